"""Where W1's time goes on the GPU: a per-step trace of the engine loop and the top kernels by device time.

    python -m benchmarks.profile_w1 [--adapters N] [--home DIR]

Prints (1) every engine step's wall time grouped by kind (pure decode by batch size, mixed prefill), (2) the
torch profiler's top operators and kernels over one W1 run, (3) the kernels of one batch-1 decode forward.
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import w1 as bench
from kiln_common.model_loader import load_state_dict, load_tokenizer, resolve_model
from kiln_common.weight_share import pack_state_dict
from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.types import AdapterRef
from kiln_infer.lora.random_adapter import write_random_adapter


def trace_steps(engine) -> list[tuple[float, float, int, int, bool]]:  # type: ignore[no-untyped-def]
    """Wrap the core's step: records (start, end, tokens, sequences, pure decode) per step."""
    core, records = engine.core, []
    original = core.step

    def step() -> int:
        t0 = time.perf_counter()
        batch_before = core.num_steps
        n = original()
        inflight = core.inflight
        seqs = len(inflight.batch) if inflight is not None else 0
        pure = inflight is not None and all(item.num_tokens == 1 for item in inflight.batch)
        if core.num_steps != batch_before:
            records.append((t0, time.perf_counter(), n, seqs, pure))
        return n

    core.step = step  # type: ignore[method-assign]
    return records


def cprofile_steps(engine, reqs, adapters, w) -> None:  # type: ignore[no-untyped-def]
    """Python-level profile of the engine thread's step() over one W1 run, by own time."""
    import cProfile
    import pstats

    core, prof = engine.core, cProfile.Profile()
    original = core.step

    def step() -> int:
        prof.enable()
        try:
            return original()
        finally:
            prof.disable()

    core.step = step  # type: ignore[method-assign]
    r = bench.run_engine(engine, w, reqs, adapters, "cprofiled")
    core.step = original  # type: ignore[method-assign]
    print(f"cProfiled run: {r.tokens_per_s:.0f} tok/s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def summarize(records: list[tuple[float, float, int, int, bool]]) -> None:
    """Step wall times by kind."""
    if not records:
        print("no steps recorded")
        return
    t_start = records[0][0]
    groups: dict[str, list[float]] = collections.defaultdict(list)
    last_mixed = 0.0
    for t0, t1, n, seqs, pure in records:
        key = f"decode batch {seqs:>3}" if pure else f"mixed ({seqs} seqs)"
        if not pure:
            last_mixed = t1 - t_start
            print(
                f"  mixed step at {1000 * (t0 - t_start):8.1f} ms: {n} tokens, {seqs} seqs, {1000 * (t1 - t0):.1f} ms"
            )
        groups["decode" if pure else "mixed"].append(t1 - t0)
        if pure:
            groups[key].append(t1 - t0)
    print(
        f"steps {len(records)}, span {1000 * (records[-1][1] - t_start):.1f} ms, last mixed step ends {1000 * last_mixed:.1f} ms"
    )
    for key in sorted(groups):
        v = groups[key]
        print(
            f"  {key:<22} n={len(v):4d} mean {1000 * sum(v) / len(v):7.3f} ms  total {1000 * sum(v):8.1f} ms"
        )
    gaps = [records[i + 1][0] - records[i][1] for i in range(len(records) - 1)]
    print(f"  loop time outside step(): {1000 * sum(gaps):.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=0)
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KILN_HOME", ".kiln")))
    parser.add_argument("--no-profiler", action="store_true")
    parser.add_argument("--no-batch-one", action="store_true", help="skip the batch-1 sections")
    parser.add_argument("--bursts", type=int, default=0, help="only: N bursts in a row on one engine")
    parser.add_argument("--batch-one-only", action="store_true", help="only the batch-1 sections")
    parser.add_argument("--cprofile", action="store_true", help="also a Python profile of the engine thread")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    w = bench.GPU if torch.cuda.is_available() else bench.CPU  # CPU: only checks the script runs
    source = resolve_model(w.model, args.home)
    tokenizer = load_tokenizer(source)
    state = load_state_dict(source, w.dtype, w.device)
    if w.device == "cuda":
        state = pack_state_dict(state, w.device).views
    gc.collect()
    vocab = min(len(tokenizer), source.config.vocab_size)
    reqs = bench.prompts(w, vocab, w.num_requests)
    if args.batch_one_only:
        batch_one(source, state, tokenizer, w, vocab)
        return 0
    adapters: list[AdapterRef | None] = [None]
    if args.adapters:
        tmp = Path(tempfile.mkdtemp())
        adapters = [
            AdapterRef(f"p/a{i}@v1", write_random_adapter(tmp / f"a{i}", source.config, w.rank, seed=i))
            for i in range(args.adapters)
        ]
    config = bench.engine_config(w, max(1, args.adapters), w.num_requests)
    engine = bench.build_engine(source, state, tokenizer, config, w, adapters)
    if args.bursts:
        run_bursts(engine, w, vocab, adapters, args.bursts)
        engine.shutdown()
        return 0
    r = bench.run_engine(engine, w, reqs, adapters, "warm-full")
    print(f"warm run: {r.tokens_per_s:.0f} tok/s")
    records = trace_steps(engine)
    # fresh prompts for every run: a repeated prompt would be served from the prefix cache
    r = bench.run_engine(engine, w, bench.prompts(w, vocab, w.num_requests, seed=1), adapters, "traced")
    print(f"traced run: {r.tokens_per_s:.0f} tok/s, TTFT {r.ttft_ms}, TPOT {r.tpot_ms}")
    summarize(records)
    profile_engine(engine, w, vocab, adapters, args)
    engine.shutdown()
    if not args.no_batch_one:
        batch_one(source, state, tokenizer, w, vocab)
    return 0


def run_bursts(
    engine: AsyncEngine, w: bench.Workload, vocab: int, adapters: list[AdapterRef | None], n: int
) -> None:
    """N bursts in a row on one engine: tokens/s, time in mixed and decode steps, GC time per burst."""
    gc_time: dict[int, float] = collections.defaultdict(
        float
    )  # seconds in cyclic-GC collections, by generation
    gc_start: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[:] = [time.perf_counter()]
        elif gc_start:
            gc_time[info["generation"]] += time.perf_counter() - gc_start[0]

    gc.callbacks.append(on_gc)
    if os.environ.get("KILN_PROFILE_GC") == "freeze-each-burst":
        print("gc: frozen before each burst")
    for i in range(n):
        gc_time.clear()
        if os.environ.get("KILN_PROFILE_GC") == "freeze-each-burst":
            gc.collect()
            gc.freeze()
        records = trace_steps(engine)
        r = bench.run_engine(engine, w, bench.prompts(w, vocab, w.num_requests, seed=10 + i), adapters, "b")
        engine.core.step = type(engine.core).step.__get__(engine.core)  # type: ignore[method-assign]
        mixed = sum(t1 - t0 for t0, t1, _n, _s, pure in records if not pure)
        decode = sum(t1 - t0 for t0, t1, _n, _s, pure in records if pure)
        print(
            f"burst {i}: {r.tokens_per_s:.0f} tok/s; mixed steps {1000 * mixed:.1f} ms, "
            f"decode steps {1000 * decode:.1f} ms ({len(records)} steps); gc ms by generation "
            f"{ {g: round(1000 * t, 1) for g, t in sorted(gc_time.items())} }, objects {len(gc.get_objects())}"
        )


def profile_engine(
    engine: AsyncEngine,
    w: bench.Workload,
    vocab: int,
    adapters: list[AdapterRef | None],
    args: argparse.Namespace,
) -> None:
    """Optional cProfile, the torch profiler over one burst, and the batch-1 eager forward's kernels."""
    if args.cprofile:
        cprofile_steps(engine, bench.prompts(w, vocab, w.num_requests, seed=3), adapters, w)
    if not args.no_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = bench.run_engine(
                engine, w, bench.prompts(w, vocab, w.num_requests, seed=2), adapters, "profiled"
            )
            torch.cuda.synchronize()
        print(f"profiled run: {r.tokens_per_s:.0f} tok/s")
        print(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
        )
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
    decoder = engine.core.runner.decoder
    if decoder is not None and not args.no_batch_one:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            for _ in range(3):
                decoder._forward(1, False)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    decoder._forward(1, False)
                torch.cuda.synchronize()
        print("batch-1 eager decode forward, 10 runs (device time per kernel):")
        print(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
        )
        print(
            f"batch-1 graph replay: {bench.graph_step_ms(engine, 1):.3f} ms; batch 256: {bench.graph_step_ms(engine, 256):.3f} ms"
        )


def batch_one(source, state, tokenizer, w, vocab) -> None:  # type: ignore[no-untyped-def]
    """Batch-1 decode: step wall times against the graph replay, with the folded GEMVs and without them."""
    from torch.profiler import ProfilerActivity, profile

    engine = bench.build_engine(source, state, tokenizer, bench.engine_config(w, 1, 1), w, [None])
    model, decoder = engine.core.model, engine.core.runner.decoder
    assert decoder is not None, "batch-1 profile needs the static decoder (CUDA)"
    strategy = model.batch_one  # the batch-1 GEMV strategy chosen at build time, or None
    for use_gemv in [True, False] if strategy is not None else [False]:
        model.batch_one, model.gemv_logits = (strategy if use_gemv else None), use_gemv
        for key in [k for k in decoder.graphs if k[0] == 1]:
            del decoder.graphs[key]  # recaptured with the path chosen above
        bench.run_engine(engine, w, bench.prompts(w, vocab, 1, seed=4), [None], "b1w")
        records = trace_steps(engine)
        r = bench.run_engine(engine, w, bench.prompts(w, vocab, 1, seed=5), [None], "b1")
        engine.core.step = type(engine.core).step.__get__(engine.core)  # type: ignore[method-assign]
        decode = [t1 - t0 for t0, t1, _n, _s, pure in records if pure]
        print(
            f"batch-1 (gemv {use_gemv}): TPOT {r.tpot_ms[0]:.3f} ms; engine step() wall mean "
            f"{1000 * sum(decode) / len(decode):.3f} ms; graph replay alone {bench.graph_step_ms(engine, 1):.3f} ms"
        )
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            bench.run_engine(engine, w, bench.prompts(w, vocab, 1, seed=6), [None], "b1p")
            torch.cuda.synchronize()
        print(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=60)
        )
    engine.shutdown()


if __name__ == "__main__":
    sys.exit(main())
