"""The batch-1 decode strategy (folded GEMVs) against the general forward; GPU only."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln_common.weight_share import pack_state_dict
from kiln_infer.engine.kv_cache import allocate_kv_cache
from kiln_infer.kernels.backend import TRITON_KERNELS
from kiln_infer.kernels.triton_import import triton_available
from kiln_infer.model.attention import build_step_metadata
from kiln_infer.model.llama import LlamaModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]


def _tiny_model(dtype: torch.dtype) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).to(dtype)
    state = pack_state_dict({k: v for k, v in hf.state_dict().items()}, "cuda").views
    return LlamaModel(config, state, max_positions=512, kernels=TRITON_KERNELS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_one_forward_matches_the_general_forward(dtype: torch.dtype) -> None:
    """A decode token through the GEMV path equals the same token through the general path."""
    model = _tiny_model(dtype)
    batch_one = model.batch_one
    assert batch_one is not None and model.gemv_logits
    block = 16
    kv = allocate_kv_cache(
        9, block, len(model.layers), model.num_kv_heads, model.head_dim, dtype, model.device
    )
    table = [5, 2, 7]  # 38 tokens in blocks of 16
    prompt = torch.randint(0, 1000, (37,), device="cuda")
    with torch.inference_mode():
        meta = build_step_metadata([0], [37], [table], 0, block, model.device)
        model.forward(prompt, torch.arange(37, device="cuda"), kv, meta, None)
        token, pos = prompt[-1:].clone(), torch.tensor([37], device="cuda")
        results = {}
        for use_gemv in (False, True):  # the general forward, then the batch-1 strategy (and GEMV logits)
            model.batch_one, model.gemv_logits = (batch_one if use_gemv else None), use_gemv
            meta = build_step_metadata([37], [1], [table], 1, block, model.device)
            results[use_gemv] = model.logits(model.forward(token, pos, kv, meta, None)).float()
    fast, general = results[True], results[False]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert (fast - general).abs().max().item() <= tol * general.abs().max().item()
    # greedy picks the same token, or one the general path scores within that tolerance of its best
    assert general[0, fast.argmax()].item() >= general.max().item() - tol * general.abs().max().item()
