"""Read a PEFT LoRA directory (safetensors only) into host tensors keyed by (layer, module)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln_common.errors import InvalidAdapterError
from kiln_common.lora_targets import MODULE_PARENT
from kiln_common.peft_format import WEIGHTS_FILE, PeftConfig, parse_weight_name, read_peft_config
from kiln_infer.lora.errors import AdapterLoadError


@dataclass
class LoraWeights:
    """One adapter on the host: per (layer, module) the A [r, in] and scaled B [out, r] matrices."""

    key: str
    rank: int  # largest rank over modules
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]  # already multiplied by the module's scaling

    @property
    def nbytes(self) -> int:
        """Host memory held by the adapter."""
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def _pattern_value(pattern: dict[str, float], layer: int, module: str, default: float) -> float:
    """PEFT rank_pattern / alpha_pattern lookup: a key matches the module path by suffix or regex."""
    path = f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
    for key, value in pattern.items():
        if path.endswith(key) or re.fullmatch(f".*{key}", path):
            return float(value)
    return default


def _read_config(key: str, path: Path, max_rank: int) -> PeftConfig:
    """adapter_config.json of a PEFT LoRA directory with safetensors weights, checked by the one PEFT rule."""
    try:
        return read_peft_config(path, max_rank)
    except InvalidAdapterError as exc:
        raise AdapterLoadError(f"adapter {key!r}: {exc}") from exc


def load_peft_adapter(key: str, path: Path, max_rank: int) -> LoraWeights:
    """Load and validate a PEFT LoRA directory; raises AdapterLoadError naming what is wrong."""
    path = Path(path)
    cfg = _read_config(key, path, max_rank)
    weights_file = path / WEIGHTS_FILE
    r_default, alpha_default, rslora = cfg.rank, cfg.alpha, cfg.use_rslora
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(weights_file), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad adapter file
        raise AdapterLoadError(f"adapter {key!r}: cannot read {weights_file.name}: {exc}") from exc
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    for name, tensor in tensors.items():
        parsed = parse_weight_name(name)
        if parsed is None or parsed[1] not in cfg.target_modules:
            raise AdapterLoadError(f"adapter {key!r}: unsupported weight {name!r}")
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise AdapterLoadError(f"adapter {key!r}: {name} must be a 2-d float tensor, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterLoadError(f"adapter {key!r}: {name} holds NaN or infinite values")
        layer, module, side = parsed
        (a if side == "A" else b)[(layer, module)] = tensor.float()
    if not a or set(a) != set(b):
        raise AdapterLoadError(f"adapter {key!r}: lora_A and lora_B weights do not pair up")
    rank = 0
    for lm, a_t in a.items():
        r = a_t.shape[0]
        if b[lm].shape[1] != r:
            raise AdapterLoadError(f"adapter {key!r}: lora_A/lora_B rank mismatch at {lm}")
        if r > max_rank:
            raise AdapterLoadError(f"adapter {key!r}: rank {r} exceeds the server's max_lora_rank {max_rank}")
        rank = max(rank, r)
        r_cfg = _pattern_value(dict(cfg.rank_pattern), *lm, r_default)
        alpha = _pattern_value(dict(cfg.alpha_pattern), *lm, alpha_default)
        scaling = alpha / math.sqrt(r_cfg) if rslora else alpha / r_cfg
        b[lm] = b[lm] * scaling
    return LoraWeights(key=key, rank=rank, a=a, b=b)
