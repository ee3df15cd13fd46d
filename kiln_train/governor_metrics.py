"""The governor's state as Prometheus gauges, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln_train.governor import GovernorMode


class GovernorCollector(Collector):
    """kiln:train_governor_* from `Governor.state()` (mode, pacing, micro-batch, budget, the load it saw)."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        """One snapshot per scrape."""
        s = self._state()
        mode = GaugeMetricFamily(
            "kiln:train_governor_mode", "The governor's mode (1 = current).", labels=["mode"]
        )
        for m in GovernorMode:
            mode.add_metric([m.value], 1.0 if s["mode"] == m.value else 0.0)
        yield mode
        gauges = (
            ("pace_ms", "Sleep between two training steps, ms."),
            ("micro_batch", "Rows per forward/backward in a training step."),
            ("budget_ms", "Serving TPOT p99 budget in force, ms (0 = no baseline yet)."),
            ("baseline_tpot_p99_ms", "Serving TPOT p99 seen with no training running, ms."),
            ("ttft_budget_ms", "Serving TTFT p99 budget in force, ms (0 = no baseline yet)."),
            ("duty", "Training's share of wall time while serving is busy (1 = no pauses)."),
        )
        for key, doc in gauges:
            yield GaugeMetricFamily(f"kiln:train_governor_{key}", doc, value=float(s[key]))
        yield CounterMetricFamily(
            "kiln:train_governor_paused_seconds", "Time training waited for serving.", value=s["paused_s"]
        )
        load = s["load"]
        for key in ("running", "waiting", "tpot_p99_ms", "ttft_p99_ms"):
            yield GaugeMetricFamily(
                f"kiln:train_serving_{key}",
                f"Serving's {key} as the governor last read it.",
                value=float(load.get(key, 0.0)),
            )
