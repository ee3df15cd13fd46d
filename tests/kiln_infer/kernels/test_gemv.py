"""Batch-1 GEMVs with folded prologues against the torch references; GPU only."""

from __future__ import annotations

import pytest
import torch

from kiln_infer.kernels.gemv import (
    ADD_NORM,
    NORM,
    PLAIN,
    SILU_MUL,
    gemv,
    gemv_qkv_rope,
    gemv_reference,
)
from kiln_infer.kernels.rope_cache import rope_and_cache_reference
from kiln_infer.kernels.triton_import import triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]

# (n, k): Llama-3.2-1B's projections, SmolLM2-135M's, and sizes that are not multiples of any block
SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (576, 576), (1536, 576), (97, 300)]
PROLOGUES = [PLAIN, NORM, ADD_NORM, SILU_MUL]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_gemv_matches_reference(n: int, k: int, prologue: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n * 7 + k)
    weight = (torch.randn(n, k, device="cuda") * k**-0.5).to(dtype)
    x = torch.randn(1, 2 * k if prologue == SILU_MUL else k, device="cuda").to(dtype)
    residual = (torch.randn(1, k, device="cuda") * 3).to(dtype) if prologue == ADD_NORM else None
    norm = (torch.rand(k, device="cuda") + 0.5).to(dtype) if prologue in (NORM, ADD_NORM) else None
    out, new_residual = gemv(x, weight, prologue, residual, norm, 1e-5)
    ref, ref_residual = gemv_reference(x, weight, prologue, residual, norm, 1e-5)
    assert out.shape == ref.shape == (1, n) and out.dtype == dtype
    # one rounding of the output apart (fp32 sums in a different order), relative to the output's scale
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - ref.float()).abs().max().item() <= tol * max(1.0, ref.float().abs().max().item())
    if prologue == ADD_NORM:
        assert new_residual is not None and ref_residual is not None
        assert torch.equal(new_residual, ref_residual)  # the residual stream gets the same rounded sums
    else:
        assert new_residual is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prologue", [NORM, ADD_NORM])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "hidden"), [(32, 8, 64, 2048), (9, 3, 64, 576), (4, 4, 128, 300)]
)
def test_qkv_rope_gemv_matches_unfused(
    heads: int, kv_heads: int, dim: int, hidden: int, prologue: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(heads + dim)
    n = (heads + 2 * kv_heads) * dim
    weight = (torch.randn(n, hidden, device="cuda") * hidden**-0.5).to(dtype)
    x = torch.randn(1, hidden, device="cuda").to(dtype)
    residual = (torch.randn(1, hidden, device="cuda") * 3).to(dtype) if prologue == ADD_NORM else None
    norm = (torch.rand(hidden, device="cuda") + 0.5).to(dtype)
    angles = torch.rand(1, dim // 2, device="cuda") * 6.0
    rope = (torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype))
    slot = torch.tensor([11], device="cuda")

    def cache() -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.zeros(2, 8, kv_heads, dim, device="cuda", dtype=dtype),
            torch.zeros(2, 8, kv_heads, dim, device="cuda", dtype=dtype),
        )

    fused_kv, ref_kv = cache(), cache()
    q, new_residual = gemv_qkv_rope(
        x, weight, prologue, residual, norm, 1e-5, rope, fused_kv, slot, heads, kv_heads
    )
    qkv, ref_residual = gemv_reference(x, weight, prologue, residual, norm, 1e-5)
    q_parts = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    ref_q = rope_and_cache_reference(*q_parts, rope, ref_kv, slot, heads, kv_heads)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for out, ref in [(q, ref_q), (fused_kv[0], ref_kv[0]), (fused_kv[1], ref_kv[1])]:
        assert out.shape == ref.shape
        assert (out.float() - ref.float()).abs().max().item() <= tol * max(
            1.0, ref.float().abs().max().item()
        )
    assert fused_kv[0].flatten(0, 1)[12:].abs().max() == 0  # nothing written outside the token's slot
    if prologue == ADD_NORM:
        assert new_residual is not None and ref_residual is not None
        assert torch.equal(new_residual, ref_residual)
