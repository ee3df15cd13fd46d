"""Where a short request's time to first token goes under steady load, with the engine in-process (no gRPC).

`kiln bench --train-while-serving` sees a TTFT p50 of 40-160 ms from 32 streams of short chat prompts on the
1B shape, and kiln-infer's access log most of it too. This probe runs the same shape of load on the engine
alone: `--streams` closed-loop clients (threads), each asking `--new-tokens` tokens (EOS ignored) for a
prompt of a shared 30-token prefix (a chat template's system turn) and a few tokens of its own, either all
started at once (they then finish, and ask again, in waves) or spread over the first half second. It
records every engine step's wall time with its rows and tokens, and reports TTFT/TPOT p50/p99 from the
engine's own output times beside the steps that carried a prefill and those that only decoded.

    python -m benchmarks.ttft_probe --home "$KILN_HOME" --json out.json     # on the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import w1
from benchmarks.tws_load import percentiles
from kiln_infer.engine import engine_core
from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.types import EngineRequest, SamplingParams

log = logging.getLogger("benchmarks.ttft_probe")
PREFIX_TOKENS, OWN_TOKENS = 30, 8


Step = Callable[[], int]


@contextlib.contextmanager
def _around_steps(engine: AsyncEngine, wrap: Callable[[Step], Step]) -> Iterator[None]:
    """The engine thread runs `wrap(step)` for each of its steps while inside; its own step afterwards."""
    core = engine.core
    step: Step = core.step
    core.step = wrap(step)  # type: ignore[method-assign]
    try:
        yield
    finally:
        core.step = step  # type: ignore[method-assign]


def _timed(engine: AsyncEngine, steps: list[tuple[float, float, int, int]]) -> Callable[[Step], Step]:
    """A wrapper recording each engine step as (start, seconds, rows, tokens)."""

    def wrap(step: Step) -> Step:
        def timed() -> int:
            t0 = time.monotonic()
            tokens = step()
            inflight = engine.core.inflight
            steps.append((t0, time.monotonic() - t0, len(inflight.batch) if inflight else 0, tokens))
            return tokens

        return timed

    return wrap


def _client(
    engine: AsyncEngine,
    index: int,
    prefix: list[int],
    new_tokens: int,
    delay: float,
    until: float,
    out: list[tuple[float, float, float]],
) -> None:
    """Back-to-back requests until `until`; appends (submitted, ttft, tpot) per finished request."""
    rng = random.Random(index)
    time.sleep(delay)
    i = 0
    while time.monotonic() < until:
        i += 1
        prompt = prefix + [rng.randrange(1000, 30000) for _ in range(OWN_TOKENS)]
        params = SamplingParams(
            max_tokens=new_tokens, temperature=0.8, seed=index * 100_000 + i, ignore_eos=True
        )
        t0 = time.monotonic()
        outs = list(engine.submit(EngineRequest(f"c{index}-{i}", prompt, params, None)))
        first = next(o.emitted_at for o in outs if o.token_ids)
        n = sum(len(o.token_ids) for o in outs)
        out.append((t0, first - t0, (outs[-1].emitted_at - first) / max(1, n - 1)))


def _pct(values: list[float]) -> dict[str, float]:
    """Count, p50, p99 and mean in ms of durations in seconds."""
    if not values:
        return {"n": 0}
    p50, p99 = percentiles(values)
    return {
        "n": len(values),
        "p50_ms": 1e3 * p50,
        "p99_ms": 1e3 * p99,
        "mean_ms": 1e3 * sum(values) / len(values),
    }


def scenario(
    engine: AsyncEngine, streams: int, new_tokens: int, seconds: float, spread_s: float
) -> dict[str, Any]:
    """One load: TTFT/TPOT after the first second, and the steps of the same span by kind."""
    prefix = [random.Random(7).randrange(1000, 30000) for _ in range(PREFIX_TOKENS)]
    steps: list[tuple[float, float, int, int]] = []
    results: list[tuple[float, float, float]] = []
    start = time.monotonic()
    until = start + seconds
    threads = [
        threading.Thread(
            target=_client,
            args=(engine, i, prefix, new_tokens, random.Random(i).uniform(0, spread_s), until, results),
        )
        for i in range(streams)
    ]
    with _around_steps(engine, _timed(engine, steps)):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    settled = start + 1.0
    mine = [r for r in results if r[0] >= settled]
    window = [s for s in steps if s[0] >= settled]
    decode = [s[1] for s in window if s[3] == s[2]]  # one token a row
    mixed = [s[1] for s in window if s[3] > s[2]]
    span = max(1e-9, (window[-1][0] + window[-1][1] - window[0][0]) if window else 1e-9)
    return {
        "streams": streams,
        "spread_s": spread_s,
        "ttft": _pct([r[1] for r in mine]),
        "tpot": _pct([r[2] for r in mine]),
        "decode_steps": _pct(decode),
        "prefill_steps": _pct(mixed),
        "prefill_tokens_per_step": sum(s[3] - s[2] for s in window if s[3] > s[2]) / max(1, len(mixed)),
        "engine_busy_share": sum(s[1] for s in window) / span,
    }


def _cprofile(engine: AsyncEngine, args: argparse.Namespace) -> None:
    """One more waves run with 1.5 s of its engine steps under cProfile (on the engine thread): where the
    host time of a step goes, blocking calls included."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    begin = time.monotonic() + 1.0

    def wrap(step: Step) -> Step:
        def profiled() -> int:
            if not begin <= time.monotonic() < begin + 1.5:
                return step()
            prof.enable()
            try:
                return step()
            finally:
                prof.disable()

        return profiled

    with _around_steps(engine, wrap):
        scenario(engine, args.streams, args.new_tokens, 4.0, 0.0)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
    args.cprofile.write_text(text.getvalue())


def _profile(engine: AsyncEngine, args: argparse.Namespace) -> None:
    """One more waves run with its engine steps under torch.profiler (entered and left on the engine
    thread, which the profiler follows): the ops by host time and by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    state = {"steps": 0, "on": False}
    begin = time.monotonic() + 1.0  # past the first wave

    def wrap(step: Step) -> Step:
        def profiled() -> int:
            if not state["on"] and time.monotonic() >= begin and state["steps"] == 0:
                prof.__enter__()
                state["on"] = True
            tokens = step()
            if state["on"]:
                state["steps"] += 1
                if time.monotonic() >= begin + 1.5:  # 1.5 s of steps (the run goes on to 4 s)
                    prof.__exit__(None, None, None)
                    state["on"] = False
            return tokens

        return profiled

    with _around_steps(engine, wrap):
        scenario(engine, args.streams, args.new_tokens, 4.0, 0.0)
    if state["on"]:
        return
    table = prof.key_averages()
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    args.profile.write_text(
        f"{state['steps']} engine steps\n"
        + table.table(sort_by="self_cpu_time_total", row_limit=40)
        + "\n\n"
        + table.table(sort_by=device_key, row_limit=30)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ttft_probe", description=__doc__)
    parser.add_argument("--model", default="dummy:llama-3.2-1b")
    parser.add_argument("--home", type=Path, default=Path(".kiln"))
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cprofile", type=Path, help="also cProfile a waves run's engine steps, stats here")
    parser.add_argument("--profile", type=Path, help="also profile a waves run (torch.profiler), tables here")
    parser.add_argument(
        "--eager-prefill", action="store_true", help="steps with prefill chunks run eagerly (the old way)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    if cuda:  # W1's shape for the warm-up burst (build_engine runs one)
        w = w1.Workload(args.model, torch.bfloat16, "cuda", 256, 256, 128, 64, 64, (1,))
    else:  # a smoke run
        w = w1.Workload(args.model, torch.float32, "cpu", 8, 64, 16, 8, 8, (1,))
    source, tokenizer, state = w1.load_model(w, args.home)
    config = w1.engine_config(w, 1, w.num_requests)
    if args.eager_prefill:
        config = dataclasses.replace(config, cuda_graph_token_sizes=())
    engine = w1.build_engine(source, state, tokenizer, config, w, [None])
    engine_core.SLOW_STEP_S = 0.010  # every step over 10 ms logs where its time went
    out = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "prefill_steps": "eager" if args.eager_prefill else "graphs",
        "scenarios": [],
    }
    try:
        for spread in (0.0, 0.5, 0.0):  # waves, spread, waves again (the first pays new shapes' costs)
            result = scenario(engine, args.streams, args.new_tokens, args.seconds, spread)
            log.info("%s", result)
            out["scenarios"].append(result)
        if args.cprofile:
            _cprofile(engine, args)
        if args.profile:
            _profile(engine, args)
    finally:
        w1.free(engine)
    text = json.dumps(out, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
