"""The engine's first adapter requests, made at start rather than in the middle of serving.

On the H200 the first prefill through an adapter stalled the whole engine for 2.5 s under steady load
(a training round's gate asking its candidate; docs/benchmarks.md, session 7). The likely cause is Triton
compiling the LoRA shrink/expand kernels for prefill shapes at first use (the decode graphs compile only the
decode ones). `warm_lora` makes that first use happen before kiln-infer reports SERVING: prompts of a few
lengths through a random adapter and one without, two tokens each. The adapter's host copy stays in the cache
under a key no tenant can pin (version 0 of an adapter is always the base model).

Those few lengths were not enough: the next H200 run still stalled 1.6 s when a gate sent ~150 prompts
(about 6,000 tokens) to a new adapter at once. The expand kernel is compiled once per count of shrink splits,
and that count falls as a step's token blocks grow (`bgmv.bgmv_shrink`), so a large prefill needs variants no
short one compiles. `split_sweep` lists one prompt length per variant; `warm_lora` runs each alone in a step.
With the sweep, the H200's engine still spent 1.5 s in its first step mixing 32 decoding rows with a gate's
8 new prompts through an adapter (kiln-infer's slow-step log), so `warm_lora` also makes such mixed steps.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from transformers import PretrainedConfig

from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.types import AdapterRef, EngineRequest, SamplingParams
from kiln_infer.kernels.bgmv import MAX_MODULES, MAX_SHRINK_SPLITS, SHRINK_PROGRAMS
from kiln_infer.kernels.lora_segments import BLOCK_M, cdiv
from kiln_infer.lora.random_adapter import write_random_adapter

WARM_KEY = "kiln-warm-up/lora@v0"
LENGTHS = (9, 40, 130)  # prompt tokens: a short chat turn, a paragraph, a longer prompt


def split_sweep(max_tokens: int) -> list[int]:
    """Prompt lengths (one adapter, one prompt a step) that together reach every count of shrink splits the
    kernels can pick for every group size of modules, up to `max_tokens`: the first block count at which each
    count appears (the splits' rule of `bgmv.bgmv_shrink`, with the input features not limiting it)."""
    lengths: set[int] = set()
    for modules in range(1, MAX_MODULES + 1):
        seen: set[int] = set()
        for blocks in range(1, max_tokens // BLOCK_M + 1):
            want = min(MAX_SHRINK_SPLITS, max(1, cdiv(SHRINK_PROGRAMS, blocks * modules)))
            splits = 1 << (want.bit_length() - 1)
            if splits not in seen:
                seen.add(splits)
                lengths.add(blocks * BLOCK_M)
    return sorted(lengths)


def warm_lora(
    engine: AsyncEngine,
    config: PretrainedConfig,
    lengths: tuple[int, ...] = LENGTHS,
    sweep: bool = True,
    mix_rows: tuple[int, ...] | None = None,
) -> float:
    """Run the warm-up requests to completion, then (with `sweep`) `split_sweep`'s one at a time, then steps
    that mix decoding rows (`mix_rows` of them; default MIX_ROWS with `sweep`, none without) with arriving
    prompts; returns their seconds."""
    rank = min(16, engine.config.max_lora_rank)
    vocab = int(config.vocab_size)
    greedy = SamplingParams(max_tokens=2, temperature=0.0)

    def prompt(n: int) -> list[int]:
        return [(7 * j + 3) % vocab for j in range(n)]

    with tempfile.TemporaryDirectory(prefix="kiln-warm-") as tmp:
        ref = AdapterRef(WARM_KEY, write_random_adapter(Path(tmp) / "adapter", config, rank=rank, seed=0))
        engine.preload_adapter(ref)  # reads the files now; the weights stay in memory after tmp is gone
        t = time.monotonic()
        requests = [(n, ref) for n in lengths] + [(lengths[0], None)]
        streams = [
            engine.submit(EngineRequest(f"kiln-warm-up-{i}", prompt(n), greedy, adapter))
            for i, (n, adapter) in enumerate(requests)
        ]
        for stream in streams:
            for _ in stream:
                pass
        if sweep:
            ec = engine.config
            for n in split_sweep(min(ec.max_num_batched_tokens, ec.max_model_len - 2)):
                for _ in engine.submit(EngineRequest(f"kiln-warm-up-sweep-{n}", prompt(n), greedy, ref)):
                    pass
        for decoding, arriving in MIXES:
            for rows in MIX_ROWS if mix_rows is None and sweep else mix_rows or ():
                adapters = (ref if decoding else None, ref if arriving else None)
                _mixed_step(engine, prompt, adapters, rows, f"{int(decoding)}{int(arriving)}-{rows}")
    return time.monotonic() - t


# (rows decoding through the adapter, rows arriving through it): eager steps that mix decoding rows with new
# prompts, as a round's gate makes them under load (its first such step stalled the H200's engine 1.5 s)
MIXES = ((False, True), (True, True), (True, False))
MIX_ROWS = (3, 32)  # decoding rows beside the new prompts (off and on a multiple of 16)


def _mixed_step(
    engine: AsyncEngine,
    prompt: Callable[[int], list[int]],
    adapters: tuple[AdapterRef | None, AdapterRef | None],
    rows: int,
    tag: str,
) -> None:
    """`rows` requests decoding, then prompts arriving through `adapters[1]` while they still decode."""
    long = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0.0)
    decoding = [
        iter(engine.submit(EngineRequest(f"kiln-warm-up-mix-{tag}-d{i}", prompt(9), long, adapters[0])))
        for i in range(rows)
    ]
    for stream in decoding:
        next(stream, None)  # its first token: it is decoding now
    arriving = [
        iter(engine.submit(EngineRequest(f"kiln-warm-up-mix-{tag}-p{i}", prompt(40 + i), short, adapters[1])))
        for i in range(8)
    ]
    for stream in arriving + decoding:
        for _ in stream:
            pass
