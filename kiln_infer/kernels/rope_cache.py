"""Rotary embedding of q and k fused with the KV-cache write: one Triton kernel per layer on CUDA."""

from __future__ import annotations

import logging

import torch

from kiln_infer.kernels.triton_import import tl, triton

log = logging.getLogger(__name__)

# Tokens per program: enough to amortise a program's load latency on long prefill steps, few enough that
# short steps (decode: T = batch) still spread over many programs.
ROPE_TOKENS_PER_PROGRAM_MAX = 64
ROPE_MIN_PROGRAMS_PER_HEAD = 32

if triton is not None:

    @triton.jit
    def _rotate(src, dst, c1, c2, s1, s2, rows, HALF: tl.constexpr):
        """Rotate-half RoPE (fp32 math) of the [BLOCK_T, D] rows at src into dst (pointers: first half)."""
        x1 = tl.load(src, mask=rows, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=rows, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=rows)
        tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=rows)

    @triton.jit(do_not_specialize=["num_tokens"])  # one build per tiling, whatever the step's size
    def _rope_cache_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        q_out_ptr,
        k_cache_ptr,
        v_cache_ptr,
        cos_ptr,
        sin_ptr,
        slot_ptr,
        num_tokens,
        q_stride,
        k_stride,
        v_stride,
        rope_stride,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HEADS: tl.constexpr,
    ):
        """One program per (HEADS heads of q | k | v, BLOCK_T tokens): rotate q / k, store q, k and v.

        HEADS divides both head counts, so a program's heads are all of q, of k or of v, and the cos/sin
        tiles are loaded once for all of them.
        """
        j = tl.program_id(0)
        tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        live = tok < num_tokens
        tok = tok.to(tl.int64)
        rows = live[:, None]
        first = j * HEADS  # first head row of this program in [q heads | k heads | v heads]
        if first < NUM_HEADS + NUM_KV_HEADS:
            offs = tl.arange(0, HALF)[None, :]
            cos = cos_ptr + tok[:, None] * rope_stride + offs
            sin = sin_ptr + tok[:, None] * rope_stride + offs
            c1 = tl.load(cos, mask=rows, other=0.0).to(tl.float32)
            c2 = tl.load(cos + HALF, mask=rows, other=0.0).to(tl.float32)
            s1 = tl.load(sin, mask=rows, other=0.0).to(tl.float32)
            s2 = tl.load(sin + HALF, mask=rows, other=0.0).to(tl.float32)
            if first < NUM_HEADS:
                for i in tl.static_range(HEADS):
                    src = q_ptr + tok[:, None] * q_stride + (first + i) * HEAD_DIM + offs
                    dst = q_out_ptr + (tok[:, None] * NUM_HEADS + first + i) * HEAD_DIM + offs
                    _rotate(src, dst, c1, c2, s1, s2, rows, HALF)
            else:
                slot = tl.load(slot_ptr + tok, mask=live, other=0).to(tl.int64)
                for i in tl.static_range(HEADS):
                    h = first - NUM_HEADS + i
                    src = k_ptr + tok[:, None] * k_stride + h * HEAD_DIM + offs
                    dst = k_cache_ptr + (slot[:, None] * NUM_KV_HEADS + h) * HEAD_DIM + offs
                    _rotate(src, dst, c1, c2, s1, s2, rows, HALF)
        else:  # V rows of HEADS consecutive heads are contiguous in the projection and in the cache
            h = first - NUM_HEADS - NUM_KV_HEADS
            full = tl.arange(0, HEADS * HEAD_DIM)[None, :]
            slot = tl.load(slot_ptr + tok, mask=live, other=0).to(tl.int64)
            x = tl.load(v_ptr + tok[:, None] * v_stride + h * HEAD_DIM + full, mask=rows)
            tl.store(v_cache_ptr + (slot[:, None] * NUM_KV_HEADS + h) * HEAD_DIM + full, x, mask=rows)


def rope_tokens_per_program(num_tokens: int) -> int:
    """Tokens one program of the fused kernel handles: a power of two in [2, ROPE_TOKENS_PER_PROGRAM_MAX]."""
    want = -(-num_tokens // ROPE_MIN_PROGRAMS_PER_HEAD)
    return min(ROPE_TOKENS_PER_PROGRAM_MAX, max(2, 1 << (want - 1).bit_length()))


def fused_rope_supported(head_dim: int) -> bool:
    """Whether the fused kernel handles this head size (a power of two) on this install."""
    return triton is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def fused_rope_self_check(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Run the kernel once against the torch path; False (and a warning) if it fails to build or disagrees."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        t = 5
        qkv = torch.randn(t, (num_heads + 2 * num_kv_heads) * head_dim, device=device, generator=gen).to(
            dtype
        )
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        rope = (
            torch.rand(t, head_dim, device=device).to(dtype),
            torch.rand(t, head_dim, device=device).to(dtype),
        )
        slots = torch.arange(t, device=device)
        outs = []
        for fn in (rope_and_cache_reference, rope_and_cache):
            kv = (
                torch.zeros(1, 8, num_kv_heads, head_dim, device=device, dtype=dtype),
                torch.zeros(1, 8, num_kv_heads, head_dim, device=device, dtype=dtype),
            )
            outs.append((fn(q, k, v, rope, kv, slots, num_heads, num_kv_heads), *kv))
        ok = all(
            torch.allclose(a.float(), b.float(), atol=0.1) for a, b in zip(outs[0], outs[1], strict=True)
        )
    except Exception:  # noqa: BLE001 - any build or launch failure means: use the torch path
        log.warning("fused rope/cache kernel unavailable; using the torch path", exc_info=True)
        return False
    if not ok:
        log.warning("fused rope/cache kernel disagrees with the torch path; using the torch path")
    return ok


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by per-token cos/sin [T, D] (the rotate-half convention of HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's K/V ([T, KVH, D]) into caches of shape [num_blocks, block_size, KVH, D]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def rope_and_cache_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Torch version of `rope_and_cache` (rotate, then an index copy into the cache); same contract."""
    t = q.shape[0]
    dim = q.shape[1] // num_heads
    cos, sin = rope
    q3, k3 = q.reshape(t, num_heads, dim), k.reshape(t, num_kv_heads, dim)
    q3, k3 = apply_rope(q3, cos, sin), apply_rope(k3, cos, sin)
    write_kv(kv[0], kv[1], k3, v.reshape(t, num_kv_heads, dim), slot_mapping)
    return q3


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotate q and k, write k and v into the cache, return rotated q [T, H, D]; one Triton kernel.

    semantics:
        q_rot = apply_rope(q.view(T, H, D), cos, sin); k_rot = apply_rope(k.view(T, KVH, D), cos, sin)
        cache_k[slot_mapping[t]] = k_rot[t]; cache_v[slot_mapping[t]] = v[t]
    q, k, v: [T, heads * D] with unit stride inside a row (views of a fused projection are fine).
    """
    t = q.shape[0]
    q_out = torch.empty(t, num_heads, q.shape[1] // num_heads, dtype=q.dtype, device=q.device)
    launch_rope_cache(q, k, v, q_out, rope, kv, slot_mapping, rope_tokens_per_program(t))
    return q_out


def launch_rope_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_out: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    block_t: int,
    heads: int = 1,
) -> None:
    """Launch the fused kernel with `block_t` tokens x `heads` heads a program; q_out: [T, H, D].

    Both are powers of two; `heads` divides the q and the kv head counts.
    """
    t, num_heads, dim = q_out.shape
    num_kv_heads = kv[0].shape[2]
    cos, sin = rope
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    assert num_heads % heads == 0 and num_kv_heads % heads == 0
    _rope_cache_kernel[((num_heads + 2 * num_kv_heads) // heads, triton.cdiv(t, block_t))](
        q,
        k,
        v,
        q_out,
        kv[0],
        kv[1],
        cos,
        sin,
        slot_mapping,
        t,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        cos.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=dim // 2,
        HEAD_DIM=dim,
        BLOCK_T=block_t,
        HEADS=heads,
        num_warps=max(1, min(4, block_t * dim // 512)),
    )
