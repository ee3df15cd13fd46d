"""A training run's record: its result, its best checkpoints so far, and where its time went."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


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
    # where the seconds went: setup (start loss, parent targets), compute (steps), wait (should_stop: the
    # governor's pacing and pauses), eval (vetting loss), vet (checking candidates), capture (CUDA graph)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Progress:
    """A run's best checkpoint so far and evaluations since it improved."""

    best: float  # lowest vetting loss so far
    state: list[torch.Tensor]  # the LoRA parameters at the start (the parent)
    best_loss_at_start: float
    best_step: int = 0
    bad_evals: int = 0
    refused: int = 0  # better checkpoints the vet refused
    candidates: list[tuple[float, int, list[torch.Tensor]]] = field(default_factory=list)  # loss, step, state
    losses: list[float] = field(default_factory=list)


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
        timings=clock.spent,
    )
