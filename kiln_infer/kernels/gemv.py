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

from kiln_infer.kernels.fused_ops import rms_norm_reference, silu_mul_reference
from kiln_infer.kernels.triton_import import tl, triton

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
    def _rstd(
        x_ptr, res_ptr, res_out_ptr, k, eps, pid, PROLOGUE: tl.constexpr, BLOCK_K: tl.constexpr
    ):  # pragma: no cover - GPU / interpreter only
        """1 / RMS of the (residual-added) input for the norm prologues, else 0.

        With ADD_NORM, program 0 also writes residual' = residual + x.
        """
        rstd = 0.0
        if PROLOGUE == _NORM or PROLOGUE == _ADD_NORM:
            offs = tl.arange(0, BLOCK_K)
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
        return rstd

    @triton.jit
    def _dot_rows(
        x_ptr,
        res_ptr,
        norm_ptr,
        w_ptr,
        rows,
        rmask,
        k,
        w_stride,
        rstd,
        PROLOGUE: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # pragma: no cover - GPU / interpreter only
        """W[rows] @ prologue(x) in fp32, [len(rows)]; rows need not be contiguous."""
        offs = tl.arange(0, BLOCK_K)
        acc = tl.zeros((rows.shape[0], BLOCK_K), dtype=tl.float32)
        row_ptrs = w_ptr + rows.to(tl.int64)[:, None] * w_stride
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + offs
            cmask = cols < k
            w = tl.load(row_ptrs + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            v = _prologue_chunk(x_ptr, res_ptr, norm_ptr, cols, cmask, k, rstd, PROLOGUE)
            acc += w.to(tl.float32) * v[None, :]
        return tl.sum(acc, axis=1)

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
        rstd = _rstd(x_ptr, res_ptr, res_out_ptr, k, eps, pid, PROLOGUE, BLOCK_K)
        y = _dot_rows(x_ptr, res_ptr, norm_ptr, w_ptr, rows, rmask, k, w_stride, rstd, PROLOGUE, BLOCK_K)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _gemv_qkv_rope_kernel(
        x_ptr,
        res_ptr,
        res_out_ptr,
        norm_ptr,
        w_ptr,  # [(H + 2 * KVH) * D, k]: the fused q | k | v weight
        q_out_ptr,  # [H, D] rotated q
        k_cache_ptr,  # [..., KVH, D] cache rows, addressed by slot
        v_cache_ptr,
        cos_ptr,  # [D] this token's rotary tables
        sin_ptr,
        slot_ptr,  # [1] this token's cache slot
        k,
        w_stride,
        eps,
        PROLOGUE: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PAIRS: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # pragma: no cover - GPU / interpreter only
        """The q|k|v GEMV with RoPE and the KV-cache write in its epilogue (one decode token).

        A program owns PAIRS rotation pairs (dims j and j + D/2) of one head, as rows interleaved
        [j, j + D/2, j + 1, j + 1 + D/2, ...], so it can rotate its own outputs: q goes to q_out, k (rotated)
        and v to the cache. Rounding as unfused: the projection output is rounded to the model dtype first.
        """
        HALF: tl.constexpr = HEAD_DIM // 2
        pid = tl.program_id(0)
        head = pid // (HALF // PAIRS)
        i = tl.arange(0, 2 * PAIRS)
        d = (i % 2) * HALF + (pid % (HALF // PAIRS)) * PAIRS + i // 2  # dims of this head, interleaved
        rows = head * HEAD_DIM + d
        rstd = _rstd(x_ptr, res_ptr, res_out_ptr, k, eps, pid, PROLOGUE, BLOCK_K)
        y = _dot_rows(x_ptr, res_ptr, norm_ptr, w_ptr, rows, rows >= 0, k, w_stride, rstd, PROLOGUE, BLOCK_K)
        dt = q_out_ptr.dtype.element_ty
        y = y.to(dt).to(tl.float32)
        slot = tl.load(slot_ptr).to(tl.int64)
        if head < NUM_HEADS + NUM_KV_HEADS:
            c1, c2 = tl.split(tl.reshape(tl.load(cos_ptr + d).to(tl.float32), (PAIRS, 2)))
            s1, s2 = tl.split(tl.reshape(tl.load(sin_ptr + d).to(tl.float32), (PAIRS, 2)))
            x1, x2 = tl.split(tl.reshape(y, (PAIRS, 2)))
            out = tl.reshape(tl.join(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), (2 * PAIRS,)).to(dt)
            if head < NUM_HEADS:
                tl.store(q_out_ptr + head * HEAD_DIM + d, out)
            else:
                tl.store(k_cache_ptr + (slot * NUM_KV_HEADS + head - NUM_HEADS) * HEAD_DIM + d, out)
        else:
            h = head - NUM_HEADS - NUM_KV_HEADS
            tl.store(v_cache_ptr + (slot * NUM_KV_HEADS + h) * HEAD_DIM + d, y.to(dt))


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [n, k] weight.

    Row chunks of up to 2048 columns (each thread loads 16 contiguous values of a row per chunk), 4 rows a
    program while that still gives two programs per SM of an H200, fewer rows for smaller weights. Measured
    on the H200 (`scripts/gemv_probe.py`): 4 rows x 2048 was best or within 3% of the best of 16 configs for
    each Llama-3.2-1B projection, and beats cuBLAS on every one (o 1.4x, down 1.3x).
    """
    block_k = min(2048, triton.next_power_of_2(k))
    block_n = max(1, 8192 // block_k)
    while block_n > 1 and triton.cdiv(n, block_n) < 2 * 132:
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


QKV_ROPE_PAIRS = 2  # rotation pairs a program of the q|k|v GEMV owns (4 weight rows, as `gemv_config`)


def gemv_qkv_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    prologue: int,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused q|k|v projection of one decode token with RoPE and the KV-cache write in its epilogue.

    semantics:
        qkv, residual' = gemv(x, weight, prologue, residual, norm_weight, eps)     # prologue NORM / ADD_NORM
        q = rope_and_cache(q, k, v of qkv, rope, kv, slot_mapping, ...)           # k, v written to the cache
        return q [1, H, D], residual'
    rope: this token's (cos, sin), [1, D] each; kv: the layer's (k_cache, v_cache), [..., KVH, D] contiguous.
    """
    dim = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    assert prologue in (NORM, ADD_NORM) and x.shape[0] == 1 and x.is_contiguous()
    assert dim % (2 * QKV_ROPE_PAIRS) == 0 and all(c.is_contiguous() for c in (*rope, *kv))
    q = torch.empty(1, num_heads, dim, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if prologue == ADD_NORM else None
    k = weight.shape[1]
    block_k = gemv_config(weight.shape[0], k)[1]  # the row chunk of the plain GEMV
    _gemv_qkv_rope_kernel[(weight.shape[0] // (2 * QKV_ROPE_PAIRS),)](
        x,
        residual if residual is not None else x,
        res_out if res_out is not None else x,
        norm_weight,
        weight,
        q,
        kv[0],
        kv[1],
        rope[0],
        rope[1],
        slot_mapping,
        k,
        weight.stride(0),
        eps,
        PROLOGUE=prologue,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=dim,
        PAIRS=QKV_ROPE_PAIRS,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return q, res_out
