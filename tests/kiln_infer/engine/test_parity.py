"""Greedy text and logprobs equal transformers', batched, across chunked prefill and after preemption."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.types import EngineRequest, FinishReason, SamplingParams
from tests.kiln_infer.engine.conftest import PROMPTS, EngineFactory, collect, greedy, run_all


def hf_greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids`."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids) :].tolist()


def hf_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at each completion position: [len(completion), vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    return logits[len(prompt) - 1 : -1].log_softmax(-1)


def test_greedy_matches_transformers_batched(
    make_engine: EngineFactory, hf_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = make_engine()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outs = run_all(
        engine, [EngineRequest(str(i), p, greedy(12, ignore_eos=True)) for i, p in enumerate(prompts)]
    )
    for prompt, out in zip(prompts, outs, strict=True):
        ids, text = collect(out)
        assert ids == hf_greedy(hf_model, prompt, 12)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert out[-1].finish_reason == FinishReason.LENGTH and out[-1].completion_tokens == 12
        assert out[-1].prompt_tokens == len(prompt)


def check_logprobs(engine_outputs: list, hf_lp: torch.Tensor, k: int) -> None:
    """Chosen-token and top-k logprobs agree with the reference within fp32 tolerance."""
    pairs = [lp for o in engine_outputs for lp in o.logprobs]
    assert len(pairs) == hf_lp.shape[0]
    for row, (chosen, alts) in zip(hf_lp, pairs, strict=True):
        assert abs(chosen.logprob - row[chosen.token_id].item()) < 2e-3
        ref_vals, ref_ids = row.topk(k)
        assert [a.token_id for a in alts][:2] == ref_ids.tolist()[:2]
        assert torch.allclose(torch.tensor([a.logprob for a in alts]), ref_vals, atol=2e-3)


def test_logprobs_parity_with_chunked_prefill(
    make_engine: EngineFactory, hf_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    # A 16-token budget splits the long prompt into several chunks while other sequences decode.
    engine = make_engine(max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    assert len(prompts[2]) > 40
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True)
    outs = run_all(engine, [EngineRequest(str(i), p, params) for i, p in enumerate(prompts)])
    for prompt, out in zip(prompts, outs, strict=True):
        ids, _ = collect(out)
        check_logprobs(out, hf_logprobs(hf_model, prompt, ids), 5)


def test_parity_after_preemption(
    make_engine: EngineFactory, hf_model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    # 12 blocks of 8 tokens cannot hold four ~40-token sequences at once: some are preempted and recomputed.
    engine = make_engine(block_size=8, num_kv_blocks=12, max_model_len=96, max_num_batched_tokens=64)
    base = tokenizer(PROMPTS[2])["input_ids"][:20]
    prompts = [base[i:] + tokenizer(f" Item {i}:")["input_ids"] for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=3, ignore_eos=True)
    outs = run_all(engine, [EngineRequest(str(i), p, params) for i, p in enumerate(prompts)])
    assert engine.core.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        ids, _ = collect(out)
        assert ids == hf_greedy(hf_model, prompt, 24)
        check_logprobs(out, hf_logprobs(hf_model, prompt, ids), 3)
    assert engine.core.blocks.num_free == 12


def test_packed_weights_use_fused_views_and_stay_exact(
    smol,
    hf_model: torch.nn.Module,
    smol_state: dict,
    tokenizer: PreTrainedTokenizerBase,  # noqa: ANN001
) -> None:
    """Weights packed as the server shares them (one bucket) give fused q/k/v and gate/up views, no copies."""
    from kiln_common.weight_share import pack_state_dict
    from kiln_infer.engine.async_engine import AsyncEngine
    from kiln_infer.engine.config import EngineConfig

    shared = pack_state_dict(smol_state, "cpu")
    config = EngineConfig(max_model_len=256, max_num_seqs=4, num_kv_blocks=64)
    engine = AsyncEngine.from_weights(
        smol.config, shared.views, tokenizer, config=config, source_path=smol.path
    )
    try:
        layer = engine.core.model.layers[5]
        assert layer.qkv is not None and layer.gate_up is not None
        assert layer.qkv.data_ptr() == shared.views["model.layers.5.self_attn.q_proj.weight"].data_ptr()
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
        outs = run_all(
            engine, [EngineRequest(str(i), p, greedy(10, ignore_eos=True)) for i, p in enumerate(prompts)]
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert collect(out)[0] == hf_greedy(hf_model, prompt, 10)
    finally:
        engine.shutdown()
