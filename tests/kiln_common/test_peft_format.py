"""One check of a PEFT LoRA directory's files and config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln_common.errors import InvalidAdapterError
from kiln_common.lora_targets import TARGET_MODULES
from kiln_common.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft_config


def peft_dir(tmp_path: Path, **cfg: object) -> Path:
    """A directory with a weights file and a LoRA config (defaults overridden by `cfg`)."""
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, **cfg}))
    return tmp_path


def test_reads_a_lora_config(tmp_path: Path) -> None:
    cfg = read_peft_config(peft_dir(tmp_path, rank_pattern={"q_proj": 4}, use_rslora=True), max_rank=8)
    assert (cfg.rank, cfg.alpha, cfg.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert cfg.rank_pattern == {"q_proj": 4.0} and cfg.use_rslora


@pytest.mark.parametrize(
    ("targets", "expected"),
    [("all-linear", tuple(sorted(TARGET_MODULES))), ("q_proj|v_proj", ("q_proj", "v_proj"))],
)
def test_target_module_strings(tmp_path: Path, targets: str, expected: tuple[str, ...]) -> None:
    assert read_peft_config(peft_dir(tmp_path, target_modules=targets), 64).target_modules == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias"),
        ({"r": 16}, "rank 16 exceeds"),
        ({"rank_pattern": {"q_proj": 32}}, "rank 32 exceeds"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": "nothing_here"}, "non-empty"),
    ],
)
def test_refuses_what_we_cannot_serve(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidAdapterError, match=message):
        read_peft_config(peft_dir(tmp_path, **change), max_rank=8)


def test_refuses_missing_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match=CONFIG_FILE):
        read_peft_config(tmp_path, 8)
    peft_dir(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(InvalidAdapterError, match="pickle"):
        read_peft_config(tmp_path, 8)
    with pytest.raises(InvalidAdapterError, match="not a directory"):
        read_peft_config(tmp_path / "nope", 8)
