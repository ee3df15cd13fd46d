"""A PNG of `kiln bench` results beside its JSON: throughput and latency (TTFT, TPOT p50/p99) per scenario."""

from __future__ import annotations

import json
import math
from pathlib import Path


def plot_results(results_json_path: Path | str, png_path: Path | str) -> Path:
    """Read the JSON `kiln bench --json` wrote and save a two-panel bar chart at `png_path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    results = json.loads(Path(results_json_path).read_text())
    names = [r["name"] for r in results]
    ys = range(len(names))
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(14, 0.5 * len(names) + 2), sharey=True)
    tput.barh(ys, [r["tokens_per_s"] for r in results], color="tab:orange")
    tput.set_xlabel("tokens / s (higher is better)")
    tput.set_yticks(list(ys), names)
    tput.invert_yaxis()
    height = 0.2
    series = [
        ("ttft_ms", 0, "TTFT p50"),
        ("ttft_ms", 1, "TTFT p99"),
        ("tpot_ms", 0, "TPOT p50"),
        ("tpot_ms", 1, "TPOT p99"),
    ]
    for k, (key, idx, label) in enumerate(series):
        values = [r[key][idx] for r in results]
        lat.barh(
            [y + (k - 1.5) * height for y in ys],
            [0 if math.isnan(v) else v for v in values],
            height,
            label=label,
        )
    lat.set_xlabel("latency, ms (lower is better)")
    lat.legend(loc="lower right")
    fig.suptitle(f"kiln bench: {Path(results_json_path).name}")
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
