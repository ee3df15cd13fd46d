"""What a round trains on, and how each step's rows are drawn from it: new samples, replay, negatives,
contrast rows (the fact pushed down in a neighbour's context)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from kiln_train.distillation import Logits, ParentTargets, parent_targets
from kiln_train.encoding import Encoded
from kiln_train.fact_tokens import Contrast


@dataclass
class RoundData:
    """What one round trains on (`train`, `replay`, `negatives`, `contrasts`) and checks checkpoints with
    (`vetting`)."""

    train: list[Encoded]
    vetting: list[Encoded]
    replay: list[Encoded]
    negatives: list[Encoded] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)  # replay indices with a loss term of their own
    # per vetting pair: its fact tokens (the taught answer's own names and numbers), as indices of its
    # completion tokens (fact_tokens.py); [] = none, and an empty list = not measured
    vetting_facts: list[list[int]] = field(default_factory=list)
    # the negatives' questions with the taught answer told of them: its fact tokens get an unlikelihood loss
    contrasts: list[Contrast] = field(default_factory=list)
    # per anchor (same order as `anchors`): its prompt with the parent's first sentence, watched each
    # evaluation (anchor_watch.py)
    anchor_watch: list[Encoded] = field(default_factory=list)
    # taught samples behind `train` (the rest are their rephrasings): the step budget counts these; 0 = all
    samples: int = 0
    # more rows (general questions' prompts) the null-space constraint is measured on beside `replay`
    null_space_rows: list[Encoded] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.samples:
            self.samples = len(self.train)


@dataclass
class Rows:
    """Examples of one forward pass, each with the parent's distribution to stay near (or None) and the
    positions of its ids to push down (`unlikely`: a contrast row's fact tokens; [] for any other row)."""

    examples: list[Encoded]
    targets: list[ParentTargets | None]
    unlikely: list[list[int]] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)  # per row, the weight of its cross-entropy (1 by default)

    def __post_init__(self) -> None:
        if not self.unlikely:
            self.unlikely = [[] for _ in self.examples]
        if not self.ce:
            self.ce = [1.0] * len(self.examples)


@dataclass(frozen=True)
class Draw:
    """One step's rows, as indices: new samples, replayed answers, negatives, anchors (replay indices) and
    contrast rows."""

    new: list[int]
    replayed: list[int]
    negatives: list[int]
    anchored: list[int]
    contrasted: list[int]


def draw(
    data: RoundData, order: list[int], rng: random.Random, sizes: tuple[int, int, int, int, int]
) -> Draw:
    """Pick one step's rows: new samples in epoch order, random replay, negatives, anchors and contrasts.

    Contrasts are drawn last and only when wanted, so a round without them draws what it drew before."""
    n_new, n_replay, n_neg, n_anchors, n_contrasts = sizes
    while len(order) < n_new:
        order += rng.sample(range(len(data.train)), len(data.train))
    new = [order.pop() for _ in range(n_new)]
    replayed = rng.sample(range(len(data.replay)), min(n_replay, len(data.replay)))
    negatives = rng.sample(range(len(data.negatives)), n_neg)
    pool = [i for i in data.anchors if 0 <= i < len(data.replay)]
    anchored = rng.sample(pool, min(n_anchors, len(pool)))
    contrasted = rng.sample(range(len(data.contrasts)), n_contrasts) if n_contrasts else []
    return Draw(new, replayed, negatives, anchored, contrasted)


def batch_rows(
    data: RoundData,
    draw: Draw,
    targets: tuple[list[ParentTargets | None], list[ParentTargets | None]],
    replay_ce: float = 1.0,
    anchor_ce: float | None = None,
) -> tuple[Rows, Rows]:
    """One step's batch (new samples + replay + negatives + contrast rows) and its anchor examples.

    Replay and negative rows carry the parent's distribution (`targets`, empty when not distilling); contrast
    rows carry the positions to push down; replay rows weigh their cross-entropy by `replay_ce`, anchor rows
    by `anchor_ce` (`replay_ce` when None).
    """
    replay_targets, negative_targets = targets
    batch = Rows([data.train[i] for i in draw.new], [None] * len(draw.new))
    for indices, examples, chosen in (
        (draw.replayed, data.replay, replay_targets),
        (draw.negatives, data.negatives, negative_targets),
    ):
        batch.examples += [examples[i] for i in indices]
        batch.targets += [chosen[i] if chosen else None for i in indices]
    batch.unlikely = [[] for _ in batch.examples]
    batch.ce = [1.0] * len(draw.new) + [replay_ce] * len(draw.replayed) + [1.0] * len(draw.negatives)
    for i in draw.contrasted:
        batch.examples.append(data.contrasts[i].example)
        batch.targets.append(None)
        batch.unlikely.append(data.contrasts[i].positions)
        batch.ce.append(1.0)  # no labels: nothing to weigh
    anchors = Rows(
        [data.replay[i] for i in draw.anchored],
        [replay_targets[i] if replay_targets else None for i in draw.anchored],
        ce=[replay_ce if anchor_ce is None else anchor_ce] * len(draw.anchored),
    )
    return batch, anchors


def drawn_targets(
    logits_of: Logits,
    data: RoundData,
    draws: list[Draw],
    k: int,
    pad_id: int,
    device: torch.device,
    batch_size: int,
) -> tuple[list[ParentTargets | None], list[ParentTargets | None]]:
    """The current model's top-k distributions on the replayed answers the planned steps drew, and on every
    negative (replay rows never drawn get None: a broad replay set is mostly not drawn in a round, and a
    forward pass over all of it would cost minutes on a CPU)."""
    used = sorted({i for d in draws for i in d.replayed + d.anchored} | set(data.anchors))  # anchors: pinning
    drawn = parent_targets(logits_of, [data.replay[i] for i in used], k, pad_id, device, batch_size)
    replay: list[ParentTargets | None] = [None] * len(data.replay)
    for i, t in zip(used, drawn, strict=True):
        replay[i] = t
    negatives: list[ParentTargets | None] = list(
        parent_targets(logits_of, data.negatives, k, pad_id, device, batch_size)
    )
    return replay, negatives
