"""Triton fused ops (residual add + RMSNorm, RMSNorm, SiLU·up) against the torch references; GPU only."""

from __future__ import annotations

import pytest
import torch

from kiln_infer.kernels.fused_ops import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    silu_mul,
    silu_mul_reference,
)
from kiln_infer.kernels.triton_import import triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Each side rounds at the same points; what is left is the last bit of a rounding (fp32 sums, exp, rsqrt).
RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}
SHAPES = [(1, 2048), (7, 576), (300, 1536), (33, 4096), (2, 100)]  # (rows, width), widths not all 2^k


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=RTOL[out.dtype], atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), SHAPES)
def test_add_rms_norm_matches_reference(dtype: torch.dtype, rows: int, width: int) -> None:
    torch.manual_seed(0)
    x = _randn(rows, width, dtype=dtype)
    residual = _randn(rows, width, dtype=dtype, scale=3.0)
    weight = (torch.rand(width, device="cuda") + 0.5).to(dtype)
    ref_residual, residual_out = residual.clone(), residual.clone()
    ref = add_rms_norm_reference(x, ref_residual, weight, 1e-5)
    out = add_rms_norm(x, residual_out, weight, 1e-5)  # Triton: CUDA tensors
    assert torch.equal(residual_out, ref_residual)  # the residual stream gets the same rounded sums
    _close(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), SHAPES)
def test_rms_norm_matches_reference(dtype: torch.dtype, rows: int, width: int) -> None:
    torch.manual_seed(0)
    x = _randn(rows, width, dtype=dtype, scale=2.0)
    weight = (torch.rand(width, device="cuda") + 0.5).to(dtype)
    _close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 8192), (5, 1536), (300, 2048), (3, 1000)])
def test_silu_mul_matches_reference(dtype: torch.dtype, rows: int, inter: int) -> None:
    torch.manual_seed(0)
    gate_up = _randn(rows, 2 * inter, dtype=dtype, scale=4.0)
    _close(silu_mul(gate_up), silu_mul_reference(gate_up))


def test_fused_ops_take_row_strided_views() -> None:
    """Rows of a wider tensor (as a split of a fused projection gives) work without a copy."""
    torch.manual_seed(0)
    wide = _randn(6, 4000, dtype=torch.bfloat16)
    x, gate_up = wide[:, :576], wide[:, 1000:4000]
    residual = _randn(6, 576, dtype=torch.bfloat16)
    weight = torch.rand(576, device="cuda").bfloat16()
    ref_residual = residual.clone()
    _close(add_rms_norm(x, residual, weight, 1e-5), add_rms_norm_reference(x, ref_residual, weight, 1e-5))
    assert torch.equal(residual, ref_residual)
    _close(silu_mul(gate_up), silu_mul_reference(gate_up))


def test_fused_ops_replay_in_a_cuda_graph() -> None:
    """add_rms_norm and silu_mul captured once, replayed on new inputs, give the reference results."""
    torch.manual_seed(0)
    rows, width, inter, eps = 4, 2048, 8192, 1e-5
    x = _randn(rows, width, dtype=torch.bfloat16)
    residual = _randn(rows, width, dtype=torch.bfloat16)
    weight = (torch.rand(width, device="cuda") + 0.5).bfloat16()
    gate_up = _randn(rows, 2 * inter, dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, weight, eps), silu_mul(gate_up)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile the kernels before capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, act = step()
    for _ in range(3):
        start = _randn(rows, width, dtype=torch.bfloat16)
        x.copy_(_randn(rows, width, dtype=torch.bfloat16))
        gate_up.copy_(_randn(rows, 2 * inter, dtype=torch.bfloat16))
        residual.copy_(start)
        graph.replay()
        ref_residual = start.clone()
        ref = add_rms_norm_reference(x, ref_residual, weight, eps)
        assert torch.equal(residual, ref_residual)
        _close(normed, ref)
        _close(act, silu_mul_reference(gate_up))
