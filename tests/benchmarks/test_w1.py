"""`kiln bench --cpu` end to end: every scenario of W1's CPU variant and its baselines on the real SmolLM2."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import w1 as bench
from kiln_common.model_loader import ModelSource


def test_cpu_bench_reports_every_scenario(
    smollm2: ModelSource, model_cache_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--cpu", "--repeats", "1", "--home", str(model_cache_home), "--json", str(out)]
    assert bench.main(argv) == 0
    results = {r["name"]: r for r in json.loads(out.read_text())}
    w = bench.CPU
    expected = ["kiln base", "kiln base (no overlap)", "kiln batch-1"]
    expected += [f"kiln {n} adapters (r={w.rank})" for n in w.adapter_counts]
    expected += [f"transformers static batch {w.baseline_batch}", "transformers batch-1"]
    assert all(name in results for name in expected), sorted(results)
    assert any(name.startswith("PEFT") for name in results)
    for name, r in results.items():
        assert r["tokens_per_s"] > 0, name
        assert all(math.isfinite(v) and v >= 0 for v in (*r["ttft_ms"], *r["tpot_ms"])), name
