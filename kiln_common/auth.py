"""API keys → callers (tenant + role), from a key file of hashed or plain keys and `authorization: Bearer …`.

Key file: a JSON object `{"<key>": "tenant"}` / `{"<key>": {"tenant": "t", "role": "admin"}}`, or lines of
`<key> <tenant> [admin|tenant]`. A key may be written as `sha256:<hex>` (what `kiln adapters keys new`
prints) so the file never holds the key itself; plain keys are hashed on load and only hashes are kept.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kiln_common.adapter_store import validate_name
from kiln_common.errors import PermissionDeniedError

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
ACT_AS_HEADER = "x-kiln-tenant"  # an admin names the tenant it acts for; ignored for other callers
_HASH_PREFIX = "sha256:"


class AuthError(PermissionError):
    """Missing or unknown API key (maps to UNAUTHENTICATED)."""


class Role(str, enum.Enum):
    """What a key may do: `tenant` acts on its own tenant only; `admin` on any tenant and global state."""

    ADMIN = "admin"
    TENANT = "tenant"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant it acts for and its role."""

    tenant: str
    role: Role = Role.TENANT

    @property
    def is_admin(self) -> bool:
        """True for admin keys."""
        return self.role == Role.ADMIN

    def require_admin(self, operation: str) -> None:
        """PermissionDeniedError unless the caller is an admin."""
        if not self.is_admin:
            raise PermissionDeniedError(f"{operation} needs an admin API key")


def hash_key(key: str) -> str:
    """The stored form of an API key: "sha256:<hex>"."""
    return _HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "kiln-" + secrets.token_urlsafe(24)


def _entry(key: str, tenant: str, role: str, where: str) -> tuple[str, Caller]:
    """(stored hash, caller) for one key-file entry; ValueError naming `where` when it is malformed."""
    if key.startswith(_HASH_PREFIX):
        digest = key[len(_HASH_PREFIX) :]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: a hashed key must be sha256: and 64 lowercase hex digits")
        stored = key
    elif len(key) < 8:
        raise ValueError(f"{where}: API key for tenant {tenant!r} is shorter than 8 characters")
    else:
        stored = hash_key(key)
    try:
        parsed_role = Role(role)
    except ValueError:
        raise ValueError(f"{where}: role must be 'admin' or 'tenant', got {role!r}") from None
    validate_name(tenant, "tenant")
    return stored, Caller(tenant, parsed_role)


def parse_key_file(text: str) -> dict[str, Caller]:
    """Key file text → {sha256 hash of the key: caller} (see the module docstring for the format)."""
    stripped = text.strip()
    entries: list[tuple[str, str, str, str]] = []
    if stripped.startswith("{"):
        data = json.loads(stripped)
        if not isinstance(data, dict):
            raise ValueError("a JSON key file must map each key to a tenant name or {tenant, role}")
        for key, value in data.items():
            value = value if isinstance(value, dict) else {"tenant": value}
            if not isinstance(value.get("tenant"), str):
                raise ValueError("a JSON key file must map each key to a tenant name or {tenant, role}")
            entries.append((str(key), value["tenant"], str(value.get("role", "tenant")), "key file"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) not in (2, 3):
                raise ValueError(f"key file line {n}: expected 'key tenant [role]', got {len(parts)} fields")
            entries.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "tenant", f"line {n}"))
    return dict(_entry(*e) for e in entries)


def load_key_file(path: Path) -> dict[str, Caller]:
    """Read and check a key file at configuration time; any problem is one ValueError line naming the file."""
    try:
        return parse_key_file(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"KILN_API_KEYS file {path}: {exc}") from None


class Authenticator:
    """Maps request metadata to a caller; keys are held only as hashes."""

    def __init__(self, callers: Mapping[str, Caller] | None) -> None:
        self._callers = dict(callers) if callers is not None else None
        if self._callers is None:
            log.warning(
                "no API key file configured: every caller is the admin of tenant %r (set KILN_API_KEYS)",
                DEFAULT_TENANT,
            )

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        """Load a key file; None means open access (one local user, admin of the default tenant)."""
        if path is None:
            return cls(None)
        callers = parse_key_file(path.read_text())
        tenants = {c.tenant for c in callers.values()}
        log.info("loaded %d API keys for %d tenants from %s", len(callers), len(tenants), path)
        return cls(callers)

    @property
    def enabled(self) -> bool:
        """True when keys are required."""
        return self._callers is not None

    def caller(self, metadata: Iterable[tuple[str, str | bytes]]) -> Caller:
        """The caller of a request from `authorization: Bearer <key>`; an admin may add `x-kiln-tenant`."""
        pairs = [(k.lower(), str(v)) for k, v in metadata]
        if self._callers is None:
            found = Caller(DEFAULT_TENANT, Role.ADMIN)
        else:
            header = next((v for k, v in pairs if k == "authorization"), "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("missing 'authorization: Bearer <api key>' metadata")
            digest = hash_key(token.strip())
            match: Caller | None = None
            for stored, caller in self._callers.items():  # constant time over every key
                if hmac.compare_digest(stored, digest):
                    match = caller
            if match is None:
                raise AuthError("invalid API key")
            found = match
        act_as = next((v for k, v in pairs if k == ACT_AS_HEADER), "")
        if act_as and found.is_admin:
            return Caller(validate_name(act_as, "tenant"), Role.ADMIN)
        return found

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """Tenant a request acts for; AuthError when it has no valid key."""
        return self.caller(metadata).tenant
