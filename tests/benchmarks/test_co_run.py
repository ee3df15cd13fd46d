"""The co-run probe's arithmetic, and its refusal to run without a GPU (its runs are on the H200)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.co_run import percentiles, summary


def test_percentiles_are_nearest_rank_and_empty_is_zero() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentiles(values) == (51.0, 100.0)
    assert percentiles([7.0]) == (7.0, 7.0)
    assert percentiles([]) == (0.0, 0.0)


def test_summary_gives_each_co_run_mode_as_ratios_to_its_alone_runs() -> None:
    results = {
        "serve_alone": {"decode_ms": (5.0, 10.0)},
        "train_alone": {"steps_per_s": 4.0},
        "one_process_priority": {"decode_ms": (10.0, 40.0), "steps_per_s": 3.0},
        "two_processes": {"decode_ms": (11.0, 12.0), "steps_per_s": 2.0},
        "one_process_green_64": {"error": "RuntimeError: no green contexts here"},
    }
    ratios = summary(results)
    assert set(ratios) == {"one_process_priority", "two_processes"}  # nor a mode not run, nor one that failed
    assert ratios["one_process_priority"] == {"decode_p50_x": 2.0, "decode_p99_x": 4.0, "training_x": 0.75}
    assert ratios["two_processes"]["decode_p99_x"] == pytest.approx(1.2)
    assert ratios["two_processes"]["training_x"] == 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_without_a_gpu_it_says_so_and_exits_non_zero() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.co_run", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "needs a CUDA GPU" in run.stderr
