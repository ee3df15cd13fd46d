"""The API process's side of the engine-core link: submit, abort and call over a socket, outputs per step.

The engine core runs in a process of its own (kiln_infer.engine_process). This client speaks to it over one
Unix socket: requests and aborts go out as they come; outputs come back as one message per engine step
holding every sequence's increment. A reader thread unpickles those messages and hands each batch to the
asyncio loop in one call, where every stream's pending outputs are appended; a stream read slower than
tokens arrive finds several increments waiting and sends them as one response.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from typing import Any

from kiln_infer.engine.types import (
    AdapterRef,
    EngineOverloadedError,
    EngineRequest,
    FinishReason,
    RequestOutput,
    TokenLogprob,
)

log = logging.getLogger(__name__)

# Wire form of one RequestOutput: a tuple pickles several times faster than a dataclass.
WireOutput = tuple[
    str, list[int], str, bool, "str | None", int, int, list[tuple[TokenLogprob, list[TokenLogprob]]], float
]


def to_wire(out: RequestOutput) -> WireOutput:
    """RequestOutput -> its wire tuple."""
    reason = out.finish_reason.value if out.finish_reason is not None else None
    return (
        out.request_id,
        out.token_ids,
        out.text,
        out.finished,
        reason,
        out.prompt_tokens,
        out.completion_tokens,
        out.logprobs,
        out.emitted_at,
    )


def from_wire(w: WireOutput) -> RequestOutput:
    """Wire tuple -> RequestOutput."""
    reason = FinishReason(w[4]) if w[4] is not None else None
    return RequestOutput(w[0], w[1], w[2], w[3], reason, w[5], w[6], w[7], w[8])


class EngineUnavailableError(RuntimeError):
    """The engine-core process is gone (crashed or stopped); maps to UNAVAILABLE."""


@dataclass(frozen=True)
class EngineInfo:
    """What the engine core reports once connected: its sizes and where it runs."""

    max_model_len: int
    max_num_seqs: int
    max_waiting: int
    max_num_batched_tokens: int
    max_lora_slots: int
    max_lora_rank: int
    kv_blocks: int
    block_size: int
    device: str
    dtype: str


def merge_wire(ready: list[WireOutput]) -> RequestOutput:
    """Every increment that arrived for one request since it was last read, as one RequestOutput."""
    last = ready[-1]
    if len(ready) == 1:
        return from_wire(last)
    tokens: list[int] = []
    logprobs: list[tuple[TokenLogprob, list[TokenLogprob]]] = []
    for w in ready:
        tokens += w[1]
        if w[7]:
            logprobs += w[7]
    reason = FinishReason(last[4]) if last[4] is not None else None
    text = "".join(w[2] for w in ready)
    return RequestOutput(last[0], tokens, text, last[3], reason, last[5], last[6], logprobs, ready[0][8])


class OutputStream:
    """One request's outputs on the asyncio loop; `outputs()` yields what is ready at each wake-up, merged.

    The engine link appends raw wire tuples (cheap: once per request per engine step); the merged output is
    built once per wake-up of the reader, so a reader that falls behind does less work per token, not more.
    """

    def __init__(self) -> None:
        self._ready: list[WireOutput] = []
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self.done = False

    def push(self, wire: WireOutput) -> None:
        """Called on the loop: add an increment."""
        self._ready.append(wire)
        self._wake.set()

    def fail(self, exc: BaseException) -> None:
        """Called on the loop: end the stream with an error."""
        self._error = exc
        self._wake.set()

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The increments ready at each wake-up, merged into one; the last one is finished."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._ready:
                ready, self._ready = self._ready, []
                out = merge_wire(ready)
                yield out
                if out.finished:
                    self.done = True
                    return
            if self._error is not None:
                self.done = True
                raise self._error


class EngineClient:
    """The engine as the API process sees it: async submit, abort; thread-safe preload and counters."""

    def __init__(self, address: str, authkey: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self._conn: Connection = Client(address, family="AF_UNIX", authkey=authkey)
        kind, info = pickle.loads(self._conn.recv_bytes())
        if kind != "ready":
            raise RuntimeError(f"engine core answered {kind!r} instead of ready")
        self.info: EngineInfo = info
        self._loop = loop
        self._send_lock = threading.Lock()
        self._streams: dict[str, OutputStream] = {}
        self._calls: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._call_ids = itertools.count()
        self._unfinished = 0  # touched only on the loop
        self._unfinished_seen = 0  # a copy readable from any thread
        self.alive = True
        self._closing = False
        self.on_lost: Callable[[], None] = lambda: None
        self._reader = threading.Thread(target=self._read, name="kiln-engine-link", daemon=True)
        self._reader.start()

    # -- called on the asyncio loop ---------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> OutputStream:
        """Queue a request in the engine core; raises EngineOverloadedError when the engine is full."""
        if not self.alive:
            raise EngineUnavailableError("the engine core is not running")
        if not request.prompt_token_ids:
            raise ValueError("prompt_token_ids is empty")
        capacity = self.info.max_num_seqs + self.info.max_waiting
        if self._unfinished >= capacity:
            raise EngineOverloadedError(f"{self._unfinished} requests in flight (limit {capacity})")
        stream = OutputStream()
        self._streams[request.request_id] = stream
        self._unfinished += 1
        self._unfinished_seen = self._unfinished
        self._send(("add", request))
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request; the engine frees its sequence on its next step."""
        if request_id in self._streams and self.alive:
            self._send(("abort", request_id))

    # -- callable from any thread -----------------------------------------------------------------------

    def preload_adapter(self, adapter: AdapterRef, timeout_s: float = 120.0) -> None:
        """Load an adapter into the engine core's host cache (raises what the load raised)."""
        self._call("preload", adapter, timeout_s=timeout_s)

    def stats(self) -> dict[str, float]:
        """The engine core's counters: running, waiting, KV usage."""
        result: dict[str, float] = self._call("stats", timeout_s=10.0)
        return result

    def num_unfinished(self) -> int:
        """Requests this process submitted that have not finished."""
        return self._unfinished_seen

    def close(self) -> None:
        """Disconnect (the engine core aborts whatever this process left running)."""
        self._closing = True
        self.alive = False
        try:
            self._conn.close()
        except OSError:
            pass

    # -- internals --------------------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            raise EngineUnavailableError(f"the engine core is not reachable: {exc}") from exc

    def _call(self, method: str, *args: Any, timeout_s: float) -> Any:
        call_id = next(self._call_ids)
        done = threading.Event()
        box: list[Any] = []
        self._calls[call_id] = (done, box)
        try:
            self._send(("call", call_id, method, args))
            if not done.wait(timeout_s):
                raise TimeoutError(f"engine core did not answer {method} within {timeout_s:.0f}s")
        finally:
            self._calls.pop(call_id, None)
        result, error = box
        if error is not None:
            raise error
        return result

    def _read(self) -> None:
        """Reader thread: one message per engine step, handed to the loop in one call."""
        try:
            while True:
                message = pickle.loads(self._conn.recv_bytes())
                if message[0] == "reply":
                    _, call_id, result, error = message
                    waiter = self._calls.get(call_id)
                    if waiter is not None:
                        waiter[1][:] = [result, error]
                        waiter[0].set()
                else:
                    self._loop.call_soon_threadsafe(self._deliver, message)
        except (EOFError, OSError) as exc:
            if self._closing:
                return
            log.error("engine core link lost: %s", exc or "connection closed")
        except RuntimeError:  # the loop closed under us: the process is stopping
            return
        self.alive = False
        for done, box in list(self._calls.values()):
            box[:] = [None, EngineUnavailableError("the engine core stopped")]
            done.set()
        try:
            self._loop.call_soon_threadsafe(self._lost)
        except RuntimeError:
            pass

    def _deliver(self, message: tuple[Any, ...]) -> None:
        """On the loop: route a step's outputs (or a failed admission) to their streams."""
        if message[0] == "out":
            streams = self._streams
            for wire in message[1]:
                stream = streams.get(wire[0])
                if stream is not None:
                    stream.push(wire)
                    if wire[3]:
                        self._finish(wire[0])
        elif message[0] == "fail":
            _, request_id, error = message
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.fail(error)
                self._finish(request_id)

    def _finish(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._unfinished -= 1
            self._unfinished_seen = self._unfinished

    def _lost(self) -> None:
        """On the loop: the engine core is gone; every open stream ends UNAVAILABLE."""
        error = EngineUnavailableError("the engine core stopped; retry later")
        for request_id, stream in list(self._streams.items()):
            stream.fail(error)
            self._finish(request_id)
        self.on_lost()
