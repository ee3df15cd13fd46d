"""The PEFT LoRA directory format, checked once: its files and its config, as every reader needs them."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln_common.errors import InvalidAdapterError
from kiln_common.lora_targets import MODULE_PARENT, TARGET_MODULES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PARENTS = "|".join(sorted(set(MODULE_PARENT.values())))  # mlp|self_attn
# PEFT's tensor names: "...layers.<N>.<parent>.<module>.lora_<A|B>[.<adapter name>].weight"
WEIGHT_NAME = re.compile(rf"(?:.*\.)?layers\.(\d+)\.({_PARENTS})\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: the base model's layer count and each target module's (in, out) features."""

    num_layers: int
    modules: Mapping[str, tuple[int, int]]  # module -> (in_features, out_features)

    @classmethod
    def from_config(cls, config: Any) -> BaseShapes:
        """From a transformers Llama-family config: hidden and intermediate size, heads, layers."""
        hidden, inter = int(config.hidden_size), int(config.intermediate_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        q, kv = heads * head_dim, kv_heads * head_dim
        # in TARGET_MODULES order: q, k, v, o, gate, up, down
        sizes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter)]
        sizes.append((inter, hidden))
        return cls(int(config.num_hidden_layers), dict(zip(TARGET_MODULES, sizes, strict=True)))


def parse_weight_name(name: str) -> tuple[int, str, str] | None:
    """PEFT tensor name -> (layer, module, "A" or "B"); None when it is not a LoRA weight of a target."""
    m = WEIGHT_NAME.match(name)
    if m is None or m.group(3) not in TARGET_MODULES or MODULE_PARENT[m.group(3)] != m.group(2):
        return None
    return int(m.group(1)), m.group(3), m.group(4)


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


def check_directory(path: Path, max_bytes: int) -> None:
    """A plain directory of plain files: no symlinks (itself or inside), no pickle files, within max_bytes."""
    if path.is_symlink():
        raise InvalidAdapterError(f"{path} is a symlink; adapters are read from plain directories only")
    if not path.is_dir():
        raise InvalidAdapterError(f"adapter path {path} is not a directory")
    total = 0
    for entry in os.scandir(path):
        if entry.is_symlink():
            raise InvalidAdapterError(f"{path}: {entry.name} is a symlink; adapters must hold plain files")
        if entry.name.endswith(_PICKLE_SUFFIXES):
            raise InvalidAdapterError(f"{path}: {entry.name} is a pickle file; only safetensors are accepted")
        if entry.is_file(follow_symlinks=False):
            total += entry.stat(follow_symlinks=False).st_size
    if total > max_bytes:
        raise InvalidAdapterError(f"{path}: {total} bytes exceeds the adapter size limit ({max_bytes} bytes)")


def _check_tensor(name: str, tensor: torch.Tensor, expected: tuple[int, int]) -> None:
    """One LoRA matrix: a 2-d float of the expected shape (-1 = any), every value finite."""
    if tensor.dtype not in _FLOAT_DTYPES:
        raise InvalidAdapterError(f"{name} has dtype {tensor.dtype}; expected float32, float16 or bfloat16")
    shape = tuple(tensor.shape)
    if len(shape) != 2 or any(e >= 0 and s != e for s, e in zip(shape, expected, strict=True)):
        want = "x".join("?" if e < 0 else str(e) for e in expected)
        raise InvalidAdapterError(f"{name} has shape {list(shape)}, expected [{want}]")
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidAdapterError(f"{name} holds NaN or infinite values")


def check_weights(path: Path, cfg: PeftConfig, base: BaseShapes | None) -> None:
    """Every tensor of the weights file: a LoRA matrix of a configured target, the config's rank, the base
    model's layer range and (in, out) features when `base` is known, a float dtype, finite values, A/B paired.
    """
    from safetensors import safe_open

    seen: dict[tuple[int, str], set[str]] = {}
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:  # type: ignore[no-untyped-call]
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                parsed = parse_weight_name(name)
                if parsed is None:
                    raise InvalidAdapterError(f"{path}: {name} is not a LoRA weight of a supported module")
                layer, module, side = parsed
                if module not in cfg.target_modules:
                    raise InvalidAdapterError(f"{path}: {name}: {module} is not in target_modules")
                if base is not None and layer >= base.num_layers:
                    raise InvalidAdapterError(
                        f"{path}: {name}: layer {layer} is out of range ({base.num_layers} layers)"
                    )
                fan_in, fan_out = base.modules[module] if base is not None else (-1, -1)
                expected = (cfg.rank, fan_in) if side == "A" else (fan_out, cfg.rank)
                _check_tensor(f"{path}: {name}", weights.get_tensor(name), expected)
                seen.setdefault((layer, module), set()).add(side)
    except InvalidAdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a malformed weights file
        raise InvalidAdapterError(f"{path}: {WEIGHTS_FILE} is not readable safetensors: {exc}") from exc
    unpaired = sorted(f"layer {lm[0]} {lm[1]}" for lm, sides in seen.items() if sides != {"A", "B"})
    if not seen or unpaired:
        raise InvalidAdapterError(f"{path}: lora_A and lora_B weights do not pair up ({unpaired or 'none'})")


def check_adapter(path: Path, max_rank: int, max_bytes: int, base: BaseShapes | None = None) -> PeftConfig:
    """The whole check before an adapter becomes a version: files, config, then every tensor.

    One rank throughout (rank_pattern / alpha_pattern are refused: a version records one rank). Raises
    InvalidAdapterError naming what is wrong.
    """
    path = Path(path)
    check_directory(path, max_bytes)
    cfg = read_peft_config(path, max_rank)
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise InvalidAdapterError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    if not math.isfinite(cfg.alpha) or cfg.alpha <= 0:
        raise InvalidAdapterError(f"{path}: lora_alpha={cfg.alpha} must be a finite positive number")
    check_weights(path, cfg, base)
    return cfg
