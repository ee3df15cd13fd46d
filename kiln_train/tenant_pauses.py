"""Per-tenant training pauses, kept in Redis so every kiln-train process and restart sees them."""

from __future__ import annotations

from typing import Any

PAUSED_TENANTS = "kiln:train:paused_tenants"  # set of tenant names


class TenantPauses:
    """Which tenants' training is paused (the daemon's global pause is separate and admin-only)."""

    def __init__(self, client: Any) -> None:
        self.redis = client

    def pause(self, tenant: str) -> None:
        """No new rounds for the tenant; its running round stops at its next step."""
        self.redis.sadd(PAUSED_TENANTS, tenant)

    def resume(self, tenant: str) -> None:
        """The tenant's rounds may start again."""
        self.redis.srem(PAUSED_TENANTS, tenant)

    def is_paused(self, tenant: str) -> bool:
        """True when the tenant's training is paused."""
        return bool(self.redis.sismember(PAUSED_TENANTS, tenant))
