"""The governor benchmark's verdicts, markdown table and PNG plot, from its JSON results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TPOT_LIMIT = 1.15  # TPOT p99 beside training / alone
TTFT_LIMIT = 1.25
TRAIN_AT_HALF = 0.50  # training throughput at half capacity / standalone
TRAIN_IDLE = 0.90  # training throughput, governor on and no traffic / standalone


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def judge(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the issue's criteria for one model: name, measured ratio, limit, pass."""
    standalone = result["standalone"]["steps_per_s"]
    idle = _ratio(result["idle_governed"]["steps_per_s"], standalone)
    verdicts = [
        {"check": "train, no traffic", "value": idle, "limit": TRAIN_IDLE, "pass": idle >= TRAIN_IDLE}
    ]
    for entry in result["loads"]:
        alone, gov = entry["alone"], entry["governed"]
        tpot = _ratio(gov["tpot_ms"][1], alone["tpot_ms"][1])
        ttft = _ratio(gov["ttft_ms"][1], alone["ttft_ms"][1])
        failed = alone["failed"] + gov["failed"]
        load = entry["load"]
        verdicts += [
            {"check": f"TPOT p99 @{load:g}", "value": tpot, "limit": TPOT_LIMIT, "pass": tpot <= TPOT_LIMIT},
            {"check": f"TTFT p99 @{load:g}", "value": ttft, "limit": TTFT_LIMIT, "pass": ttft <= TTFT_LIMIT},
            {"check": f"failed requests @{load:g}", "value": failed, "limit": 0, "pass": failed == 0},
        ]
        if abs(load - 0.5) < 1e-9:
            train = _ratio(gov["train_steps_per_s"], standalone)
            verdicts.append(
                {
                    "check": "train @0.5",
                    "value": train,
                    "limit": TRAIN_AT_HALF,
                    "pass": train >= TRAIN_AT_HALF,
                }
            )
    return verdicts


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per model and load, serving latency alone / beside training, training throughput, verdicts."""
    lines = [
        "| model | load | req/s | TTFT p99 alone / governed / ungoverned (ms) | TPOT p99 alone / governed / "
        "ungoverned (ms) | train steps/s governed (x standalone) | micro-batch mean | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        standalone = r["standalone"]["steps_per_s"]
        idle = r["idle_governed"]["steps_per_s"]
        lines.append(
            f"| {r['model']} | 0 | 0 | - | - | {idle:.2f} ({_ratio(idle, standalone):.2f}x; "
            f"standalone {standalone:.2f}) | - | - |"
        )
        for e in r["loads"]:
            alone, gov, ungov = e["alone"], e["governed"], e.get("ungoverned")

            def trio(key: str, a: dict[str, Any] = alone, g: dict[str, Any] = gov, u: Any = ungov) -> str:
                tail = f" / {u[key][1]:.1f}" if u else ""
                return f"{a[key][1]:.1f} / {g[key][1]:.1f}{tail}"

            failed = alone["failed"] + gov["failed"] + (ungov["failed"] if ungov else 0)
            lines.append(
                f"| {r['model']} | {e['load']:g} | {e['rate_rps']:.1f} | {trio('ttft_ms')} | {trio('tpot_ms')} | "
                f"{gov['train_steps_per_s']:.2f} ({_ratio(gov['train_steps_per_s'], standalone):.2f}x) | "
                f"{gov['micro_batch_mean']:.1f} | {failed} |"
            )
    lines += ["", *tradeoff(results), ""]
    for r in results:
        for v in judge(r):
            verdict = "pass" if v["pass"] else "FAIL"
            lines.append(f"- {r['model']}: {v['check']}: {v['value']:.2f} (limit {v['limit']}) {verdict}")
    return "\n".join(lines)


def runs_beside(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The runs of one load that trained beside serving: governed, ungoverned, hand-off, each fixed duty."""
    named = [(k, entry[k]) for k in ("governed", "ungoverned", "handoff") if k in entry]
    duties = sorted((k for k in entry if k.startswith("duty_")), key=lambda k: float(k[5:]))
    return named + [(f"duty {k[5:]}", entry[k]) for k in duties]


def tradeoff(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: each run beside serving as serving's slowdown against training's share of standalone."""
    lines = [
        "| model | load | training beside serving | TPOT p99 x alone | TTFT p99 x alone | "
        "training x standalone | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        standalone = r["standalone"]["steps_per_s"]
        for e in r["loads"]:
            alone = e.get("alone")
            for name, run in runs_beside(e):
                tpot = _ratio(run["tpot_ms"][1], alone["tpot_ms"][1]) if alone else float("nan")
                ttft = _ratio(run["ttft_ms"][1], alone["ttft_ms"][1]) if alone else float("nan")
                train = _ratio(run["train_steps_per_s"], standalone)
                lines.append(
                    f"| {r['model']} | {e['load']:g} | {name} | {tpot:.2f} | {ttft:.2f} | {train:.2f} | "
                    f"{run['failed']} |"
                )
    return lines


def plot(results: list[dict[str, Any]], png: Path) -> Path:
    """Serving load vs training throughput (x standalone) and vs TPOT p99, one line per model and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, tpot_ax, trade_ax) = plt.subplots(1, 3, figsize=(17, 4.5))
    for r in results:
        standalone = r["standalone"]["steps_per_s"]
        loads = [0.0] + [e["load"] for e in r["loads"]]
        train = [_ratio(r["idle_governed"]["steps_per_s"], standalone)]
        train += [_ratio(e["governed"]["train_steps_per_s"], standalone) for e in r["loads"]]
        train_ax.plot(loads, train, marker="o", label=f"{r['model']} governed")
        for mode, style in (("alone", ":"), ("governed", "-"), ("ungoverned", "--")):
            points = [(e["load"], e[mode]["tpot_ms"][1]) for e in r["loads"] if mode in e]
            if points:
                xs, ys = zip(*points, strict=True)
                tpot_ax.plot(xs, ys, style, marker="o", label=f"{r['model']} {mode}")
        for e in r["loads"]:
            if "alone" not in e:
                continue
            for name, run in runs_beside(e):
                x = _ratio(run["train_steps_per_s"], standalone)
                y = _ratio(run["tpot_ms"][1], e["alone"]["tpot_ms"][1])
                trade_ax.scatter([x], [y])
                trade_ax.annotate(f"{name} @{e['load']:g}", (x, y), fontsize=7)
    trade_ax.axhline(TPOT_LIMIT, color="grey", lw=0.8)
    trade_ax.axvline(TRAIN_AT_HALF, color="grey", lw=0.8)
    trade_ax.set_xlabel("training throughput (x standalone)")
    trade_ax.set_ylabel("serving TPOT p99 (x alone)")
    trade_ax.grid(alpha=0.3)
    train_ax.axhline(TRAIN_AT_HALF, color="grey", lw=0.8)
    train_ax.set_xlabel("serving load (fraction of capacity)")
    train_ax.set_ylabel("training throughput (x standalone)")
    tpot_ax.set_xlabel("serving load (fraction of capacity)")
    tpot_ax.set_ylabel("TPOT p99, ms (lower is better)")
    for ax in (train_ax, tpot_ax):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
