"""The kernel set an engine runs on, chosen once when it is built: the Triton kernels on CUDA, else torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln_infer.kernels import decode_attention, fused_ops, rope_cache
from kiln_infer.kernels.triton_import import triton_available

Tensor = torch.Tensor


@dataclass(frozen=True)
class Kernels:
    """One implementation of each kernel contract; the model calls these and never asks which it holds.

    Each field keeps the contract (the "semantics" docstring) of the function of the same name in its module.
    `triton` says whether these are the Triton kernels: the paths that exist only there (the batch-1 GEMV
    decode, the fused RoPE + cache write, the LoRA bgmv kernels) are chosen from it when their owner is built.
    """

    triton: bool
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    silu_mul: Callable[[Tensor], Tensor]
    decode_attention: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]
    rope_and_cache: Callable[..., Tensor]


TORCH_KERNELS = Kernels(
    triton=False,
    rms_norm=fused_ops.rms_norm_reference,
    add_rms_norm=fused_ops.add_rms_norm_reference,
    silu_mul=fused_ops.silu_mul_reference,
    decode_attention=decode_attention.decode_attention_reference,
    rope_and_cache=rope_cache.rope_and_cache_reference,
)

TRITON_KERNELS = Kernels(
    triton=True,
    rms_norm=fused_ops.rms_norm,
    add_rms_norm=fused_ops.add_rms_norm,
    silu_mul=fused_ops.silu_mul,
    decode_attention=decode_attention.decode_attention,
    rope_and_cache=rope_cache.rope_and_cache,
)


def select_kernels(device: torch.device) -> Kernels:
    """The Triton kernels for a CUDA device on an install that has Triton, else the torch references."""
    return TRITON_KERNELS if device.type == "cuda" and triton_available() else TORCH_KERNELS
