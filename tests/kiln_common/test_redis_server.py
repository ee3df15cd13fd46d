"""The embedded valkey-server: append-only, reused when running, data surviving a restart."""

from __future__ import annotations

from pathlib import Path

from kiln_common.config import RedisConfig
from kiln_common.redis_server import RedisServer, connect, ping


def test_embedded_server_is_durable_and_reused(tmp_path: Path) -> None:
    config = RedisConfig(home=tmp_path)
    first = RedisServer(config)
    url = first.start()
    client = connect(url)
    assert client.config_get("appendonly")["appendonly"] == "yes"
    client.xadd("kiln:test", {"n": "1"})
    second = RedisServer(config)
    assert second.start() == url and not second.owned  # reused, not started twice
    second.stop()
    assert ping(url)
    first.stop()
    assert not ping(url)
    third = RedisServer(config)
    client = connect(third.start())
    assert client.xlen("kiln:test") == 1  # the append-only file brought it back
    third.stop()
    assert (tmp_path / "redis").is_dir()
