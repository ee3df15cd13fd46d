"""The PEFT LoRA directory format, checked once: its files and its config, as every reader needs them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln_common.errors import InvalidAdapterError
from kiln_common.lora_targets import TARGET_MODULES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class PeftConfig:
    """What a valid PEFT LoRA directory's config says (the weights file is known to exist)."""

    rank: int  # r
    alpha: float  # lora_alpha
    target_modules: tuple[str, ...]  # sorted
    rank_pattern: Mapping[str, float] = field(default_factory=dict)  # module path pattern -> r
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)  # module path pattern -> alpha
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r


def _read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json of a directory that holds safetensors weights (never pickle)."""
    if not path.is_dir():
        raise InvalidAdapterError(f"adapter path {path} is not a directory")
    if not (path / CONFIG_FILE).is_file():
        raise InvalidAdapterError(f"{path} has no {CONFIG_FILE} (not a PEFT adapter directory)")
    if not (path / WEIGHTS_FILE).is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        hint = f" (found {', '.join(pickles)}: pickle weights are never loaded)" if pickles else ""
        raise InvalidAdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidAdapterError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{path / CONFIG_FILE} must hold a JSON object")
    return cfg


def _target_modules(path: Path, targets: object) -> tuple[str, ...]:
    """The config's target_modules as our module names: a list, "all-linear", or a PEFT regex string."""
    if targets == "all-linear":
        targets = list(TARGET_MODULES)
    elif isinstance(targets, str):
        pattern = targets
        targets = [m for m in TARGET_MODULES if re.fullmatch(pattern, m) or re.search(pattern, m)]
    if not isinstance(targets, list) or not targets:
        raise InvalidAdapterError(f"{path}: target_modules must be a non-empty list, got {targets!r}")
    unknown = sorted(set(targets) - set(TARGET_MODULES))
    if unknown:
        raise InvalidAdapterError(
            f"{path}: unsupported target_modules {unknown}; allowed {sorted(TARGET_MODULES)}"
        )
    return tuple(sorted(targets))


def read_peft_config(path: Path, max_rank: int) -> PeftConfig:
    """Check a PEFT LoRA directory (safetensors weights, a plain LoRA config, ranks we serve, our targets).

    Raises InvalidAdapterError naming what is wrong.
    """
    path = Path(path)
    cfg = _read_config(path)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapterError(f"{path}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    if cfg.get("use_dora") or cfg.get("modules_to_save"):
        raise InvalidAdapterError(f"{path}: DoRA and modules_to_save are not supported")
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapterError(f"{path}: LoRA bias={cfg.get('bias')!r} is not supported")
    rank_pattern = {str(k): float(v) for k, v in (cfg.get("rank_pattern") or {}).items()}
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise InvalidAdapterError(f"{path}: LoRA rank r={rank!r} must be a positive integer")
    for r in (rank, *rank_pattern.values()):
        if r > max_rank:
            raise InvalidAdapterError(f"{path}: LoRA rank {r:g} exceeds the maximum rank {max_rank}")
    return PeftConfig(
        rank=rank,
        alpha=float(cfg.get("lora_alpha", rank)),
        target_modules=_target_modules(path, cfg.get("target_modules")),
        rank_pattern=rank_pattern,
        alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
        use_rslora=bool(cfg.get("use_rslora", False)),
    )


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without loading the tensors."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 * 1024 * 1024:
                raise ValueError("implausible header size")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise InvalidAdapterError(f"{path} is not a readable safetensors file: {exc}") from exc
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
