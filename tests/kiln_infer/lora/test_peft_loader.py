"""PEFT directories load with the right scaling, and bad ones fail with a clear AdapterLoadError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from kiln_infer.lora.errors import AdapterLoadError
from kiln_infer.lora.peft_loader import load_peft_adapter
from kiln_infer.lora.random_adapter import write_random_adapter

CONFIG = LlamaConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=100,
)


def edit_config(path: Path, **changes: object) -> None:
    """Rewrite fields of adapter_config.json."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_scaling_and_rslora(tmp_path: Path) -> None:
    path = write_random_adapter(tmp_path / "a", CONFIG, rank=4, seed=0, alpha=8)
    from safetensors.torch import load_file

    raw = load_file(str(path / "adapter_model.safetensors"))
    b_raw = raw["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    plain = load_peft_adapter("t/a@v1", path, max_rank=8)
    assert plain.rank == 4 and len(plain.a) == 2 * 7
    assert torch.allclose(plain.b[(1, "down_proj")], b_raw * 2.0)  # alpha / r
    edit_config(path, use_rslora=True)
    rs = load_peft_adapter("t/a@v1", path, max_rank=8)
    assert torch.allclose(rs.b[(1, "down_proj")], b_raw * 4.0)  # alpha / sqrt(r)
    edit_config(path, use_rslora=False, alpha_pattern={"down_proj": 2})
    patterned = load_peft_adapter("t/a@v1", path, max_rank=8)
    assert torch.allclose(patterned.b[(1, "down_proj")], b_raw * 0.5)
    assert torch.allclose(patterned.b[(1, "up_proj")], plain.b[(1, "up_proj")])


def test_missing_directory_or_config(tmp_path: Path) -> None:
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        load_peft_adapter("t/x@v1", tmp_path, max_rank=8)


def test_pickle_only_weights_are_refused(tmp_path: Path) -> None:
    path = write_random_adapter(tmp_path / "a", CONFIG, rank=4, seed=0)
    (path / "adapter_model.safetensors").unlink()
    torch.save({}, path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle"):
        load_peft_adapter("t/a@v1", path, max_rank=8)


def test_rank_above_maximum(tmp_path: Path) -> None:
    path = write_random_adapter(tmp_path / "a", CONFIG, rank=16, seed=0)
    with pytest.raises(AdapterLoadError, match="rank 16 exceeds"):
        load_peft_adapter("t/a@v1", path, max_rank=8)


def test_unsupported_target_modules(tmp_path: Path) -> None:
    path = write_random_adapter(tmp_path / "a", CONFIG, rank=4, seed=0)
    edit_config(path, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterLoadError, match="lm_head"):
        load_peft_adapter("t/a@v1", path, max_rank=8)


def test_corrupt_weights(tmp_path: Path) -> None:
    path = write_random_adapter(tmp_path / "a", CONFIG, rank=4, seed=0)
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterLoadError, match="cannot read"):
        load_peft_adapter("t/a@v1", path, max_rank=8)
