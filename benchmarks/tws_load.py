"""The train-while-serving benchmark's load: streaming clients, their samples, and the windows they are judged in.

The clients run in processes of their own (`LoadGroup`, asyncio streams), so the times they record are the
server's, not the benchmark's: 32 streams of a few hundred tokens a second each are thousands of messages a
second, and read by threads of one Python process (`Load`, the way before session 18) they queue behind each
other for the interpreter, which adds to every TTFT they report.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any, Protocol

import grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc


@dataclass
class Sample:
    """One streamed request: when it started, its time to first token, its time per output token."""

    start: float
    ttft: float
    tpot: float
    end: float = 0.0  # time.monotonic() of its last token


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50, p99 (nan when empty)."""
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return pick(0.5), pick(0.99)


def story_request(max_tokens: int, seed: int, i: int) -> inference_pb2.GenerateRequest:
    """A stream's `i`-th request: a short chat prompt on the base model, `max_tokens` new tokens (EOS ignored)."""
    return inference_pb2.GenerateRequest(
        messages=[inference_pb2.ChatMessage(role="user", content=f"Tell me a story about {i}.")],
        sampling=inference_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.8, seed=seed * 100_000 + i, ignore_eos=True
        ),
    )


class Load(threading.Thread):
    """A client streaming back-to-back generations on the base model from a thread of this process, recording
    TTFT and TPOT."""

    def __init__(self, address: str, max_tokens: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
        self.max_tokens, self.seed = max_tokens, seed
        self.stop = threading.Event()
        self.samples: list[Sample] = []
        self.starts: list[float] = []  # time.monotonic() of every request sent, finished or not
        self.failures = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            req = story_request(self.max_tokens, self.seed, i)
            t0 = time.monotonic()
            self.starts.append(t0)
            first, n = 0.0, 0
            try:
                for r in self.stub.Generate(req, timeout=300):
                    if r.token_ids and not first:
                        first = time.monotonic()
                    n += len(r.token_ids)
            except grpc.RpcError:
                self.failures += 1
                continue
            end = time.monotonic()
            if first and n > 1:
                self.samples.append(Sample(t0, first - t0, (end - first) / (n - 1), end))

    def halt(self) -> None:
        """Send no more requests (the one in flight finishes)."""
        self.stop.set()


@dataclass
class StreamRecord:
    """What one stream of a `LoadGroup` has done so far, as `Load` keeps it."""

    samples: list[Sample] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    failures: int = 0


async def _stream(address: str, max_tokens: int, seed: int, events: Queue[Any], stop: Event) -> None:
    """One client in a load process: back-to-back requests on a channel of its own until `stop`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.monotonic()
            events.put(("start", seed, t0))
            first, n = 0.0, 0
            try:
                async for r in stub.Generate(story_request(max_tokens, seed, i), timeout=300):
                    if r.token_ids and not first:
                        first = time.monotonic()
                    n += len(r.token_ids)
            except grpc.aio.AioRpcError:
                events.put(("failed", seed, 0.0))
                await asyncio.sleep(0.05)  # a server that is down is not asked in a tight loop
                continue
            end = time.monotonic()
            if first and n > 1:
                events.put(("sample", seed, (t0, first - t0, (end - first) / (n - 1), end)))


def _load_main(address: str, max_tokens: int, seeds: list[int], events: Queue[Any], stop: Event) -> None:
    """A load process: its streams, then a last event saying it is done."""

    async def run() -> None:
        await asyncio.gather(*(_stream(address, max_tokens, seed, events, stop) for seed in seeds))

    try:
        asyncio.run(run())
    finally:
        events.put(("exit", -1, 0.0))


class LoadGroup:
    """Streams in a client process of their own; `streams` fill in as its events arrive (a reader thread)."""

    def __init__(self, address: str, max_tokens: int, seeds: list[int]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._events: Queue[Any] = ctx.Queue()
        self._stop = ctx.Event()
        self._records = {seed: StreamRecord() for seed in seeds}
        self.streams = list(self._records.values())
        self._proc = ctx.Process(
            target=_load_main, args=(address, max_tokens, seeds, self._events, self._stop), daemon=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        self._proc.start()
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                kind, seed, value = self._events.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():  # died without its last event
                    return
                continue
            if kind == "exit":
                return
            record = self._records[seed]
            if kind == "start":
                record.starts.append(value)
            elif kind == "failed":
                record.failures += 1
            else:
                record.samples.append(Sample(*value))

    def halt(self) -> None:
        """Send no more requests (those in flight finish)."""
        self._stop.set()

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._reader.join(timeout)
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()


class Runner(Protocol):
    """A `Load` thread or a `LoadGroup` process."""

    def start(self) -> None: ...
    def halt(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


Stream = Load | StreamRecord  # what the windows read: samples, starts, failures


def start_load(
    address: str, max_tokens: int, streams: int, processes: int
) -> tuple[list[Runner], list[Stream]]:
    """`streams` clients spread over `processes` client processes (0: threads of this one, the way before
    session 18), started; (what to halt and join, each stream's record)."""
    runners: list[Runner]
    records: list[Stream]
    if processes <= 0:
        threads = [Load(address, max_tokens, i) for i in range(streams)]
        runners, records = list(threads), list(threads)
    else:
        spread = [list(range(p, streams, processes)) for p in range(processes)]
        groups = [LoadGroup(address, max_tokens, seeds) for seeds in spread if seeds]
        runners, records = list(groups), [r for g in groups for r in g.streams]
    for runner in runners:
        runner.start()
    return runners, records


def latency(samples: list[Sample], start: float, end: float) -> dict[str, float]:
    """TTFT and TPOT p50/p99 in ms of the requests that started in [start, end)."""
    window = [s for s in samples if start <= s.start < end]
    ttft, tpot = percentiles([s.ttft for s in window]), percentiles([s.tpot for s in window])
    return {
        "requests": float(len(window)),
        "ttft_p50_ms": ttft[0] * 1e3,
        "ttft_p99_ms": ttft[1] * 1e3,
        "tpot_p50_ms": tpot[0] * 1e3,
        "tpot_p99_ms": tpot[1] * 1e3,
    }


def slowest(
    samples: list[Sample], start: float, end: float, origin: float, n: int = 8
) -> list[dict[str, float]]:
    """The `n` requests with the highest TPOT that started in [start, end): when each ran, in seconds from
    `origin`, and its TTFT and TPOT in ms (which part of a round a p99 overlapped)."""
    window = sorted((s for s in samples if start <= s.start < end), key=lambda s: -s.tpot)[:n]
    return [
        {
            "start_s": round(s.start - origin, 3),
            "end_s": round(s.end - origin, 3),
            "ttft_ms": round(s.ttft * 1e3, 2),
            "tpot_ms": round(s.tpot * 1e3, 3),
        }
        for s in window
    ]


def hold_window(
    loads: list[Stream], start: float, length_s: float, timeout_s: float, finished: bool
) -> float:
    """Sleep until `start + length_s`, and on past it until some request has started in the window (and, with
    `finished`, also finished), within `timeout_s`; the window's end. On a busy CPU one request can outlast
    a short window, which would then hold no request at all."""
    deadline = time.monotonic() + timeout_s

    def has_one() -> bool:
        if not loads:  # no serving load (--streams 0): nothing to wait for
            return True
        if finished:
            return any(s.start >= start for load in loads for s in load.samples)
        return any(t >= start for load in loads for t in load.starts)

    time.sleep(max(0.0, start + length_s - time.monotonic()))
    while not has_one() and time.monotonic() < deadline:
        time.sleep(0.05)
    return time.monotonic()


def steady(loads: list[Stream], at_least_s: float, timeout_s: float) -> float:
    """When the load is steady: every stream has had a request answered, and `at_least_s` has passed."""
    time.sleep(at_least_s)
    deadline = time.monotonic() + timeout_s
    while not all(load.samples or load.failures for load in loads) and time.monotonic() < deadline:
        time.sleep(0.05)
    return time.monotonic()
