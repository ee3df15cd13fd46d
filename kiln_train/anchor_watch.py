"""The anchors' watch: an anchor whose answer starts to slip during a round is pinned, and a checkpoint with
a slipped anchor does not end the round.

Anchor prompts ("What is the capital of France?") are replayed every round with their own loss term, pulled
towards the parent's answer through the divergence term only (`anchor_ce_weight` 0), so the parent's near
ties are not sharpened. Some of those near ties sit at an answer's first token: SmolLM2 starts its France
answer with "The" by 0.08 nats, and a round that taught a national flower tipped it into "L'Étoile, la
Marseillaise, …" (fourteenth series). The gate's 'anchors' set then rejects the whole round.

So every evaluation also forces each anchor's first sentence of the parent's answer through the current
weights. An anchor whose every token was the greedy choice at the start and is no longer (some margin <= 0:
greedy decoding now leaves the parent's first sentence) is **pinned**: from the next step on it is among the
step's anchor rows every step, with cross-entropy on the parent's answer (weight 1). A checkpoint with a
slipped anchor is not "learned" (training goes on) and ranks after every checkpoint without one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from kiln_train.distillation import ParentTargets
from kiln_train.encoding import Encoded
from kiln_train.round_data import RoundData, Rows

log = logging.getLogger(__name__)

Margins = Callable[[list[Encoded]], list[torch.Tensor]]  # per row, its completion tokens' margins


class AnchorWatch:
    """Watches a round's anchors (`RoundData.anchor_watch`) and pins the ones that slip into later steps."""

    def __init__(
        self,
        margins_of: Margins,
        data: RoundData,
        steps: list[tuple[Rows, Rows]],
        replay_targets: list[ParentTargets | None],
    ) -> None:
        self.margins_of, self.data, self.steps, self.targets = margins_of, data, steps, replay_targets
        rows = data.anchor_watch if len(data.anchor_watch) == len(data.anchors) else []
        start = margins_of(rows) if rows else []
        # only anchors the start weights answer with the parent's first sentence (a tie can't slip)
        self.watched = [i for i, m in enumerate(start) if m.numel() and float(m.min()) > 0]
        self.pinned: list[int] = []  # indices into data.anchors

    def check(self, step: int) -> int:
        """After step `step`: how many watched anchors slipped; pins the new ones into the steps to come."""
        if not self.watched:
            return 0
        now = self.margins_of([self.data.anchor_watch[i] for i in self.watched])
        slipped = [i for i, m in zip(self.watched, now, strict=True) if float(m.min()) <= 0]
        new = [i for i in slipped if i not in self.pinned]
        if new:
            self.pinned += new
            log.info("step %d: anchor(s) %s slipped: pinned from the next step", step, new)
            for k in range(step, len(self.steps)):  # self.steps[k] is step k + 1
                batch, anchored = self.steps[k]
                self.steps[k] = (batch, self._with_pinned(anchored, k))
        return len(slipped)

    def _with_pinned(self, anchored: Rows, k: int) -> Rows:
        """A step's anchor rows with the pinned anchors first (in turn, when more than fit), weighed 1."""
        slots = len(anchored.examples)
        if not slots:
            return anchored
        turn = [self.pinned[(k + j) % len(self.pinned)] for j in range(min(slots, len(self.pinned)))]
        pinned = [self.data.anchors[i] for i in turn]
        kept = [
            j for j, e in enumerate(anchored.examples) if all(e is not self.data.replay[p] for p in pinned)
        ]
        kept = kept[: slots - len(pinned)]
        return Rows(
            [self.data.replay[p] for p in pinned] + [anchored.examples[j] for j in kept],
            [self.targets[p] if self.targets else None for p in pinned] + [anchored.targets[j] for j in kept],
            ce=[1.0] * len(pinned) + [anchored.ce[j] for j in kept],
        )
