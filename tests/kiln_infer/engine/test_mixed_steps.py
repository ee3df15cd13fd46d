"""Steps with prefill chunks on static buffers (the mixed-step CUDA-graph path, eager on CPU)."""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.types import EngineRequest, SamplingParams
from kiln_infer.kernels.lora_segments import MAX_TOKENS
from tests.kiln_infer.engine.conftest import PROMPTS, EngineFactory, collect, run_all


def test_which_steps_take_the_static_path(make_engine: EngineFactory) -> None:
    engine = make_engine(static_decode=True, cuda_graph_token_sizes=(64, 512))
    mixed = engine.core.runner.mixed
    assert mixed is not None
    # (starts, lengths): a decode at position 30 beside a 39-token chunk from position 0
    assert mixed.fits([30, 0], [1, 39], with_lora=False) and mixed.fits([30, 0], [1, 39], with_lora=True)
    assert not mixed.fits([0], [513], with_lora=False)  # more tokens than the largest bucket
    # the LoRA kernels group at most MAX_TOKENS tokens on the device: larger adapter steps stay eager
    assert MAX_TOKENS < 300
    assert mixed.fits([0], [300], with_lora=False) and not mixed.fits([0], [300], with_lora=True)
    assert not mixed.fits([5] * 17, [1] * 17, with_lora=False)  # more sequences than max_num_seqs (16)
    # 64 tokens late in a long context read too many positions through the decode kernel:
    # positions 200..263 read 201 + ... + 264 = 14,880 positions
    mixed.context_budget = 14_880
    assert mixed.fits([200], [64], with_lora=False) and not mixed.fits([201], [64], with_lora=False)


def test_static_mixed_steps_match_eager_tokens(
    make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Greedy outputs are the same whichever path ran each step, over chunked prompts and prefix hits."""
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] * 2  # the repeats hit the prefix cache
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, ignore_eos=True)
    outs = {}
    for sizes in ((), (16, 32, 64)):
        engine = make_engine(
            static_decode=True, max_num_batched_tokens=32, cuda_graph_token_sizes=sizes, max_num_seqs=4
        )
        requests = [EngineRequest(f"r{i}", p, params) for i, p in enumerate(prompts)]
        streams = run_all(engine, requests)
        outs[sizes] = [(collect(o)[0], [lp[0].logprob for out in o for lp in out.logprobs]) for o in streams]
        if sizes:
            mixed = engine.core.runner.mixed
            assert mixed is not None and mixed.num_runs > 0
            # some ran before the previous step's tokens reached the host (read on the device)
            assert mixed.num_overlapped > 0
    for (ids_a, lps_a), (ids_b, lps_b) in zip(outs[()], outs[(16, 32, 64)], strict=True):
        assert ids_a == ids_b
        assert np.allclose(lps_a, lps_b, atol=1e-3)
