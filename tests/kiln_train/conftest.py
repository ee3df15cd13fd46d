"""Fixtures for kiln-train tests: a private real valkey-server per module, flushed per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kiln_common.config import RedisConfig
from kiln_common.redis_server import RedisServer, connect


@pytest.fixture(scope="module")
def train_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real embedded valkey-server (AOF on) owned by this test module."""
    server = RedisServer(RedisConfig(home=Path(tmp_path_factory.mktemp("kt-redis"))))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def rds(train_redis_url: str) -> Iterator[redis.Redis]:
    """A decoded client on a flushed database."""
    client = connect(train_redis_url)
    client.flushall()
    yield client
    client.close()
