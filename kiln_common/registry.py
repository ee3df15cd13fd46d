"""Durable adapter registry in Redis hashes: versions, aliases, traffic splits, sampling policy, events."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from kiln_common.adapter_alias import (
    AdapterEvent,
    AdapterNotFoundError,
    AdapterState,
    EventType,
    NoPreviousVersionError,
    ResolvedAdapter,
    normalise_split,
    parse_spec,
    state_from_hash,
)
from kiln_common.adapter_store import AdapterStore, InvalidAdapterError, VersionMeta, validate_name
from kiln_common.samples import EVENTS_STREAM

__all__ = [
    "AdapterEvent",
    "AdapterNotFoundError",
    "AdapterState",
    "EventType",
    "NoPreviousVersionError",
    "Registry",
    "ResolvedAdapter",
    "normalise_split",
    "parse_spec",
]

log = logging.getLogger(__name__)

# Flip an alias atomically: remember what it served (for Rollback), set the new target, and notify.
# KEYS: adapter hash, events stream.
# ARGV: current, split json, event type, tenant, name, time, detail, maxlen.
_FLIP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('KILN_NOT_FOUND') end
local cur = redis.call('HGET', KEYS[1], 'current')
local split = redis.call('HGET', KEYS[1], 'split') or ''
redis.call('HSET', KEYS[1], 'previous', cur, 'previous_split', split, 'current', ARGV[1], 'split', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'type', ARGV[3], 'tenant', ARGV[4],
  'adapter', ARGV[5], 'version', ARGV[1], 'time', ARGV[6], 'detail', ARGV[7])
return cur
"""

# Swap current and previous (alias and split) atomically. KEYS/ARGV as _FLIP minus current/split/type.
_ROLLBACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('KILN_NOT_FOUND') end
local prev = redis.call('HGET', KEYS[1], 'previous')
if not prev or prev == '' then return redis.error_reply('KILN_NO_PREVIOUS') end
local cur = redis.call('HGET', KEYS[1], 'current')
local split = redis.call('HGET', KEYS[1], 'split') or ''
local psplit = redis.call('HGET', KEYS[1], 'previous_split') or ''
redis.call('HSET', KEYS[1], 'previous', cur, 'previous_split', split, 'current', prev, 'split', psplit)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'rolled_back', 'tenant', ARGV[1],
  'adapter', ARGV[2], 'version', prev, 'time', ARGV[3], 'detail', ARGV[4])
return {cur, prev}
"""

# Record a written version and raise `latest`. KEYS: adapter hash, versions hash, events. ARGV: version, meta,
# tenant, name, time, maxlen.
_REGISTER = """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local latest = tonumber(redis.call('HGET', KEYS[1], 'latest') or '0')
if tonumber(ARGV[1]) > latest then redis.call('HSET', KEYS[1], 'latest', ARGV[1]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'type', 'published', 'tenant', ARGV[3],
  'adapter', ARGV[4], 'version', ARGV[1], 'time', ARGV[5], 'detail', '')
return 1
"""


class Registry:
    """Adapters, versions and aliases of every tenant; all changes are atomic and announced on kiln:events."""

    def __init__(self, client: redis.Redis, store: AdapterStore, events_maxlen: int = 10_000) -> None:
        self.redis: Any = client  # decode_responses=True
        self.store = store
        self.events_maxlen = events_maxlen
        self._flip = client.register_script(_FLIP)
        self._rollback = client.register_script(_ROLLBACK)
        self._register = client.register_script(_REGISTER)

    @staticmethod
    def _key(tenant: str, name: str) -> str:
        return f"kiln:reg:{tenant}:{name}"

    def create(self, tenant: str, name: str, sample_rate: float = 1.0) -> bool:
        """Create an adapter whose version 0 is the base model; False when it already existed."""
        validate_name(tenant, "tenant")
        validate_name(name)
        key = self._key(tenant, name)
        created = self.redis.hsetnx(key, "current", 0)
        if created:
            self.redis.hset(
                key, mapping={"latest": 0, "alloc": 0, "sample_rate": sample_rate, "created": time.time()}
            )
            self.redis.sadd(f"kiln:reg:{tenant}", name)
            self.emit(EventType.PUBLISHED, tenant, name, 0, "created; version 0 is the base model")
            log.info("created adapter %s/%s (v0 = base model)", tenant, name)
        return bool(created)

    def get(self, tenant: str, name: str) -> AdapterState:
        """The adapter's alias state; AdapterNotFoundError when missing."""
        h = self.redis.hgetall(self._key(tenant, name))
        if not h:
            raise AdapterNotFoundError(name)
        return state_from_hash(tenant, name, h)

    def list_adapters(self, tenant: str) -> list[AdapterState]:
        """The tenant's adapters sorted by name."""
        out = []
        for name in sorted(self.redis.smembers(f"kiln:reg:{tenant}")):
            h = self.redis.hgetall(self._key(tenant, name))
            if h:
                out.append(state_from_hash(tenant, name, h))
        return out

    def tenants(self) -> list[str]:
        """Every tenant with at least one adapter."""
        return sorted({k.split(":")[2] for k in self.redis.scan_iter("kiln:reg:*") if k.count(":") == 2})

    def versions(self, tenant: str, name: str) -> list[VersionMeta]:
        """Registered versions (without sample ids), oldest first."""
        self.get(tenant, name)
        raw = self.redis.hgetall(self._key(tenant, name) + ":versions")
        return sorted((VersionMeta.from_json(v) for v in raw.values()), key=lambda m: m.version)

    def has_version(self, tenant: str, name: str, version: int) -> bool:
        """True for 0 (the base model) or a registered version."""
        return version == 0 or bool(self.redis.hexists(self._key(tenant, name) + ":versions", str(version)))

    def require_version(self, tenant: str, name: str, version: int) -> None:
        """AdapterNotFoundError unless the adapter exists and has `version` (0 always exists)."""
        self.get(tenant, name)
        if not self.has_version(tenant, name, version):
            raise AdapterNotFoundError(f"{name}@v{version}")

    def publish(
        self,
        tenant: str,
        name: str,
        src: Path,
        *,
        origin: str = "published",
        parent: int | None = None,
        sample_ids: Sequence[str] = (),
        num_samples: int = 0,
        hyperparameters: Mapping[str, object] | None = None,
        eval_scores: Mapping[str, float] | None = None,
        promote: bool = False,
    ) -> VersionMeta:
        """Copy a PEFT directory in as the next version (creating the adapter if new); optionally promote.

        The copy is checked in full before a version number is taken: a refused adapter leaves no trace.
        """
        validate_name(tenant, "tenant")
        validate_name(name)
        staged = self.store.stage(src)
        return self.publish_staged(
            tenant,
            name,
            staged,
            origin=origin,
            parent=parent,
            sample_ids=sample_ids,
            num_samples=num_samples,
            hyperparameters=hyperparameters,
            eval_scores=eval_scores,
            promote=promote,
        )

    def publish_staged(
        self,
        tenant: str,
        name: str,
        staged: Path,
        *,
        origin: str = "published",
        parent: int | None = None,
        sample_ids: Sequence[str] = (),
        num_samples: int = 0,
        hyperparameters: Mapping[str, object] | None = None,
        eval_scores: Mapping[str, float] | None = None,
        promote: bool = False,
    ) -> VersionMeta:
        """Number and register a staging directory (from `AdapterStore.stage` or an upload) once it passes."""
        try:
            self.store.check(staged, label=name)
            self.create(tenant, name)
            state = self.get(tenant, name)
            version = int(self.redis.hincrby(self._key(tenant, name), "alloc", 1))
            meta = self.store.commit(
                staged,
                tenant,
                name,
                version,
                parent=state.current if parent is None else parent,
                origin=origin,
                num_samples=num_samples,
                sample_ids=tuple(sample_ids),
                hyperparameters=hyperparameters,
                eval_scores=eval_scores,
            )
        finally:
            self.store.discard(staged)
        self._register(
            keys=[self._key(tenant, name), self._key(tenant, name) + ":versions", EVENTS_STREAM],
            args=[version, meta.to_json(with_samples=False), tenant, name, time.time(), self.events_maxlen],
        )
        log.info("published %s/%s@v%d (%s, rank %d)", tenant, name, version, origin, meta.rank)
        if promote:
            self.promote(tenant, name, version)
        return meta

    def _run(self, script: Any, tenant: str, name: str, keys: list[str], args: list[object]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.ResponseError as exc:
            if "KILN_NOT_FOUND" in str(exc):
                raise AdapterNotFoundError(name) from None
            if "KILN_NO_PREVIOUS" in str(exc):
                raise NoPreviousVersionError(
                    f"adapter {name!r} has no previous version to roll back to"
                ) from None
            raise

    def promote(
        self,
        tenant: str,
        name: str,
        version: int,
        detail: str = "",
        event: EventType = EventType.PROMOTED,
    ) -> tuple[int, int]:
        """Point the alias at one version (100%); returns (previous, current). `event` and `detail` say why
        (a canary's automatic decision is announced as PROMOTED or ROLLED_BACK with its reason)."""
        if not self.has_version(tenant, name, version):
            raise AdapterNotFoundError(f"{name}@v{version}")
        prev = self._run(
            self._flip,
            tenant,
            name,
            [self._key(tenant, name), EVENTS_STREAM],
            [version, "", event.value, tenant, name, time.time(), detail, self.events_maxlen],
        )
        return int(prev), version

    def add_eval(self, tenant: str, name: str, version: int, scores: Mapping[str, float]) -> None:
        """Merge scores measured after a version was written (kiln-train's gate) into its registry entry,
        which ListVersions reports; the files on disk (weights, meta.json) stay as they were written."""
        key = self._key(tenant, name) + ":versions"
        raw = self.redis.hget(key, str(version))
        if raw is None:
            raise AdapterNotFoundError(f"{name}@v{version}")
        meta = VersionMeta.from_json(raw)
        merged = replace(meta, eval={**meta.eval, **scores})
        self.redis.hset(key, str(version), merged.to_json(with_samples=False))

    def note(self, tenant: str, name: str, version: int, action: str, reason: str) -> None:
        """Append to a version's history (canary started, promoted, rolled back, rejected) with the reason."""
        entry = json.dumps({"time": time.time(), "action": action, "reason": reason})
        self.redis.rpush(f"{self._key(tenant, name)}:history:{version}", entry)

    def history(self, tenant: str, name: str, version: int) -> list[dict[str, Any]]:
        """A version's history entries ({time, action, reason}), oldest first."""
        raw = self.redis.lrange(f"{self._key(tenant, name)}:history:{version}", 0, -1)
        return [json.loads(r) for r in raw]

    def rollback(self, tenant: str, name: str) -> tuple[int, int]:
        """Swap the alias back to what it served before the last change; returns (previous, current)."""
        cur, prev = self._run(
            self._rollback,
            tenant,
            name,
            [self._key(tenant, name), EVENTS_STREAM],
            [tenant, name, time.time(), "", self.events_maxlen],
        )
        return int(cur), int(prev)

    def set_split(
        self, tenant: str, name: str, shares: Sequence[tuple[int, float]]
    ) -> tuple[tuple[int, float], ...]:
        """Split traffic between versions by weight (one share = promote); returns the normalised split."""
        split = normalise_split(shares)
        for version, _ in split:
            if not self.has_version(tenant, name, version):
                raise AdapterNotFoundError(f"{name}@v{version}")
        if len(split) == 1:
            self.promote(tenant, name, split[0][0])
            return ((split[0][0], 1.0),)
        main = max(split, key=lambda s: s[1])[0]
        detail = ", ".join(f"v{v}: {w:.3f}" for v, w in split)
        self._run(
            self._flip,
            tenant,
            name,
            [self._key(tenant, name), EVENTS_STREAM],
            [
                main,
                json.dumps([list(s) for s in split]),
                EventType.SPLIT.value,
                tenant,
                name,
                time.time(),
                detail,
                self.events_maxlen,
            ],
        )
        return split

    def set_sample_rate(self, tenant: str, name: str, rate: float) -> None:
        """Set the fraction of generations recorded as samples (0 = off)."""
        if not 0.0 <= rate <= 1.0:
            raise InvalidAdapterError(f"must be in [0, 1], got {rate}", "sample_rate")
        self.get(tenant, name)
        self.redis.hset(self._key(tenant, name), "sample_rate", rate)

    def resolve(
        self, tenant: str, spec: str, rng: random.Random, sticky_key: str = ""
    ) -> ResolvedAdapter | None:
        """ "" → None (base); "name" → alias/split; "name@vN" → pinned. AdapterNotFoundError otherwise."""
        if not spec:
            return None
        name, version = parse_spec(spec)
        try:
            state = self.get(tenant, name)
        except AdapterNotFoundError:
            raise AdapterNotFoundError(spec) from None
        return self.pin(state, version, rng, sticky_key)

    def pin(
        self, state: AdapterState, version: int | None, rng: random.Random, sticky_key: str = ""
    ) -> ResolvedAdapter:
        """Turn a state (and an optional pinned version) into a concrete version with its files."""
        if version is None:
            version = state.pick_version(rng, sticky_key)
        elif not self.has_version(state.tenant, state.name, version):
            raise AdapterNotFoundError(f"{state.name}@v{version}")
        path = self.store.version_dir(state.tenant, state.name, version) if version > 0 else None
        return ResolvedAdapter(tenant=state.tenant, name=state.name, version=version, path=path)

    def emit(self, type_: EventType, tenant: str, name: str, version: int, detail: str = "") -> str:
        """Append a notification to kiln:events."""
        fields = {
            "type": type_.value,
            "tenant": tenant,
            "adapter": name,
            "version": version,
            "time": time.time(),
            "detail": detail,
        }
        return str(self.redis.xadd(EVENTS_STREAM, fields, maxlen=self.events_maxlen, approximate=True))

    def read_events(self, last_id: str, block_ms: int, count: int = 100) -> tuple[list[AdapterEvent], str]:
        """Events after `last_id` and the id to continue from, waiting up to block_ms for the first."""
        reply = self.redis.xread({EVENTS_STREAM: last_id}, count=count, block=block_ms)
        out = []
        for _stream, entries in reply or []:
            for entry_id, f in entries:
                last_id = entry_id
                try:
                    out.append(
                        AdapterEvent(
                            id=entry_id,
                            type=EventType(f["type"]),
                            tenant=f["tenant"],
                            adapter=f["adapter"],
                            version=int(f["version"]),
                            time=float(f["time"]),
                            detail=f.get("detail", ""),
                        )
                    )
                except (KeyError, ValueError):
                    log.warning("skipping malformed event %s: %s", entry_id, f)
        return out, last_id

    def last_event_id(self) -> str:
        """Id of the newest event ("0-0" when there is none)."""
        info = self.redis.xrevrange(EVENTS_STREAM, count=1)
        return str(info[0][0]) if info else "0-0"
