"""Adapter bookkeeping: host LRU cache of loaded adapters, device slots with reference counts."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from kiln_infer.lora.errors import AdapterLoadError
from kiln_infer.lora.layers import LoraSlots
from kiln_infer.lora.peft_loader import LoraWeights, load_peft_adapter

log = logging.getLogger(__name__)


def check_fits(weights: LoraWeights, num_layers: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Raise AdapterLoadError unless every LoRA matrix matches the base model's layers and (in, out) sizes."""
    for (layer, module), a in weights.a.items():
        fan_in, fan_out = shapes[module]
        b = weights.b[(layer, module)]
        if layer >= num_layers or a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterLoadError(
                f"adapter {weights.key!r} does not fit the base model: layer {layer} {module} has "
                f"A {tuple(a.shape)} and B {tuple(b.shape)}; the model has {num_layers} layers and its "
                f"{module} maps {fan_in} -> {fan_out}"
            )


class AdapterManager:
    """Maps adapter keys (external strings) to device slots (internal ints); never evicts an in-use slot."""

    def __init__(self, slots: LoraSlots, max_cpu_loras: int) -> None:
        self.slots = slots
        self.max_cpu_loras = max_cpu_loras
        self._host: OrderedDict[str, LoraWeights] = OrderedDict()  # LRU: oldest first
        self._host_lock = threading.Lock()  # host cache is filled from servicer threads
        self._reading: dict[str, threading.Lock] = {}  # adapter key -> held while one thread reads it
        self._slot_of: dict[str, int] = {}  # adapter key -> slot
        self._key_in: list[str | None] = [None] * slots.num_slots  # slot -> adapter key
        self._refs: list[int] = [0] * slots.num_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # unreferenced resident slots, oldest first

    def get_host(self, key: str, path: Path) -> LoraWeights:
        """The adapter's host weights, loading them from disk (any thread) on a miss; concurrent misses of one
        key wait for a single read (a gate's burst of requests to a new version would read it once each)."""
        with self._host_lock:
            hit = self._host.get(key)
            if hit is not None:
                self._host.move_to_end(key)
                return hit
            reading = self._reading.setdefault(key, threading.Lock())
        try:
            with reading:
                with self._host_lock:
                    hit = self._host.get(key)
                    if hit is not None:  # read by the thread this one waited for
                        self._host.move_to_end(key)
                        return hit
                t = time.perf_counter()
                weights = load_peft_adapter(key, path, self.slots.max_rank)
                check_fits(weights, self.slots.num_layers, self.slots.shapes)
                log.info("adapter %s read from disk in %.1f ms", key, 1e3 * (time.perf_counter() - t))
                with self._host_lock:
                    self._host[key] = weights
                    self._host.move_to_end(key)
                    while len(self._host) > self.max_cpu_loras:
                        evicted, _ = self._host.popitem(last=False)
                        log.debug("host LRU evicted adapter %s", evicted)
                return weights
        finally:
            with self._host_lock:
                if self._reading.get(key) is reading:
                    del self._reading[key]

    def host_keys(self) -> list[str]:
        """Adapters in the host cache, least recently used first."""
        with self._host_lock:
            return list(self._host)

    def acquire(self, weights: LoraWeights) -> int | None:
        """Pin the adapter in a device slot (loading it if needed); None when every slot is in use."""
        slot = self._slot_of.get(weights.key)
        if slot is None:
            free = [s for s, k in enumerate(self._key_in) if k is None]
            if free:
                slot = free[0]
            elif self._slot_lru:
                slot, _ = self._slot_lru.popitem(last=False)
                old = self._key_in[slot]
                assert old is not None and self._refs[slot] == 0
                del self._slot_of[old]
            else:
                return None
            t = time.perf_counter()
            self.slots.load(slot, weights)
            log.info(
                "adapter %s loaded into slot %d in %.1f ms",
                weights.key,
                slot,
                1e3 * (time.perf_counter() - t),
            )
            self._slot_of[weights.key], self._key_in[slot] = slot, weights.key
        self._slot_lru.pop(slot, None)
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """Drop one reference; an unreferenced slot stays resident until the LRU needs it."""
        assert self._refs[slot] > 0, f"slot {slot} released more often than acquired"
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._slot_lru[slot] = None

    def can_acquire(self, key: str) -> bool:
        """Whether `acquire` would succeed now."""
        return key in self._slot_of or None in self._key_in or bool(self._slot_lru)

    def resident(self) -> dict[str, int]:
        """Adapter key -> slot for every adapter on the device."""
        return dict(self._slot_of)

    def refcounts(self) -> list[int]:
        """References held per slot."""
        return list(self._refs)
