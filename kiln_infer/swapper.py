"""Hot swap: a registry view kept fresh by tailing kiln:events; new versions are preloaded before use."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

import redis

from kiln_common.errors import FailedPreconditionError, InvalidAdapterError
from kiln_common.registry import (
    AdapterEvent,
    AdapterNotFoundError,
    AdapterState,
    EventType,
    Registry,
    ResolvedAdapter,
    parse_spec,
)
from kiln_infer.engine.types import AdapterRef
from kiln_infer.lora.errors import AdapterLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")

_VERIFY_PREFIX = "verify/"  # engine key of a staged adapter being checked (never a tenant name: '/' )
_ALIAS_CHANGES = (EventType.PROMOTED, EventType.ROLLED_BACK, EventType.SPLIT)


STICKY_KEY_HEADER = "x-kiln-sticky-key"  # gRPC metadata naming the end user: a split keeps it on one version


def sticky_key(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The request's sticky key from its metadata ("" when it has none)."""
    return next((str(v) for k, v in metadata if k.lower() == STICKY_KEY_HEADER), "")[:256]


def engine_ref(resolved: ResolvedAdapter | None) -> AdapterRef | None:
    """The engine's handle for a resolved version (None for the base model and for version 0)."""
    if resolved is None or resolved.path is None:
        return None
    return AdapterRef(key=resolved.key, path=resolved.path)


class AdapterView:
    """Alias states by (tenant, name), so resolving a request costs no Redis round trip."""

    def __init__(self, registry: Registry, seed: int | None = None) -> None:
        self.registry = registry
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str], AdapterState] = {}

    def rebuild(self) -> int:
        """Reload every tenant's adapters from the registry (the durable state); returns how many."""
        states = {
            (s.tenant, s.name): s for t in self.registry.tenants() for s in self.registry.list_adapters(t)
        }
        with self._lock:
            self._states = states
        return len(states)

    def refresh(self, tenant: str, name: str) -> AdapterState | None:
        """Re-read one adapter from the registry."""
        try:
            state = self.registry.get(tenant, name)
        except AdapterNotFoundError:
            with self._lock:
                self._states.pop((tenant, name), None)
            return None
        with self._lock:
            self._states[(tenant, name)] = state
        return state

    def state(self, tenant: str, name: str) -> AdapterState:
        """Cached state, read through to the registry on a miss; AdapterNotFoundError when missing."""
        with self._lock:
            state = self._states.get((tenant, name))
        if state is None:
            state = self.refresh(tenant, name)
        if state is None:
            raise AdapterNotFoundError(name)
        return state

    def states(self) -> list[AdapterState]:
        """Every cached state."""
        with self._lock:
            return list(self._states.values())

    def resolve(
        self, tenant: str, spec: str, sticky_key: str = ""
    ) -> tuple[ResolvedAdapter | None, AdapterState | None]:
        """Pin a request's adapter spec to a concrete version ("" = base model).

        With a `sticky_key` (the caller's end-user id) a split picks by its hash: the same version for that
        key on every request and every replica, for as long as the split stands.
        """
        if not spec:
            return None, None
        name, version = parse_spec(spec)
        try:
            state = self.state(tenant, name)
            return self.registry.pin(state, version, self._rng, sticky_key), state
        except AdapterNotFoundError:
            raise AdapterNotFoundError(spec) from None


class Preloader(Protocol):
    """What the swapper needs of the engine: load an adapter version into host memory ahead of use."""

    def preload_adapter(self, adapter: AdapterRef) -> None: ...


class HotSwapper:
    """Tails kiln:events: preloads versions before their alias flips in the view, then announces LOADED."""

    def __init__(
        self, view: AdapterView, engine: Preloader, poll_ms: int = 1000, max_preload: int = 8
    ) -> None:
        self.view = view
        self.engine = engine
        self.poll_ms = poll_ms
        self.max_preload = max_preload
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-hot-swapper", daemon=True)
        # Called from the swapper's thread with every batch of events it read (the WatchEvents fan-out).
        self.listeners: list[Callable[[list[AdapterEvent]], None]] = []

    def start(self) -> None:
        """Rebuild the view from the registry, preload what aliases serve, then follow events."""
        self._last_id = self.view.registry.last_event_id()  # before the rebuild, so nothing slips between
        count = self.view.rebuild()
        served = [(s, v) for s in self.view.states() for v in self._served_versions(s)]
        for state, version in served[: self.max_preload]:
            self.preload(state.tenant, state.name, version)
        log.info(
            "adapter view rebuilt: %d adapters, %d versions preloaded",
            count,
            min(len(served), self.max_preload),
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop following events."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @staticmethod
    def _served_versions(state: AdapterState) -> list[int]:
        versions = [v for v, _ in state.split] or [state.current]
        return [v for v in versions if v > 0]

    def preload(self, tenant: str, name: str, version: int, strict: bool = False) -> None:
        """Load a version into the engine's host cache (v0: nothing); errors logged, or raised if strict."""
        if version <= 0:
            return
        resolved = ResolvedAdapter(
            tenant=tenant,
            name=name,
            version=version,
            path=self.view.registry.store.version_dir(tenant, name, version),
        )
        ref = engine_ref(resolved)
        if ref is None:
            return
        try:
            self.engine.preload_adapter(ref)
        except Exception as exc:  # noqa: BLE001 - a bad version must not stop the swapper
            if strict:
                raise FailedPreconditionError(f"{resolved.label} cannot be served: {exc}") from exc
            log.warning("preloading %s failed: %s", resolved.key, exc)

    def verify(self, staged: Path) -> None:
        """Load a staged adapter through the engine's own loader (the served model's real shapes) before it
        gets a version number; InvalidAdapterError naming what does not fit."""
        ref = AdapterRef(key=f"{_VERIFY_PREFIX}{staged.name}", path=staged)
        try:
            self.engine.preload_adapter(ref)
        except AdapterLoadError as exc:
            message = str(exc).replace(repr(ref.key), "the upload").replace(str(staged), "the upload")
            raise InvalidAdapterError(message) from None

    def flip(self, tenant: str, name: str) -> AdapterState | None:
        """Preload what the registry now serves for an adapter, then let new requests see it."""
        try:
            state = self.view.registry.get(tenant, name)
        except AdapterNotFoundError:
            return self.view.refresh(tenant, name)
        for version in self._served_versions(state):
            self.preload(tenant, name, version)
        return self.view.refresh(tenant, name)

    def change(self, tenant: str, name: str, warm: Iterable[int], registry_op: Callable[[], T]) -> T:
        """The lifecycle ritual: preload `warm` versions, apply `registry_op`, then flip the live view.

        Preloading before the registry changes means the first request routed to a new version finds its
        weights warm; a version that fails to load stops the change (FailedPreconditionError) before the
        alias moves, and when `registry_op` raises, the view is left as it was.
        """
        for version in warm:
            self.preload(tenant, name, version, strict=True)
        result = registry_op()
        self.flip(tenant, name)
        return result

    def handle(self, events: Iterable[AdapterEvent]) -> None:
        """Apply a batch of events to the view."""
        for event in events:
            if event.type == EventType.PUBLISHED:
                # Warm the new version now; the alias may already point at it (publish with promote).
                self.preload(event.tenant, event.adapter, event.version)
                self.flip(event.tenant, event.adapter)
            elif event.type in _ALIAS_CHANGES:
                state = self.flip(event.tenant, event.adapter)
                if state is not None:
                    served = ", ".join(f"v{v}" for v in (self._served_versions(state) or [0]))
                    self.view.registry.emit(
                        EventType.LOADED, event.tenant, event.adapter, state.current, f"serving {served}"
                    )
                    log.info("hot swap: %s/%s now serves %s", event.tenant, event.adapter, served)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events, self._last_id = self.view.registry.read_events(self._last_id, block_ms=self.poll_ms)
                self.handle(events)
                for listener in self.listeners if events else ():
                    listener(events)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("hot swapper: Redis unavailable (%s); retrying", exc)
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - keep following events whatever one of them does
                log.exception("hot swapper: failed to apply events")
                self._stop.wait(1.0)
