"""Our forward equals transformers' for Llama-family variants: llama3 RoPE, Qwen2 bias, Qwen3 q/k norm."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.types import EngineRequest, SamplingParams

SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=1000,
    max_position_embeddings=512,
)


def qwen3() -> PretrainedConfig:
    """A tiny Qwen3 config (per-head q/k RMSNorm)."""
    from transformers import Qwen3Config

    return Qwen3Config(**SHAPE, tie_word_embeddings=True)


CONFIGS = {
    "llama3-rope": lambda: LlamaConfig(
        **SHAPE,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2-bias": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),
    "qwen3-norm": qwen3,
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None, tie_word_embeddings=False),
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_logprobs_match_transformers(family: str, tokenizer: PreTrainedTokenizerBase) -> None:
    torch.manual_seed(0)
    config = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and norm weights
    state = {k: v.detach() for k, v in model.state_dict().items()}
    engine = AsyncEngine.from_weights(
        config,
        state,
        tokenizer,
        config=EngineConfig(max_model_len=128, max_num_seqs=4, num_kv_blocks=32, max_num_batched_tokens=24),
        eos_token_ids=set(),
    )
    try:
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in (3, 30, 70)]
        params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True)
        streams = [engine.submit(EngineRequest(str(i), p, params)) for i, p in enumerate(prompts)]
        outs = [list(s) for s in streams]
    finally:
        engine.shutdown()
    for prompt, out in zip(prompts, outs, strict=True):
        ids = [t for o in out for t in o.token_ids]
        with torch.no_grad():
            ref = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        chosen = torch.tensor([lp[0].logprob for o in out for lp in o.logprobs])
        assert ids == ref.argmax(-1).tolist()
        assert torch.allclose(chosen, ref.gather(1, torch.tensor(ids)[:, None]).squeeze(1), atol=1e-4)


def test_sliding_window_shorter_than_context_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    config = MistralConfig(**SHAPE, sliding_window=64)
    state = {k: v.detach() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    with pytest.raises(ValueError, match="sliding window of 64"):
        AsyncEngine.from_weights(
            config, state, tokenizer, config=EngineConfig(max_model_len=128, num_kv_blocks=16)
        )
