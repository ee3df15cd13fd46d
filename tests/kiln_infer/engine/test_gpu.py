"""CUDA paths (Triton decode attention, CUDA-graph decode, batched LoRA) against the references; GPU only."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from kiln_common.model_loader import load_hf_model, load_state_dict, load_tokenizer, resolve_model
from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.types import AdapterRef, EngineRequest, SamplingParams
from kiln_infer.kernels.decode_attention import decode_attention, decode_attention_reference
from kiln_infer.kernels.rope_cache import rope_and_cache, rope_and_cache_reference
from kiln_infer.kernels.triton_import import triton_available
from kiln_infer.lora.random_adapter import write_random_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
]


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_decode_matches_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    b, heads, kv_heads, dim, block, blocks = 37, 32, 8, 64, 16, 400
    q = torch.randn(b, heads, dim, device="cuda", dtype=dtype)
    k = torch.randn(blocks, block, kv_heads, dim, device="cuda", dtype=dtype)
    v = torch.randn(blocks, block, kv_heads, dim, device="cuda", dtype=dtype)
    lens = torch.randint(1, 300, (b,), device="cuda", dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks, device="cuda")[:20] for _ in range(b)]).to(torch.int32)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), tables, lens, 0.125)
    out = decode_attention(q, k, v, tables, lens, 0.125)
    assert (out.float() - ref).abs().max() < (3e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_fused_rope_cache_kernel_matches_torch() -> None:
    torch.manual_seed(0)
    t, heads, kv_heads, dim = 300, 32, 8, 64
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split(
        [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1
    )  # strided views, as in the model
    cos, sin = torch.randn(t, dim, device="cuda").bfloat16(), torch.randn(t, dim, device="cuda").bfloat16()
    slots = torch.randperm(64 * 16, device="cuda")[:t]
    caches = [
        tuple(torch.zeros(64, 16, kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(2)
    ]
    ref = rope_and_cache_reference(q, k, v, (cos, sin), caches[0], slots, heads, kv_heads)
    out = rope_and_cache(q, k, v, (cos, sin), caches[1], slots, heads, kv_heads)
    assert (
        out.float() - ref.float()
    ).abs().max() < 0.1  # torch rounds each bf16 product, the kernel does not
    assert (caches[0][0].float() - caches[1][0].float()).abs().max() < 0.1
    assert torch.equal(caches[0][1], caches[1][1])


def test_cuda_engine_logprobs_match_transformers_and_peft(tmp_path: Path, kiln_home: Path) -> None:
    """fp32 on CUDA: graphs + Triton decode + batched LoRA agree with transformers / PEFT logprobs."""
    from peft import PeftModel

    source = resolve_model("dummy:tiny", kiln_home)
    state = load_state_dict(source, torch.float32, "cuda")
    refs = [
        AdapterRef(f"g/a{i}@v1", write_random_adapter(tmp_path / f"a{i}", source.config, 8, seed=i, std=0.1))
        for i in range(2)
    ]
    config = EngineConfig(
        max_num_seqs=8,
        max_model_len=128,
        num_kv_blocks=64,
        max_lora_slots=2,
        max_lora_rank=8,
        cuda_graph_batch_sizes=(1, 2, 4, 8),
    )
    engine = AsyncEngine.from_weights(
        source.config, state, load_tokenizer(source), config=config, eos_token_ids=set()
    )
    try:
        assert engine.core.runner.decoder is not None and engine.core.runner.decoder.use_graphs
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 40000, (n,), generator=gen).tolist() for n in (5, 40, 17, 70)]
        adapters = [None, refs[0], refs[1], refs[0]]
        params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
        streams = [
            engine.submit(EngineRequest(str(i), p, params, a))
            for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
        ]
        outs = [list(s) for s in streams]
        assert engine.core.runner.decoder.graphs  # decode steps went through captured graphs
        mixed = engine.core.runner.mixed
        assert mixed is not None and mixed.graphs and mixed.num_runs > 0  # and steps with prefill chunks
    finally:
        engine.shutdown()
    hf = load_hf_model(source, torch.float32, "cuda")
    peft = PeftModel.from_pretrained(hf, str(refs[0].path), adapter_name="a0")
    peft.load_adapter(str(refs[1].path), adapter_name="a1")
    for prompt, adapter, out in zip(prompts, adapters, outs, strict=True):
        ids = [t for o in out for t in o.token_ids]
        chosen = [lp[0].logprob for o in out for lp in o.logprobs]
        ctx = peft.disable_adapter() if adapter is None else contextlib.nullcontext()
        if adapter is not None:
            peft.set_adapter("a0" if adapter is refs[0] else "a1")
        with ctx, torch.no_grad():
            logits = peft(input_ids=torch.tensor([prompt + ids], device="cuda")).logits[0].float()
        ref = logits[len(prompt) - 1 : -1].log_softmax(-1)
        ref_chosen = ref.gather(1, torch.tensor(ids, device="cuda")[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(chosen), ref_chosen.cpu(), atol=2e-2)
        assert (ref.argmax(-1).cpu() == torch.tensor(ids)).float().mean() > 0.8
