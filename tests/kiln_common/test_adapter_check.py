"""Every way an adapter can be wrong is refused, with a message naming what, before a version exists."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file, save_file

from kiln_common.adapter_store import AdapterStore, InvalidAdapterError
from kiln_common.model_loader import ModelSource
from kiln_common.peft_format import WEIGHTS_FILE, BaseShapes
from kiln_common.registry import Registry

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def store(tmp_path: Path, smollm2: ModelSource) -> AdapterStore:
    """A store that checks against SmolLM2's shapes, with a small size limit."""
    return AdapterStore(tmp_path / "home", max_rank=16, base=BaseShapes.from_config(smollm2.config))


@pytest.fixture
def copy(peft_adapter: Path, tmp_path: Path) -> Path:
    """A private copy of the session's PEFT adapter (rank 8: q, v, o, down)."""
    return Path(shutil.copytree(peft_adapter, tmp_path / "copy"))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the weights file after `change` edits its tensors."""
    tensors = load_file(str(path / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_good_adapter_passes(store: AdapterStore, copy: Path) -> None:
    staged = store.stage(copy)
    assert store.check(staged).rank == 8
    store.discard(staged)


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[Q_B][0, 0] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    t[Q_A][1, 2] = float("inf")


def _wide(t: dict[str, torch.Tensor]) -> None:
    t[Q_A] = torch.zeros(8, 100)


def _rank(t: dict[str, torch.Tensor]) -> None:
    t[Q_B] = torch.zeros(t[Q_B].shape[0], 4)


def _unknown(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(8, 576)


def _untargeted(t: dict[str, torch.Tensor]) -> None:
    t[Q_A.replace("q_proj", "k_proj")] = torch.zeros(8, 576)
    t[Q_B.replace("q_proj", "k_proj")] = torch.zeros(192, 8)


def _layer(t: dict[str, torch.Tensor]) -> None:
    t[Q_A.replace("layers.0", "layers.99")] = t[Q_A].clone()
    t[Q_B.replace("layers.0", "layers.99")] = t[Q_B].clone()


def _dtype(t: dict[str, torch.Tensor]) -> None:
    t[Q_A] = t[Q_A].to(torch.int32)


def _unpaired(t: dict[str, torch.Tensor]) -> None:
    del t[Q_B]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_nan, "q_proj.lora_B.weight holds NaN or infinite"),
        (_inf, "q_proj.lora_A.weight holds NaN or infinite"),
        (_wide, r"shape \[8, 100\], expected \[8x576\]"),
        (_rank, r"shape \[576, 4\], expected \[576x8\]"),
        (_unknown, "rotary.lora_A.weight is not a LoRA weight of a supported module"),
        (_untargeted, "k_proj is not in target_modules"),
        (_layer, "layer 99 is out of range"),
        (_dtype, "dtype torch.int32"),
        (_unpaired, "do not pair up"),
    ],
    ids=[
        "nan",
        "inf",
        "wrong-shape",
        "wrong-rank",
        "unknown-module",
        "untargeted",
        "layer",
        "dtype",
        "unpaired",
    ],
)
def test_bad_tensors_are_refused(
    store: AdapterStore, copy: Path, change: Callable[[dict[str, torch.Tensor]], None], message: str
) -> None:
    edit_tensors(copy, change)
    with pytest.raises(InvalidAdapterError, match=message):
        store.stage(copy)
    assert list((store.root / ".staging").iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 32}, "rank 32 exceeds the maximum rank 16"),
        ({"r": 4}, r"has shape \[8, \d+\], expected \[4x\d+\]"),
        ({"peft_type": "IA3"}, "peft_type must be LORA"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"lora_alpha": float("inf")}, "lora_alpha=inf must be a finite positive number"),
    ],
    ids=["rank-limit", "rank-mismatch", "peft-type", "target", "alpha"],
)
def test_bad_configs_are_refused(
    store: AdapterStore, copy: Path, changes: dict[str, object], message: str
) -> None:
    edit_config(copy, **changes)
    with pytest.raises(InvalidAdapterError, match=message):
        store.stage(copy)


def test_pickle_is_refused(store: AdapterStore, copy: Path) -> None:
    torch.save({}, copy / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="adapter_model.bin is a pickle file"):
        store.stage(copy)
    (copy / WEIGHTS_FILE).unlink()
    (copy / "adapter_model.bin").rename(copy / "weights.pt")
    with pytest.raises(InvalidAdapterError, match="pickle"):
        store.stage(copy)


def test_symlinks_are_refused(store: AdapterStore, copy: Path, tmp_path: Path) -> None:
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(copy)
    with pytest.raises(InvalidAdapterError, match="is a symlink"):
        store.stage(linked_dir)
    secret = tmp_path / "secret.safetensors"
    (copy / WEIGHTS_FILE).rename(secret)
    os.symlink(secret, copy / WEIGHTS_FILE)
    with pytest.raises(InvalidAdapterError, match="adapter_model.safetensors is a symlink"):
        store.stage(copy)


def test_size_limit(tmp_path: Path, smollm2: ModelSource, copy: Path) -> None:
    small = AdapterStore(tmp_path / "small", base=BaseShapes.from_config(smollm2.config), max_bytes=10_000)
    with pytest.raises(InvalidAdapterError, match=r"exceeds the adapter size limit \(10000 bytes\)"):
        small.stage(copy)


def test_refused_publish_takes_no_version_number(
    redis_client: redis.Redis, store: AdapterStore, copy: Path, peft_adapter: Path
) -> None:
    registry = Registry(redis_client, store)
    tenant = "t" + uuid.uuid4().hex[:8]
    edit_tensors(copy, _nan)
    with pytest.raises(InvalidAdapterError, match="NaN"):
        registry.publish(tenant, "support", copy)
    assert registry.list_adapters(tenant) == []  # not even created
    assert registry.publish(tenant, "support", peft_adapter).version == 1
    with pytest.raises(InvalidAdapterError, match="NaN"):
        registry.publish(tenant, "support", copy)
    assert registry.publish(tenant, "support", peft_adapter).version == 2
    assert [m.version for m in registry.versions(tenant, "support")] == [1, 2]
