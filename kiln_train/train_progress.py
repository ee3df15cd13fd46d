"""A training run's record: its result, its best checkpoints so far, and where its time went."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kiln_train.settings import TrainerConfig

log = logging.getLogger(__name__)


def plan_steps(n_train: int, new_per_step: int, cfg: TrainerConfig) -> int:
    """Steps that show every new sample `epochs` times, within [min_steps, max_steps]."""
    wanted = math.ceil(cfg.epochs * n_train / max(new_per_step, 1))
    return max(cfg.min_steps, min(cfg.max_steps, wanted))


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    train_loss: float
    heldout_before: float
    heldout_after: float
    best_step: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    planned_steps: int = 0
    stop_reason: str = ""
    refused: int = 0
    anchors_pinned: int = 0  # anchors the watch pinned after they slipped (anchor_watch.py)
    # the vetting pairs' worst fact-token margin at the start and at the kept checkpoint (inf: no fact tokens)
    fact_margin_before: float = float("inf")
    fact_margin_after: float = float("inf")
    null_space: float = 0.0  # the mean share of each LoRA layer's input kept out of the update (0: off)
    evaluations: list[tuple[int, float, float]] = field(default_factory=list)  # step, vetting loss, margin
    # where the seconds went: setup (start loss, parent targets), compute (steps), wait (should_stop: the
    # governor's pacing and pauses), eval (vetting loss), vet (checking candidates), capture (CUDA graph)
    timings: dict[str, float] = field(default_factory=dict)


def facts_learned(margin: float, wanted: float) -> bool:
    """True when the worst fact-token margin reaches `wanted` nats (0 = the rule is off; inf = no fact tokens
    were measured, so there is nothing to decide by)."""
    return wanted > 0 and math.isfinite(margin) and margin >= wanted


@dataclass(frozen=True)
class Candidate:
    """A checkpoint worth keeping: its vetting loss, worst fact-token margin, step and LoRA parameters."""

    loss: float
    margin: float
    step: int
    state: list[torch.Tensor]
    slipped: int = 0  # anchors whose parent answer no longer leads (anchor_watch.py)


@dataclass
class Progress:
    """A run's best checkpoint so far and evaluations since it improved."""

    best: float  # lowest vetting loss so far
    state: list[torch.Tensor]  # the LoRA parameters at the start (the parent)
    best_loss_at_start: float
    margin_at_start: float = float("inf")  # the vetting pairs' worst fact-token margin at the start
    margin: float = float("inf")  # ... at the latest evaluation, then at the kept checkpoint
    best_step: int = 0
    bad_evals: int = 0
    refused: int = 0  # better checkpoints the vet refused
    anchors_pinned: int = 0
    candidates: list[Candidate] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    # every evaluation: step, vetting loss, worst fact-token margin
    evaluations: list[tuple[int, float, float]] = field(default_factory=list)


class Clock:
    """Seconds spent per named part of a run (`with clock("compute"): ...`), and the total since it began."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.spent: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.spent[part] = self.spent.get(part, 0.0) + time.monotonic() - t


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    """Copy a saved checkpoint back into the parameters."""
    for p, saved in zip(params, state, strict=True):
        p.copy_(saved)


class Vet(Protocol):
    """Judges the current weights (checkpoint_vet.py); `leaked` says the last refusal was for a leak to a
    near neighbour alone."""

    leaked: bool

    def __call__(self) -> bool: ...


def pick(
    params: list[torch.nn.Parameter],
    progress: Progress,
    vet: Vet | None,
    fact_margin: float,
) -> None:
    """Restore the best candidate the vet accepts (vetted lazily: one with no slipped anchor first, then
    one whose facts are learned, then by vetting loss); else the start.

    A candidate refused for a leak alone is passed over only for one that still says the facts (worst fact
    margin > 0): an earlier checkpoint that has not learned them would publish a round that taught nothing
    and used up its samples. With none, the leaking candidate is kept and the gate judges it (a gate that
    rejects it keeps the samples buffered)."""
    ranked = sorted(
        progress.candidates, key=lambda c: (c.slipped > 0, not facts_learned(c.margin, fact_margin), c.loss)
    )
    for i, c in enumerate(ranked):
        restore(params, c.state)
        accepted = vet is None or vet()
        if not accepted and vet is not None and vet.leaked:
            accepted = not any(d.margin > 0 for d in ranked[i + 1 :])
        if accepted:
            progress.best, progress.best_step, progress.margin = c.loss, c.step, c.margin
            return
        progress.refused += 1
    restore(params, progress.state)
    progress.best, progress.best_step = progress.best_loss_at_start, 0
    progress.margin = progress.margin_at_start


def train_result(
    step: int, planned: int, stop_reason: str, before: float, progress: Progress, clock: Clock
) -> TrainResult:
    return TrainResult(
        steps=step,
        train_loss=progress.losses[-1] if progress.losses else 0.0,
        heldout_before=before,
        heldout_after=progress.best,
        best_step=progress.best_step,
        seconds=clock.elapsed(),
        losses=progress.losses,
        planned_steps=planned,
        stop_reason=stop_reason,
        refused=progress.refused,
        anchors_pinned=progress.anchors_pinned,
        fact_margin_before=progress.margin_at_start,
        fact_margin_after=progress.margin,
        evaluations=progress.evaluations,
        timings=clock.spent,
    )


def training_scores(result: TrainResult) -> dict[str, float]:
    """What training measured, for the round's `eval` map (the gate's scores join them once it has run)."""
    return dict(
        vetting_loss_before=result.heldout_before,
        vetting_loss_after=result.heldout_after,
        best_step=float(result.best_step),
        planned_steps=float(result.planned_steps),
        train_seconds=result.seconds,
        vetting_refused=float(result.refused),
        anchors_pinned=float(result.anchors_pinned),
        null_space_kept_out=result.null_space,
        **{
            f"vetting_fact_margin_{when}": margin
            for when, margin in (("before", result.fact_margin_before), ("after", result.fact_margin_after))
            if math.isfinite(margin)  # inf: no vetting pair had fact tokens
        },
        **{f"phase_steps_{part}_s": seconds for part, seconds in result.timings.items()},
    )


def record_phase(phases: dict[str, float], name: str, since: float, round_id: str) -> None:
    """Record a round phase's seconds (`phase_<name>_s`) and log its end (the log's times place it)."""
    phases[f"phase_{name}_s"] = seconds = time.monotonic() - since
    log.info("round %s: %s took %.3f s", round_id, name, seconds)
