"""The anchors' watch (kiln_train/anchor_watch.py): a slipping anchor is pinned into the steps to come."""

from __future__ import annotations

import torch

from kiln_train.anchor_watch import AnchorWatch
from kiln_train.encoding import Encoded
from kiln_train.round_data import RoundData, Rows
from kiln_train.train_progress import Candidate, Progress, pick


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
