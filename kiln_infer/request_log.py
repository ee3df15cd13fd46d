"""What each served request was (prompt, completion, version): the one store feedback joins, in Redis."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from kiln_common.samples import Sample, SampleKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedRequest:
    """A finished generation as feedback needs it."""

    tenant: str
    request_id: str
    adapter: str  # adapter name, "" for the base model
    version: int
    prompt: str
    messages: tuple[tuple[str, str], ...]
    completion: str

    def feedback(self, adapter: str, version: int, rating: float | None, correction: str) -> Sample:
        """The feedback sample: this request's prompt and completion joined to a rating and/or correction."""
        return Sample(
            kind=SampleKind.FEEDBACK,
            tenant=self.tenant,
            adapter=adapter,
            prompt=self.prompt,
            messages=self.messages,
            completion=self.completion,
            adapter_version=version,
            request_id=self.request_id,
            rating=rating,
            correction=correction,
        )


class RequestLog:
    """Served requests by (tenant, request_id), expiring after `ttl_s`."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis: Any = client  # decode_responses=True
        self._ttl_s = ttl_s

    @staticmethod
    def _key(tenant: str, request_id: str) -> str:
        return f"kiln:req:{tenant}:{request_id}"

    def put(self, served: ServedRequest) -> None:
        """Remember a served request; a Redis failure is logged, never raised (it must not fail Generate)."""
        fields = {
            "adapter": served.adapter,
            "version": served.version,
            "prompt": served.prompt,
            "messages": json.dumps([list(m) for m in served.messages]),
            "completion": served.completion,
        }
        try:
            key = self._key(served.tenant, served.request_id)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self._ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not record request %s for feedback: %s", served.request_id, exc)

    def get(self, tenant: str, request_id: str) -> ServedRequest | None:
        """The served request, or None when unknown, expired or another tenant's."""
        h = self._redis.hgetall(self._key(tenant, request_id))
        if not h:
            return None
        return ServedRequest(
            tenant=tenant,
            request_id=request_id,
            adapter=h.get("adapter", ""),
            version=int(h.get("version", 0)),
            prompt=h.get("prompt", ""),
            messages=tuple((r, c) for r, c in json.loads(h.get("messages", "[]"))),
            completion=h.get("completion", ""),
        )
