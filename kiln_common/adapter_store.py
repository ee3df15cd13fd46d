"""On-disk adapter store: immutable numbered PEFT versions under $KILN_HOME/adapters/<tenant>/<name>/v<N>/."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kiln_common.errors import InvalidAdapterError, VersionExistsError
from kiln_common.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseShapes, check_adapter, check_directory

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
STAGING_DIR = ".staging"  # under the adapters root: uploads and copies wait here until they pass the check
DEFAULT_MAX_ADAPTER_BYTES = 512 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_name(name: str, what: str = "adapter") -> str:
    """Return `name` if it is 1-64 of [A-Za-z0-9_.-] not starting with '.'; else raise InvalidAdapterError."""
    if not _NAME.match(name) or name.startswith("."):
        raise InvalidAdapterError(
            f"{what} name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . - (not starting with '.')", what
        )
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


def validate_peft_dir(
    path: Path, max_rank: int, base: BaseShapes | None = None, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
) -> PeftInfo:
    """The full check a directory passes before it becomes a version (peft_format.check_adapter)."""
    cfg = check_adapter(path, max_rank, max_bytes, base)
    return PeftInfo(rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)


def _copy_no_follow(src: Path, dst: Path, max_bytes: int) -> None:
    """Copy one plain file, refusing a symlink at `src` (O_NOFOLLOW) and files over max_bytes."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise InvalidAdapterError(f"cannot read {src.name} from {src.parent}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fin, dst.open("wb") as fout:
        copied = 0
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            copied += len(chunk)
            if copied > max_bytes:
                raise InvalidAdapterError(f"{src.name} exceeds the adapter size limit ({max_bytes} bytes)")
            fout.write(chunk)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterStore:
    """Immutable adapter versions on disk: staged, checked in full, then renamed into place with meta.json.

    `base` (the served model's shapes) makes the check cover layer range and (in, out) features too.
    """

    def __init__(
        self,
        home: Path,
        max_rank: int = 64,
        base: BaseShapes | None = None,
        max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    ) -> None:
        self.root = home / "adapters"
        self.max_rank = max_rank
        self.base = base
        self.max_bytes = max_bytes

    def adapter_dir(self, tenant: str, name: str) -> Path:
        """Directory holding an adapter's versions."""
        return self.root / validate_name(tenant, "tenant") / validate_name(name)

    def version_dir(self, tenant: str, name: str, version: int) -> Path:
        """PEFT directory of one version (version >= 1)."""
        if version < 1:
            raise InvalidAdapterError(f"version {version} has no files (0 is the base model)")
        return self.adapter_dir(tenant, name) / f"v{version}"

    def new_staging(self) -> Path:
        """An empty private directory for an upload (remove it with `discard`)."""
        staging = self.root / STAGING_DIR / uuid.uuid4().hex
        staging.mkdir(parents=True, mode=0o700)
        return staging

    def discard(self, staged: Path) -> None:
        """Remove a staging directory (after a failed check, or once committed)."""
        if staged.parent == self.root / STAGING_DIR:
            shutil.rmtree(staged, ignore_errors=True)

    def stage(self, src: Path) -> Path:
        """Copy a PEFT directory's two files (no symlinks, within size) into staging and check them there.

        Checking the copy, not `src`, means what was checked is what gets stored.
        """
        check_directory(src, self.max_bytes)
        staged = self.new_staging()
        try:
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                if (src / fname).exists() or (src / fname).is_symlink():
                    _copy_no_follow(src / fname, staged / fname, self.max_bytes)
            self.check(staged, label=str(src))
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def receive(self, config_json: str, chunks: Iterable[bytes], size: int, sha256: str = "") -> Path:
        """Write an upload (config text, then the weights in chunks) into staging and check it in full.

        The declared `size` must be within the limit up front, and the chunks must add up to it exactly (and
        to `sha256` when given); the staging directory is removed on any failure.
        """
        if not 0 < size <= self.max_bytes:
            raise InvalidAdapterError(f"weights_bytes {size} must be in 1..{self.max_bytes}", "weights_bytes")
        if len(config_json.encode()) > 1 << 20:
            raise InvalidAdapterError("adapter_config_json exceeds 1 MiB", "adapter_config_json")
        staged = self.new_staging()
        try:
            (staged / CONFIG_FILE).write_text(config_json)
            digest, written = hashlib.sha256(), 0
            with (staged / WEIGHTS_FILE).open("wb") as out:
                for chunk in chunks:
                    written += len(chunk)
                    if written > size:
                        raise InvalidAdapterError(
                            f"the weights exceed the declared {size} bytes", "weights_chunk"
                        )
                    digest.update(chunk)
                    out.write(chunk)
            if written != size:
                raise InvalidAdapterError(f"got {written} of {size} weight bytes", "weights_chunk")
            if sha256 and not hmac.compare_digest(digest.hexdigest(), sha256.lower()):
                raise InvalidAdapterError("the weights do not match weights_sha256", "weights_sha256")
            self.check(staged, label="the upload")
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def check(self, path: Path, label: str = "adapter") -> PeftInfo:
        """The full check against this store's limits and base model; InvalidAdapterError naming what fails.

        Messages name the directory as `label`, so a staging path on the server is never shown to callers.
        """
        try:
            return validate_peft_dir(path, self.max_rank, self.base, self.max_bytes)
        except InvalidAdapterError as exc:
            raise InvalidAdapterError(str(exc).replace(str(path), label), exc.field) from None

    def commit(
        self,
        staged: Path,
        tenant: str,
        name: str,
        version: int,
        *,
        parent: int,
        origin: str,
        num_samples: int = 0,
        sample_ids: tuple[str, ...] = (),
        hyperparameters: Mapping[str, object] | None = None,
        eval_scores: Mapping[str, float] | None = None,
    ) -> VersionMeta:
        """Rename a checked staging directory into place as version `version` with its meta.json."""
        info = self.check(staged, label=f"{name}@v{version}")
        final = self.version_dir(tenant, name, version)
        if final.exists():
            self.discard(staged)
            raise VersionExistsError(f"{final} already exists; versions are immutable")
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            meta = VersionMeta(
                version=version,
                parent=parent,
                sha256=file_sha256(staged / WEIGHTS_FILE),
                created=time.time(),
                origin=origin,
                rank=info.rank,
                num_samples=num_samples or len(sample_ids),
                sample_ids=tuple(sample_ids),
                hyperparameters=dict(hyperparameters or {}),
                eval=dict(eval_scores or {}),
            )
            (staged / META_FILE).write_text(meta.to_json())
            for f in staged.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(f, 0o444)  # immutable versions: read-only files
            os.chmod(staged, 0o755)
            os.rename(staged, final)  # fails if `final` appeared meanwhile: never overwrite a version
        except OSError as exc:
            self.discard(staged)
            if final.exists():
                raise VersionExistsError(f"{final} already exists; versions are immutable") from exc
            raise
        return meta
