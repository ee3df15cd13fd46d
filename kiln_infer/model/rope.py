"""Rotary position embeddings (default, linear and llama3 scaling) as precomputed cos/sin tables."""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig


def _rope_params(config: PretrainedConfig) -> dict[str, object]:
    """Rope settings from either `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_frequencies(config: PretrainedConfig, head_dim: int) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim / 2] in fp32, with the config's scaling applied."""
    p = _rope_params(config)
    theta = float(p["rope_theta"])  # type: ignore[arg-type]
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = p["rope_type"]
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(p["factor"])  # type: ignore[arg-type]
    if kind == "llama3":
        factor = float(p["factor"])  # type: ignore[arg-type]
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])  # type: ignore[arg-type]
        old_len = float(p["original_max_position_embeddings"])  # type: ignore[arg-type]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3)")


def rope_tables(
    config: PretrainedConfig, head_dim: int, max_positions: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim] in `dtype` (computed in fp32 like transformers)."""
    inv = inv_frequencies(config, head_dim).to(device)
    freqs = torch.arange(max_positions, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
