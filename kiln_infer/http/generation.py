"""The gRPC Generate calls behind one OpenAI request: run whole, or merged into one event stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_infer.http.errors import ApiError, from_grpc
from kiln_infer.http.responses import ResponseShape
from kiln_infer.http.translate import ChoiceState, SubRequest, absorb, finish_reason_of
from kiln_infer.metrics import RequestMetrics

DONE = b"data: [DONE]\n\n"
Metadata = Sequence[tuple[str, str]]


def sse(body: object) -> bytes:
    """One server-sent event carrying a JSON body."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class StreamEndedEarlyError(grpc.RpcError):
    """The backend closed a stream without its final response (treated as the backend going away)."""

    def code(self) -> grpc.StatusCode:
        """Reported as UNAVAILABLE."""
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        """What happened."""
        return "kiln-infer ended the stream without a finish reason"


@dataclass
class CallTimer:
    """Times one call for the metrics: first token, gaps between tokens, total."""

    metrics: RequestMetrics | None
    start: float = field(default_factory=time.monotonic)
    first: float | None = None
    last: float = 0.0
    gaps: list[float] = field(default_factory=list)

    def seen(self, response: inference_pb2.GenerateResponse) -> None:
        """Note a response's arrival; its tokens share the gap since the previous one."""
        now, n = time.monotonic(), len(response.token_ids)
        if n and self.first is None:
            self.first = now
            self.gaps.extend([0.0] * (n - 1))
        elif n:
            self.gaps.extend([(now - self.last) / n] * n)
        if n:
            self.last = now
        if self.metrics is not None and response.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
            self.metrics.finished(
                response.adapter_version,
                response.usage.prompt_tokens,
                response.usage.completion_tokens,
                None if self.first is None else self.first - self.start,
                now - self.start,
                None,  # the queue time is only known inside kiln-infer
                self.gaps,
                finish_reason_of(response) or "stop",
            )


async def _next(call: grpc.aio.UnaryStreamCall) -> inference_pb2.GenerateResponse | None:
    message = await call.read()
    return None if message is grpc.aio.EOF else message  # type: ignore[return-value]


class Generation:
    """The calls of one request, started together; errors before the first response become HTTP errors."""

    def __init__(self, subs: list[SubRequest], metrics: RequestMetrics | None) -> None:
        self.subs = subs
        self.metrics = metrics
        self.calls: list[grpc.aio.UnaryStreamCall] = []
        self.firsts: list[inference_pb2.GenerateResponse | None] = []
        self.states = {s.index: ChoiceState() for s in subs}
        self.counts_prompt = {s.index for s in subs if s.counts_prompt}

    async def start(self, stub: inference_pb2_grpc.InferenceServiceStub, metadata: Metadata) -> None:
        """Start every call and wait for each one's first response (validation errors arrive there)."""
        self.calls = [stub.Generate(s.request, metadata=tuple(metadata)) for s in self.subs]
        try:
            self.firsts = list(await asyncio.gather(*(_next(c) for c in self.calls)))
        except grpc.RpcError as err:
            self.cancel()
            raise from_grpc(err) from None
        if any(first is None for first in self.firsts):
            self.cancel()
            raise from_grpc(StreamEndedEarlyError())

    @property
    def request_id(self) -> str:
        """The first call's request id (the id feedback joins on)."""
        first = self.firsts[0]
        return first.request_id if first is not None else ""

    def cancel(self) -> None:
        """Cancel every call still running (the engine frees their resources at once)."""
        for call in self.calls:
            call.cancel()

    async def _drain(self, i: int) -> None:
        sub, call, timer = self.subs[i], self.calls[i], CallTimer(self.metrics)
        message = self.firsts[i]
        while message is not None:
            timer.seen(message)
            absorb(self.states[sub.index], message)
            message = await _next(call)
        if self.states[sub.index].finish_reason is None:
            raise StreamEndedEarlyError()

    async def whole(self) -> dict[int, ChoiceState]:
        """Run every call to its end; a failure cancels the others and becomes an ApiError."""
        try:
            await asyncio.gather(*(self._drain(i) for i in range(len(self.subs))))
        except grpc.RpcError as err:
            raise from_grpc(err) from None
        finally:
            self.cancel()
        return self.states

    async def _pump(self, i: int, queue: asyncio.Queue[tuple[int, object]]) -> None:
        call, timer = self.calls[i], CallTimer(self.metrics)
        message = self.firsts[i]
        try:
            while message is not None:
                timer.seen(message)
                await queue.put((i, message))
                if message.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    break
                message = await _next(call)
            else:
                raise StreamEndedEarlyError()
            await queue.put((i, None))
        except grpc.RpcError as err:
            await queue.put((i, err))

    async def stream(self, shape: ResponseShape, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE: a chunk per response, usage (if asked), then [DONE]; an error arrives as a last event."""
        queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self.subs))]
        offsets = {s.index: 0 for s in self.subs}
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, grpc.RpcError):
                    yield from_grpc(item).sse_event()
                    yield DONE
                    return
                assert isinstance(item, inference_pb2.GenerateResponse)
                index = self.subs[i].index
                state = self.states[index]
                first = not state.text
                absorb(state, item)
                yield sse(
                    shape.chunk(index, item, finish_reason_of(item), first, offsets[index], include_usage)
                )
                offsets[index] += len(item.text)
            if include_usage:
                yield sse(shape.usage_chunk(self.states, self.counts_prompt))
            yield DONE
        finally:
            for task in tasks:
                task.cancel()
            self.cancel()


__all__ = ["ApiError", "DONE", "Generation", "sse"]
