"""One copy of the base weights for two processes: pack into a few buckets, export, attach elsewhere.

kiln-infer packs its HF-named state dict into a few large contiguous buckets (256-byte aligned views),
builds its engine over the views, and exports the buckets: CUDA IPC handles on the GPU (one per bucket),
shared-memory files on CPU (``torch.from_file(shared=True)`` maps the same pages). The manifest saying where
each tensor lives is plain JSON (bytes as base64, never pickle): it travels through Redis or a file.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln_common.lora_targets import FUSED_GROUPS, TARGET_MODULES

log = logging.getLogger(__name__)

ALIGN = 256
DEFAULT_BUCKET_BYTES = 1 << 30
MANIFEST_VERSION = 1
SHM_PREFIX = "kiln-base-"

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_STORAGE_CLASSES = {"TypedStorage": torch.TypedStorage, "UntypedStorage": torch.UntypedStorage}


@dataclass(frozen=True)
class TensorSpec:
    """Where one named tensor lives: bucket index, byte offset, shape, dtype."""

    name: str
    bucket: int
    offset: int
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies."""
        n = _dtype(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class SharedWeights:
    """Buckets plus same-named views into them; whoever holds this keeps the storage alive."""

    buckets: list[torch.Tensor]  # [nbytes] uint8 each, one storage per bucket
    views: dict[str, torch.Tensor]
    specs: list[TensorSpec]
    generation: str
    shm_paths: list[Path]  # CPU shared-memory files (empty on CUDA)

    def close(self) -> None:
        """Unlink this exporter's shared-memory files (mappings stay valid until released)."""
        for p in self.shm_paths:
            p.unlink(missing_ok=True)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def canonical_order(names: list[str]) -> list[str]:
    """Layer by layer, projections in TARGET_MODULES order; other names keep their place around the layers."""
    seen_layer = False
    keys: dict[str, tuple[int, int, int]] = {}
    for i, name in enumerate(names):
        m = _LAYER_RE.search(name)
        if m:
            seen_layer = True
            leaf = name.rsplit(".", 2)[-2]
            rank = TARGET_MODULES.index(leaf) if leaf in TARGET_MODULES else len(TARGET_MODULES)
            keys[name] = (int(m.group(1)), rank, i)
        else:
            keys[name] = ((1 << 30) if seen_layer else -1, 0, i)
    return sorted(names, key=keys.__getitem__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_shm(shm_dir: Path) -> int:
    """Delete shared-memory files left by exporters that died (kill -9); returns how many."""
    removed = 0
    for p in shm_dir.glob(SHM_PREFIX + "*"):
        try:
            pid = int(p.name[len(SHM_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _new_bucket(nbytes: int, device: torch.device, path: Path | None) -> torch.Tensor:
    if path is not None:
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _view(bucket: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """A typed view of `spec` inside a uint8 bucket (no copy)."""
    return bucket[spec.offset : spec.offset + spec.nbytes].view(_dtype(spec.dtype)).view(spec.shape)


def _group_bytes(name: str, state: dict[str, torch.Tensor]) -> int:
    """Bytes (aligned) of the fused group that `name` starts, or of `name` alone."""
    # A fused group (kiln-infer runs it as one matmul over a fused view) never splits across buckets.
    for group in FUSED_GROUPS:
        if name.endswith(f".{group[0]}.weight"):
            names = [name.replace(f".{group[0]}.", f".{m}.") for m in group]
            if all(n in state for n in names):
                return sum(_align(state[n].numel() * state[n].element_size()) for n in names)
    t = state[name]
    return t.numel() * t.element_size()


def plan_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[list[TensorSpec], list[int]]:
    """Assign each tensor a bucket and aligned offset; aliases (tied weights) share the first one's place.

    A layer's q/k/v and gate/up weights always share a bucket (a new bucket starts before the group when it
    would not fit), so the engine can fuse them whatever the bucket size.
    """
    specs: list[TensorSpec] = []
    sizes: list[int] = [0]
    placed: dict[tuple[int, tuple[int, ...], torch.dtype], TensorSpec] = {}
    for name in canonical_order(list(state)):
        t = state[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in placed:
            prev = placed[key]
            specs.append(TensorSpec(name, prev.bucket, prev.offset, prev.shape, prev.dtype))
            continue
        nbytes = t.numel() * t.element_size()
        if sizes[-1] > 0 and sizes[-1] + _group_bytes(name, state) > bucket_bytes:
            sizes.append(0)
        spec = TensorSpec(name, len(sizes) - 1, sizes[-1], tuple(t.shape), _dtype_name(t.dtype))
        sizes[-1] = _align(sizes[-1] + nbytes)
        placed[key] = spec
        specs.append(spec)
    return specs, sizes


def pack_state_dict(
    state: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    shm_dir: Path | None = None,
) -> SharedWeights:
    """Copy `state` into a few contiguous buckets on `device`; on CPU with `shm_dir` they are shared files."""
    device = torch.device(device)
    generation = uuid.uuid4().hex[:12]
    specs, sizes = plan_buckets(state, bucket_bytes)
    paths: list[Path] = []
    if device.type == "cpu" and shm_dir is not None:
        shm_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_shm(shm_dir)
        if stale:
            log.info("removed %d stale shared-memory bucket(s) from %s", stale, shm_dir)
        paths = [shm_dir / f"{SHM_PREFIX}{os.getpid()}-{generation}-{i}" for i in range(len(sizes))]
    buckets = [_new_bucket(max(n, ALIGN), device, paths[i] if paths else None) for i, n in enumerate(sizes)]
    views: dict[str, torch.Tensor] = {}
    for spec in specs:
        view = _view(buckets[spec.bucket], spec)
        src = state[spec.name]
        if src.data_ptr() != view.data_ptr():
            view.copy_(src)
        views[spec.name] = view
    log.info(
        "packed %d tensors into %d bucket(s), %.1f MiB on %s",
        len(specs),
        len(buckets),
        sum(sizes) / 2**20,
        device,
    )
    return SharedWeights(buckets, views, specs, generation, paths)


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


def _export_cuda(bucket: torch.Tensor) -> dict[str, Any]:
    """CUDA IPC rebuild arguments of one bucket, JSON-able (the exporter must keep the bucket alive)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(bucket)
    (
        _,
        size,
        stride,
        offset,
        storage_cls,
        dtype,
        dev,
        handle,
        storage_bytes,
        storage_off,
        _,
        ref_handle,
        ref_off,
        event_handle,
        event_sync,
    ) = args
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": offset,
        "storage_cls": storage_cls.__name__,
        "dtype": _dtype_name(dtype),
        "device": dev,
        "handle": _b64(handle),
        "storage_bytes": storage_bytes,
        "storage_offset": storage_off,
        "ref_counter_handle": _b64(ref_handle),
        "ref_counter_offset": ref_off,
        "event_handle": _b64(event_handle),
        "event_sync_required": event_sync,
    }


def _import_cuda(d: dict[str, Any]) -> torch.Tensor:
    """Rebuild a bucket from `_export_cuda` output in another process (no allocation: it maps the memory)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    storage_cls = _STORAGE_CLASSES[d["storage_cls"]]
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(d["size"]),
        tuple(d["stride"]),
        d["offset"],
        storage_cls,
        _dtype(d["dtype"]),
        d["device"],
        _unb64(d["handle"]),
        d["storage_bytes"],
        d["storage_offset"],
        False,
        _unb64(d["ref_counter_handle"]),
        d["ref_counter_offset"],
        _unb64(d["event_handle"]),
        d["event_sync_required"],
    )


def export_manifest(shared: SharedWeights) -> dict[str, Any]:
    """JSON-able description of the buckets and every tensor in them."""
    buckets: list[dict[str, Any]] = []
    for i, b in enumerate(shared.buckets):
        entry: dict[str, Any] = {"nbytes": b.numel()}
        if b.device.type == "cuda":
            entry["cuda_ipc"] = _export_cuda(b)
        elif shared.shm_paths:
            entry["path"] = str(shared.shm_paths[i])
        else:
            raise ValueError("a CPU bucket can only be exported when packed with shm_dir")
        buckets.append(entry)
    return {
        "version": MANIFEST_VERSION,
        "generation": shared.generation,
        "pid": os.getpid(),
        "device": str(shared.buckets[0].device) if shared.buckets else "cpu",
        "buckets": buckets,
        "tensors": [[s.name, s.bucket, s.offset, list(s.shape), s.dtype] for s in shared.specs],
    }


def attach(manifest: dict[str, Any]) -> SharedWeights:
    """Map the exporter's buckets and return same-named views; allocates no memory for the weights."""
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"unsupported manifest version {manifest.get('version')!r}")
    buckets: list[torch.Tensor] = []
    for entry in manifest["buckets"]:
        if "cuda_ipc" in entry:
            buckets.append(_import_cuda(entry["cuda_ipc"]))
        else:
            path = Path(entry["path"])
            if not path.is_file():
                raise FileNotFoundError(f"shared bucket {path} is gone (exporter restarted?)")
            buckets.append(torch.from_file(str(path), shared=True, size=entry["nbytes"], dtype=torch.uint8))
    specs = [TensorSpec(n, b, o, tuple(shape), dt) for n, b, o, shape, dt in manifest["tensors"]]
    views = {s.name: _view(buckets[s.bucket], s) for s in specs}
    return SharedWeights(buckets, views, specs, manifest["generation"], shm_paths=[])
