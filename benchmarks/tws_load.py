"""The train-while-serving benchmark's load: streaming clients, their samples, and the windows they are judged in."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

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


class Load(threading.Thread):
    """A client streaming back-to-back generations on the base model, recording TTFT and TPOT."""

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
            req = inference_pb2.GenerateRequest(
                messages=[inference_pb2.ChatMessage(role="user", content=f"Tell me a story about {i}.")],
                sampling=inference_pb2.SamplingParams(
                    max_tokens=self.max_tokens, temperature=0.8, seed=self.seed * 100_000 + i, ignore_eos=True
                ),
            )
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


def hold_window(loads: list[Load], start: float, length_s: float, timeout_s: float, finished: bool) -> float:
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


def steady(loads: list[Load], at_least_s: float, timeout_s: float) -> float:
    """When the load is steady: every stream has had a request answered, and `at_least_s` has passed."""
    time.sleep(at_least_s)
    deadline = time.monotonic() + timeout_s
    while not all(load.samples or load.failures for load in loads) and time.monotonic() < deadline:
        time.sleep(0.05)
    return time.monotonic()
