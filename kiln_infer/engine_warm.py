"""The engine's first adapter requests, made at start rather than in the middle of serving.

On the H200 the first prefill through an adapter stalled the whole engine for 2.5 s under steady load
(a training round's gate asking its candidate; docs/benchmarks.md, session 7). The likely cause is Triton
compiling the LoRA shrink/expand kernels for prefill shapes at first use (the decode graphs compile only the
decode ones). `warm_lora` makes that first use happen before kiln-infer reports SERVING: prompts of a few
lengths through a random adapter and one without, two tokens each. The adapter's host copy stays in the cache
under a key no tenant can pin (version 0 of an adapter is always the base model).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from transformers import PretrainedConfig

from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.types import AdapterRef, EngineRequest, SamplingParams
from kiln_infer.lora.random_adapter import write_random_adapter

WARM_KEY = "kiln-warm-up/lora@v0"
LENGTHS = (9, 40, 130)  # prompt tokens: a short chat turn, a paragraph, a longer prompt


def warm_lora(engine: AsyncEngine, config: PretrainedConfig, lengths: tuple[int, ...] = LENGTHS) -> float:
    """Run the warm-up requests to completion; returns their seconds."""
    rank = min(16, engine.config.max_lora_rank)
    vocab = int(config.vocab_size)
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    with tempfile.TemporaryDirectory(prefix="kiln-warm-") as tmp:
        ref = AdapterRef(WARM_KEY, write_random_adapter(Path(tmp) / "adapter", config, rank=rank, seed=0))
        engine.preload_adapter(ref)  # reads the files now; the weights stay in memory after tmp is gone
        t = time.monotonic()
        requests = [(n, ref) for n in lengths] + [(lengths[0], None)]
        streams = [
            engine.submit(
                EngineRequest(f"kiln-warm-up-{i}", [(7 * j + 3) % vocab for j in range(n)], greedy, adapter)
            )
            for i, (n, adapter) in enumerate(requests)
        ]
        for stream in streams:
            for _ in stream:
                pass
    return time.monotonic() - t
