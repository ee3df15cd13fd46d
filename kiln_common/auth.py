"""API keys → tenants, from a key file (JSON object or `key tenant` lines) and `authorization: Bearer …`."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from kiln_common.adapter_store import validate_name

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
MIN_KEY_CHARS = 8


class AuthError(PermissionError):
    """Missing or unknown API key (maps to UNAUTHENTICATED)."""


def parse_key_file(text: str) -> dict[str, str]:
    """`{"key": "tenant", ...}` JSON, or lines of `key tenant` (blank lines and # comments ignored)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        data = json.loads(stripped)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError("a JSON key file must map each key to a tenant name")
        keys = {str(k): v for k, v in data.items()}
    else:
        keys = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"key file line {n}: expected 'key tenant', got {len(parts)} fields")
            keys[parts[0]] = parts[1]
    for key, tenant in keys.items():
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(
                f"the API key of tenant {tenant!r} is shorter than {MIN_KEY_CHARS} characters "
                f"({len(key)}); use a longer key"
            )
        validate_name(tenant, "tenant")
    return keys


def load_key_file(path: Path) -> dict[str, str]:
    """Read and check a key file at configuration time; any problem is one ValueError line naming the file."""
    try:
        return parse_key_file(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"KILN_API_KEYS file {path}: {exc}") from None


class Authenticator:
    """Maps request metadata to a tenant."""

    def __init__(self, keys: Mapping[str, str] | None) -> None:
        self._keys = dict(keys) if keys is not None else None
        if self._keys is None:
            log.warning(
                "no API key file configured: every caller is tenant %r (set KILN_API_KEYS)", DEFAULT_TENANT
            )

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        """Load a key file; None means open access as the default tenant."""
        if path is None:
            return cls(None)
        keys = load_key_file(path)
        log.info("loaded %d API keys for %d tenants from %s", len(keys), len(set(keys.values())), path)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        """True when keys are required."""
        return self._keys is not None

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """Tenant of a caller from its `authorization: Bearer <key>` metadata; AuthError when it has none."""
        if self._keys is None:
            return DEFAULT_TENANT
        header = next((str(v) for k, v in metadata if k.lower() == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("missing 'authorization: Bearer <api key>' metadata")
        token = token.strip()
        # Compare against every key in constant time so timing does not reveal a prefix.
        found = ""
        for key, tenant in self._keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        if not found:
            raise AuthError("invalid API key")
        return found
