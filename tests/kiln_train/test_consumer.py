"""Consumer-group semantics on a real valkey-server: ack after buffering, recovery, claims, dead letters."""

from __future__ import annotations

import time

import pytest
import redis

from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_common.samples import DEAD_LETTER_STREAM, SAMPLES_STREAM, Sample, SampleKind
from kiln_train.buffer import TrainingBuffer
from kiln_train.consumer import SampleConsumer
from kiln_train.pipeline import Pipeline
from kiln_train.settings import TrainSettings


@pytest.fixture(scope="module")
def count_tokens(smollm2: ModelSource):  # type: ignore[no-untyped-def]
    tok = load_tokenizer(smollm2)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def _consumer(rds: redis.Redis, count_tokens, name: str = "c1", **kw: object) -> SampleConsumer:  # type: ignore[no-untyped-def]
    settings = TrainSettings(consumer=name, **kw)  # type: ignore[arg-type]
    buffer = TrainingBuffer(rds)
    c = SampleConsumer(rds, buffer, Pipeline(settings, count_tokens, buffer), settings)
    c.ensure_group()
    return c


def _example(i: int, adapter: str = "facts", **kw: object) -> Sample:
    fields = dict(
        kind=SampleKind.EXAMPLE,
        tenant="default",
        adapter=adapter,
        messages=(("user", f"Question number {i}: what is item {i * 7919}?"),),
        completion=f"Item {i * 7919} is the {i}th distinct answer about topic {i * 31}.",
    )
    fields.update(kw)
    return Sample(**fields)  # type: ignore[arg-type]


def _add(rds: redis.Redis, samples: list[Sample]) -> list[str]:
    return [rds.xadd(SAMPLES_STREAM, s.to_fields()) for s in samples]


def _pending(rds: redis.Redis, group: str = "kiln-train") -> int:
    return int(rds.xpending(SAMPLES_STREAM, group)["pending"])


def test_buffered_then_acked_and_idempotent(rds: redis.Redis, count_tokens) -> None:  # type: ignore[no-untyped-def]
    c = _consumer(rds, count_tokens)
    samples = [_example(i) for i in range(5)]
    _add(rds, samples + [samples[2]])  # the same sample_id delivered twice
    assert c.poll(block_ms=10) == 6
    assert _pending(rds) == 0
    buffered = c.buffer.load("default", "facts")
    assert [e.sample_id for e in buffered] == [s.sample_id for s in samples]
    assert c.buffer.drops() == {"duplicate_id": 1}
    assert c.buffer.stats()["consumed"] == 5


def test_crash_before_ack_is_recovered_from_own_pending(rds: redis.Redis, count_tokens) -> None:  # type: ignore[no-untyped-def]
    c = _consumer(rds, count_tokens)
    samples = [_example(i) for i in range(4)]
    _add(rds, samples)
    # Simulate a crash: the entries were delivered to c1 but the process died before buffering them.
    rds.xreadgroup("kiln-train", "c1", {SAMPLES_STREAM: ">"}, count=10)
    assert _pending(rds) == 4 and c.buffer.size("default", "facts") == 0
    restarted = _consumer(rds, count_tokens)
    assert restarted.recover() == 4
    assert _pending(rds) == 0
    assert {e.sample_id for e in restarted.buffer.load("default", "facts")} == {s.sample_id for s in samples}


def test_autoclaim_takes_over_a_dead_consumer(rds: redis.Redis, count_tokens) -> None:  # type: ignore[no-untyped-def]
    samples = [_example(i) for i in range(3)]
    _add(rds, samples)
    _consumer(rds, count_tokens, name="dead-one")
    rds.xreadgroup("kiln-train", "dead-one", {SAMPLES_STREAM: ">"}, count=10)  # then it dies
    live = _consumer(rds, count_tokens, name="live", claim_idle_ms=50)
    assert live.claim() == 0  # not idle long enough yet
    time.sleep(0.1)
    live.claim()
    assert _pending(rds) == 0
    assert live.buffer.size("default", "facts") == 3


def test_poison_sample_goes_to_dead_letters_after_n_deliveries(
    rds: redis.Redis, count_tokens, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    c = _consumer(rds, count_tokens, max_deliveries=3, claim_idle_ms=0)
    poison = _example(1)
    _add(rds, [poison])
    rds.xadd(SAMPLES_STREAM, {"kind": "nonsense"})
    real_screen = c.pipeline.screen

    def failing_screen(example):  # type: ignore[no-untyped-def]
        if example.sample_id == poison.sample_id:
            raise RuntimeError("tokenizer exploded")
        return real_screen(example)

    monkeypatch.setattr(c.pipeline, "screen", failing_screen)
    c.poll(block_ms=10)  # delivery 1 fails; the malformed entry is dead-lettered at once
    assert _pending(rds) == 1
    for _ in range(3):  # deliveries 2, 3 fail; delivery 4 exceeds max_deliveries
        c.claim()
    assert _pending(rds) == 0
    dead = rds.xrange(DEAD_LETTER_STREAM)
    assert len(dead) == 2
    assert dead[0][1]["dead_reason"].startswith("malformed")
    assert dead[1][1]["sample_id"] == poison.sample_id and dead[1][1]["deliveries"] == "4"
    assert c.buffer.stats()["dead_lettered"] == 2
    assert c.buffer.size("default", "facts") == 0


def test_samples_trimmed_before_anyone_read_them_are_counted(rds: redis.Redis, count_tokens) -> None:  # type: ignore[no-untyped-def]
    c = _consumer(rds, count_tokens)
    _add(rds, [_example(i) for i in range(3)])
    assert c.poll(block_ms=10) == 3
    _add(rds, [_example(i) for i in range(3, 13)])
    rds.xtrim(SAMPLES_STREAM, maxlen=4, approximate=False)  # the recorder's MAXLEN, while kiln-train was away
    c.housekeeping()
    assert c.buffer.stats()["trimmed_unread"] == 6  # 10 unread, 4 still there
    assert c.poll(block_ms=10) == 4
    c.housekeeping()
    assert c.buffer.stats()["trimmed_unread"] == 6
    assert c.buffer.stats()["consumed"] == 7


def test_seen_ids_and_fingerprints_are_kept_for_a_window(rds: redis.Redis, count_tokens) -> None:  # type: ignore[no-untyped-def]
    c = _consumer(rds, count_tokens, seen_ttl_s=60, fingerprint_ttl_s=60)
    old = _example(1)
    _add(rds, [old])
    assert c.poll(block_ms=10) == 1
    c.buffer.finish_round("default", "facts", [old.sample_id], {"round_id": "r"})
    assert c.buffer.seen(old.sample_id)
    c.buffer.prune(60, 60)
    assert c.buffer.seen(old.sample_id)  # inside the window
    time.sleep(1.1)
    c.buffer.prune(1, 1)
    assert not c.buffer.seen(old.sample_id)  # outside it: forgotten, the sets stay bounded
    assert rds.zcard("kiln:train:fp:default:facts") == 0
    assert rds.hlen("kiln:train:fpof:default:facts") == 0
