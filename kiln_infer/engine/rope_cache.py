"""Rotary embedding of q and k fused with the KV-cache write: one Triton kernel per layer on CUDA."""

from __future__ import annotations

import logging

import torch

from kiln_infer.engine.attention import write_kv
from kiln_infer.engine.decode_attention import triton
from kiln_infer.engine.rope import apply_rope

log = logging.getLogger(__name__)

if triton is not None:
    import triton.language as tl

    @triton.jit
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
        q_stride,
        k_stride,
        v_stride,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """One program per (token, head row of q | k | v): rotate q / k, store q, k and v where they go."""
        t = tl.program_id(0)
        j = tl.program_id(1)
        offs = tl.arange(0, HALF)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if j < NUM_HEADS + NUM_KV_HEADS:
            c1 = tl.load(cos_ptr + t * HEAD_DIM + offs).to(tl.float32)
            c2 = tl.load(cos_ptr + t * HEAD_DIM + HALF + offs).to(tl.float32)
            s1 = tl.load(sin_ptr + t * HEAD_DIM + offs).to(tl.float32)
            s2 = tl.load(sin_ptr + t * HEAD_DIM + HALF + offs).to(tl.float32)
            if j < NUM_HEADS:
                src = q_ptr + t * q_stride + j * HEAD_DIM
                dst = q_out_ptr + (t * NUM_HEADS + j) * HEAD_DIM
            else:
                src = k_ptr + t * k_stride + (j - NUM_HEADS) * HEAD_DIM
                dst = k_cache_ptr + (slot * NUM_KV_HEADS + (j - NUM_HEADS)) * HEAD_DIM
            x1 = tl.load(src + offs).to(tl.float32)
            x2 = tl.load(src + HALF + offs).to(tl.float32)
            tl.store(dst + offs, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty))
            tl.store(dst + HALF + offs, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty))
        else:
            h = j - NUM_HEADS - NUM_KV_HEADS
            full = tl.arange(0, HEAD_DIM)
            x = tl.load(v_ptr + t * v_stride + h * HEAD_DIM + full)
            tl.store(v_cache_ptr + (slot * NUM_KV_HEADS + h) * HEAD_DIM + full, x)


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
        for use_triton in (False, True):
            kv = (
                torch.zeros(1, 8, num_kv_heads, head_dim, device=device, dtype=dtype),
                torch.zeros(1, 8, num_kv_heads, head_dim, device=device, dtype=dtype),
            )
            outs.append((rope_and_cache(q, k, v, rope, kv, slots, num_heads, num_kv_heads, use_triton), *kv))
        ok = all(
            torch.allclose(a.float(), b.float(), atol=0.1) for a, b in zip(outs[0], outs[1], strict=True)
        )
    except Exception:  # noqa: BLE001 - any build or launch failure means: use the torch path
        log.warning("fused rope/cache kernel unavailable; using the torch path", exc_info=True)
        return False
    if not ok:
        log.warning("fused rope/cache kernel disagrees with the torch path; using the torch path")
    return ok


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    use_triton: bool,
) -> torch.Tensor:
    """Rotate q and k, write k and v into the cache, return rotated q [T, H, D].

    semantics:
        q_rot = apply_rope(q.view(T, H, D), cos, sin); k_rot = apply_rope(k.view(T, KVH, D), cos, sin)
        cache_k[slot_mapping[t]] = k_rot[t]; cache_v[slot_mapping[t]] = v[t]
    q, k, v: [T, heads * D] with unit stride inside a row (views of a fused projection are fine).
    """
    t = q.shape[0]
    dim = q.shape[1] // num_heads
    cos, sin = rope
    if not use_triton:
        q3, k3 = q.reshape(t, num_heads, dim), k.reshape(t, num_kv_heads, dim)
        q3, k3 = apply_rope(q3, cos, sin), apply_rope(k3, cos, sin)
        write_kv(kv[0], kv[1], k3, v.reshape(t, num_kv_heads, dim), slot_mapping)
        return q3
    q_out = torch.empty(t, num_heads, dim, dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(t, num_heads + 2 * num_kv_heads)](
        q,
        k,
        v,
        q_out,
        kv[0],
        kv[1],
        cos,
        sin,
        slot_mapping,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=dim // 2,
        HEAD_DIM=dim,
        num_warps=1,
    )
    return q_out
