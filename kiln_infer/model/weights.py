"""One decoder layer's weights, borrowed from an HF-named state dict, with fused views where adjacent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln_common.lora_targets import MODULE_PARENT, TARGET_MODULES


def fuse_if_adjacent(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """A view concatenating `parts` on dim 0 when they already lie back to back in memory, else None."""
    first = parts[0]
    if not all(p.is_contiguous() and p.dtype == first.dtype and p.dim() == 2 for p in parts):
        return None
    if any(p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for p in parts):
        return None
    ptr = first.data_ptr()
    for p in parts:
        if p.data_ptr() != ptr or p.shape[1] != first.shape[1]:
            return None
        ptr += p.numel() * p.element_size()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


@dataclass
class LayerWeights:
    """One decoder layer's tensors, exactly the ones given (views at most, never copies)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    qkv: torch.Tensor | None = None  # fused view when q, k, v are adjacent
    gate_up: torch.Tensor | None = None  # fused view when gate, up are adjacent
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # Qwen3 per-head RMSNorm
    k_norm: torch.Tensor | None = None


def _module_weight(state: dict[str, torch.Tensor], layer: int, module: str) -> torch.Tensor:
    """The base weight of LoRA target `module` (e.g. "q_proj") in decoder layer `layer`."""
    return state[f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}.weight"]


def load_layer(state: dict[str, torch.Tensor], i: int) -> LayerWeights:
    """Decoder layer `i`'s tensors from an HF-named state dict, with fused views where they are adjacent."""
    p = f"model.layers.{i}."
    q, k, v, o, gate, up, down = (_module_weight(state, i, m) for m in TARGET_MODULES)
    w = LayerWeights(
        input_norm=state[p + "input_layernorm.weight"],
        post_norm=state[p + "post_attention_layernorm.weight"],
        q=q,
        k=k,
        v=v,
        o=o,
        gate=gate,
        up=up,
        down=down,
        q_bias=state.get(p + "self_attn.q_proj.bias"),
        k_bias=state.get(p + "self_attn.k_proj.bias"),
        v_bias=state.get(p + "self_attn.v_proj.bias"),
        q_norm=state.get(p + "self_attn.q_norm.weight"),
        k_norm=state.get(p + "self_attn.k_norm.weight"),
    )
    w.qkv = fuse_if_adjacent([w.q, w.k, w.v])
    w.gate_up = fuse_if_adjacent([w.gate, w.up])
    return w
