"""Adapter aliases as plain data: alias state, pinned versions, spec parsing, events, lookup errors."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kiln_common.adapter_store import InvalidAdapterError, validate_name

_SPEC = re.compile(r"^(?P<name>[^@]+)(?:@v(?P<version>\d+))?$")


class AdapterNotFoundError(LookupError):
    """No such adapter or version for this tenant (identical for missing and another tenant's)."""

    def __init__(self, spec: str) -> None:
        super().__init__(f"adapter {spec!r} not found")


class NoPreviousVersionError(RuntimeError):
    """Rollback with nothing to roll back to (maps to FAILED_PRECONDITION)."""


class EventType(str, Enum):
    """Kinds of `kiln:events` entries."""

    PUBLISHED = "published"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    SPLIT = "split"
    LOADED = "loaded"
    REJECTED = "rejected"


@dataclass(frozen=True)
class AdapterEvent:
    """One registry notification."""

    id: str
    type: EventType
    tenant: str
    adapter: str
    version: int
    time: float
    detail: str = ""


@dataclass(frozen=True)
class AdapterState:
    """An adapter's alias: one version, or a weighted split, plus its sampling policy."""

    tenant: str
    name: str
    current: int
    latest: int
    previous: int | None
    split: tuple[tuple[int, float], ...]  # (version, normalised weight); empty = `current` alone
    sample_rate: float  # fraction of generations recorded; 0 = off

    def pick_version(self, rng: random.Random, sticky_key: str = "") -> int:
        """The version a new request gets: by the hash of `sticky_key` when given (one end user sees one
        version, on every replica), else at random; weighted over the split."""
        if not self.split:
            return self.current
        x = split_point(self.tenant, self.name, sticky_key) if sticky_key else rng.random()
        for version, weight in self.split:
            x -= weight
            if x < 0:
                return version
        return self.split[-1][0]


@dataclass(frozen=True)
class ResolvedAdapter:
    """A concrete version a request is pinned to; `path` is None for version 0 (the base model)."""

    tenant: str
    name: str
    version: int
    path: Path | None

    @property
    def label(self) -> str:
        """What responses report: "name@vN"."""
        return f"{self.name}@v{self.version}"

    @property
    def key(self) -> str:
        """Unique engine key: "tenant/name@vN"."""
        return f"{self.tenant}/{self.label}"


def split_point(tenant: str, name: str, sticky_key: str) -> float:
    """A caller's fixed point in [0, 1) for one adapter: the same on every replica and every request."""
    digest = hashlib.sha256(f"{tenant}\0{name}\0{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def parse_spec(spec: str) -> tuple[str, int | None]:
    """ "name" → (name, None); "name@vN" → (name, N). Raises InvalidAdapterError."""
    m = _SPEC.match(spec)
    if not m:
        raise InvalidAdapterError(f"adapter {spec!r} must be 'name' or 'name@vN'", "adapter")
    version = m.group("version")
    return validate_name(m.group("name")), (int(version) if version is not None else None)


def state_from_hash(tenant: str, name: str, h: Mapping[str, str]) -> AdapterState:
    split = tuple((int(v), float(w)) for v, w in json.loads(h["split"])) if h.get("split") else ()
    prev = h.get("previous", "")
    return AdapterState(
        tenant=tenant,
        name=name,
        current=int(h.get("current", 0)),
        latest=int(h.get("latest", 0)),
        previous=int(prev) if prev else None,
        split=split,
        sample_rate=float(h.get("sample_rate", 1.0)),
    )


def normalise_split(shares: Sequence[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """Validate and normalise weights to sum to 1; versions must be distinct."""
    if not shares:
        raise InvalidAdapterError("shares must not be empty", "shares")
    versions = [v for v, _ in shares]
    if len(set(versions)) != len(versions):
        raise InvalidAdapterError("shares must name each version once", "shares")
    for v, w in shares:
        if v < 0 or not math.isfinite(w) or not w > 0:
            raise InvalidAdapterError(
                f"shares: version {v} weight {w}: versions must be >= 0 and weights finite and > 0"
            )
    total = sum(w for _, w in shares)
    return tuple((v, w / total) for v, w in shares)
