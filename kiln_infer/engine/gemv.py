"""Batch-1 decode projections: one Triton GEMV per weight, with the op before it folded into its prologue.

At batch 1 a decode step is a chain of matrix-vector products, each reading its whole weight once. cuBLAS
picks tiles of 64-128 output rows for them, which leaves most of the H200's 132 SMs idle on the smaller
projections (q|k|v: 48 tiles, o: 32); its down projection adds a split-K reduce kernel. Here every program
owns a few output rows over the whole input, so there are hundreds of programs, and the kernel before each
projection disappears into its prologue:

    x_qkv = rms_norm(residual += mlp_out)      ->  gemv(w_qkv, prologue=ADD_NORM)   (also writes residual')
    x_gu  = rms_norm(residual += attn_out)     ->  gemv(w_gate_up, prologue=ADD_NORM)
    x_dn  = silu(gate) * up                    ->  gemv(w_down, prologue=SILU_MUL)

Every program recomputes the prologue over the whole input vector (a few KB, served from L2). The rounding
matches the unfused kernels: the residual sum and the normalised vector are rounded to the model dtype
before use, as in `fused_ops`.
"""

from __future__ import annotations

import torch

from kiln_infer.engine.decode_attention import triton
from kiln_infer.engine.fused_ops import rms_norm_reference, silu_mul_reference

if triton is not None:
    import triton.language as tl

PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3  # what runs before the product
if triton is not None:  # the same codes as Triton compile-time constants (kernels read no plain globals)
    _PLAIN, _NORM, _ADD_NORM, _SILU_MUL = (
        tl.constexpr(PLAIN),
        tl.constexpr(NORM),
        tl.constexpr(ADD_NORM),
        tl.constexpr(SILU_MUL),
    )
MAX_K = 16384  # widest input the prologues are written for (one norm pass in BLOCK_K chunks)


def gemv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    prologue: int = PLAIN,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Torch version of `gemv`; same contract (returns (out, new residual or None))."""
    new_residual = None
    if prologue == SILU_MUL:
        x = silu_mul_reference(x)
    elif prologue in (NORM, ADD_NORM):
        assert norm_weight is not None
        if prologue == ADD_NORM:
            assert residual is not None
            new_residual = residual + x
            x = new_residual
        x = rms_norm_reference(x, norm_weight, eps)
    return torch.nn.functional.linear(x, weight), new_residual


if triton is not None:

    @triton.jit
    def _prologue_chunk(
        x_ptr, res_ptr, norm_ptr, cols, cmask, k, rstd, PROLOGUE: tl.constexpr
    ):  # pragma: no cover - GPU / interpreter only
        """The GEMV's input at `cols`, in fp32, rounded as the unfused kernels round it."""
        if PROLOGUE == _SILU_MUL:
            gate = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + k + cols, mask=cmask, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
            v = (act * up).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            v = tl.load(x_ptr + cols, mask=cmask, other=0.0)
            if PROLOGUE == _ADD_NORM:
                r = tl.load(res_ptr + cols, mask=cmask, other=0.0)
                v = (v.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            v = v.to(tl.float32)
            if PROLOGUE != _PLAIN:
                w = tl.load(norm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                v = (v * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
                v = (v * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        return v

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [k] input (SILU_MUL: [2k], gate then up)
        res_ptr,  # [k] residual (ADD_NORM)
        res_out_ptr,  # [k] residual + x, written by program 0 (ADD_NORM)
        norm_ptr,  # [k] RMSNorm weight (NORM, ADD_NORM)
        w_ptr,  # [n, k] weight, row stride w_stride
        out_ptr,  # [n]
        n,
        k,
        w_stride,
        eps,
        PROLOGUE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # pragma: no cover - GPU / interpreter only
        """out[rows] = W[rows] @ prologue(x) for this program's BLOCK_N rows."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        offs = tl.arange(0, BLOCK_K)
        rstd = 0.0
        if PROLOGUE == _NORM or PROLOGUE == _ADD_NORM:
            sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, k, BLOCK_K):
                cols = k0 + offs
                cmask = cols < k
                v = tl.load(x_ptr + cols, mask=cmask, other=0.0)
                if PROLOGUE == _ADD_NORM:
                    r = tl.load(res_ptr + cols, mask=cmask, other=0.0)
                    v = (v.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                    tl.store(res_out_ptr + cols, v, mask=cmask & (pid == 0))
                v = v.to(tl.float32)
                sq += v * v
            rstd = tl.rsqrt(tl.sum(sq, axis=0) / k + eps)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        row_ptrs = w_ptr + rows.to(tl.int64)[:, None] * w_stride
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + offs
            cmask = cols < k
            w = tl.load(row_ptrs + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            v = _prologue_chunk(x_ptr, res_ptr, norm_ptr, cols, cmask, k, rstd, PROLOGUE)
            acc += w.to(tl.float32) * v[None, :]
        tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rmask)


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight.

    Enough programs to fill the GPU, whole 2048-wide row chunks per load, and at most
    BLOCK_N * BLOCK_K = 8192 fp32 accumulators a program.
    """
    block_k = min(2048, triton.next_power_of_2(k))
    block_n = max(1, 8192 // block_k)
    while block_n > 1 and triton.cdiv(n, block_n) < 4 * 132:
        block_n //= 2
    return block_n, block_k, 4, 1


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes this input on the Triton path: one CUDA row, unit-stride rows, K <= MAX_K."""
    return (
        triton is not None
        and x.is_cuda
        and weight.is_cuda
        and weight.dim() == 2
        and weight.stride(1) == 1
        and weight.shape[1] <= MAX_K
        and x.dtype == weight.dtype
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    prologue: int = PLAIN,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matrix-vector product with the preceding op folded in; returns (out [1, n], new residual or None).

    semantics:
        PLAIN:     out = weight @ x
        NORM:      out = weight @ rms_norm(x, norm_weight, eps)
        ADD_NORM:  residual' = residual + x;  out = weight @ rms_norm(residual', norm_weight, eps)
        SILU_MUL:  out = weight @ (silu(x[:k]) * x[k:])               # x is a fused gate|up row [2k]
    x: [1, k] ([1, 2k] for SILU_MUL), contiguous; residual: [1, k] (read only: residual' is a new tensor);
    weight: [n, k] with unit stride along k. Off the Triton path: the torch reference.
    """
    if not gemv_supported(x, weight):
        return gemv_reference(x, weight, prologue, residual, norm_weight, eps)
    n, k = weight.shape
    assert x.shape[0] == 1 and x.is_contiguous()
    assert x.shape[1] == (2 * k if prologue == SILU_MUL else k)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if prologue == ADD_NORM else None
    if prologue == ADD_NORM:
        assert residual is not None and residual.is_contiguous()
    if prologue in (NORM, ADD_NORM):
        assert norm_weight is not None and norm_weight.is_contiguous()
    block_n, block_k, warps, stages = config or gemv_config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        residual if residual is not None else x,
        res_out if res_out is not None else x,
        norm_weight if norm_weight is not None else x,
        weight,
        out,
        n,
        k,
        weight.stride(0),
        eps,
        PROLOGUE=prologue,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out, res_out
