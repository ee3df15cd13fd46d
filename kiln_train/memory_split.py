"""kiln-train's share of GPU memory, checked against kiln-infer's KV cache before training starts.

kiln-infer holds the base weights (kiln-train maps the same memory) and gives `--kv-memory-fraction` of the
memory left free after them to its KV cache. kiln-train caps its own allocator (activations, LoRA, optimizer
state) at `KILN_TRAIN_MEMORY_FRACTION` of the device with `torch.cuda.set_per_process_memory_fraction`, so a
large round runs out of memory in kiln-train, never in serving. The two must fit together, with headroom for
both CUDA contexts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from kiln_common.base_beacon import read_base_manifest
from kiln_common.load_report import read_load

log = logging.getLogger(__name__)

GIB = 2**30
TRAIN_SETTING = "KILN_TRAIN_MEMORY_FRACTION"
INFER_SETTING = "kiln-infer --kv-memory-fraction (KILN_KV_MEMORY_FRACTION)"


class MemorySplitError(ValueError):
    """kiln-train's memory share and kiln-infer's KV cache do not fit on the device together."""


@dataclass(frozen=True)
class MemorySplit:
    """The device's memory as both processes plan to use it, in bytes."""

    total_bytes: int
    base_bytes: int  # the shared base weights (counted once: kiln-train maps kiln-infer's copy)
    kv_memory_fraction: float  # kiln-infer's share of the memory free after the weights, for the KV cache
    train_memory_fraction: float  # kiln-train's cap, a share of the whole device
    headroom_bytes: int = 2 * GIB

    @property
    def kv_bytes(self) -> int:
        """What kiln-infer's KV cache takes (at most: it measured free memory after its own weights)."""
        return int(max(self.total_bytes - self.base_bytes, 0) * self.kv_memory_fraction)

    @property
    def train_bytes(self) -> int:
        """kiln-train's cap."""
        return int(self.total_bytes * self.train_memory_fraction)

    def check(self) -> None:
        """MemorySplitError, naming both settings, when weights + KV + training + headroom exceed it."""
        need = self.base_bytes + self.kv_bytes + self.train_bytes + self.headroom_bytes
        if need <= self.total_bytes:
            return
        room = self.total_bytes - self.base_bytes - self.kv_bytes - self.headroom_bytes
        most = max(room, 0) / self.total_bytes
        raise MemorySplitError(
            f"{TRAIN_SETTING}={self.train_memory_fraction} ({self.train_bytes / GIB:.1f} GiB) does not fit "
            f"beside {INFER_SETTING}={self.kv_memory_fraction} ({self.kv_bytes / GIB:.1f} GiB of KV cache) "
            f"on a {self.total_bytes / GIB:.1f} GiB device with {self.base_bytes / GIB:.1f} GiB of base "
            f"weights and {self.headroom_bytes / GIB:.1f} GiB of headroom: lower {TRAIN_SETTING} to at most "
            f"{most:.2f} or lower --kv-memory-fraction"
        )


def base_bytes(manifest: dict[str, Any] | None) -> int:
    """Size of the shared base weights from kiln-infer's manifest (0 when none is published)."""
    if manifest is None:
        return 0
    return sum(int(b.get("nbytes", 0)) for b in manifest.get("buckets", []))


def enforce_memory_split(
    redis: Any, device: torch.device, train_memory_fraction: float, headroom_gib: float
) -> MemorySplit | None:
    """At start (once the base is attached): check the split against what kiln-infer published, then cap.

    Returns None when there is nothing to enforce (no cap configured, or not CUDA); without kiln-infer's
    published KV fraction the cap is applied unchecked. Raises MemorySplitError when the two cannot fit.
    """
    if train_memory_fraction <= 0 or device.type != "cuda":
        return None
    load = read_load(redis)
    if load is None or load.kv_memory_fraction <= 0:
        log.warning(
            "kiln-infer publishes no --kv-memory-fraction yet: %s is applied unchecked", TRAIN_SETTING
        )
        kv_fraction = 0.0
    else:
        kv_fraction = load.kv_memory_fraction
    _, total = torch.cuda.mem_get_info(device)
    split = MemorySplit(
        total_bytes=int(total),
        base_bytes=base_bytes(read_base_manifest(redis)),
        kv_memory_fraction=kv_fraction,
        train_memory_fraction=train_memory_fraction,
        headroom_bytes=int(headroom_gib * GIB),
    )
    split.check()
    torch.cuda.set_per_process_memory_fraction(train_memory_fraction, device)
    log.info(
        "kiln-train capped at %.1f GiB (%s=%s) beside %.1f GiB of KV cache",
        split.train_bytes / GIB,
        TRAIN_SETTING,
        train_memory_fraction,
        split.kv_bytes / GIB,
    )
    return split
