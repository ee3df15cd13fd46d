"""A shared LoraWorkspace: rounds train as fresh trainers do, the base computes as the base between rounds,
parents load in place, and (on a GPU) a prepared step graph is replayed by later rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln_train.encoding import Encoded
from kiln_train.gate_baseline import Baselines
from kiln_train.graph_step import round_shapes
from kiln_train.prompt_sets import GENERIC_TEXTS
from kiln_train.round_data import RoundData, Rows
from kiln_train.trainer import LoraTrainer, TrainerConfig
from kiln_train.workspace import LoraWorkspace
from tests.kiln_train.tiny_lm import TinyTok, examples, tiny_model


def _data(seed: int) -> RoundData:
    data = RoundData(
        train=examples(5, seed),
        vetting=examples(2, seed + 1),
        replay=examples(8, seed + 2),
        negatives=examples(3, seed + 3),
    )
    data.anchors = [0, 2, 4, 6]
    return data


def _cfg(**kw: object) -> TrainerConfig:
    # no null-space constraint: these rounds' replay prompts differ (seeded), and each set would be measured
    # and captured anew (test_null_space.py covers a graph replayed with it, over the same replay prompts)
    base: dict[str, object] = dict(
        kl_top_k=4, min_steps=6, max_steps=6, eval_every=3, patience=5, rank=4, null_space_energy=0.0
    )
    return TrainerConfig(**{**base, **kw})  # type: ignore[arg-type]


def _weights(trainer: LoraTrainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in trainer.trainable()])


def test_a_round_in_a_shared_workspace_trains_as_a_fresh_trainer_does() -> None:
    cfg = _cfg(cuda_graphs=False)
    fresh = LoraTrainer(tiny_model(), TinyTok(), cfg)  # type: ignore[arg-type]
    expected = fresh.train(_data(1))
    expected_weights = _weights(fresh)

    base, ws = tiny_model(), LoraWorkspace(shared=True)
    other = LoraTrainer(base, TinyTok(), cfg, workspace=ws)  # type: ignore[arg-type]
    other.train(_data(20))  # another round first: it leaves its weights and the optimiser behind
    params = other.trainable()
    other.release()
    again = LoraTrainer(base, TinyTok(), cfg, workspace=ws)  # type: ignore[arg-type]
    assert all(a is b for a, b in zip(again.trainable(), params, strict=True))  # the same layers, re-used
    result = again.train(_data(1))
    assert result.losses == pytest.approx(expected.losses, rel=1e-6)
    torch.testing.assert_close(_weights(again), expected_weights)


def test_between_rounds_the_wrapped_base_computes_as_the_base_and_drop_unwraps_it() -> None:
    base = tiny_model()
    ids = torch.tensor([[5, 9, 13, 2, 40, 41]])
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    ws = LoraWorkspace(shared=True)
    trainer = LoraTrainer(base, TinyTok(), _cfg(cuda_graphs=False), workspace=ws)  # type: ignore[arg-type]
    trainer.train(_data(3))
    with torch.no_grad():
        for p in trainer.trainable():
            p.add_(0.05)  # whatever the round kept, the adapter now changes the outputs
        assert not torch.allclose(trainer.model(input_ids=ids).logits, before)
    assert trainer.release() is base
    assert any("lora_" in n for n, _ in base.named_parameters())  # still wrapped, for the next round
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, before, rtol=0, atol=0)
    ws.drop()
    assert not any("lora_" in n for n, _ in base.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, before, rtol=0, atol=0)


def test_a_parent_loads_in_place_and_another_shape_wraps_afresh(tmp_path: Path) -> None:
    base, ws = tiny_model(), LoraWorkspace(shared=True)
    first = LoraTrainer(base, TinyTok(), _cfg(cuda_graphs=False), workspace=ws)  # type: ignore[arg-type]
    first.train(_data(5))
    parent = first.save(tmp_path / "v1")
    trained, params = _weights(first), first.trainable()
    first.release()

    child = LoraTrainer(base, TinyTok(), _cfg(cuda_graphs=False), parent, ws)  # type: ignore[arg-type]
    assert all(a is b for a, b in zip(child.trainable(), params, strict=True))  # loaded in place
    torch.testing.assert_close(_weights(child), trained)
    child.release()

    wider = LoraTrainer(base, TinyTok(), _cfg(cuda_graphs=False, rank=8), workspace=ws)  # type: ignore[arg-type]
    assert wider.trainable()[0].shape != params[0].shape  # rank 8: wrapped afresh
    assert wider.release() is base
    # a child keeps its parent's shape (rank 4) whatever the settings say now
    child = LoraTrainer(base, TinyTok(), _cfg(cuda_graphs=False, rank=8), parent, ws)  # type: ignore[arg-type]
    assert child.trainable()[0].shape == params[0].shape
    torch.testing.assert_close(_weights(child), trained)


def test_round_shapes_pad_to_the_multiple_and_at_least_wider() -> None:
    a, b = examples(3, 1), examples(2, 2)
    steps = [(Rows(a, [None] * 3), Rows(b, [None] * 2))]
    widest_a = max(len(e.input_ids) for e in a)
    (rows, width), (a_rows, a_width) = round_shapes(steps, 64)
    assert (rows, a_rows) == (3, 2) and width == 64 >= widest_a and a_width == 64
    (_, width), (_, a_width) = round_shapes(steps, 64, wider=65)
    assert width == a_width == 128
    (_, width), _ = round_shapes(steps, 16)
    assert width == -(-widest_a // 16) * 16


class _CountingTrainer:
    def __init__(self) -> None:
        self.calls = 0

    def next_token_logprobs(self, texts: list[str]) -> list[torch.Tensor]:
        self.calls += 1
        return [torch.full((2, 3), float(self.calls)) for _ in texts]

    def token_logprobs(self, data: list[Encoded]) -> list[torch.Tensor]:
        return [torch.zeros(1) for _ in data]


def test_baselines_are_measured_once_per_parent_and_the_base_is_shared() -> None:
    cache, trainer = Baselines(keep=2), _CountingTrainer()
    pairs = examples(2, 9)
    v0_a = cache.get(cache.key("t1", "a", 0, "flip"), trainer, lambda: pairs)  # type: ignore[arg-type]
    v0_b = cache.get(cache.key("t2", "b", 0, "flip"), trainer, lambda: pairs)  # type: ignore[arg-type]
    assert v0_a is v0_b and trainer.calls == 1  # every adapter's first round: one measurement
    assert len(v0_a.generic) == len(GENERIC_TEXTS) and len(v0_a.general) == 2
    v3 = cache.get(cache.key("t1", "a", 3, "flip"), trainer, lambda: pairs)  # type: ignore[arg-type]
    assert v3 is not v0_a and trainer.calls == 2
    assert cache.key("t1", "a", 3, "flip") != cache.key("t2", "a", 3, "flip")  # tenants never share
    assert cache.key("t1", "a", 3, "flip") != cache.key("t1", "a", 3, "exact")
    cache.get(cache.key("t1", "a", 4, "flip"), trainer, lambda: pairs)  # type: ignore[arg-type]
    assert cache.key("", "", 0, "flip") not in cache and trainer.calls == 3  # keep=2: the oldest went


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
def test_a_prepared_step_graph_is_replayed_by_later_rounds_on_a_gpu(caplog: pytest.LogCaptureFixture) -> None:
    eager = []
    for seed in (1, 11):
        trainer = LoraTrainer(tiny_model("cuda"), TinyTok(), _cfg(cuda_graphs=False))  # type: ignore[arg-type]
        eager.append((trainer.train(_data(seed)), _weights(trainer)))
    base, ws = tiny_model("cuda"), LoraWorkspace(shared=True)
    caplog.set_level("INFO")
    prep = LoraTrainer(base, TinyTok(), _cfg(), workspace=ws)  # type: ignore[arg-type]
    prep.prepare(_data(1))
    captured = ws.step
    assert captured is not None and ws.forward is not None
    prep.release()
    for seed, (want, want_weights) in zip((1, 11), eager, strict=True):
        trainer = LoraTrainer(base, TinyTok(), _cfg(), workspace=ws)  # type: ignore[arg-type]
        got = trainer.train(_data(seed))
        assert ws.step is captured  # replayed, not captured again
        torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(_weights(trainer), want_weights, rtol=1e-3, atol=1e-4)
        trainer.release()
    assert caplog.text.count("step captured as a CUDA graph") == 1
    assert "training eagerly" not in caplog.text
