"""Taught facts on a real kiln-infer: held-out phrasings answered, near misses not, general answers kept."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import torch

from benchmarks.fact_sets import SET_A
from kiln.v1 import inference_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_common.redis_server import connect
from kiln_common.registry import Registry
from kiln_train.base_model import SharedBase
from kiln_train.demo import ask
from kiln_train.evaluator import PromptSets, ReferenceCache
from kiln_train.parent_client import ParentClient
from kiln_train.pipeline import Example
from kiln_train.round_record import new_round
from kiln_train.settings import TrainSettings
from kiln_train.training_round import RoundRunner

pytestmark = [pytest.mark.slow, pytest.mark.facts]
log = logging.getLogger(__name__)

# The facts, their held-out phrasings, near misses and general questions (in none of kiln-train's prompt
# sets, with the words a right answer has): set A of the probe that measures the same round in-process.
TAUGHT, HELD_OUT, NEAR_MISS, GENERAL = SET_A.taught, SET_A.held_out, SET_A.near_misses, SET_A.general


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """kiln-train's CPU default: one torch thread, so kiln-infer keeps a core."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _asked(stub: Any, questions: list[tuple[str, str]], adapter: str) -> list[str]:
    return [ask(stub, q, adapter, [], 48)[0] for q, _ in questions]


def _says(answer: str, word: str) -> bool:
    low = answer.lower()
    return word.lower() in low or (word == "four" and " 4 " in f" {low} ")


def _wait_serving(stub: Any, adapter: str, version: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ask(stub, "Hi", adapter, [], 1)[1] != version:
        assert time.monotonic() < deadline, f"{version} not served"
        time.sleep(0.5)


def test_taught_facts_generalise_stay_specific_and_keep_general_answers(
    infer_stack: Any, kiln_home: Path, smollm2: ModelSource, tmp_path: Path
) -> None:
    client: redis.Redis = connect(infer_stack.redis_url)
    tok = load_tokenizer(smollm2)
    base = SharedBase(client, smollm2.config).model()
    assert base is not None
    registry = Registry(client, AdapterStore(kiln_home))
    runner = RoundRunner(
        registry,
        tok,
        TrainSettings(),
        ReferenceCache(tmp_path / "ref", "smollm2", PromptSets.builtin()),
        ParentClient(infer_stack.address, None),
    )
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(infer_stack.address))
    general_before = _asked(stub, GENERAL, "")
    examples = [
        Example(f"fact-{i}", "default", "facts", a, messages=(("user", q),))
        for i, (q, a) in enumerate(TAUGHT)
    ]
    registry.create("default", "facts")
    t0 = time.monotonic()
    record = runner.run(base, new_round("default", "facts", 0), examples, lambda r: None, lambda: False)
    log.info("round: %s in %.0fs, %s", record.outcome, time.monotonic() - t0, record.eval)
    assert record.outcome == "published", record.reason
    _wait_serving(stub, "facts", "facts@v1")
    held = _asked(stub, HELD_OUT, "facts")
    near = _asked(stub, NEAR_MISS, "facts")
    general_after = _asked(stub, GENERAL, "facts")
    log.info(
        "held-out: %s\nnear misses: %s\ngeneral: %s",
        held,
        near,
        list(zip(general_before, general_after, strict=True)),
    )
    assert sum(_says(a, w) for a, (_, w) in zip(held, HELD_OUT, strict=True)) >= 5, held
    assert not any(_says(a, w) for a, (_, w) in zip(near, NEAR_MISS, strict=True)), near
    for (q, w), before, after in zip(GENERAL, general_before, general_after, strict=True):
        if _says(before, w):
            assert _says(after, w), (q, before, after)
