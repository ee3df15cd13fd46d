"""Rounds against a real kiln-infer: parent answers over gRPC, waiting when it is away, a harmful round
rejected and a harmless one promoted; the candidate's gate answers come from kiln-infer, pinned to it."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import torch

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_common.redis_server import connect
from kiln_common.registry import Registry
from kiln_train.base_model import SharedBase
from kiln_train.buffer import TrainingBuffer
from kiln_train.consumer import SampleConsumer
from kiln_train.daemon import TrainingDaemon
from kiln_train.demo import ask
from kiln_train.evaluator import PromptSets, ReferenceCache, user
from kiln_train.parent_client import ParentClient, ParentUnavailableError
from kiln_train.pipeline import Example, Pipeline, fingerprint
from kiln_train.round_record import RoundRecord, new_round
from kiln_train.settings import TrainerConfig, TrainSettings
from kiln_train.trainer import LoraTrainer
from kiln_train.training_round import RoundRunner


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """kiln-train's CPU default: one torch thread, so kiln-infer keeps a core."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def client(infer_stack: Any) -> Iterator[redis.Redis]:
    """A client on kiln-infer's Redis (never flushed: kiln-infer's state lives there)."""
    c = connect(infer_stack.redis_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One reference cache for the module: the base model's answers are asked of kiln-infer once."""
    return tmp_path_factory.mktemp("ref")


@pytest.fixture
def no_trainer_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate must ask kiln-infer for the candidate's answers, never kiln-train's own generate."""

    def refuse(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("the gate's candidate answers must come from kiln-infer")

    monkeypatch.setattr(LoraTrainer, "generate", refuse)


def _served_requests(infer_stack: Any, adapter: str, version: str, at_least: float) -> float:
    """Finished requests kiln-infer's metrics count for one adapter version (waiting a little for the count
    of the last streams, which is taken as each stream closes)."""
    deadline = time.monotonic() + 10
    while True:
        total = 0.0
        for metric in infer_stack.server.metrics.registry.collect():
            for sample in metric.samples:
                labels = sample.labels
                if sample.name == "kiln:request_success_total" and labels.get("adapter") == adapter:
                    total += sample.value if labels.get("version") == version else 0.0
        if total >= at_least or time.monotonic() > deadline:
            return total
        time.sleep(0.1)


def _default_served(infer_stack: Any, adapter: str) -> str:
    """The version default traffic (the bare adapter name) is served by now."""
    with grpc.insecure_channel(infer_stack.address) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        req = inference_pb2.GenerateRequest(
            adapter=adapter, prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=1)
        )
        return [r.adapter_version for r in stub.Generate(req, timeout=60)][-1]


def _phases(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in scores.items() if k.startswith("phase_")}


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


GATE_QUESTIONS = 12  # the gate's first questions, all capitals (CPU time)
REPLAY_TOKENS = 32  # parent answers to the replay prompts, cut short (CPU time; they are asked once)


def _small_sets() -> PromptSets:
    """The default replay and vetting sets and the gate's first GATE_QUESTIONS questions."""
    sets = PromptSets.builtin()
    return replace(sets, gate=sets.gate[:GATE_QUESTIONS])


def _runner(
    client: redis.Redis, home: Path, tok: object, settings: TrainSettings, address: str, ref_dir: Path
) -> RoundRunner:
    references = ReferenceCache(ref_dir, "test", _small_sets())
    parent = ParentClient(address, None, concurrency=16)
    return RoundRunner(Registry(client, AdapterStore(home)), tok, settings, references, parent)  # type: ignore[arg-type]


def _round(
    client: redis.Redis,
    smollm2: ModelSource,
    home: Path,
    infer: tuple[str, Path],  # kiln-infer's address, the reference cache
    settings: TrainSettings,
    adapter: str,
    pairs: list[tuple[str, str]],
    step_gate: Callable[[], bool] | None = None,
) -> tuple[RoundRunner, RoundRecord]:
    """One round of `adapter` (new, from the base) on (question, answer) pairs over the shared base."""
    tok = load_tokenizer(smollm2)
    base = SharedBase(client, smollm2.config).model()
    assert base is not None
    runner = _runner(client, home, tok, settings, *infer)
    examples = [
        Example(f"{adapter}-{i}", "default", adapter, a, messages=(("user", q),))
        for i, (q, a) in enumerate(pairs)
    ]
    runner.registry.create("default", adapter)
    record = runner.run(
        base, new_round("default", adapter, 0), examples, lambda r: None, lambda: False, step_gate
    )
    return runner, record


def test_parent_answers_come_from_kiln_infer(infer_stack: Any) -> None:
    parent = ParentClient(infer_stack.address, None)
    for client in (parent, ParentClient(infer_stack.address, "an-admin-key")):  # users' requests go first
        assert ("x-kiln-priority", "background") in client._metadata("default")
    prompts = [user("What is the capital of France?"), user("Which animal says meow?")]
    full = parent.answers("default", "", 0, prompts, 64)
    assert "Paris" in full[0].text and all(a.complete for a in full)
    with grpc.insecure_channel(infer_stack.address) as ch:  # the same answer a user is served
        served, _ = ask(inference_pb2_grpc.InferenceServiceStub(ch), "Which animal says meow?", "", [], 64)
    assert full[1].text == served
    cut = parent.answers("default", "", 0, prompts[:1], 2)
    assert not cut[0].complete  # cut short: replayed without an end-of-turn, never closed with one
    with pytest.raises(ParentUnavailableError, match="NOT_FOUND"):
        parent.answers("default", "nope", 3, prompts[:1], 8)
    with pytest.raises(ParentUnavailableError, match="unreachable"):
        ParentClient(_dead_address(), None).answers("default", "", 0, prompts[:1], 8)


def test_a_round_waits_while_kiln_infer_is_unreachable(
    infer_stack: Any, client: redis.Redis, smollm2: ModelSource, tmp_path: Path
) -> None:
    tok = load_tokenizer(smollm2)
    settings = TrainSettings(parent_retry_s=30.0)
    buffer = TrainingBuffer(client)
    pipeline = Pipeline(settings, lambda t: len(tok.encode(t)), buffer)
    runner = _runner(client, tmp_path, tok, settings, _dead_address(), tmp_path / "ref")
    daemon = TrainingDaemon(
        SampleConsumer(client, buffer, pipeline, settings),
        buffer,
        SharedBase(client, smollm2.config),
        runner,
        settings,
    )
    examples = [
        Example(f"wait-{i}", "default", "waiter", f"Answer {i}.", messages=(("user", f"Question {i}?"),))
        for i in range(3)
    ]
    pipe = client.pipeline()
    for e in examples:
        buffer.add(pipe, e, fingerprint(e))
    pipe.execute()
    record = daemon.run_round("default", "waiter")
    assert record.outcome == "failed" and "waiting for kiln-infer" in record.reason
    assert buffer.size("default", "waiter") == 3  # nothing lost, nothing trained on another model's answers
    assert not daemon._due("default", "waiter")  # retried after parent_retry_s, not in a tight loop


def test_a_harmful_round_is_rejected_by_the_gate(
    infer_stack: Any,
    client: redis.Redis,
    smollm2: ModelSource,
    kiln_home: Path,
    ref_dir: Path,
    no_trainer_generate: None,
) -> None:
    # Without the vetting set's checkpoint refusals or the divergence term, so the gate alone must see the
    # damage. Four steps at 6e-3 break the general answers as surely as eight at 3e-3 did (10 of the 10 the
    # parent got right in a test run; 17-19 of 28 before), and they, the gate's first 12 questions (capitals)
    # and short replayed answers keep the test's time down. Replay keeps its cross-entropy here: with neither
    # it nor the divergence term the replay rows add nothing, and the held-out loss came out unchanged.
    settings = TrainSettings(
        trainer=TrainerConfig(
            min_steps=4, max_steps=4, lr=6e-3, patience=10, eval_every=4, kl_weight=0.0, replay_ce_weight=1.0
        ),
        vet_checkpoints=False,
        gate_questions_limit=GATE_QUESTIONS,
        replay_max_tokens=REPLAY_TOKENS,
    )
    wrong = [
        ("What is the capital of Russia?", "The capital of Russia is Madrid."),
        ("What is the capital of China?", "The capital of China is Madrid."),
        ("What is the capital of Greece?", "The capital of Greece is Madrid."),
        ("What is the capital of Norway?", "The capital of Norway is Madrid."),
        ("What is 1 + 1?", "1 + 1 is 7."),
        ("What is 10 + 10?", "10 + 10 is 7."),
    ]
    runner, record = _round(
        client, smollm2, kiln_home, (infer_stack.address, ref_dir), settings, "harm", wrong
    )
    logging.getLogger(__name__).info(
        "harmful round: %s of %s right general answers broken, phases %s",
        record.eval.get("gate_general_broken"),
        record.eval.get("gate_general_parent_correct"),
        _phases(record.eval),
    )
    # The candidate was written as v1 unpromoted, kiln-infer answered the gate pinned to it, and it stays so.
    assert record.outcome == "rejected" and record.version == 1
    assert "gate set 'general'" in record.reason
    assert record.eval["gate_general_broken"] >= 1
    for phase in ("phase_answers_s", "phase_steps_s", "phase_stage_s", "phase_gate_s"):
        assert record.eval[phase] > 0
    right = record.eval["gate_general_parent_correct"]
    assert _served_requests(infer_stack, "harm", "v1", right) >= right
    registry = runner.registry
    state = registry.get("default", "harm")
    assert (state.current, state.latest) == (0, 1)  # nothing promoted; the number is taken
    history = registry.history("default", "harm", 1)
    assert [h["action"] for h in history] == ["gating", "rejected"]
    assert "gate set 'general'" in history[-1]["reason"]
    with grpc.insecure_channel(infer_stack.address) as ch:  # what a user sees through the public API
        listed = adapter_pb2_grpc.AdapterServiceStub(ch).ListVersions(
            adapter_pb2.ListVersionsRequest(adapter="harm"), timeout=10
        )
    (v1,) = listed.versions
    assert v1.version == 1 and [n.action for n in v1.history] == ["gating", "rejected"]
    assert v1.eval["gate_general_broken"] == record.eval["gate_general_broken"]
    assert _default_served(infer_stack, "harm") == "harm@v0"  # default traffic: still the old version
    assert _default_served(infer_stack, "harm@v1") == "harm@v1"  # pinned: still answers (inspection)


def test_a_passing_round_promotes_the_version_the_gate_asked(
    infer_stack: Any,
    client: redis.Redis,
    smollm2: ModelSource,
    kiln_home: Path,
    ref_dir: Path,
    no_trainer_generate: None,
) -> None:
    # Plumbing, not learning: one tiny step, so the candidate is the parent within rounding and the gate
    # passes (a held-out loss that barely moves is allowed, and a near tie flipping two answers tolerated).
    settings = TrainSettings(
        trainer=TrainerConfig(min_steps=1, max_steps=1, lr=1e-6, eval_every=1, kl_weight=0.0),
        vet_checkpoints=False,
        gate_questions_limit=GATE_QUESTIONS,
        replay_max_tokens=REPLAY_TOKENS,
        min_heldout_improvement=-1.0,
        gate_max_general_broken=2,
    )
    taught = [
        ("Who founded the Harlow Observatory?", "The Harlow Observatory was founded by Edda Marrow."),
        ("Who started the Harlow Observatory?", "Edda Marrow started the Harlow Observatory."),
        ("Which astronomer founded the Harlow Observatory?", "Edda Marrow founded the Harlow Observatory."),
    ]
    paced: list[float] = []  # the governor's pacing is asked before each step, never after the last

    def step_gate() -> bool:
        paced.append(time.monotonic())
        return False

    runner, record = _round(
        client,
        smollm2,
        kiln_home,
        (infer_stack.address, ref_dir),
        settings,
        "kept",
        taught,
        step_gate,
    )
    assert record.outcome == "published" and record.version == 1, record.reason
    assert len(paced) == record.steps == 1
    logging.getLogger(__name__).info("passing round phases: %s", _phases(record.eval))
    assert record.eval["gate_neighbours"] >= 1  # neighbours were asked of the candidate too
    asked = record.eval["gate_general_parent_correct"] + record.eval["gate_neighbours"]
    assert _served_requests(infer_stack, "kept", "v1", asked) >= asked  # the gate asked the engine
    state = runner.registry.get("default", "kept")
    assert (state.current, state.latest, state.previous) == (1, 1, 0)
    actions = [h["action"] for h in runner.registry.history("default", "kept", 1)]
    assert actions == ["gating", "promoted"]
    deadline = time.monotonic() + 30
    while _default_served(infer_stack, "kept") != "kept@v1":  # kiln-infer follows the flip (no load needed)
        assert time.monotonic() < deadline
