"""Generate over real gRPC: streaming, concurrency, seeds, validation, auth, deadlines, model info."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from kiln.v1 import inference_pb2 as pb
from kiln_infer.server import InferServer
from tests.kiln_infer.conftest import Client

CAPITAL = [pb.ChatMessage(role="user", content="What is the capital of France?")]


def _generate(client: Client, **kwargs: object) -> list[pb.GenerateResponse]:
    timeout = kwargs.pop("timeout", 120)
    return list(
        client.inference.Generate(pb.GenerateRequest(**kwargs), metadata=client.metadata, timeout=timeout)
    )


def _text(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


def test_chat_answer_streams_over_several_responses(alice: Client) -> None:
    arrivals = []
    responses = []
    start = time.monotonic()
    for r in alice.inference.Generate(
        pb.GenerateRequest(
            messages=CAPITAL, request_id="capital-1", sampling=pb.SamplingParams(temperature=0.0)
        ),
        metadata=alice.metadata,
        timeout=120,
    ):
        arrivals.append(time.monotonic() - start)
        responses.append(r)
    assert "Paris" in _text(responses)
    assert len(responses) >= 3
    assert arrivals[-1] - arrivals[0] > 0.05 and len({round(t, 3) for t in arrivals}) >= 3  # not buffered
    assert all(r.request_id == "capital-1" and r.adapter_version == "" for r in responses)
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.completion_tokens == sum(len(r.token_ids) for r in responses) > 0
    assert last.usage.prompt_tokens > 5
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_eight_concurrent_streams_with_different_sampling(alice: Client) -> None:
    settings = [
        pb.SamplingParams(temperature=0.0, max_tokens=12),
        pb.SamplingParams(temperature=0.7, seed=1, max_tokens=20),
        pb.SamplingParams(temperature=1.0, top_p=0.9, seed=2, max_tokens=16),
        pb.SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=24),
        pb.SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=4, max_tokens=18),
        pb.SamplingParams(temperature=0.0, stop=["."], max_tokens=40),
        pb.SamplingParams(temperature=1.2, top_p=0.5, top_k=5, seed=6, max_tokens=10, ignore_eos=True),
        pb.SamplingParams(temperature=0.5, logprobs=3, seed=7, max_tokens=8),
    ]
    results: dict[int, list[pb.GenerateResponse]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = _generate(
                alice, prompt=f"Write a short sentence about the number {i}.", sampling=settings[i]
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 8
    for i, responses in results.items():
        last = responses[-1]
        n = sum(len(r.token_ids) for r in responses)
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED and last.usage.completion_tokens == n
        assert n <= settings[i].max_tokens
    assert sum(len(r.token_ids) for r in results[6]) == 10  # ignore_eos runs to max_tokens
    assert results[5][-1].finish_reason in (pb.FINISH_REASON_STOP_STRING, pb.FINISH_REASON_STOP)
    assert "." not in _text(results[5])
    with_lp = [lp for r in results[7] for lp in r.logprobs]
    assert len(with_lp) == sum(len(r.token_ids) for r in results[7])
    assert all(len(lp.top) == 3 and lp.chosen.logprob <= 0.0 for lp in with_lp)


def test_same_seed_same_tokens(alice: Client) -> None:
    sampling = pb.SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    runs = [
        [t for r in _generate(alice, prompt="Once upon a time", sampling=sampling) for t in r.token_ids]
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 24
    sampling.seed = 99
    other = [t for r in _generate(alice, prompt="Once upon a time", sampling=sampling) for t in r.token_ids]
    assert other != runs[0]


BAD_INPUTS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(), "prompt"),
    (dict(prompt="hi", messages=CAPITAL), "prompt"),
    (dict(messages=[pb.ChatMessage(role="robot", content="hi")]), "messages[0].role"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=-3)), "sampling.max_tokens"),
    (dict(prompt="hi", sampling=pb.SamplingParams(max_tokens=100_000)), "sampling.max_tokens"),
    (dict(prompt="hi", sampling=pb.SamplingParams(temperature=-0.1)), "sampling.temperature"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (dict(prompt="hi", sampling=pb.SamplingParams(top_k=-1)), "sampling.top_k"),
    (dict(prompt="hi", sampling=pb.SamplingParams(repetition_penalty=0.0)), "sampling.repetition_penalty"),
    (dict(prompt="hi", sampling=pb.SamplingParams(logprobs=21)), "sampling.logprobs"),
    (dict(prompt="hi", sampling=pb.SamplingParams(stop=["x"] * 17)), "sampling.stop"),
    (dict(prompt="hi", sampling=pb.SamplingParams(stop=[""])), "sampling.stop[0]"),
    (dict(prompt="word " * 3000), "prompt"),
    (dict(prompt="x" * (2 << 20)), "request"),
    (dict(prompt="hi", adapter="bad name!"), "adapter"),
    (dict(prompt="hi", request_id="has space"), "request_id"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_is_invalid_argument_naming_the_field(alice: Client, kwargs: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(alice, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_a_client_may_ask_for_background_priority_and_nothing_else(alice: Client) -> None:
    greedy = pb.SamplingParams(max_tokens=8, temperature=0.0)

    def ask(priority: str) -> list[pb.GenerateResponse]:
        metadata = [*alice.metadata, ("x-kiln-priority", priority)]
        request = pb.GenerateRequest(messages=CAPITAL, sampling=greedy)
        return list(alice.inference.Generate(request, metadata=metadata, timeout=120))

    # the same answer at either priority (a background request waits only while others do)
    assert (
        _text(ask("background"))
        == _text(ask("normal"))
        == _text(_generate(alice, messages=CAPITAL, sampling=greedy))
    )
    for bad in ("high", "urgent", ""):
        with pytest.raises(grpc.RpcError) as err:
            ask(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("x-kiln-priority:"), err.value.details()


def test_unknown_and_other_tenants_adapter_are_the_same_not_found(alice: Client, bob: Client) -> None:
    alice.inference.SubmitExamples(
        pb.SubmitExamplesRequest(adapter="private", examples=[pb.Example(prompt="Q", completion="A")]),
        metadata=alice.metadata,
    )
    assert _generate(alice, prompt="hi", adapter="private", sampling=pb.SamplingParams(max_tokens=2))
    details = []
    for client, adapter in ((bob, "private"), (alice, "missing"), (bob, "private@v0"), (alice, "private@v7")):
        with pytest.raises(grpc.RpcError) as err:
            _generate(client, prompt="hi", adapter=adapter)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        details.append(err.value.details().replace(adapter, "<a>"))
    assert len(set(details)) == 1


def test_bad_or_missing_api_key_is_unauthenticated(alice: Client) -> None:
    for metadata in ([], [("authorization", "Bearer nope-nope-nope")], [("authorization", "Basic x")]):
        with pytest.raises(grpc.RpcError) as err:
            list(alice.inference.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata, timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_deadline_is_honoured_and_frees_the_engine(alice: Client, infer_server: InferServer) -> None:
    sampling = pb.SamplingParams(max_tokens=1500, ignore_eos=True)
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for r in alice.inference.Generate(
            pb.GenerateRequest(prompt="Count:", sampling=sampling), metadata=alice.metadata, timeout=1.5
        ):
            got.append(r)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got  # it was streaming when the deadline hit
    engine = infer_server._parts.engine  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while engine.num_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_unfinished() == 0


def test_client_cancel_aborts_the_request(alice: Client, infer_server: InferServer) -> None:
    call = alice.inference.Generate(
        pb.GenerateRequest(prompt="Count:", sampling=pb.SamplingParams(max_tokens=1500, ignore_eos=True)),
        metadata=alice.metadata,
        timeout=60,
    )
    next(call)
    call.cancel()
    engine = infer_server._parts.engine  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while engine.num_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_unfinished() == 0


def test_model_info(alice: Client) -> None:
    info = alice.inference.GetModelInfo(pb.GetModelInfoRequest(), metadata=alice.metadata)
    assert info.model == "smollm2" and info.architecture == "llama" and info.vocab_size == 49152
    assert info.max_context_tokens == 2048 and info.device == "cpu" and info.dtype == "float32"
