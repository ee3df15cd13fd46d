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

from kiln_common.errors import InvalidAdapterError, VersionExistsError
from kiln_common.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft_config, safetensors_shapes

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterStore",
    "InvalidAdapterError",
    "PeftInfo",
    "VersionExistsError",
    "VersionMeta",
    "validate_name",
    "validate_peft_dir",
]

META_FILE = "meta.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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


def validate_peft_dir(path: Path, max_rank: int) -> PeftInfo:
    """Check a PEFT LoRA directory can be stored as a version: one rank throughout, weights of that rank."""
    cfg = read_peft_config(path, max_rank)
    # A version records one rank (meta.json, ListAdapters), so per-module patterns are refused here.
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise InvalidAdapterError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    shapes = safetensors_shapes(path / WEIGHTS_FILE)
    lora_a = {k: s for k, s in shapes.items() if "lora_A" in k}
    if not lora_a or len(lora_a) != sum("lora_B" in k for k in shapes):
        raise InvalidAdapterError(f"{path}: {WEIGHTS_FILE} must hold matching lora_A/lora_B tensors")
    for key, shape in lora_a.items():
        if len(shape) != 2 or shape[0] != cfg.rank:
            raise InvalidAdapterError(f"{path}: {key} has shape {shape}, expected rank {cfg.rank} rows")
    return PeftInfo(rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)


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
