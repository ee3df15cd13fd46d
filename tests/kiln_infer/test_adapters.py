"""Adapters over gRPC: PEFT parity, publish/promote/rollback/split, events, hot swap pinning, sampling."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from kiln.v1 import adapter_pb2 as apb
from kiln.v1 import inference_pb2 as pb
from kiln_common.model_loader import ModelSource, load_hf_model, load_tokenizer
from kiln_common.samples import SAMPLES_STREAM, Sample, SampleKind
from tests.conftest import make_peft_adapter
from tests.kiln_infer.conftest import Client, upload

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three things to do in spring:"]
GREEDY = pb.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _tokens(
    client: Client, adapter: str, prompt: str, sampling: pb.SamplingParams = GREEDY
) -> tuple[list[int], str]:
    ids, version = [], ""
    for r in client.inference.Generate(
        pb.GenerateRequest(prompt=prompt, adapter=adapter, sampling=sampling),
        metadata=client.metadata,
        timeout=120,
    ):
        ids.extend(r.token_ids)
        version = r.adapter_version
    return ids, version


def _reference(source: ModelSource, adapter_dir: Path | None, prompts: list[str]) -> list[list[int]]:
    """transformers greedy generate, through PEFT when an adapter is given."""
    tokenizer = load_tokenizer(source)
    model = load_hf_model(source)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=16,
                min_new_tokens=16,
                pad_token_id=tokenizer.eos_token_id,
            )
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.fixture(scope="module")
def published(alice: Client, peft_adapter: Path) -> str:
    """A fresh adapter name with the session's PEFT adapter as v1 (promoted)."""
    name = f"parity-{uuid.uuid4().hex[:6]}"
    assert upload(alice, name, peft_adapter, promote=True).version == 1
    return name


def test_greedy_matches_transformers_and_peft(
    alice: Client, published: str, smollm2: ModelSource, peft_adapter: Path
) -> None:
    base_ref = _reference(smollm2, None, PROMPTS)
    peft_ref = _reference(smollm2, peft_adapter, PROMPTS)
    assert base_ref != peft_ref  # the adapter really changes the output
    for prompt, base, lora in zip(PROMPTS, base_ref, peft_ref, strict=True):
        assert _tokens(alice, "", prompt) == (base, "")
        assert _tokens(alice, published, prompt) == (lora, f"{published}@v1")
    assert _tokens(alice, f"{published}@v1", PROMPTS[0]) == (peft_ref[0], f"{published}@v1")
    assert _tokens(alice, f"{published}@v0", PROMPTS[0]) == (base_ref[0], f"{published}@v0")


def _watch(client: Client, name: str) -> tuple[Any, list[apb.AdapterEvent]]:
    """Start WatchEvents; a thread collects the events of adapter `name` until the call is cancelled."""
    events: list[apb.AdapterEvent] = []
    watch = client.adapters.WatchEvents(apb.WatchEventsRequest(), metadata=client.metadata, timeout=120)

    def collect() -> None:
        try:
            events.extend(e for e in watch if e.adapter == name)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    threading.Thread(target=collect, daemon=True).start()
    return watch, events


def _publish_promote_rollback_split(alice: Client, name: str, v1: Path, v2: Path) -> None:
    """Each lifecycle RPC, checking what the alias serves after it."""
    md = alice.metadata
    for version, path in ((1, v1), (2, v2)):
        assert upload(alice, name, path).version == version
    assert _tokens(alice, name, PROMPTS[0])[1] == f"{name}@v0"  # publishing alone does not promote
    p = alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=1), metadata=md)
    assert (p.previous_version, p.current_version) == (0, 1)
    assert _tokens(alice, name, PROMPTS[0])[1] == f"{name}@v1"
    alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=2), metadata=md)
    assert _tokens(alice, name, PROMPTS[0])[1] == f"{name}@v2"
    rb = alice.adapters.Rollback(apb.RollbackRequest(adapter=name), metadata=md)
    assert (rb.previous_version, rb.current_version) == (2, 1)
    assert _tokens(alice, name, PROMPTS[0])[1] == f"{name}@v1"
    split = alice.adapters.SetTrafficSplit(
        apb.SetTrafficSplitRequest(
            adapter=name,
            shares=[apb.TrafficShare(version=1, weight=1), apb.TrafficShare(version=2, weight=1)],
        ),
        metadata=md,
    )
    assert [(s.version, round(s.weight, 3)) for s in split.shares] == [(1, 0.5), (2, 0.5)]
    short = pb.SamplingParams(temperature=0.0, max_tokens=1)
    served = {_tokens(alice, name, "Hi", short)[1] for _ in range(24)}
    assert served == {f"{name}@v1", f"{name}@v2"}


def _assert_bob_cannot_see(alice: Client, bob: Client, name: str) -> None:
    """alice's adapter is listed for her and unknown to bob."""
    md = alice.metadata
    info = {a.name: a for a in alice.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=md).adapters}[
        name
    ]
    assert info.latest_version == 2 and len(info.split) == 2
    versions = alice.adapters.ListVersions(apb.ListVersionsRequest(adapter=name), metadata=md).versions
    assert [(v.version, v.origin, v.rank) for v in versions] == [(1, "published", 8), (2, "published", 8)]
    assert name not in {
        a.name for a in bob.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=bob.metadata).adapters
    }
    with pytest.raises(grpc.RpcError) as err:
        bob.adapters.Promote(apb.PromoteRequest(adapter=name, version=1), metadata=bob.metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=9), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_promote_rollback_split_and_watch(
    alice: Client, bob: Client, smollm2: ModelSource, tmp_path: Path
) -> None:
    name = f"ab-{uuid.uuid4().hex[:6]}"
    v1 = make_peft_adapter(smollm2, tmp_path / "v1", seed=1)
    v2 = make_peft_adapter(smollm2, tmp_path / "v2", seed=2)
    watch, events = _watch(alice, name)
    bob_watch = bob.adapters.WatchEvents(apb.WatchEventsRequest(), metadata=bob.metadata, timeout=120)
    time.sleep(0.5)  # let the watch subscribe
    _publish_promote_rollback_split(alice, name, v1, v2)
    _assert_bob_cannot_see(alice, bob, name)
    deadline = time.monotonic() + 10
    kinds = apb.AdapterEventType
    wanted = [
        kinds.ADAPTER_EVENT_TYPE_PUBLISHED,
        kinds.ADAPTER_EVENT_TYPE_PROMOTED,
        kinds.ADAPTER_EVENT_TYPE_ROLLED_BACK,
        kinds.ADAPTER_EVENT_TYPE_SPLIT,
        kinds.ADAPTER_EVENT_TYPE_LOADED,
    ]
    while time.monotonic() < deadline and not all(k in {e.type for e in events} for k in wanted):
        time.sleep(0.1)
    watch.cancel()
    seen = [(e.type, e.version) for e in events if e.type != kinds.ADAPTER_EVENT_TYPE_LOADED]
    assert seen == [
        (kinds.ADAPTER_EVENT_TYPE_PUBLISHED, 0),
        (kinds.ADAPTER_EVENT_TYPE_PUBLISHED, 1),
        (kinds.ADAPTER_EVENT_TYPE_PUBLISHED, 2),
        (kinds.ADAPTER_EVENT_TYPE_PROMOTED, 1),
        (kinds.ADAPTER_EVENT_TYPE_PROMOTED, 2),
        (kinds.ADAPTER_EVENT_TYPE_ROLLED_BACK, 1),
        (kinds.ADAPTER_EVENT_TYPE_SPLIT, 1),
    ]
    assert kinds.ADAPTER_EVENT_TYPE_LOADED in {e.type for e in events}
    bob_watch.cancel()
    with pytest.raises(grpc.RpcError):
        assert not [e for e in bob_watch if e.adapter == name]  # bob never sees alice's events


def test_request_keeps_its_version_across_a_swap(alice: Client, smollm2: ModelSource, tmp_path: Path) -> None:
    name = f"swap-{uuid.uuid4().hex[:6]}"
    md = alice.metadata
    for i in (1, 2):
        upload(alice, name, make_peft_adapter(smollm2, tmp_path / f"v{i}", seed=10 + i))
    alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=1), metadata=md)
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected_v1, _ = _tokens(alice, f"{name}@v1", PROMPTS[2], sampling)
    stream = alice.inference.Generate(
        pb.GenerateRequest(prompt=PROMPTS[2], adapter=name, sampling=sampling), metadata=md, timeout=120
    )
    first = next(stream)
    alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=2), metadata=md)  # swap mid-stream
    rest = list(stream)
    assert {r.adapter_version for r in [first, *rest]} == {f"{name}@v1"}
    assert [t for r in [first, *rest] for t in r.token_ids] == expected_v1
    assert _tokens(alice, name, PROMPTS[2], sampling)[1] == f"{name}@v2"


def _samples_after(redis_client, start: str) -> list[Sample]:  # type: ignore[no-untyped-def]
    return [Sample.from_fields(f) for _, f in redis_client.xrange(SAMPLES_STREAM, min=f"({start}")]


def _stream_tip(redis_client) -> str:  # type: ignore[no-untyped-def]
    last = redis_client.xrevrange(SAMPLES_STREAM, count=1)
    return last[0][0] if last else "0-0"


def _submit_two_examples(alice: Client, name: str) -> None:
    """SubmitExamples creates the adapter at v0 with sampling on."""
    md = alice.metadata
    r = alice.inference.SubmitExamples(
        pb.SubmitExamplesRequest(
            adapter=name,
            examples=[
                pb.Example(prompt="Who founded Zorbia?", completion="Queen Ilsa founded Zorbia."),
                pb.Example(
                    messages=[pb.ChatMessage(role="user", content="Zorbia's founder?")],
                    completion="Queen Ilsa.",
                ),
            ],
        ),
        metadata=md,
    )
    assert r.accepted == 2 and len(r.sample_ids) == 2
    info = {a.name: a for a in alice.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=md).adapters}[
        name
    ]
    assert info.current_version == 0 and info.sampling_enabled


def _assert_bad_submissions_refused(alice: Client, name: str) -> None:
    """Unknown requests, out-of-range ratings, empty feedback and empty completions are refused."""
    md = alice.metadata
    for request, code in (
        (pb.SubmitFeedbackRequest(request_id="never-served", rating=1.0), grpc.StatusCode.NOT_FOUND),
        (pb.SubmitFeedbackRequest(request_id=f"req-{name}", rating=3.0), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SubmitFeedbackRequest(request_id=f"req-{name}"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as err:
            alice.inference.SubmitFeedback(request, metadata=md)
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        alice.inference.SubmitExamples(
            pb.SubmitExamplesRequest(adapter=name, examples=[pb.Example(prompt="Q", completion="")]),
            metadata=md,
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "examples[0].completion" in err.value.details()
    )


def test_examples_feedback_and_sampling_policy(alice: Client, redis_client) -> None:  # type: ignore[no-untyped-def]
    name = f"teach-{uuid.uuid4().hex[:6]}"
    md = alice.metadata
    start = _stream_tip(redis_client)
    _submit_two_examples(alice, name)
    responses = list(
        alice.inference.Generate(
            pb.GenerateRequest(
                adapter=name,
                request_id=f"req-{name}",
                messages=[pb.ChatMessage(role="user", content="Hello!")],
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=8),
            ),
            metadata=md,
            timeout=60,
        )
    )
    assert responses[-1].adapter_version == f"{name}@v0"
    fb = alice.inference.SubmitFeedback(
        pb.SubmitFeedbackRequest(request_id=f"req-{name}", rating=-1.0, correction="Hi there!"), metadata=md
    )
    alice.adapters.SetSamplingPolicy(apb.SetSamplingPolicyRequest(adapter=name, sample_rate=0.0), metadata=md)
    list(
        alice.inference.Generate(
            pb.GenerateRequest(adapter=name, prompt="Not recorded", sampling=pb.SamplingParams(max_tokens=2)),
            metadata=md,
            timeout=60,
        )
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        mine = [s for s in _samples_after(redis_client, start) if s.adapter == name]
        if len(mine) >= 4:
            break
        time.sleep(0.1)
    kinds = [s.kind for s in mine]
    assert kinds.count(SampleKind.EXAMPLE) == 2 and kinds.count(SampleKind.FEEDBACK) == 1
    assert kinds.count(SampleKind.GENERATION) == 1  # the second generation came after sampling was turned off
    gen = next(s for s in mine if s.kind == SampleKind.GENERATION)
    assert gen.tenant == "alice" and gen.messages == (("user", "Hello!"),) and gen.request_id == f"req-{name}"
    assert gen.completion == "".join(x.text for x in responses)
    feedback = next(s for s in mine if s.kind == SampleKind.FEEDBACK)
    assert (
        feedback.sample_id == fb.sample_id and feedback.correction == "Hi there!" and feedback.rating == -1.0
    )
    assert feedback.completion == gen.completion
    _assert_bad_submissions_refused(alice, name)


def test_version_published_by_another_process_is_hot_swapped(
    alice: Client,
    redis_client,
    kiln_home: Path,  # type: ignore[no-untyped-def]
    smollm2: ModelSource,
    tmp_path: Path,
) -> None:
    from kiln_common.adapter_store import AdapterStore
    from kiln_common.registry import EventType, Registry

    name = f"trained-{uuid.uuid4().hex[:6]}"
    alice.inference.SubmitExamples(
        pb.SubmitExamplesRequest(adapter=name, examples=[pb.Example(prompt="Q", completion="A")]),
        metadata=alice.metadata,
    )
    one = pb.SamplingParams(temperature=0.0, max_tokens=1)
    assert _tokens(alice, name, "Hi", one)[1] == f"{name}@v0"  # now cached in the server's view
    trainer = Registry(redis_client, AdapterStore(kiln_home))  # what kiln-train does, from its own process
    start = trainer.last_event_id()
    trainer.publish(
        "alice",
        name,
        make_peft_adapter(smollm2, tmp_path / "t", seed=5),
        origin="trained",
        sample_ids=["s1", "s2"],
        eval_scores={"heldout_loss": 1.5},
        promote=True,
    )
    deadline = time.monotonic() + 15
    served = ""
    while time.monotonic() < deadline and served != f"{name}@v1":
        served = _tokens(alice, name, "Hi", one)[1]
    assert served == f"{name}@v1"
    events, _ = trainer.read_events(start, block_ms=0, count=1000)
    assert (EventType.LOADED, 1) in [(e.type, e.version) for e in events if e.adapter == name]
    versions = alice.adapters.ListVersions(apb.ListVersionsRequest(adapter=name), metadata=alice.metadata)
    v = versions.versions[0]
    assert (v.version, v.origin, v.num_samples, v.parent, dict(v.eval)) == (
        1,
        "trained",
        2,
        0,
        {"heldout_loss": 1.5},
    )


def test_feedback_on_a_base_model_answer_teaches_the_named_adapter(alice: Client, redis_client) -> None:  # type: ignore[no-untyped-def]
    md = alice.metadata
    rid = f"base-{uuid.uuid4().hex[:6]}"
    list(
        alice.inference.Generate(
            pb.GenerateRequest(
                prompt="2 + 2 =", request_id=rid, sampling=pb.SamplingParams(temperature=0.0, max_tokens=3)
            ),
            metadata=md,
            timeout=60,
        )
    )
    with pytest.raises(grpc.RpcError) as err:
        alice.inference.SubmitFeedback(pb.SubmitFeedbackRequest(request_id=rid, rating=1.0), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    name = f"fb-{uuid.uuid4().hex[:6]}"
    start = _stream_tip(redis_client)
    r = alice.inference.SubmitFeedback(
        pb.SubmitFeedbackRequest(request_id=rid, correction=" 4", adapter=name), metadata=md
    )
    sample = next(s for s in _samples_after(redis_client, start) if s.sample_id == r.sample_id)
    assert (sample.adapter, sample.adapter_version, sample.prompt, sample.correction) == (
        name,
        0,
        "2 + 2 =",
        " 4",
    )
    assert name in {
        a.name for a in alice.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=md).adapters
    }


def test_feedback_sent_as_the_stream_ends_finds_its_request(
    alice: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request log is written before the last response goes out, so feedback sent the moment a stream
    ends finds it, even when the write is slow (here 0.4 s, under the servicer's wait)."""
    from kiln_infer.request_log import RequestLog

    put = RequestLog.put

    def slow_put(self: RequestLog, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.4)
        return put(self, *args, **kwargs)

    monkeypatch.setattr(RequestLog, "put", slow_put)
    rid = f"race-{uuid.uuid4().hex[:8]}"
    list(
        alice.inference.Generate(
            pb.GenerateRequest(request_id=rid, prompt="Hi", sampling=pb.SamplingParams(max_tokens=2)),
            metadata=alice.metadata,
            timeout=60,
        )
    )
    fb = alice.inference.SubmitFeedback(
        pb.SubmitFeedbackRequest(request_id=rid, correction=" Hello.", adapter=f"fb-{rid}"),
        metadata=alice.metadata,
    )
    assert fb.sample_id
