"""`kiln bench --train-while-serving --small`: two real processes, steady load, a round, every number."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import train_while_serving as bench
from kiln_common.model_loader import ModelSource

pytestmark = pytest.mark.slow


def test_small_run_reports_latency_phases_and_swap(
    smollm2: ModelSource, model_cache_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tws.json"
    argv = ["--small", "--device", "cpu", "--home", str(model_cache_home), "--json", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["outcome"] == "published", result["reason"]
    for window in ("before", "during", "after"):
        stats = result[window]
        assert stats["requests"] > 0, window
        assert all(math.isfinite(v) and v > 0 for k, v in stats.items() if k.endswith("_ms")), window
    assert {"phase_answers_s", "phase_steps_s", "phase_gate_s", "phase_publish_s"} <= set(result["phases_s"])
    assert 0 < result["publish_to_first_token_s"] < result["teach_to_serving_s"]
    assert result["failed_requests"] == 0
    slow = result["slowest_during"]  # the round's slowest requests, placed in time from the teach call
    assert slow and all(r["end_s"] > r["start_s"] >= 0 and r["tpot_ms"] > 0 for r in slow)
    assert [r["tpot_ms"] for r in slow] == sorted((r["tpot_ms"] for r in slow), reverse=True)


def test_settings_are_kiln_variables_the_stack_does_not_set_itself() -> None:
    pairs = ["KILN_TRAIN_NULL_SPACE_ENERGY=0.9", "KILN_MAX_BACKGROUND_SEQS=256"]
    assert bench._train_settings(pairs) == {
        "KILN_TRAIN_NULL_SPACE_ENERGY": "0.9",
        "KILN_MAX_BACKGROUND_SEQS": "256",
    }
    for bad in ("KILN_TRAIN_LR", "PATH=/tmp"):
        with pytest.raises(SystemExit, match="KILN_NAME=VALUE"):
            bench._train_settings([bad])
    with pytest.raises(SystemExit, match="KILN_MODEL: the benchmark sets it"):
        bench._train_settings(["KILN_MODEL=x"])
