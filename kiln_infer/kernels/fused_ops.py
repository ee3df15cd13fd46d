"""Fused elementwise ops of the decoder layer: residual add + RMSNorm, RMSNorm, SiLU·up (Triton on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln_infer.kernels.triton_import import tl, triton

# One program normalises a whole row, so a row must fit in one block; wider rows use the torch path.
MAX_NORM_WIDTH = 65536
SILU_BLOCK = 1024


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in fp32, cast back to x's dtype, then scale by `weight`."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Torch version of `add_rms_norm`; same contract."""
    residual += x
    return rms_norm_reference(residual, weight, eps)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch version of `silu_mul`; same contract."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        x_stride,
        res_stride,
        out_stride,
        n,
        eps,
        ADD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per row: (residual += x; x = residual), then rms-normalise x and scale it."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
        if ADD:
            r = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)  # rounded like torch
            tl.store(res_ptr + row * res_stride + offs, x, mask=mask)
        h = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n + eps)
        h = (h * rstd).to(x.dtype).to(tl.float32)  # cast back before the weight, as HF does
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_stride + offs, (h * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(in_ptr, out_ptr, in_stride, out_stride, n, BLOCK: tl.constexpr):
        """One program per (row, block of columns): silu(gate) * up, rounded after the silu like torch."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gate = tl.load(in_ptr + row * in_stride + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(in_ptr + row * in_stride + n + offs, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_stride + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    rows, n = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1) and weight.is_contiguous()
    res = x if residual is None else residual  # the normalised rows
    out = torch.empty(rows, n, dtype=torch.promote_types(res.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x,
        res,
        weight,
        out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        n,
        eps,
        ADD=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row, HF numerics.

    semantics:
        out[t] = weight * (x[t].float() * rsqrt(mean(x[t].float() ** 2) + eps)).to(x.dtype)
    x: [T, N] with unit stride along N; weight: [N]; returns a new [T, N].
    The Triton kernel (CUDA tensors); shapes it does not cover (other ranks, wider rows) take the torch path.
    """
    if x.dim() != 2 or x.shape[1] > MAX_NORM_WIDTH:
        return rms_norm_reference(x, weight, eps)
    return _norm_launch(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Residual add fused with the following RMSNorm, in one Triton kernel (CUDA tensors).

    semantics:
        residual += x                                   # in place: the residual stream goes on
        return rms_norm(residual, weight, eps)
    x, residual: [T, N] with unit stride along N (residual is written); weight: [N].
    """
    if x.dim() != 2 or x.shape[1] > MAX_NORM_WIDTH:
        return add_rms_norm_reference(x, residual, weight, eps)
    return _norm_launch(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The MLP activation on a fused gate/up projection, in one Triton kernel (CUDA tensors).

    semantics:
        gate, up = gate_up[:, :I], gate_up[:, I:]
        return silu(gate) * up                          # [T, I]
    gate_up: [T, 2 * I] with unit stride along the columns.
    """
    if gate_up.dim() != 2:
        return silu_mul_reference(gate_up)
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(1) == 1
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=SILU_BLOCK, num_warps=4
    )
    return out
