"""The anchors' watch (kiln_train/anchor_watch.py): a slipping anchor is pinned into the steps to come."""

from __future__ import annotations

import torch

from kiln_train.anchor_watch import AnchorWatch
from kiln_train.encoding import IGNORE, Encoded
from kiln_train.round_data import RoundData, Rows
from kiln_train.train_progress import Candidate, Progress, pick
from kiln_train.trainer import LoraTrainer, TrainerConfig
from tests.kiln_train.tiny_lm import VOCAB, TinyTok, examples, tiny_model


def _row(n: int) -> Encoded:
    return Encoded([n, n + 1, n + 2], [-100, n + 1, n + 2])


def _round(margins: dict[int, list[list[float]]]) -> tuple[AnchorWatch, list[tuple[Rows, Rows]], RoundData]:
    """Six replay rows, rows 1, 3 and 5 anchors; four steps drawing anchors 1 and 3 (weight 0)."""
    replay = [_row(10 * i) for i in range(6)]
    watch_rows = [_row(100 + i) for i in range(3)]
    data = RoundData([_row(1)], [], replay, anchors=[1, 3, 5], anchor_watch=watch_rows)
    steps = [(Rows([data.train[0]], [None]), Rows([replay[1], replay[3]], [None, None], ce=[0.0, 0.0]))] * 4
    calls = iter(margins.items())

    def margins_of(rows: list[Encoded]) -> list[torch.Tensor]:
        _, values = next(calls)
        assert len(values) == len(rows)
        return [torch.tensor(v) for v in values]

    targets = [f"target-{i}" for i in range(6)]  # stand-ins: only passed through
    return AnchorWatch(margins_of, data, list(steps), targets), steps, data  # type: ignore[arg-type]


def test_a_slipped_anchor_is_pinned_into_later_steps_with_cross_entropy() -> None:
    # at the start anchor 2 (row 5) is a tie already: not watched; then anchor 0 stays, anchor 1 slips
    watch, _, data = _round({0: [[1.0, 0.5], [2.0, 0.1], [0.0, 3.0]], 1: [[1.0, 0.4], [0.3, -0.2]]})
    assert watch.watched == [0, 1]
    assert watch.check(step=2) == 1 and watch.pinned == [1]
    first, later = watch.steps[1][1], watch.steps[2][1]
    assert first.examples == [data.replay[1], data.replay[3]] and first.ce == [0.0, 0.0]  # step 2: done
    assert later.examples[0] is data.replay[3] and later.ce[0] == 1.0  # pinned first, weighed 1
    assert later.targets[0] == "target-3"
    assert later.examples[1] is data.replay[1] and later.ce[1] == 0.0  # the other drawn anchor stays
    assert len(later.examples) == 2  # the captured shape's row count is kept


def test_nothing_is_watched_without_anchor_rows() -> None:
    data = RoundData([_row(1)], [], [_row(2)], anchors=[0])
    watch = AnchorWatch(lambda rows: [], data, [], [])
    assert watch.watched == [] and watch.check(1) == 0


def test_a_checkpoint_with_a_slipped_anchor_is_kept_only_when_nothing_else_is() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    progress = Progress(1.0, [torch.zeros(1)], 1.0)
    progress.candidates = [
        Candidate(0.1, 2.0, 5, [torch.ones(1)], slipped=1),  # lowest loss, facts learned, an anchor slipped
        Candidate(0.3, 0.2, 3, [torch.full((1,), 2.0)]),
    ]
    pick([p], progress, None, 0.5)
    assert progress.best_step == 3 and float(p.detach()) == 2.0


def _greedy_row(model: torch.nn.Module, prompt: list[int], n: int) -> Encoded:
    """The prompt and the model's own greedy continuation: a row whose every token leads at the start."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return Encoded(ids, [IGNORE] * len(prompt) + ids[len(prompt) :])


def test_a_round_that_pushes_an_anchor_off_pins_it_and_keeps_a_checkpoint_that_holds_it() -> None:
    prompt = [5, 17, 33, 2, 60]
    anchor = _greedy_row(tiny_model(), prompt, 6)
    wrong = [(t + 7) % (VOCAB - 2) + 2 for t in anchor.input_ids[len(prompt) :]]  # its prompt, another answer
    train = [Encoded(prompt + wrong, [IGNORE] * len(prompt) + wrong) for _ in range(3)]
    # vetting on the taught rows: unwatched, the lowest vetting loss is the checkpoint that lost the anchor
    data = RoundData(train, train[:1], [anchor, *examples(7, 2)], anchors=[0], anchor_watch=[anchor])
    seen = {}
    for pin in (False, True):
        cfg = TrainerConfig(
            kl_top_k=4, min_steps=12, max_steps=12, eval_every=1, patience=50, rank=4, lr=5e-3,
            null_space_energy=0.0, pin_anchors=pin, anchors_per_step=1,
        )  # fmt: skip
        trainer = LoraTrainer(tiny_model(), TinyTok(), cfg)  # type: ignore[arg-type]
        result = trainer.train(data)
        seen[pin] = result.anchors_pinned, float(trainer.completion_margins([anchor])[0].min())
    assert seen[False][0] == 0 and seen[False][1] < 0  # unwatched: the kept checkpoint lost the anchor
    assert seen[True][0] == 1  # the taught rows pushed the anchor off, and the watch pinned it
    assert seen[True][1] > 0  # the kept checkpoint still answers the anchor the parent's way
