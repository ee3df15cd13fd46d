"""Random PEFT LoRA adapters of a model's shape, written to disk (for benchmarks and tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig

from kiln_common.lora_targets import MODULE_PARENT, TARGET_MODULES


def module_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA target module of a Llama-family config."""
    h, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # TARGET_MODULES order
    return dict(zip(TARGET_MODULES, shapes, strict=True))


def write_random_adapter(
    path: Path,
    config: PretrainedConfig,
    rank: int,
    seed: int,
    alpha: float | None = None,
    targets: tuple[str, ...] = TARGET_MODULES,
    std: float = 0.02,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with random A and non-zero random B."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.num_hidden_layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": False,
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return path
