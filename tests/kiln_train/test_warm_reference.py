"""Reference answers asked ahead: the base model's at start, a published version's right after publishing."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import redis
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln_common.adapter_store import AdapterStore
from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_common.registry import Registry
from kiln_train.evaluator import PromptSets, ReferenceCache
from kiln_train.parent_client import ParentAnswer, ParentUnavailableError
from kiln_train.prompt_sets import GENERIC_TEXTS
from kiln_train.round_record import RoundRecord
from kiln_train.settings import TrainSettings
from kiln_train.training_round import RoundRunner


class _Answers:
    """kiln-infer's answers as the round asks for them: records who asked for which version; can be away."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, int]] = []
        self.away = False
        self.release = threading.Event()
        self.release.set()

    def answers(self, tenant: str, adapter: str, version: int, prompts: list[Any], max_tokens: int) -> Any:
        if self.away:
            raise ParentUnavailableError("kiln-infer is unreachable")
        self.release.wait(10)
        self.asked.append((tenant, adapter, version))
        return [ParentAnswer(f"answer {i} of v{version}", True) for i in range(len(prompts))]


def _runner(rds: redis.Redis, tmp_path: Path, parent: _Answers) -> tuple[RoundRunner, ReferenceCache]:
    sets = PromptSets.builtin(gate_limit=5)
    cache = ReferenceCache(tmp_path / "ref", "model", sets)
    registry = Registry(rds, AdapterStore(tmp_path / "home"))
    return RoundRunner(registry, None, TrainSettings(), cache, parent), cache  # type: ignore[arg-type]


def test_warm_base_asks_once_and_rounds_reuse_it(rds: redis.Redis, tmp_path: Path) -> None:
    parent = _Answers()
    runner, cache = _runner(rds, tmp_path, parent)
    parent.away = True
    try:
        runner.warm_base("kiln-train")
        raise AssertionError("warm_base should raise while kiln-infer is away")
    except ParentUnavailableError:
        pass
    parent.away = False
    runner.warm_base("kiln-train")
    assert parent.asked == [("kiln-train", "", 0)] * 2  # replay, then vetting + gate
    got = cache.get("acme", "support", 0)  # the base's reference is every adapter's first parent
    assert got is not None and got.replay[0].text == got.vetting[0] == "answer 0 of v0"
    runner._reference(RoundRecord("r1", "acme", "support", 0))
    assert len(parent.asked) == 2  # a round found it and asked nothing


def test_a_round_waits_for_a_warm_up_in_flight_instead_of_asking_twice(
    rds: redis.Redis, tmp_path: Path
) -> None:
    parent = _Answers()
    runner, _ = _runner(rds, tmp_path, parent)
    parent.release.clear()  # the warm-up's ask hangs until released
    warm = threading.Thread(target=runner.warm_base, args=("kiln-train",))
    warm.start()
    time.sleep(0.2)
    round_ask = threading.Thread(target=runner._reference, args=(RoundRecord("r1", "acme", "a", 0),))
    round_ask.start()
    time.sleep(0.2)
    parent.release.set()
    warm.join(10)
    round_ask.join(10)
    assert len(parent.asked) == 2  # one reference asked (two calls), not two


def test_a_published_version_s_reference_is_asked_ahead_only_when_enabled(
    rds: redis.Redis, tmp_path: Path
) -> None:
    parent = _Answers()
    runner, cache = _runner(rds, tmp_path, parent)
    published = RoundRecord("r1", "acme", "support", 0, version=3, outcome="published")
    runner._warm_next(published)
    time.sleep(0.2)
    assert parent.asked == [] and cache.get("acme", "support", 3) is None  # off: nothing asked
    runner.warm_published = True
    runner._warm_next(published)
    deadline = time.monotonic() + 10
    while cache.get("acme", "support", 3) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert set(parent.asked) == {("acme", "support", 3)}  # asked as the tenant, for the new version


def test_prepare_measures_the_base_gate_baseline_once_it_has_the_reference(
    rds: redis.Redis, tmp_path: Path, smollm2: ModelSource
) -> None:
    parent = _Answers()
    sets = PromptSets.builtin(gate_limit=5)
    cache = ReferenceCache(tmp_path / "ref", "model", sets)
    registry = Registry(rds, AdapterStore(tmp_path / "home"))
    runner = RoundRunner(registry, load_tokenizer(smollm2), TrainSettings(), cache, parent)  # type: ignore[arg-type]
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=smollm2.config.vocab_size, num_key_value_heads=2, **shape))
    ids = torch.tensor([[5, 9, 13, 2, 40, 41]])
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    key = runner.baselines.key("acme", "support", 0, runner.settings.gate_general_scoring)

    runner.prepare(base)
    assert key not in runner.baselines  # off unless kiln-train turns it on (GPU machines)
    runner.prepare_ahead = True
    runner.prepare(base)
    assert key not in runner.baselines  # waits for the base's reference answers
    runner.warm_base("kiln-train")
    runner.prepare(base)
    assert key in runner.baselines
    measured = runner.baselines.get(key, None, lambda: [])  # type: ignore[arg-type]  # cached: no trainer
    assert len(measured.generic) == len(GENERIC_TEXTS) and len(measured.general) == len(sets.gate)
    other = runner.baselines.key("globex", "billing", 0, runner.settings.gate_general_scoring)
    assert runner.baselines.get(other, None, lambda: []) is measured  # type: ignore[arg-type]  # shared base
    runner.prepare(base)
    assert runner.baselines.get(key, None, lambda: []) is measured  # type: ignore[arg-type]  # once per base
    with torch.no_grad():  # the wrapped base still computes exactly as the base
        torch.testing.assert_close(base(input_ids=ids).logits, before, rtol=0, atol=0)
