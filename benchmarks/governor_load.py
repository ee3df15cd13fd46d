"""The serving side of the governor benchmark: W1's load on a model, its capacity, and what a window measured."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from benchmarks import w1
from benchmarks.grpc_load import BurstResult, burst, generate_request
from benchmarks.server_bench import CLIENT_PROCESSES

log = logging.getLogger("benchmarks.governor_bench")


def workload(spec: str, cpu: bool) -> w1.Workload:
    """W1's shape for the model (256 streams, 256-token prompts, 128 new tokens), or the CPU variant."""
    if cpu:
        return w1.CPU
    return w1.Workload(spec, torch.bfloat16, "cuda", 256, 256, 128, 64, 64, (4,))


def requests(w: w1.Workload, vocab: int, n: int, seed: int) -> list[dict[str, Any]]:
    """n W1 requests on the base model (random prompts, ignore_eos: every request decodes all its tokens)."""
    return [generate_request(p, w.new_tokens) for p in w1.prompts(w, vocab, n, seed=seed)]


def latency(result: BurstResult, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
    """TTFT / TPOT p50, p99 (ms) of the streams submitted in [since, until]; failures of all."""
    ok = [s for s in result.ok if since <= s.submitted <= until]
    ttft = [s.first - s.submitted for s in ok]
    tpot = [(s.last - s.first) / (s.tokens - 1) for s in ok if s.tokens > 1]
    return {
        "requests": len(ok),
        "failed": len(result.streams) - len(result.ok),
        "codes": result.codes(),
        "ttft_ms": list(w1.percentiles(ttft)) if ttft else [0.0, 0.0],
        "tpot_ms": list(w1.percentiles(tpot)) if tpot else [0.0, 0.0],
    }


def steps_per_s(report: dict[str, Any], since: float | None = None, until: float | None = None) -> float:
    """Optimizer steps per second, over the whole round or the steps that ended inside [since, until]."""
    ends = report["step_ends"]
    a = report["started"] if since is None else max(since, report["started"])
    b = ends[-1] if until is None else min(until, ends[-1])
    inside = [t for t in ends if a < t <= b]
    return len(inside) / (b - a) if b > a else 0.0


def capacity(target: str, w: w1.Workload, vocab: int, probe_s: float) -> dict[str, Any]:
    """The highest request rate serving sustains open loop (the way the load arrives), and how it was found.

    A closed-loop burst with all W1 streams open starts every request together and overstates what steady
    arrivals get (each step then mixes prefill with decoding), so it only sets the first rate to try: open-loop
    probes of `probe_s` seconds step down from 0.8 of it until one is served with no failure and TTFT p99
    under a second.
    """
    result = burst(target, requests(w, vocab, 2 * w.num_requests, 11), w.num_requests, CLIENT_PROCESSES)
    wall = max(s.last for s in result.ok) - min(s.submitted for s in result.streams)
    closed = len(result.ok) / wall
    probes = []
    rate = 0.0
    for fraction in (0.8, 0.6, 0.45, 0.35, 0.25, 0.15):
        rate = closed * fraction
        n = max(16, int(rate * probe_s))
        stats = latency(burst(target, requests(w, vocab, n, 13), n, CLIENT_PROCESSES, rate=rate))
        probes.append({"rate_rps": rate, **stats})
        log.info("capacity probe at %.1f requests/s: %s", rate, json.dumps(stats))
        if stats["failed"] == 0 and stats["ttft_ms"][1] < 1000.0:
            break
    log.info("capacity: %.1f requests/s open loop (closed-loop burst: %.1f)", rate, closed)
    return {"rps": rate, "closed_loop_rps": closed, "probes": probes}
