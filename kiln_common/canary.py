"""Canaries: a candidate version on a share of traffic, promoted or rolled back by its feedback.

State lives in one Redis hash per adapter (`kiln:canary:<tenant>:<name>`); ratings are counted there by one
atomic script, and the request that completes the count is the one that decides (the hash is deleted in the
same script, so two replicas never both decide). The decision flips the alias through the registry, so every
replica's hot swapper follows it like any promote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kiln_common.errors import FailedPreconditionError, InvalidArgumentError
from kiln_common.registry import EventType, Registry

log = logging.getLogger(__name__)

# Count one rating for the candidate or the baseline; when the candidate has enough, take the canary (delete
# it) and return its counts for the caller to decide. KEYS: canary hash. ARGV: version, rating.
_RECORD = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return nil end
local c = {}
for i = 1, #h, 2 do c[h[i]] = h[i + 1] end
local side
if ARGV[1] == c['version'] then side = 'candidate' elseif ARGV[1] == c['baseline'] then side = 'baseline' end
if not side then return nil end
redis.call('HINCRBY', KEYS[1], side .. '_rated', 1)
redis.call('HINCRBYFLOAT', KEYS[1], side .. '_sum', ARGV[2])
local n = tonumber(redis.call('HGET', KEYS[1], 'candidate_rated') or '0')
if n < tonumber(c['min_requests']) then return nil end
local done = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return done
"""


@dataclass(frozen=True)
class CanaryState:
    """A running (or just judged) canary with its rating counts."""

    version: int
    baseline: int
    share: float
    min_requests: int
    candidate_rated: int = 0
    candidate_sum: float = 0.0
    baseline_rated: int = 0
    baseline_sum: float = 0.0

    @property
    def candidate_mean(self) -> float:
        """Mean rating of the candidate (0 before any)."""
        return self.candidate_sum / self.candidate_rated if self.candidate_rated else 0.0

    @property
    def baseline_mean(self) -> float:
        """Mean rating of the baseline since the canary started (0 before any)."""
        return self.baseline_sum / self.baseline_rated if self.baseline_rated else 0.0

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> CanaryState:
        """Parse the Redis hash."""
        return cls(
            version=int(h["version"]),
            baseline=int(h["baseline"]),
            share=float(h["share"]),
            min_requests=int(h["min_requests"]),
            candidate_rated=int(h.get("candidate_rated", 0)),
            candidate_sum=float(h.get("candidate_sum", 0.0)),
            baseline_rated=int(h.get("baseline_rated", 0)),
            baseline_sum=float(h.get("baseline_sum", 0.0)),
        )

    def verdict(self) -> tuple[bool, str]:
        """(promote?, reason): the candidate goes out unless its mean rating is below the baseline's."""
        compared = (
            f"v{self.version} mean rating {self.candidate_mean:+.3f} over {self.candidate_rated} vs "
            f"v{self.baseline} {self.baseline_mean:+.3f} over {self.baseline_rated}"
        )
        if self.candidate_mean < self.baseline_mean:
            return False, f"canary worse than the current version: {compared}"
        return True, f"canary at least as good as the current version: {compared}"


class Canaries:
    """Start canaries and judge them by feedback (used by the adapter servicer and SubmitFeedback)."""

    def __init__(
        self, registry: Registry, default_share: float = 0.1, default_min_requests: int = 100
    ) -> None:
        self.registry = registry
        self.redis: Any = registry.redis
        self.default_share = default_share
        self.default_min_requests = default_min_requests
        self._record = registry.redis.register_script(_RECORD)

    @staticmethod
    def _key(tenant: str, name: str) -> str:
        return f"kiln:canary:{tenant}:{name}"

    def get(self, tenant: str, name: str) -> CanaryState | None:
        """The adapter's running canary, if any."""
        h = self.redis.hgetall(self._key(tenant, name))
        return CanaryState.from_hash(h) if h else None

    def start(
        self, tenant: str, name: str, version: int, share: float = 0.0, min_requests: int = 0
    ) -> CanaryState:
        """Split traffic (1 - share) to what the alias serves now and `share` to `version`, and watch it."""
        share = share or self.default_share
        min_requests = min_requests or self.default_min_requests
        if not 0.0 < share < 1.0:
            raise InvalidArgumentError("share", f"must be in (0, 1), got {share}")
        if min_requests <= 0:
            raise InvalidArgumentError("min_requests", f"must be > 0, got {min_requests}")
        self.registry.require_version(tenant, name, version)
        baseline = self.registry.get(tenant, name).current
        if version == baseline:
            raise FailedPreconditionError(f"v{version} is already what {name!r} serves")
        canary = CanaryState(version, baseline, share, min_requests)
        fields = {"version": version, "baseline": baseline, "share": share, "min_requests": min_requests}
        self.redis.delete(self._key(tenant, name))
        self.redis.hset(self._key(tenant, name), mapping=fields)
        self.registry.set_split(tenant, name, [(baseline, 1.0 - share), (version, share)])
        reason = f"canary on {share:.0%} of traffic against v{baseline}, judged after {min_requests} ratings"
        self.registry.note(tenant, name, version, "canary", reason)
        log.info("%s/%s: %s", tenant, name, reason)
        return canary

    def cancel(self, tenant: str, name: str, why: str) -> CanaryState | None:
        """Stop judging the adapter's canary (the alias was changed by hand); returns it if there was one."""
        canary = self.get(tenant, name)
        if canary is not None and self.redis.delete(self._key(tenant, name)):
            self.registry.note(tenant, name, canary.version, "canary_cancelled", why)
        return canary

    def record(self, tenant: str, name: str, version: int, rating: float | None) -> CanaryState | None:
        """Count a rating of a request served by `version`; the rating that completes the canary decides it.

        Returns the judged canary when this call decided it, else None.
        """
        if rating is None or not name:
            return None
        done = self._record(keys=[self._key(tenant, name)], args=[str(version), float(rating)])
        if not done:
            return None
        canary = CanaryState.from_hash(dict(zip(done[::2], done[1::2], strict=True)))
        promote, reason = canary.verdict()
        chosen = canary.version if promote else canary.baseline
        event = EventType.PROMOTED if promote else EventType.ROLLED_BACK
        self.registry.promote(tenant, name, chosen, detail=reason, event=event)
        self.registry.note(tenant, name, canary.version, "promoted" if promote else "rolled_back", reason)
        log.info("%s/%s: %s", tenant, name, reason)
        return canary
