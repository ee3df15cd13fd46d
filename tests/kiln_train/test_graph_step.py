"""The graphed step's fixed-shape loss is the eager step's; on a GPU, graphed training is eager training."""

from __future__ import annotations

import random

import pytest
import torch

from kiln_train.distillation import model_logits, parent_targets
from kiln_train.encoding import IGNORE, Encoded
from kiln_train.fact_tokens import Contrast
from kiln_train.graph_step import LossWeights, Slots, dense_loss, graphed, width_of
from kiln_train.round_data import RoundData, Rows, batch_rows, draw
from kiln_train.trainer import LoraTrainer, TrainerConfig
from tests.kiln_train.tiny_lm import TinyTok, examples, tiny_model


def _round(cfg: TrainerConfig, device: str = "cpu") -> tuple[LoraTrainer, RoundData]:
    trainer = LoraTrainer(tiny_model(device), TinyTok(), cfg)  # type: ignore[arg-type]
    data = RoundData(
        train=examples(5, 1), vetting=examples(2, 2), replay=examples(8, 3), negatives=examples(3, 4)
    )
    data.anchors = [0, 2, 4, 6]
    data.contrasts = _contrasts(examples(4, 5))
    return trainer, data


def _contrasts(rows: list[Encoded]) -> list[Contrast]:
    """Contrast rows pushing down every completion token but the first (as `fact_positions` would)."""
    out = []
    for e in rows:
        start = next(i for i, t in enumerate(e.labels) if t != IGNORE)
        out.append(
            Contrast(Encoded(e.input_ids, [IGNORE] * len(e.labels)), list(range(start + 1, len(e.labels))))
        )
    return out


def _nudge(trainer: LoraTrainer) -> None:
    """LoRA weights off zero: the candidate differs from the parent, so the divergence is not 0."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.trainable():
            p.add_(torch.randn_like(p) * 0.05)


def _slots(rows: Rows, k: int, device: torch.device) -> Slots:
    slots = Slots.empty(len(rows.examples), width_of(rows.examples), k, device)
    slots.fill(rows, pad_id=0)
    return slots


@pytest.mark.parametrize(
    ("kl_weight", "unlikelihood_weight", "replay_ce"),
    [(1.0, 0.0, 1.0), (0.0, 0.0, 1.0), (1.0, 2.5, 1.0), (0.0, 2.5, 1.0), (1.0, 2.5, 0.0), (1.0, 0.0, 0.4)],
)
def test_dense_loss_matches_the_eager_step_loss(
    kl_weight: float, unlikelihood_weight: float, replay_ce: float
) -> None:
    cfg = TrainerConfig(
        kl_weight=kl_weight,
        kl_top_k=4,
        anchor_weight=0.7,
        cuda_graphs=False,
        unlikelihood_weight=unlikelihood_weight,
        replay_ce_weight=replay_ce,
    )
    trainer, data = _round(cfg)
    rng = random.Random(0)
    draws = [draw(data, [], rng, trainer._sizes(data)) for _ in range(3)]
    targets = trainer._parent_targets(data, draws)
    _nudge(trainer)
    device = torch.device("cpu")
    for d in draws:
        batch, anchored = batch_rows(data, d, targets, replay_ce)
        assert batch.ce.count(replay_ce) >= len(d.replayed) and anchored.ce == [replay_ce] * len(d.anchored)
        assert batch_rows(data, d, targets, replay_ce, 0.5)[1].ce == [0.5] * len(d.anchored)  # anchors' own
        assert anchored.examples and any(t is not None for t in batch.targets) == (kl_weight > 0)
        contrasted = sum(1 for p in batch.unlikely if p)
        assert contrasted == (3 if unlikelihood_weight > 0 else 0)  # as many as negatives a step
        eager = trainer._step_loss(batch, anchored)
        weights = LossWeights.of(cfg)
        dense = dense_loss(trainer.model, _slots(batch, 4, device), _slots(anchored, 4, device), weights)
        torch.testing.assert_close(dense, eager, rtol=1e-5, atol=1e-5)
        if unlikelihood_weight > 0:  # the term is there, in both: without it both losses fall by as much
            plain = dense_loss(
                trainer.model, _slots(batch, 4, device), None, LossWeights(kl_weight, 0.7, 4, 0.0)
            )
            with_term = dense_loss(trainer.model, _slots(batch, 4, device), None, weights)
            assert float((with_term - plain).detach()) > 1e-3


def test_weights_average_over_rows_with_targets_and_their_positions() -> None:
    model = tiny_model()
    rows = examples(4, 7)
    targets = parent_targets(model_logits(model), rows[1:3], 3, pad_id=0, device=torch.device("cpu"))
    slots = _slots(Rows(rows, [None, *targets, None]), 3, torch.device("cpu"))
    assert slots.ids.shape[1] % 16 == 0 and slots.ids.shape[1] >= max(len(e.input_ids) for e in rows)
    per_row = slots.weights.sum(1)
    torch.testing.assert_close(per_row, torch.tensor([0.0, 0.5, 0.5, 0.0]))
    for r in (1, 2):  # the weighted positions are exactly the row's completion-predicting positions
        labels = torch.tensor(rows[r].labels)
        completion = (labels[1:] != IGNORE).nonzero().squeeze(-1)
        assert slots.weights[r].nonzero().squeeze(-1).tolist() == completion.tolist()
        assert torch.equal(slots.target_ids[r, completion], targets[r - 1].ids)
    no_targets = _slots(Rows(rows, [None] * 4), 3, torch.device("cpu"))
    assert float(no_targets.weights.sum()) == 0.0


def test_a_round_whose_steps_differ_in_rows_is_not_graphed() -> None:
    trainer, _ = _round(TrainerConfig(cuda_graphs=False))
    a, b = examples(3, 1), examples(2, 2)
    steps = [(Rows(a, [None] * 3), Rows([], [])), (Rows(b, [None] * 2), Rows([], []))]
    with pytest.raises(ValueError, match="rows per pass"):
        graphed(trainer.model, trainer.trainable(), trainer.cfg, steps, pad_id=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
def test_graphed_training_follows_eager_training_on_a_gpu(caplog: pytest.LogCaptureFixture) -> None:
    results = []
    for graphs in (False, True):
        # replay's cross-entropy on: with it off (the default) this tiny model's step losses do not fall
        # in 8 steps (the same on a CPU, eager), so "it learned" could not be seen
        cfg = TrainerConfig(
            kl_top_k=4,
            min_steps=8,
            max_steps=8,
            eval_every=4,
            patience=5,
            cuda_graphs=graphs,
            lr=1e-3,
            replay_ce_weight=1.0,
        )
        trainer, data = _round(cfg, "cuda")
        caplog.clear()
        result = trainer.train(data)
        assert ("training eagerly" in caplog.text) is False, caplog.text  # captured when asked to be
        weights = torch.cat([p.detach().flatten() for p in trainer.trainable()])
        results.append((result, weights))
    (eager, w_eager), (graph, w_graph) = results
    assert graph.steps == eager.steps == 8
    assert graph.losses[-1] < graph.losses[0]  # it learned
    torch.testing.assert_close(torch.tensor(graph.losses), torch.tensor(eager.losses), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(w_graph, w_eager, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
def test_graphed_evaluations_match_eager_ones_on_a_gpu() -> None:
    graphed_trainer, data = _round(TrainerConfig(kl_top_k=4, cuda_graphs=True), "cuda")
    eager_trainer, _ = _round(TrainerConfig(kl_top_k=4, cuda_graphs=False), "cuda")
    rows = data.replay + data.train  # 13 rows: more than one call, of different widths
    for t in (graphed_trainer, eager_trainer):
        _nudge(t)  # the same nudge for both
    assert graphed_trainer.loss(rows) == pytest.approx(eager_trainer.loss(rows), rel=1e-4)
    assert graphed_trainer.workspace.forward is not None and eager_trainer.workspace.forward is None  # used
    pairs = zip(graphed_trainer.token_logprobs(rows), eager_trainer.token_logprobs(rows), strict=True)
    for a, b in pairs:
        assert a.numel() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_at_replay_ce_weight_0_the_replayed_answers_add_no_cross_entropy() -> None:
    """What the replay rows' answers say stops mattering at weight 0 (the KL term off here): other answer
    tokens there leave the loss as it was, while at weight 1 they change it."""
    cfg = TrainerConfig(kl_weight=0.0, cuda_graphs=False, unlikelihood_weight=0.0)
    trainer, data = _round(cfg)
    d = draw(data, [], random.Random(0), trainer._sizes(data))
    replayed = range(len(d.new), len(d.new) + len(d.replayed))
    assert replayed

    def other_answers(rows: Rows) -> Rows:
        swapped = list(rows.examples)
        for r in replayed:
            e = rows.examples[r]
            swapped[r] = Encoded(e.input_ids, [t if t == IGNORE else (t + 1) % 64 for t in e.labels])
        return Rows(swapped, rows.targets, rows.unlikely, rows.ce)

    with torch.no_grad():
        for weight, same in ((0.0, True), (1.0, False)):
            batch, _ = batch_rows(data, d, ([], []), weight)
            before, after = trainer._rows_loss(batch), trainer._rows_loss(other_answers(batch))
            assert torch.isclose(before, after).item() is same, (weight, float(before), float(after))
