"""Engine-thread host time per decode step at batch 256, with the model forward and sampling stubbed out.

    python -m benchmarks.host_overhead [--batch 256] [--steps 200] [--repeat 3] [--stop] [--profile]

Runs the real EngineCore (static decode path, overlapped steps) over dummy:tiny weights on the CPU, but the
decoder's forward returns a preallocated tensor and the sampler hands back fixed random token ids, so what is
timed is only the Python host work of a step: scheduling, building decode inputs, resolving tokens,
detokenizing, stop checks and streaming. Streams are drained by a consumer thread, as the server's are.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from kiln_common.model_loader import load_state_dict, load_tokenizer, resolve_model
from kiln_infer.engine import engine_core
from kiln_infer.engine.async_engine import eos_ids
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.engine_core import EngineCore
from kiln_infer.engine.sampler import PendingSample, SamplingBatch
from kiln_infer.engine.sequence import Sequence
from kiln_infer.engine.types import EngineRequest, SamplingParams


def build(batch: int, vocab: int) -> EngineCore:
    """An EngineCore over dummy:tiny whose forward and sampler do no real work."""
    home = Path(os.environ.get("KILN_HOME", Path(__file__).resolve().parents[1] / ".kiln"))
    source = resolve_model("dummy:tiny", home)
    tokenizer = load_tokenizer(source)
    state = load_state_dict(source, torch.float32, "cpu")
    config = EngineConfig(
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, batch),
        max_model_len=1024,
        num_kv_blocks=batch * 1024 // 16 + 16,
        static_decode=True,
        overlap_steps=True,
    )
    core = EngineCore(source.config, state, tokenizer, config, eos_ids(None, source.config, tokenizer))
    decoder = core.runner.decoder
    assert decoder is not None
    logits = torch.zeros(batch, 8)
    decoder._forward = lambda bucket, with_lora: logits[:bucket]  # type: ignore[method-assign]
    rng = random.Random(0)
    eos = core.eos_token_ids
    pool = [t for t in (rng.randrange(100, vocab) for _ in range(4096)) if t not in eos]
    counter = [0]

    def fake_sample(logits: torch.Tensor, sb: SamplingBatch) -> PendingSample:
        n = len(sb.params)
        i = counter[0] = (counter[0] + n) % (len(pool) - batch)
        return PendingSample(torch.tensor(pool[i : i + n]), sb.params, [], None)

    engine_core.sample_async = fake_sample  # type: ignore[assignment]
    return core


def measure(core: EngineCore, batch: int, steps: int, stop: bool, profile: bool) -> float:
    """Median engine-thread CPU ms per pure decode step over `steps` steps (CPU: the cores are shared)."""
    params = SamplingParams(
        max_tokens=steps + 8, temperature=0.0, ignore_eos=True, stop=("\x00never",) if stop else ()
    )
    seqs = [
        Sequence(EngineRequest(f"r{i}", [11 + i % 50] * 16, params), seed=i, arrival=i) for i in range(batch)
    ]
    done = threading.Event()

    def consume() -> None:
        for s in seqs:
            while s.outputs.get() is not None:
                pass
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    for s in seqs:
        core.add(s)
    while any(len(s.token_ids) <= s.num_prompt_tokens for s in seqs):  # prefill
        core.step()
    for _ in range(3):
        core.step()
    times = []
    phases = dict(core.phase_s)
    prof = cProfile.Profile() if profile else None
    for _ in range(steps):
        t0 = time.thread_time()
        if prof is not None:
            prof.enable()
        core.step()
        if prof is not None:
            prof.disable()
        times.append(time.thread_time() - t0)
    split = {k: (core.phase_s[k] - phases[k]) * 1000 / steps for k in phases}
    while core.has_work():
        core.step()
    done.wait()
    sys.stdout.write("  mean wall ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()) + "\n")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return statistics.median(times) * 1000


def main() -> int:
    """Print engine-thread CPU ms per decode step."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stop", action="store_true", help="requests carry a never-matching stop")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    core = build(args.batch, 49152)
    gc.freeze()  # as AsyncEngine does after start
    results = [measure(core, args.batch, args.steps, args.stop, args.profile) for _ in range(args.repeat)]
    sys.stdout.write(
        f"batch {args.batch}, stop strings {'on' if args.stop else 'off'}: "
        "engine-thread CPU ms per decode step "
        + " ".join(f"{r:.2f}" for r in results)
        + f" (best {min(results):.2f})\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
