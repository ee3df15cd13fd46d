"""What a round trains on, and how each step's rows are drawn from it: new samples, replay, negatives."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kiln_train.distillation import ParentTargets
from kiln_train.encoding import Encoded


@dataclass
class RoundData:
    """What one round trains on (`train`, `replay`, `negatives`) and checks checkpoints with (`vetting`)."""

    train: list[Encoded]
    vetting: list[Encoded]
    replay: list[Encoded]
    negatives: list[Encoded] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)  # replay indices with a loss term of their own
    # per vetting pair: its fact tokens (the taught answer's own names and numbers), as indices of its
    # completion tokens (fact_tokens.py); [] = none, and an empty list = not measured
    vetting_facts: list[list[int]] = field(default_factory=list)


@dataclass
class Rows:
    """Examples of one forward pass, each with the parent's distribution to stay near (or None)."""

    examples: list[Encoded]
    targets: list[ParentTargets | None]


@dataclass(frozen=True)
class Draw:
    """One step's rows, as indices: new samples, replayed answers, negatives, anchors (replay indices)."""

    new: list[int]
    replayed: list[int]
    negatives: list[int]
    anchored: list[int]


def draw(data: RoundData, order: list[int], rng: random.Random, sizes: tuple[int, int, int, int]) -> Draw:
    """Pick one step's rows: new samples in epoch order, random replay, negatives and anchors."""
    n_new, n_replay, n_neg, n_anchors = sizes
    while len(order) < n_new:
        order += rng.sample(range(len(data.train)), len(data.train))
    new = [order.pop() for _ in range(n_new)]
    replayed = rng.sample(range(len(data.replay)), min(n_replay, len(data.replay)))
    negatives = rng.sample(range(len(data.negatives)), n_neg)
    pool = [i for i in data.anchors if 0 <= i < len(data.replay)]
    anchored = rng.sample(pool, min(n_anchors, len(pool)))
    return Draw(new, replayed, negatives, anchored)


def batch_rows(
    data: RoundData,
    draw: Draw,
    targets: tuple[list[ParentTargets | None], list[ParentTargets | None]],
) -> tuple[Rows, Rows]:
    """One step's batch (new samples + replay + negatives) and its anchor examples.

    Replay and negative rows carry the parent's distribution (`targets`, empty when not distilling).
    """
    replay_targets, negative_targets = targets
    batch = Rows([data.train[i] for i in draw.new], [None] * len(draw.new))
    for indices, examples, chosen in (
        (draw.replayed, data.replay, replay_targets),
        (draw.negatives, data.negatives, negative_targets),
    ):
        batch.examples += [examples[i] for i in indices]
        batch.targets += [chosen[i] if chosen else None for i in indices]
    anchors = Rows(
        [data.replay[i] for i in draw.anchored],
        [replay_targets[i] if replay_targets else None for i in draw.anchored],
    )
    return batch, anchors
