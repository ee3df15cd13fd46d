"""The null-space constraint: a round's LoRA update stays out of the inputs generic (replay) text uses."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_train.encoding import IGNORE, Encoded, TextPair, prompt_ids
from kiln_train.evaluator import Reference
from kiln_train.heldout import HeldOut
from kiln_train.null_space import Directions, _leading, _union, lora_a_layers, measure
from kiln_train.prompt_sets import load_replay_general
from kiln_train.round_data import RoundData
from kiln_train.round_plan import RoundPlan, question_rows, round_data
from kiln_train.trainer import LoraTrainer, TrainerConfig
from kiln_train.workspace import LoraWorkspace
from tests.kiln_train.tiny_lm import TinyTok, tiny_model


def _rows(n: int, seed: int, tokens: range) -> list[Encoded]:
    """Rows over a few token ids only: their layer inputs span part of the hidden size."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, completion = rng.randint(3, 6), rng.randint(4, 10)
        ids = [rng.choice(tokens) for _ in range(prompt + completion)]
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _round(energy: float, device: str = "cpu", graphs: bool = False) -> tuple[LoraTrainer, RoundData]:
    cfg = TrainerConfig(
        null_space_energy=energy, min_steps=12, max_steps=12, eval_every=4, patience=5, fact_margin=0.0,
        kl_top_k=4, lr=3e-3, replay_ce_weight=1.0, cuda_graphs=graphs,
    )  # fmt: skip
    trainer = LoraTrainer(tiny_model(device), TinyTok(), cfg)  # type: ignore[arg-type]
    generic, taught = range(2, 12), range(60, 96)
    train = _rows(6, 1, taught)  # vetted on two of them: the vetting loss falls, the last checkpoint is kept
    data = RoundData(train=train, vetting=train[:2], replay=_rows(24, 3, generic))
    return trainer, data


def _logits(trainer: LoraTrainer, rows: list[Encoded]) -> torch.Tensor:
    with torch.no_grad():
        out = [
            trainer.model(input_ids=torch.tensor([e.input_ids], device=trainer.device)).logits for e in rows
        ]
    return torch.cat([o[0] for o in out])


def _train(energy: float, device: str = "cpu", graphs: bool = False) -> tuple[float, LoraTrainer]:
    """Train a fresh adapter; the mean change of the generic rows' logits. Checks it learned the taught
    rows, and that with a constraint every `A` reads none of the kept-out directions."""
    trainer, data = _round(energy, device, graphs)
    generic_before = _logits(trainer, data.replay)
    taught_before = trainer.loss(data.train)
    # measured as the round will (B is zero: the inputs are the base's), without touching the weights
    space = measure(trainer.model, data.replay, energy, 0, fresh=False) if energy > 0 else None
    result = trainer.train(data)
    assert result.steps == 12 and (0 < result.null_space < 1) == (energy > 0)  # recorded for the round's eval
    assert trainer.loss(data.train) < taught_before - 0.05  # it learned the taught rows
    if space is not None:
        assert 0.0 < space.kept_out() < 1.0
        for layer in space.layers:  # a fresh start is projected, and so is every step's update
            assert float(layer.directions.outside(layer.weight.detach()).abs().max()) < 1e-4
    return float((_logits(trainer, data.replay) - generic_before).abs().mean()), trainer


def test_an_update_stays_out_of_the_generic_directions_and_spares_generic_text() -> None:
    free, _ = _train(0.0)
    constrained, _ = _train(0.99)
    assert constrained < 0.5 * free, (constrained, free)


def test_a_fresh_start_is_projected_and_a_parents_start_is_kept() -> None:
    trainer, data = _round(0.99)
    layers = lora_a_layers(trainer.model)
    start = {n: m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}  # type: ignore[index]
    fresh = measure(trainer.model, data.replay, 0.99, 0, fresh=True)
    assert fresh is not None and len(fresh.layers) == len(layers)
    for layer in fresh.layers:  # the random initial A no longer reads the generic directions
        assert float(layer.directions.outside(layer.weight.detach()).abs().max()) < 1e-5
    trainer, data = _round(0.99)
    child = measure(trainer.model, data.replay, 0.99, 0, fresh=False)
    assert child is not None
    for name, layer in zip(layers, child.layers, strict=True):
        assert torch.equal(layer.weight, start[name])  # a parent's weights are not touched
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        child.project()
        moved = layer.weight - layer.start
        assert float(layer.directions.outside(moved).abs().max()) < 1e-4 and float(moved.abs().max()) > 0.1


def _read_share(directions: Directions, weight: torch.Tensor) -> float:
    """How much of `weight` (its norm's share) reads the kept-out directions."""
    w = weight.detach()
    return float(directions.outside(w).norm() / w.norm())


def test_a_childs_round_keeps_its_whole_update_out_when_its_parent_was_constrained(tmp_path: Path) -> None:
    # a child's B update acts through its parent's A, which is not projected; it adds nothing to generic text
    # when that A reads none of the kept-out directions. The parent's round left it so, and the child (a new
    # workspace, as after a restart, with the parent's weights loaded) measures the same directions, because
    # the measurement reads the base's inputs whatever adapter is loaded
    trainer, data = _round(0.99)
    trainer.train(data)
    parent = trainer.save(tmp_path / "v1")
    base = trainer.release()
    child = LoraTrainer(base, TinyTok(), trainer.cfg, parent)  # type: ignore[arg-type]
    at_start = measure(child.model, data.replay, 0.99, 0, fresh=False)
    assert at_start is not None
    for layer in at_start.layers:  # the parent's A, as loaded
        assert _read_share(layer.directions, layer.weight) < 1e-4
    taught = _rows(6, 7, range(40, 58))
    child.train(RoundData(train=taught, vetting=taught[:2], replay=data.replay))
    after = measure(child.model, data.replay, 0.99, 0, fresh=False)
    assert after is not None
    for layer in after.layers:  # the child's A (its parent's plus its own projected update): still outside
        assert _read_share(layer.directions, layer.weight) < 1e-4


def test_shared_inputs_share_one_basis_and_padding_is_left_out() -> None:
    trainer, data = _round(0.99)
    space = measure(trainer.model, data.replay, 0.99, 0, fresh=False)
    assert space is not None
    names = list(lora_a_layers(trainer.model))
    bases = dict(zip(names, (layer.directions for layer in space.layers), strict=True))
    for prefix in ("model.layers.0.self_attn", "model.layers.1.self_attn"):
        q, k, v = (
            n for suffix in ("q_proj", "k_proj", "v_proj") for n in names if n.endswith(f"{prefix}.{suffix}")
        )
        assert bases[q] is bases[k] is bases[v]
    one_by_one = measure(trainer.model, data.replay, 0.99, 0, fresh=False, batch=1)  # no padding at all
    assert one_by_one is not None
    for a, b in zip(space.layers, one_by_one.layers, strict=True):
        da, db = a.directions, b.directions
        assert da.basis.shape == db.basis.shape and da.kept == db.kept
        torch.testing.assert_close(da.basis @ da.basis.T, db.basis @ db.basis.T, rtol=1e-3, atol=1e-3)


def test_the_smaller_side_is_stored_and_projects_the_same() -> None:
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    q = q.float()
    t = torch.randn(4, 16)
    for k in (3, 12):  # 3 directions kept out: stored as they are; 12: stored as the 4 left free
        out, free = Directions(q[:, :k], kept=False), Directions(q[:, k:], kept=True)
        torch.testing.assert_close(out.outside(t), free.outside(t), rtol=1e-5, atol=1e-5)
        assert out.kept_out() == free.kept_out() == k / 16
    values = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.125])
    basis, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    covariance = basis @ torch.diag(values.double()) @ basis.T
    few = _leading(covariance, 0.49)  # the first eigenvalue holds half of the trace
    many = _leading(covariance, 0.975)
    assert not few.kept and few.basis.shape == (8, 1) and few.kept_out() == 1 / 8
    assert many.kept and many.kept_out() == 6 / 8  # 6 of 8 kept out: the 2 free ones are stored


def test_measuring_in_chunks_gives_the_same_directions() -> None:
    trainer, data = _round(0.99)
    whole = measure(trainer.model, data.replay, 0.99, 0, fresh=False)
    piecewise = measure(trainer.model, data.replay, 0.99, 0, fresh=False, budget_bytes=1)  # a pass per layer
    assert whole is not None and piecewise is not None
    for a, b in zip(whole.layers, piecewise.layers, strict=True):
        t = torch.randn(3, a.weight.shape[1])
        torch.testing.assert_close(a.directions.outside(t), b.directions.outside(t), rtol=1e-3, atol=1e-3)


def test_without_replay_rows_there_is_no_constraint() -> None:
    trainer, _ = _round(0.99)
    assert measure(trainer.model, [], 0.99, 0, fresh=True) is None


@pytest.mark.parametrize("energy", [-0.1, 1.0, float("nan"), float("inf")])
def test_energy_outside_zero_to_one_is_refused(energy: float) -> None:
    with pytest.raises(ValueError, match="KILN_TRAIN_NULL_SPACE_ENERGY"):
        TrainerConfig(null_space_energy=energy)


def test_a_workspace_measures_once_per_replay_prompts_and_restarts_in_place() -> None:
    trainer, data = _round(0.99)
    ws = trainer.workspace
    first = ws.null_space(data.replay, 0.99, 0, fresh=True)
    assert first is not None
    starts = [layer.start for layer in first.layers]
    with torch.no_grad():  # as if a round had trained
        for layer in first.layers:
            layer.weight.add_(1.0)
    other_answers = []  # the same prompts answered otherwise: a child's replay rows
    for e in data.replay:
        cut = next(i for i, t in enumerate(e.labels) if t != IGNORE)
        other_answers.append(Encoded(e.input_ids[:cut] + [5, 6, 7], [IGNORE] * cut + [5, 6, 7]))
    again = ws.null_space(other_answers, 0.99, 0, fresh=False)
    assert again is first and all(
        a is b for a, b in zip(starts, (x.start for x in again.layers), strict=True)
    )
    for layer in again.layers:  # restarted where the weights are now, in the same tensors
        assert torch.equal(layer.start, layer.weight)
    assert ws.null_space(data.replay, 0.95, 0, fresh=True) is not first  # another energy: measured again
    assert ws.null_space(data.replay[1:], 0.95, 0, fresh=True) is not first  # other prompts: measured again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
def test_a_constrained_round_is_graphed_on_a_gpu_and_keeps_the_constraint() -> None:
    free, _ = _train(0.0, "cuda", graphs=True)
    constrained, graphed = _train(0.99, "cuda", graphs=True)
    step = graphed.workspace.step
    assert step is not None and step.space is not None  # replayed graphs, projections captured with them
    assert constrained < 0.5 * free, (constrained, free)
    ws, base, data = LoraWorkspace(shared=True), tiny_model("cuda"), _round(0.99)[1]
    captures = []
    for _ in range(2):  # kiln-train's rounds share a workspace; the same replay prompts, the same constraint
        trainer = LoraTrainer(base, TinyTok(), graphed.cfg, None, ws)  # type: ignore[arg-type]
        trainer.train(data)
        captures.append(ws.step)
        trainer.release()
    assert captures[0] is not None and captures[1] is captures[0]  # the second round replayed the capture
    _, eager = _train(0.99, "cuda", graphs=False)
    assert eager.workspace.step is None
    for a, b in zip(graphed.trainable(), eager.trainable(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_extra_rows_widen_what_is_kept_out_and_are_never_trained_on() -> None:
    other = _rows(24, 5, range(30, 40))  # inputs the replay rows never take

    def change_on_other(extra: list[Encoded]) -> tuple[float, float]:
        trainer, data = _round(0.99)
        data.null_space_rows = extra
        space = trainer._null_space(data)
        assert space is not None
        before, taught_before = _logits(trainer, other), trainer.loss(data.train)
        trainer.train(data)
        assert trainer.loss(data.train) < taught_before - 0.05  # it still learned the taught rows
        return float((_logits(trainer, other) - before).abs().mean()), space.kept_out()

    alone, kept_alone = change_on_other([])
    widened, kept_widened = change_on_other(other)
    assert kept_widened > kept_alone  # measured anew, on more inputs
    assert widened < 0.5 * alone, (widened, alone)  # and the update spares the extra rows' text too


def test_the_broad_questions_prompts_join_the_measurement_only(smollm2: ModelSource) -> None:
    held = HeldOut([], [], [], [], [], paraphrased=True)
    plan = RoundPlan(held, Reference((), (), ()), [], [], [])
    tok = load_tokenizer(smollm2)
    assert round_data(tok, plan, [], [], 0).null_space_rows == []
    data = round_data(tok, plan, [], [], 0, None, 5)
    assert len(data.null_space_rows) == 5 and data.train == [] and data.replay == []
    shared = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("x")[0]
    for e, q in zip(data.null_space_rows, load_replay_general(5), strict=True):
        assert e.input_ids == prompt_ids(tok, TextPair("", (("user", q),)))  # as the server renders it
    questions = ("What is 2 + 2?", "Name a red fruit.", "Who wrote Hamlet?")
    for e, q in zip(question_rows(tok, questions), questions, strict=True):
        measured = tok.decode([t for t, label in zip(e.input_ids, e.labels, strict=True) if label != IGNORE])
        assert q in measured and shared[:24] not in measured  # the question is read, the system turn is not


def test_a_union_of_kept_out_directions_holds_each_part() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 12
    first = torch.linalg.qr(torch.randn(d, 3, generator=gen))[0]
    free = torch.linalg.qr(torch.randn(d, 4, generator=gen))[0]  # stored as free directions: 8 kept out
    parts = [Directions(first, kept=False), Directions(free, kept=True)]
    union = _union(parts)
    for part in parts:  # whatever either keeps out, the union keeps out
        probe = part.outside(torch.randn(5, d, generator=gen))
        assert torch.allclose(union.outside(probe), probe, atol=1e-4)
    assert 8 <= round(union.kept_out() * d) <= 11
    assert _union(parts[:1]) is parts[0]
