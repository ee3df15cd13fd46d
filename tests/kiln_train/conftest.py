"""Fixtures for kiln-train tests: a private real valkey-server per module; a real kiln-infer for rounds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from kiln_common.config import InferConfig, RedisConfig
from kiln_common.redis_server import RedisServer, connect
from kiln_infer.server import InferServer


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


@dataclass
class InferStack:
    """A real kiln-infer (real engine, real SmolLM2) over its own real valkey-server."""

    server: InferServer
    redis_url: str

    @property
    def address(self) -> str:
        """host:port of its gRPC API."""
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="module")
def infer_stack(kiln_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferStack]:
    """kiln-infer on an ephemeral port (no API keys: every caller is tenant 'default'), serving once warm."""
    redis_server = RedisServer(RedisConfig(home=Path(tmp_path_factory.mktemp("infer-redis"))))
    url = redis_server.start()
    config = InferConfig(
        home=kiln_home, redis=RedisConfig(home=kiln_home, url=url), port=0, drain_timeout_s=5.0
    )
    server = InferServer(config)
    server.start()
    server.start_warm_up()
    assert server.serving.wait(180), "kiln-infer did not warm up"
    yield InferStack(server, url)
    server.drain()
    redis_server.stop()
