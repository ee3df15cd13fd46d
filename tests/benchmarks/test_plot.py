"""`kiln bench --json` results become a PNG (real matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.plot import plot_results


def test_plot_writes_a_png(tmp_path: Path) -> None:
    results = [
        {"name": "kiln base", "tokens_per_s": 1200.0, "ttft_ms": [12.0, 30.0], "tpot_ms": [8.0, 11.0]},
        {"name": "hf", "tokens_per_s": 300.0, "ttft_ms": [float("nan")] * 2, "tpot_ms": [20.0, 25.0]},
    ]
    data = tmp_path / "w1.json"
    data.write_text(json.dumps(results))
    png = plot_results(data, tmp_path / "w1.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
