"""The pipeline through the real consumer: drops counted by reason; feedback rates; corrections win."""

from __future__ import annotations

import pytest
import redis

from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_common.samples import SAMPLES_STREAM, Sample, SampleKind
from kiln_train.buffer import TrainingBuffer
from kiln_train.consumer import SampleConsumer
from kiln_train.pipeline import Pipeline, normalise_text
from kiln_train.settings import TrainSettings


@pytest.fixture
def consumer(rds: redis.Redis, smollm2: ModelSource) -> SampleConsumer:
    tok = load_tokenizer(smollm2)
    settings = TrainSettings(max_completion_tokens=64)
    buffer = TrainingBuffer(rds)
    c = SampleConsumer(rds, buffer, Pipeline(settings, lambda t: len(tok.encode(t)), buffer), settings)
    c.ensure_group()
    return c


def _feed(c: SampleConsumer, samples: list[Sample]) -> None:
    for s in samples:
        c.redis.xadd(SAMPLES_STREAM, s.to_fields())
    while c.poll(block_ms=10):
        pass


def _ex(q: str, a: str, **kw: object) -> Sample:
    return Sample(
        kind=SampleKind.EXAMPLE, tenant="default", adapter="kb", messages=(("user", q),), completion=a, **kw
    )  # type: ignore[arg-type]


def _feedback(served: Sample, **kw: object) -> Sample:
    """Feedback as SubmitFeedback records it: the served request it rates, joined from the request log."""
    return Sample(
        kind=SampleKind.FEEDBACK,
        tenant=served.tenant,
        adapter=served.adapter,
        prompt=served.prompt,
        messages=served.messages,
        completion=served.completion,
        request_id=served.request_id,
        **kw,
    )  # type: ignore[arg-type]


def test_drops_are_counted_by_reason(consumer: SampleConsumer) -> None:
    answer = "The Velmor stone is deep green, found only in the northern caves of Arkel, and glows at night."
    keep = _ex("What colour is the Velmor stone?", answer)
    _feed(
        consumer,
        [
            keep,
            _ex(
                "What colour  is the VELMOR stone ?", answer.upper().replace(",", "")
            ),  # exact after normalising
            _ex("What colour is the Velmor stone?", answer.replace("night", "dusk")),  # near-duplicate
            _ex("Say nothing.", "   "),
            _ex("Repeat yourself.", "yes " * 40),
            _ex("Write an essay.", " ".join(f"word{i}" for i in range(100))),
            Sample(kind=SampleKind.EXAMPLE, tenant="default", adapter="kb", prompt="", completion="orphan"),
        ],
    )
    drops = consumer.buffer.drops()
    assert drops == {
        "duplicate": 1,
        "near_duplicate": 1,
        "empty_completion": 1,
        "degenerate": 1,
        "too_long": 1,
        "empty_prompt": 1,
    }
    assert [e.sample_id for e in consumer.buffer.load("default", "kb")] == [keep.sample_id]


def test_feedback_comes_late_and_corrections_supersede(consumer: SampleConsumer) -> None:
    gen = Sample(
        kind=SampleKind.GENERATION,
        tenant="default",
        adapter="kb",
        request_id="req-1",
        messages=(("user", "Who tends the Orlin lighthouse?"),),
        completion="Nobody knows.",
    )
    good_gen = Sample(
        kind=SampleKind.GENERATION,
        tenant="default",
        adapter="kb",
        request_id="req-2",
        messages=(("user", "What is Kiln?"),),
        completion="Kiln is a train-while-you-serve server.",
    )
    _feed(consumer, [gen, good_gen])
    assert consumer.buffer.size("default", "kb") == 0  # unrated generations wait for feedback
    # Minutes later: a correction for req-1, a good rating for req-2, a bad rating, and feedback carrying no
    # served request (SubmitFeedback refuses an unknown request_id, so only a foreign writer could send it).
    _feed(
        consumer,
        [
            _feedback(gen, correction="The Orlin lighthouse is tended by Maro Fell."),
            _feedback(good_gen, rating=1.0),
            _feedback(good_gen, rating=-1.0),
            Sample(kind=SampleKind.FEEDBACK, tenant="default", adapter="kb", request_id="nope", rating=1.0),
        ],
    )
    buffered = {e.request_id: e for e in consumer.buffer.load("default", "kb")}
    assert buffered["req-1"].completion == "The Orlin lighthouse is tended by Maro Fell."
    assert buffered["req-1"].messages == (("user", "Who tends the Orlin lighthouse?"),)
    assert "req-2" not in buffered  # rated good, then withdrawn by the bad rating
    # A second correction of req-1 supersedes the first.
    _feed(consumer, [_feedback(gen, correction="Maro Fell tends the Orlin lighthouse every night.")])
    buffered = consumer.buffer.load("default", "kb")
    assert [e.completion for e in buffered] == ["Maro Fell tends the Orlin lighthouse every night."]
    drops = consumer.buffer.drops()
    assert drops["superseded"] == 2 and drops["low_rating"] == 1 and drops["unjoined_feedback"] == 1


def test_normalisation() -> None:
    assert normalise_text("  a\u00a0 b\t c \r\n\r\n\r\n\r\nd\x07 ") == "a b c\n\nd"
