"""Durable per-adapter training buffers and the daemon's bookkeeping, all in Redis (AOF on)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from kiln_train.example import Example

PREFIX = "kiln:train"
SEEN_KEY = f"{PREFIX}:seen:z"  # sample ids consumed (idempotency), scored by time; pruned to a window
DROPS_KEY = f"{PREFIX}:drops"  # reason -> count
STATS_KEY = f"{PREFIX}:stats"  # consumed, dead_lettered, unrated_generations
ADAPTERS_KEY = f"{PREFIX}:adapters"  # "tenant/adapter" with a buffer
ROUNDS_KEY = f"{PREFIX}:rounds"  # recent rounds, newest first (JSON)
MAX_ROUNDS = 50


def _k(kind: str, tenant: str, adapter: str) -> str:
    return f"{PREFIX}:{kind}:{tenant}:{adapter}"


class TrainingBuffer:
    """Examples waiting for a round, per (tenant, adapter); writes are queued on a caller's transaction."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client  # decode_responses=True

    # --- writes (queued on a MULTI pipeline so they commit together with the XACK) ---
    def add(self, pipe: Any, example: Example, fp: str) -> None:
        """Buffer an example and remember its fingerprint and request id."""
        t, a = example.tenant, example.adapter
        pipe.hset(_k("data", t, a), example.sample_id, example.to_json())
        pipe.zadd(_k("order", t, a), {example.sample_id: time.time()})
        pipe.zadd(_k("fp", t, a), {fp: time.time()})
        pipe.hset(_k("fpof", t, a), example.sample_id, fp)
        if example.request_id:
            pipe.hset(_k("req", t, a), example.request_id, example.sample_id)
        pipe.sadd(ADAPTERS_KEY, example.buffer_key)

    def remove(self, pipe: Any, tenant: str, adapter: str, sample_ids: list[str], reason: str | None) -> None:
        """Take examples out of the buffer; with a reason they also count as dropped."""
        if not sample_ids:
            return
        pipe.hdel(_k("data", tenant, adapter), *sample_ids)
        pipe.zrem(_k("order", tenant, adapter), *sample_ids)
        pipe.hdel(_k("fpof", tenant, adapter), *sample_ids)  # the fingerprint itself stays, for its window
        if reason is not None:
            pipe.hincrby(DROPS_KEY, reason, len(sample_ids))

    def forget_fingerprints(self, pipe: Any, tenant: str, adapter: str, sample_ids: list[str]) -> None:
        """Let the content of superseded examples be taught again."""
        fps = [fp for fp in self.redis.hmget(_k("fpof", tenant, adapter), sample_ids) if fp]
        if fps:
            pipe.zrem(_k("fp", tenant, adapter), *fps)

    def count_drop(self, pipe: Any, reason: str, n: int = 1) -> None:
        """Count a dropped sample by reason."""
        pipe.hincrby(DROPS_KEY, reason, n)

    def count_stat(self, pipe: Any, name: str) -> None:
        """Count an event in the daemon's stats (dead letters, unrated generations)."""
        pipe.hincrby(STATS_KEY, name, 1)

    def mark_consumed(self, pipe: Any, sample_id: str) -> None:
        """Record the sample id as consumed."""
        pipe.zadd(SEEN_KEY, {sample_id: time.time()})
        pipe.hincrby(STATS_KEY, "consumed", 1)

    def prune(self, seen_ttl_s: float, fingerprint_ttl_s: float) -> int:
        """Forget sample ids and fingerprints older than their windows, and request ids no longer buffered."""
        now = time.time()
        removed = int(self.redis.zremrangebyscore(SEEN_KEY, 0, now - seen_ttl_s))
        for tenant, adapter in self.adapters():
            removed += int(self.redis.zremrangebyscore(_k("fp", tenant, adapter), 0, now - fingerprint_ttl_s))
            req: Any = self.redis.hgetall(_k("req", tenant, adapter))
            buffered = self.redis.hmget(_k("data", tenant, adapter), list(req.values())) if req else []
            gone = [r for (r, _), raw in zip(req.items(), buffered, strict=True) if raw is None]
            if gone:
                removed += int(self.redis.hdel(_k("req", tenant, adapter), *gone))
        return removed

    # --- reads ---
    def seen(self, sample_id: str) -> bool:
        """True when this sample id was already consumed."""
        return self.redis.zscore(SEEN_KEY, sample_id) is not None

    def has_fingerprint(self, tenant: str, adapter: str, fp: str) -> bool:
        """True when identical content was buffered or trained before."""
        return self.redis.zscore(_k("fp", tenant, adapter), fp) is not None

    def example_for_request(self, tenant: str, adapter: str, request_id: str) -> str | None:
        """sample_id of the buffered example that came from request_id, if still buffered."""
        if not request_id:
            return None
        sid = self.redis.hget(_k("req", tenant, adapter), request_id)
        if sid and self.redis.hexists(_k("data", tenant, adapter), sid):
            return str(sid)
        return None

    def load(self, tenant: str, adapter: str, limit: int = 0) -> list[Example]:
        """Buffered examples, oldest first (the newest `limit` when limit > 0)."""
        ids: Any = self.redis.zrange(_k("order", tenant, adapter), -limit if limit else 0, -1)
        if not ids:
            return []
        raws: Any = self.redis.hmget(_k("data", tenant, adapter), ids)
        return [Example.from_json(str(r)) for r in raws if r]

    def size(self, tenant: str, adapter: str) -> int:
        """Examples waiting."""
        return int(self.redis.zcard(_k("order", tenant, adapter)))

    def oldest_age_s(self, tenant: str, adapter: str) -> float:
        """Seconds since the oldest waiting example was buffered (0 when empty)."""
        first = self.redis.zrange(_k("order", tenant, adapter), 0, 0, withscores=True)
        return time.time() - float(first[0][1]) if first else 0.0

    def adapters(self) -> list[tuple[str, str]]:
        """(tenant, adapter) pairs that have (or had) a buffer."""
        out = []
        for key in sorted(self.redis.smembers(ADAPTERS_KEY)):
            tenant, _, adapter = str(key).partition("/")
            out.append((tenant, adapter))
        return out

    def drops(self) -> dict[str, int]:
        """Dropped samples by reason."""
        return {str(k): int(v) for k, v in self.redis.hgetall(DROPS_KEY).items()}

    def stats(self) -> dict[str, int]:
        """consumed, dead_lettered, unrated_generations, trimmed_unread counters."""
        return {str(k): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}

    def set_stat(self, name: str, value: int) -> None:
        """Set a gauge-like counter (e.g. trimmed_unread, recomputed from the stream)."""
        self.redis.hset(STATS_KEY, name, value)

    # --- rounds ---
    def begin_round(self, tenant: str, adapter: str, record: dict[str, Any]) -> None:
        """Remember the round in progress (its sample ids) so a restart can reconcile it."""
        self.redis.set(_k("round", tenant, adapter), json.dumps(record))

    def round_in_progress(self, tenant: str, adapter: str) -> dict[str, Any] | None:
        """The round a crashed daemon left unfinished, if any."""
        raw = self.redis.get(_k("round", tenant, adapter))
        return json.loads(raw) if raw else None

    def finish_round(
        self, tenant: str, adapter: str, consumed_ids: list[str], record: dict[str, Any]
    ) -> None:
        """Atomically: take the round's examples out of the buffer, count them trained, log the round."""
        pipe = self.redis.pipeline(transaction=True)
        self.remove(pipe, tenant, adapter, consumed_ids, None)
        pipe.hincrby(_k("count", tenant, adapter), "trained", len(consumed_ids))
        pipe.delete(_k("round", tenant, adapter))
        pipe.lpush(ROUNDS_KEY, json.dumps(record))
        pipe.ltrim(ROUNDS_KEY, 0, MAX_ROUNDS - 1)
        pipe.execute()

    def abandon_round(self, tenant: str, adapter: str, record: dict[str, Any]) -> None:
        """A rejected or failed round: examples stay buffered, the round is logged."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(_k("round", tenant, adapter))
        pipe.lpush(ROUNDS_KEY, json.dumps(record))
        pipe.ltrim(ROUNDS_KEY, 0, MAX_ROUNDS - 1)
        pipe.execute()

    def trained_count(self, tenant: str, adapter: str) -> int:
        """Examples trained into published versions."""
        return int(self.redis.hget(_k("count", tenant, adapter), "trained") or 0)

    def rounds(self) -> list[dict[str, Any]]:
        """Recent rounds, newest first."""
        return [json.loads(r) for r in self.redis.lrange(ROUNDS_KEY, 0, MAX_ROUNDS - 1)]
