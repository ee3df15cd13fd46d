"""Announces kiln-infer's shared base weights in Redis: manifest, generation id, heartbeat key with a TTL."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from kiln_common.weight_share import SharedWeights, export_manifest, pack_state_dict

log = logging.getLogger(__name__)

MANIFEST_KEY = "kiln:base:manifest"
HEARTBEAT_KEY = "kiln:base:heartbeat"


class BaseBeacon:
    """Publishes the manifest once, then refreshes the heartbeat (value = generation) until stopped."""

    def __init__(
        self, redis: Any, shared: SharedWeights, ttl_s: float = 3.0, interval_s: float = 1.0
    ) -> None:
        self._redis = redis
        self._shared = shared
        self._ttl_ms = int(ttl_s * 1000)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-base-beacon", daemon=True)

    @property
    def generation(self) -> str:
        """Generation id of the weights announced."""
        return self._shared.generation

    def start(self) -> None:
        """Write the manifest and start heartbeating."""
        self._redis.set(MANIFEST_KEY, json.dumps(export_manifest(self._shared)))
        self._beat()
        self._thread.start()
        log.info("base weights announced: generation %s", self.generation)

    def _beat(self) -> None:
        self._redis.set(HEARTBEAT_KEY, self.generation, px=self._ttl_ms)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - Redis hiccups must not kill the server
                log.warning("base beacon: heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Stop heartbeating and withdraw the heartbeat (only if it is still ours), then unlink shm files."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        try:
            if self._redis.get(HEARTBEAT_KEY) in (self.generation, self.generation.encode()):
                self._redis.delete(HEARTBEAT_KEY)
        except Exception as exc:  # noqa: BLE001
            log.warning("base beacon: could not withdraw heartbeat: %s", exc)
        self._shared.close()


def read_base_manifest(redis: Any) -> dict[str, Any] | None:
    """The live exporter's manifest, or None when no heartbeat is alive or it names another generation."""
    beat = redis.get(HEARTBEAT_KEY)
    if beat is None:
        return None
    raw = redis.get(MANIFEST_KEY)
    if raw is None:
        return None
    manifest: dict[str, Any] = json.loads(raw)
    generation = beat.decode() if isinstance(beat, bytes) else str(beat)
    return manifest if manifest.get("generation") == generation else None


def heartbeat_generation(redis: Any) -> str | None:
    """Generation id of the live exporter, or None when its heartbeat has expired."""
    beat = redis.get(HEARTBEAT_KEY)
    if beat is None:
        return None
    return beat.decode() if isinstance(beat, bytes) else str(beat)


def share_base_weights(
    state: dict[str, torch.Tensor], device: torch.device | str, redis: Any, shm_dir: Path
) -> tuple[SharedWeights, BaseBeacon]:
    """kiln-infer's one call: pack `state` into shared buckets and announce them; serve from `.views`."""
    shared = pack_state_dict(state, device=device, shm_dir=shm_dir)
    beacon = BaseBeacon(redis, shared)
    beacon.start()
    return shared, beacon
