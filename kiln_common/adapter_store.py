"""On-disk adapter store: immutable numbered PEFT versions under $KILN_HOME/adapters/<tenant>/<name>/v<N>/."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "meta.json"
# Llama-family projections the engine can apply a LoRA to.
LORA_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class InvalidAdapterError(ValueError):
    """An adapter name, tenant or PEFT directory is malformed (maps to INVALID_ARGUMENT on `field`)."""

    def __init__(self, message: str, field: str = "path") -> None:
        super().__init__(message)
        self.field = field


class VersionExistsError(RuntimeError):
    """A version directory already exists; versions are immutable."""


def validate_name(name: str, what: str = "adapter") -> str:
    """Return `name` if it is 1-64 of [A-Za-z0-9_.-] and not '.'/'..'; else raise InvalidAdapterError."""
    if not _NAME.match(name) or name in (".", ".."):
        raise InvalidAdapterError(f"{what} name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -", what)
    return name


@dataclass(frozen=True)
class PeftInfo:
    """What a validated PEFT LoRA directory holds."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class VersionMeta:
    """meta.json of one version: lineage, provenance and evaluation."""

    version: int
    parent: int  # 0 = the base model
    sha256: str  # of adapter_model.safetensors
    created: float
    origin: str  # "published" or "trained"
    rank: int
    num_samples: int = 0
    sample_ids: tuple[str, ...] = ()
    hyperparameters: Mapping[str, object] = field(default_factory=dict)
    eval: Mapping[str, float] = field(default_factory=dict)

    def to_json(self, with_samples: bool = True) -> str:
        """Serialise (sample ids may be left out for compact copies)."""
        d = asdict(self)
        d["sample_ids"] = list(self.sample_ids) if with_samples else []
        d["hyperparameters"] = dict(self.hyperparameters)
        d["eval"] = dict(self.eval)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VersionMeta:
        """Parse meta.json."""
        d = json.loads(text)
        return cls(
            version=int(d["version"]),
            parent=int(d["parent"]),
            sha256=str(d["sha256"]),
            created=float(d["created"]),
            origin=str(d["origin"]),
            rank=int(d["rank"]),
            num_samples=int(d.get("num_samples", 0)),
            sample_ids=tuple(d.get("sample_ids", ())),
            hyperparameters=dict(d.get("hyperparameters", {})),
            eval={str(k): float(v) for k, v in d.get("eval", {}).items()},
        )


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
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


def validate_peft_dir(path: Path, max_rank: int) -> PeftInfo:
    """Check a PEFT LoRA directory: safetensors weights, a LoRA config, rank and target modules we serve."""
    if not path.is_dir():
        raise InvalidAdapterError(f"adapter path {path} is not a directory")
    if not (path / WEIGHTS_FILE).is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        hint = f" (found {', '.join(pickles)}: pickle weights are never loaded)" if pickles else ""
        raise InvalidAdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise InvalidAdapterError(f"{path} has no {CONFIG_FILE}") from exc
    except ValueError as exc:
        raise InvalidAdapterError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapterError(f"{path}: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    rank = cfg.get("r")
    if not isinstance(rank, int) or not 0 < rank <= max_rank:
        raise InvalidAdapterError(f"{path}: LoRA rank r={rank!r} must be an integer in 1..{max_rank}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise InvalidAdapterError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    if cfg.get("use_dora") or cfg.get("modules_to_save"):
        raise InvalidAdapterError(f"{path}: DoRA and modules_to_save are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets == "all-linear":
        targets = sorted(LORA_TARGETS)
    if not isinstance(targets, list) or not targets:
        raise InvalidAdapterError(f"{path}: target_modules must be a non-empty list, got {targets!r}")
    unknown = sorted(set(targets) - LORA_TARGETS)
    if unknown:
        raise InvalidAdapterError(
            f"{path}: unsupported target_modules {unknown}; allowed {sorted(LORA_TARGETS)}"
        )
    shapes = _safetensors_shapes(path / WEIGHTS_FILE)
    lora_a = {k: s for k, s in shapes.items() if "lora_A" in k}
    if not lora_a or len(lora_a) != sum("lora_B" in k for k in shapes):
        raise InvalidAdapterError(f"{path}: {WEIGHTS_FILE} must hold matching lora_A/lora_B tensors")
    for key, shape in lora_a.items():
        if len(shape) != 2 or shape[0] != rank:
            raise InvalidAdapterError(f"{path}: {key} has shape {shape}, expected rank {rank} rows")
    return PeftInfo(
        rank=rank, alpha=float(cfg.get("lora_alpha", rank)), target_modules=tuple(sorted(targets))
    )


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterStore:
    """Immutable adapter versions on disk; each is written to a temp dir and renamed into place."""

    def __init__(self, home: Path, max_rank: int = 64) -> None:
        self.root = home / "adapters"
        self.max_rank = max_rank

    def adapter_dir(self, tenant: str, name: str) -> Path:
        """Directory holding an adapter's versions."""
        return self.root / validate_name(tenant, "tenant") / validate_name(name)

    def version_dir(self, tenant: str, name: str, version: int) -> Path:
        """PEFT directory of one version (version >= 1)."""
        if version < 1:
            raise InvalidAdapterError(f"version {version} has no files (0 is the base model)")
        return self.adapter_dir(tenant, name) / f"v{version}"

    def write_version(
        self,
        tenant: str,
        name: str,
        version: int,
        src: Path,
        *,
        parent: int,
        origin: str,
        num_samples: int = 0,
        sample_ids: tuple[str, ...] = (),
        hyperparameters: Mapping[str, object] | None = None,
        eval_scores: Mapping[str, float] | None = None,
    ) -> VersionMeta:
        """Copy a validated PEFT directory in as version `version` with its meta.json; atomic."""
        info = validate_peft_dir(src, self.max_rank)
        final = self.version_dir(tenant, name, version)
        if final.exists():
            raise VersionExistsError(f"{final} already exists; versions are immutable")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=final.parent))
        try:
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(src / fname, tmp / fname)
            meta = VersionMeta(
                version=version,
                parent=parent,
                sha256=file_sha256(tmp / WEIGHTS_FILE),
                created=time.time(),
                origin=origin,
                rank=info.rank,
                num_samples=num_samples or len(sample_ids),
                sample_ids=tuple(sample_ids),
                hyperparameters=dict(hyperparameters or {}),
                eval=dict(eval_scores or {}),
            )
            (tmp / META_FILE).write_text(meta.to_json())
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(f, 0o444)  # immutable versions: read-only files
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)  # fails if `final` appeared meanwhile: never overwrite a version
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists():
                raise VersionExistsError(f"{final} already exists; versions are immutable") from exc
            raise
        return meta
