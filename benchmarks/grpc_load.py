"""Load from real gRPC clients in separate processes: bursts of Generate streams, timed on the client side.

Each client process opens one channel, builds its requests, reports ready, waits for the common start, then
runs its share of the burst with at most `concurrency` streams open at a time (asyncio, so a stream costs no
thread). Times are CLOCK_MONOTONIC, which all processes of one machine share.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc


@dataclass
class StreamTiming:
    """One request seen from its client."""

    submitted: float
    first: float = 0.0  # first token received
    last: float = 0.0  # last message received
    tokens: int = 0
    messages: int = 0
    code: str = "OK"  # gRPC status name
    details: str = ""  # the status message of a failed stream


@dataclass
class BurstResult:
    """Every stream of one burst."""

    streams: list[StreamTiming] = field(default_factory=list)

    @property
    def ok(self) -> list[StreamTiming]:
        """Streams that completed."""
        return [s for s in self.streams if s.code == "OK" and s.tokens]

    def tokens_per_s(self) -> float:
        """Generated tokens over the burst's wall time (first submission to last token)."""
        ok = self.ok
        if not ok:
            return 0.0
        return sum(s.tokens for s in ok) / (max(s.last for s in ok) - min(s.submitted for s in self.streams))

    def failures(self) -> dict[str, str]:
        """One status message per failure code (what a failed stream was told)."""
        return {s.code: s.details for s in self.streams if s.code != "OK"}

    def codes(self) -> dict[str, int]:
        """How many streams ended with each status."""
        counts: dict[str, int] = {}
        for s in self.streams:
            counts[s.code] = counts.get(s.code, 0) + 1
        return counts


async def _one(
    stub: inference_pb2_grpc.InferenceServiceStub,
    request: inference_pb2.GenerateRequest,
    metadata: list[tuple[str, str]],
    gate: asyncio.Semaphore,
    at: float = 0.0,  # time.monotonic() before which the stream is not opened (a fixed request rate)
) -> StreamTiming:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    async with gate:
        timing = StreamTiming(time.monotonic())
        try:
            async for response in stub.Generate(request, metadata=metadata):
                now = time.monotonic()
                if response.token_ids and not timing.tokens:
                    timing.first = now
                timing.tokens += len(response.token_ids)
                timing.messages += 1
                timing.last = now
        except grpc.aio.AioRpcError as exc:
            timing.code, timing.details = exc.code().name, (exc.details() or "")[:200]
        return timing


async def _client(
    target: str,
    requests: list[dict[str, Any]],
    concurrency: int,
    ready: Any,
    start: Event,
    api_key: str,
    offsets: list[float],
) -> list[StreamTiming]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await channel.channel_ready()
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        built = [inference_pb2.GenerateRequest(**r) for r in requests]
        metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        ready.put(None)
        while not start.is_set():
            await asyncio.sleep(0.001)
        gate = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()
        ats = [t0 + o for o in offsets] if offsets else [0.0] * len(built)
        return list(
            await asyncio.gather(
                *(_one(stub, r, metadata, gate, at) for r, at in zip(built, ats, strict=True))
            )
        )


def _client_main(
    target: str,
    requests: list[dict[str, Any]],
    concurrency: int,
    ready: Any,
    start: Event,
    out: Any,
    api_key: str,
    offsets: list[float],
) -> None:
    out.put(asyncio.run(_client(target, requests, concurrency, ready, start, api_key, offsets)))


def generate_request(
    prompt_ids: list[int], max_tokens: int, adapter: str = "", ignore_eos: bool = True
) -> dict[str, Any]:
    """A greedy GenerateRequest on token ids, as a dict that pickles across processes."""
    return {
        "adapter": adapter,
        "prompt_token_ids": prompt_ids,
        "sampling": inference_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos
        ),
    }


def burst(
    target: str,
    requests: list[dict[str, Any]],
    concurrency: int,
    processes: int = 4,
    api_key: str = "",
    rate: float = 0.0,
    on_start: Callable[[], None] | None = None,
) -> BurstResult:
    """Run `requests` from `processes` client processes, at most `concurrency` streams open in all.

    With `rate` > 0 request i is opened i / rate seconds after the start (open loop: a fixed request rate).
    `on_start` is called the moment every client is connected and told to go (client processes take seconds
    to start, so whatever must overlap the load starts there, not before the call).
    """
    ctx = multiprocessing.get_context("spawn")
    ready, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [requests[i::processes] for i in range(processes)]
    offsets = [
        [(k * processes + i) / rate for k in range(len(shares[i]))] if rate > 0 else []
        for i in range(processes)
    ]
    per_process = max(1, concurrency // processes)
    procs = [
        ctx.Process(
            target=_client_main, args=(target, share, per_process, ready, start, out, api_key, offsets[i])
        )
        for i, share in enumerate(shares)
        if share
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    start.set()
    if on_start is not None:
        on_start()
    result = BurstResult()
    for _ in procs:
        result.streams += out.get(timeout=600)
    for p in procs:
        p.join(30)
    return result
