"""The embedded valkey-server: append-only, reused when running, data surviving a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln_common.config import RedisConfig
from kiln_common.redis_server import RedisServer, RedisStartError, connect, ping


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


def test_a_server_that_will_not_start_says_why_from_its_own_log(tmp_path: Path) -> None:
    config = RedisConfig(home=tmp_path)
    aof = config.data_dir / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("this is not a manifest\n")  # valkey refuses to load it
    with pytest.raises(RedisStartError) as err:
        RedisServer(config).start(timeout_s=10.0)
    message = str(err.value)
    assert "exited at start with status" in message
    assert "manifest" in message.lower()  # valkey's own reason, read from redis.log
