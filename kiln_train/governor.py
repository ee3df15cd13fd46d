"""Training yields to serving: before each step, read kiln-infer's load and pause, pace or shrink the step.

One GPU is time-sliced between the two processes, so the only lever kiln-train has is how much work it puts in
front of serving's decode steps. `Governor.before_step()` is the one call the step loop makes; it blocks while
serving is saturated and returns the micro-batch size for the step. The control is a duty cycle: the share of
wall time training may keep the GPU busy, enforced by sleeping after each step in proportion to its length.

- idle (nothing running or waiting, or no kiln-infer publishing): full speed, full micro-batch, duty 1;
- serving becomes busy: the duty drops to `start_duty` at once (the budget is unknown until reports arrive);
- saturated (requests waiting for `saturated_s` in a row): pause until the queue is empty;
- busy, with a relative budget and no baseline yet (serving turned busy while training ran, or just before
  the round's first step, before any request finished): no steps until kiln-infer has reported serving's own
  latency over a whole window with no training, at most `measure_s` (then the start duty, unbudgeted);
- TPOT p99 over the budget: the duty is multiplied by `backoff`, then no further cut for `settle_s`, since the
  reports still hold requests that ran before the cut; only once the duty is down at `min_duty` is the
  micro-batch halved as well (shorter kernels, but each step then costs more GPU time per row: on the H200 a
  micro-batch of 1-2 left training at a fifth of its speed for little latency gained);
- TPOT p99 under the budget by more than `headroom`: a halved micro-batch is doubled back first, then the duty
  grows by `step_up` each adjustment, up to `max_duty` (additive increase, multiplicative decrease: it settles
  just under the budget without oscillating across it).

The pause is spread over the step: a step loop that computes its gradient in micro-batches calls
`between_micro_batches()` after each one, which sleeps that micro-batch's share. With `paced_micro_batch` set,
a busy serving side gets micro-batches of at most that many rows, so training holds the GPU for short spans
often rather than long spans seldom: every request then sees about the average slowdown, where long spans
slow the requests that overlap them by much more (and those are serving's p99).

The budget is `KILN_TRAIN_TPOT_P99_BUDGET_MS` when set, else the idle baseline times
`1 + KILN_TRAIN_TPOT_P99_SLACK` (the baseline is the TPOT p99 reported while no training step has run for a
whole load window).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from kiln_common.load_report import DEFAULT_WINDOW_S, LoadReport, read_load
from kiln_train.memory_split import enforce_memory_split

PREFIX = "KILN_TRAIN_"


class GovernorMode(enum.Enum):
    """What the governor let the last step do."""

    FULL = "full"  # serving idle or absent: no restraint
    STEADY = "steady"  # serving busy, training at full duty, latency inside the budget
    PACED = "paced"  # serving busy, training at a duty below 1: pauses between steps
    PAUSED = "paused"  # serving saturated: no steps
    MEASURING = "measuring"  # serving busy and its own latency unknown: no steps until a window shows it


# evaluation passes that start closer together than this (seconds) are a run, each one's time its GPU work
PASS_GAP_S = 0.25


@dataclass(frozen=True)
class GovernorSettings:
    """The governor's knobs; each is KILN_TRAIN_<NAME upper-cased>."""

    tpot_p99_budget_ms: float = 0.0  # absolute TPOT p99 budget; 0 = relative to the idle baseline
    tpot_p99_slack: float = 0.15  # relative budget: idle-baseline TPOT p99 x (1 + slack)
    ttft_p99_budget_ms: float = 0.0  # absolute TTFT p99 budget; 0 = relative to the idle baseline
    ttft_p99_slack: float = 0.25  # relative TTFT budget: idle-baseline TTFT p99 x (1 + slack)
    saturated_s: float = 2.0  # requests waiting this long in a row = saturated: pause
    adjust_every_s: float = 1.0  # act on a new report at most this often (kiln-infer publishes every ~0.5 s)
    max_pace_ms: float = 5000.0  # the longest sleep between two steps
    start_duty: float = 0.3  # training's share of wall time when serving turns busy
    # the largest share training takes while serving is busy (caps start_duty). 0.3: on the H200 a fixed 0.3
    # held serving's p99 inside +15% / +25%, while a governor free to grow to 1.0 followed the noise of a 5 s
    # p99 window (wider than its 10% slack) up to 0.68 (docs/benchmarks.md, sessions 9 and 10)
    max_duty: float = 0.3
    paced_micro_batch: float = 0  # while serving is busy, micro-batches of at most this many rows; 0 = no cap
    min_duty: float = 0.02  # the least share training keeps while serving is busy but not saturated
    backoff: float = 0.6  # over budget: duty x this
    step_up: float = 0.05  # under budget by more than headroom: duty + this, per adjustment
    headroom: float = 0.1  # grow only while TPOT p99 < budget x (1 - headroom)
    settle_s: float = 3.0  # after a cut, wait this long for the reports to show its effect
    poll_s: float = 0.25  # how often a paused governor looks again
    measure_s: float = 8.0  # the longest wait for serving's own latency (relative budgets) before training
    memory_fraction: float = 0.0  # share of the GPU's memory kiln-train may allocate; 0 = no cap
    memory_headroom_gib: float = 2.0  # CUDA contexts and allocator slack of both processes

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value):
                raise ValueError(f"{PREFIX}{f.name.upper()} must be a finite number, got {value}")
        for name in (
            "tpot_p99_budget_ms",
            "tpot_p99_slack",
            "ttft_p99_budget_ms",
            "ttft_p99_slack",
            "saturated_s",
            "max_pace_ms",
            "settle_s",
            "headroom",
            "paced_micro_batch",
            "measure_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{PREFIX}{name.upper()} must be >= 0, got {getattr(self, name)}")
        if self.tpot_p99_budget_ms == 0 and self.tpot_p99_slack <= 0:
            raise ValueError(f"{PREFIX}TPOT_P99_SLACK must be > 0 when {PREFIX}TPOT_P99_BUDGET_MS is 0")
        if self.poll_s <= 0 or self.adjust_every_s <= 0:
            raise ValueError(f"{PREFIX}POLL_S and {PREFIX}ADJUST_EVERY_S must be > 0")
        if self.paced_micro_batch != int(self.paced_micro_batch):
            raise ValueError(
                f"{PREFIX}PACED_MICRO_BATCH must be a whole number of rows, got {self.paced_micro_batch}"
            )
        for name in ("start_duty", "min_duty", "max_duty", "backoff", "step_up"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{PREFIX}{name.upper()} must be in (0, 1], got {getattr(self, name)}")
        if self.min_duty > self.max_duty:
            raise ValueError(
                f"{PREFIX}MIN_DUTY ({self.min_duty}) must be <= {PREFIX}MAX_DUTY ({self.max_duty})"
            )
        if not 0.0 <= self.memory_fraction < 1.0:
            raise ValueError(f"{PREFIX}MEMORY_FRACTION must be in [0, 1), got {self.memory_fraction}")

    @classmethod
    def from_environ(cls, extra: Mapping[str, str]) -> tuple[GovernorSettings, dict[str, str]]:
        """The governor's KILN_TRAIN_* variables parsed, and the rest (for TrainSettings.from_environ)."""
        own = {f"{PREFIX}{f.name.upper()}": f.name for f in fields(cls)}
        values: dict[str, float] = {}
        rest: dict[str, str] = {}
        for var, raw in extra.items():
            if var not in own:
                rest[var] = raw
                continue
            try:
                values[own[var]] = float(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r}: {exc}") from exc
        return cls(**values), rest  # type: ignore[arg-type]


class Governor:
    """Decides, before each training step, whether and how hard training may use the GPU."""

    def __init__(
        self,
        settings: GovernorSettings,
        read_load: Callable[[], LoadReport | None],
        full_micro_batch: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        self.settings = settings
        self.full_micro_batch = full_micro_batch
        self._read, self._clock, self._sleep, self._window_s = read_load, clock, sleep, window_s
        self.mode = GovernorMode.FULL
        self.micro_batch = full_micro_batch
        self.pace_ms = 0.0
        self.duty = 1.0  # training's share of wall time
        self._last_cut = -float("inf")
        self.baseline_tpot_p99_ms = 0.0
        self.baseline_ttft_p99_ms = 0.0
        self.load: LoadReport | None = None
        self.paused_s = 0.0  # total time spent paused
        self._waiting_since: float | None = None
        self._last_adjust = -float("inf")
        self._step_ended: float | None = None  # when the previous step handed control back
        self._pass_at: float | None = None  # when the last evaluation pass started (or its pause ended)
        self._step_ms = 0.0  # duration of the last step (its own work, not the pacing)
        self._last_trained = -float("inf")
        self._measuring_since: float | None = None

    @property
    def budget_ms(self) -> float:
        """The TPOT p99 budget in force (0 = unknown yet: no idle baseline seen)."""
        s = self.settings
        return _budget(s.tpot_p99_budget_ms, self.baseline_tpot_p99_ms, s.tpot_p99_slack)

    @property
    def ttft_budget_ms(self) -> float:
        """The TTFT p99 budget in force (0 = unknown yet)."""
        s = self.settings
        return _budget(s.ttft_p99_budget_ms, self.baseline_ttft_p99_ms, s.ttft_p99_slack)

    def state(self) -> dict[str, Any]:
        """A plain snapshot for GetTrainingStatus and metrics."""
        return {
            "mode": self.mode.value,
            "pace_ms": round(self.pace_ms, 1),
            "duty": round(self.duty, 3),
            "micro_batch": self.micro_batch,
            "full_micro_batch": self.full_micro_batch,
            "budget_ms": round(self.budget_ms, 3),
            "baseline_tpot_p99_ms": round(self.baseline_tpot_p99_ms, 3),
            "ttft_budget_ms": round(self.ttft_budget_ms, 3),
            "paused_s": round(self.paused_s, 3),
            "load": self.load.to_dict() if self.load is not None else {},
        }

    def before_step(self, should_stop: Callable[[], bool] | None = None) -> int:
        """Wait out saturation and pacing; returns the micro-batch size for the coming step."""
        now = self._clock()
        if self._step_ended is not None:
            self._step_ms = (now - self._step_ended) * 1000
            self._last_trained = now
        self._decide(now)
        waits = (GovernorMode.PAUSED, GovernorMode.MEASURING)
        while self.mode in waits and not (should_stop is not None and should_stop()):
            self._sleep(self.settings.poll_s)
            self.paused_s += self.settings.poll_s
            self._decide(self._clock(), force=True)
        self._pause(self._step_ms)
        paced = int(self.settings.paced_micro_batch)
        if paced > 0 and self.mode is not GovernorMode.FULL:
            return min(self.micro_batch, paced)
        return self.micro_batch

    def between_micro_batches(self) -> None:
        """After one micro-batch of a step (not the last): sleep its share of the pause, so the pauses are
        spread through the step instead of gathered after it. No pause while serving is idle."""
        if self._step_ended is None or self.duty >= 1.0:
            return
        self._pause((self._clock() - self._step_ended) * 1000)

    def before_pass(self) -> None:
        """Before an evaluation pass over the base (vetting, the gate's measures): pace the pass before it.

        Passes come in runs, each one's results read before the next starts, so the time since the last call
        is that pass's GPU work: sleep its share, as after a step. The first pass of a run (more than
        `PASS_GAP_S` after the last) has nothing to pace: the gap was host work (answers, staging). The pass
        and its sleep are taken out of the span the next step's pause counts, so no work is paced twice.
        """
        now = self._clock()
        last, self._pass_at = self._pass_at, now
        if last is None or now - last > PASS_GAP_S or self.duty >= 1.0:
            return
        self.pace_ms = min(self.settings.max_pace_ms, (now - last) * 1000 * (1 - self.duty) / self.duty)
        if self.pace_ms > 0:
            self._sleep(self.pace_ms / 1000)
        self._pass_at = self._clock()
        if self._step_ended is not None and self._step_ended <= last:
            self._step_ended += self._pass_at - last

    def _pause(self, worked_ms: float) -> None:
        """Sleep so that `worked_ms` of training is `duty` of the time; the next span starts after it."""
        self.pace_ms = min(self.settings.max_pace_ms, worked_ms * (1 - self.duty) / self.duty)
        if self.pace_ms > 0:
            self._sleep(self.pace_ms / 1000)
        self._step_ended = self._clock()

    def gate(self, should_stop: Callable[[], bool]) -> Callable[[], bool]:
        """`should_stop` with the governor folded in, for step loops that ask it once at the top of each step.

        LoraTrainer.train asks its `should_stop` exactly there, so `governor.gate(stop)` in place of `stop`
        makes every step wait out saturation and pacing; a paused governor still lets a stop through.
        """

        def governed() -> bool:
            if should_stop():
                return True
            self.before_step(should_stop)
            return should_stop()

        return governed

    def finished(self) -> None:
        """The round is over: the next step is not timed from the last one; idle time counts from now."""
        if self._step_ended is not None:
            self._last_trained = self._clock()
        self._step_ended = self._pass_at = None

    def _decide(self, now: float, force: bool = False) -> None:
        """Read the load (at most every adjust_every_s unless forced) and set mode, pace and micro-batch."""
        if not force and now - self._last_adjust < self.settings.adjust_every_s:
            return
        self._last_adjust = now
        load = self._read()
        self.load = load
        if load is None or load.idle:
            self._waiting_since = None
            self.mode, self.duty, self.micro_batch = GovernorMode.FULL, 1.0, self.full_micro_batch
            return
        turned_busy = self.mode is GovernorMode.FULL
        if turned_busy:  # back off at once, before the reports can say so
            start = min(self.settings.start_duty, self.settings.max_duty)
            self.duty, self._last_cut = min(self.duty, start), now
        if now - self._last_trained >= self._window_s and load.tpot_samples > 0:
            self.baseline_tpot_p99_ms = load.tpot_p99_ms  # this window saw no training: serving's own p99
            self.baseline_ttft_p99_ms = load.ttft_p99_ms
        if load.waiting > 0:
            self._waiting_since = now if self._waiting_since is None else self._waiting_since
            if now - self._waiting_since >= self.settings.saturated_s:
                self.mode = GovernorMode.PAUSED
                return
        else:
            self._waiting_since = None
        if self._measuring(now):
            self.mode = GovernorMode.MEASURING
            return
        if turned_busy or self.mode is GovernorMode.MEASURING:
            self.mode = GovernorMode.PACED if self.duty < 1.0 else GovernorMode.STEADY
            return
        self._pace(load, now)

    def _measuring(self, now: float) -> bool:
        """Whether to hold training while a relative budget has no baseline yet (at most measure_s)."""
        s = self.settings
        relative = s.tpot_p99_budget_ms == 0 or s.ttft_p99_budget_ms == 0
        if not relative or self.baseline_tpot_p99_ms > 0:
            self._measuring_since = None
            return False
        if self._measuring_since is None:
            self._measuring_since = now
        return now - self._measuring_since < s.measure_s

    def _pace(self, load: LoadReport, now: float) -> None:
        """Over budget: cut the duty (once per settle_s; at min_duty, halve the micro-batch); under: grow."""
        s = self.settings
        ratio = self._worst_ratio(load)
        if ratio is not None and now - self._last_cut >= s.settle_s:
            if ratio > 1.0:
                if self.duty <= s.min_duty:
                    self.micro_batch = max(1, self.micro_batch // 2)
                self.duty = max(s.min_duty, self.duty * s.backoff)
                self._last_cut = now
            elif ratio < 1.0 - s.headroom:
                if self.micro_batch < self.full_micro_batch:
                    self.micro_batch = min(self.full_micro_batch, self.micro_batch * 2)
                else:
                    self.duty = min(s.max_duty, round(self.duty + s.step_up, 9))  # sums of 0.05s reach 1.0
        self.mode = GovernorMode.PACED if self.duty < 1.0 else GovernorMode.STEADY

    def _worst_ratio(self, load: LoadReport) -> float | None:
        """The worse of serving TPOT and TTFT p99 over its budget (None: nothing to judge by)."""
        ratios = []
        if self.budget_ms > 0 and load.tpot_samples > 0:
            ratios.append(load.tpot_p99_ms / self.budget_ms)
        if self.ttft_budget_ms > 0 and load.ttft_samples > 0:
            ratios.append(load.ttft_p99_ms / self.ttft_budget_ms)
        return max(ratios) if ratios else None


def _budget(absolute_ms: float, baseline_ms: float, slack: float) -> float:
    """The absolute budget when set, else the idle baseline with its slack (0 while no baseline is known)."""
    return absolute_ms if absolute_ms > 0 else baseline_ms * (1 + slack)


def start_governor(redis: Any, settings: GovernorSettings, full_micro_batch: int) -> Governor:
    """kiln-train's governor over kiln-infer's load report, once the memory split is checked and applied."""
    # MemorySplitError (naming KILN_TRAIN_MEMORY_FRACTION and --kv-memory-fraction) when they cannot fit
    if torch.cuda.is_available():
        enforce_memory_split(
            redis, torch.device("cuda"), settings.memory_fraction, settings.memory_headroom_gib
        )
    return Governor(settings, lambda: read_load(redis), full_micro_batch)
