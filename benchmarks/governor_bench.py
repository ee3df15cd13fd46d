"""`python -m benchmarks.governor_bench`: serving at a fixed request rate beside a substantial training round (issue 10).

Per model: kiln-infer started by its entry point (a process tree of its own), its capacity measured with closed-loop
bursts; then, each in a fresh trainer process attached to kiln-infer's base weights (benchmarks.governor_trainer):
training standalone (governor off, no traffic), training with the governor and no traffic, and for each serving
load (a fraction of capacity, open loop at a fixed request rate): serving alone, serving beside governed training,
and (with --ungoverned) beside ungoverned training. Latencies during training count only the requests submitted
while the round was running; training throughput counts only the steps that ended inside the serving window.

Judged (issue 10): TPOT p99 within +15% and TTFT p99 within +25% of serving alone; training >= 50% of standalone
at half capacity; >= 90% with no traffic; no request fails. Prints a table; writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import w1
from benchmarks.governor_load import capacity, latency, requests, steps_per_s, workload
from benchmarks.governor_report import judge, plot, table, tradeoff
from benchmarks.grpc_load import burst
from benchmarks.server_bench import CLIENT_PROCESSES, free_port, start_kiln_infer, stop

log = logging.getLogger("benchmarks.governor_bench")
GPU_MODELS = "dummy:llama-3.2-1b,dummy:llama-3.1-8b"


SCENARIOS = ("idle", "alone", "governed", "ungoverned", "duty", "handoff")
NO_BUDGET_MS = 1e9  # a fixed-duty run: the budget never binds, so the duty stays at its cap
DEFAULT_SCENARIOS = ("idle", "alone", "governed")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (the issue's on a GPU, tiny ones with --cpu)."""

    steps: int
    batch: int
    seq_len: int
    loads: tuple[float, ...]  # serving request rates, as fractions of the measured capacity
    kv_memory_fraction: float
    train_memory_fraction: float
    ungoverned: bool
    budget_factor: float = 1.10  # the governor's TPOT p99 budget: serving alone's p99 x this
    ttft_budget_factor: float = 1.20  # and its TTFT p99 budget
    probe_s: float = 8.0  # seconds of each open-loop capacity probe
    # the round starts this long after the clients start sending: it meets steady load, as a round does that
    # starts while serving is busy (the requests of those seconds are outside the round's window)
    warmup_s: float = 5.0
    cover: float = 1.6  # serving's load lasts the warm-up plus this many standalone rounds
    # which scenarios to run (capacity and standalone always run unless reused: the rest depend on them)
    scenarios: frozenset[str] = frozenset(DEFAULT_SCENARIOS)
    reuse: dict[str, Any] = field(
        default_factory=dict
    )  # capacity / standalone / idle_governed measured before
    paced_micro_batch: int = 0  # KILN_TRAIN_PACED_MICRO_BATCH of the governed and fixed-duty trainers
    duties: tuple[float, ...] = ()  # scenario "duty": training held at each of these shares while serving


class Trainer:
    """One benchmarks.governor_trainer process: started, ready, told to go, then its report."""

    def __init__(
        self,
        spec: str,
        home: Path,
        plan: Plan,
        governor: bool,
        budget: tuple[float, float] = (0.0, 0.0),
        env: dict[str, str] | None = None,
        handoff: bool = False,
    ) -> None:
        cmd = [
            sys.executable, "-m", "benchmarks.governor_trainer", "--model", spec, "--home", str(home),
            "--steps", str(plan.steps), "--batch", str(plan.batch), "--seq-len", str(plan.seq_len),
            "--governor", "on" if governor else "off", "--memory-fraction", str(plan.train_memory_fraction),
            "--handoff", "on" if handoff else "off",
        ]  # fmt: skip
        tpot_ms, ttft_ms = budget
        env = {
            **os.environ,
            "KILN_TRAIN_TPOT_P99_BUDGET_MS": str(tpot_ms),
            "KILN_TRAIN_TTFT_P99_BUDGET_MS": str(ttft_ms),
            "KILN_TRAIN_PACED_MICRO_BATCH": str(plan.paced_micro_batch),
            **(env or {}),
        }
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"trainer exited with {self.proc.wait()} before it was ready")

    def go(self) -> None:
        """Start the round."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def report(self, timeout_s: float = 3600.0) -> dict[str, Any]:
        """Wait for the round to end; its report."""
        out, _ = self.proc.communicate(timeout=timeout_s)
        if self.proc.returncode != 0:
            raise RuntimeError(f"trainer failed with {self.proc.returncode}")
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return report


def train_alone(spec: str, home: Path, plan: Plan, governor: bool) -> dict[str, Any]:
    """A round with no serving traffic."""
    trainer = Trainer(spec, home, plan, governor)
    trainer.go()
    report = trainer.report()
    return {
        "steps_per_s": steps_per_s(report),
        "seconds": report["step_ends"][-1] - report["started"],
        "full_micro_batch": report["full_micro_batch"],
        "peak_gib": report["peak_gib"],
    }


def serve_beside(
    target: str,
    spec: str,
    home: Path,
    plan: Plan,
    reqs: list[dict[str, Any]],
    rate: float,
    governor: bool = False,
    budget: tuple[float, float] = (0.0, 0.0),
    env: dict[str, str] | None = None,
    handoff: bool = False,
) -> dict[str, Any]:
    """Serving at `rate` while a round trains; latencies of the requests submitted during the round.

    With `governor`, the trainer runs it with `env`'s settings and `budget` (absolute TPOT, TTFT p99 in ms;
    0 = relative to the baseline it reads); with `handoff`, in layer chunks that wait for serving's GPU work
    to finish; with neither, it trains flat out.
    """
    trainer = Trainer(spec, home, plan, governor, budget, env, handoff)
    # the round starts once the clients are sending (they take seconds to start) and the load is steady
    start_round = threading.Timer(plan.warmup_s, trainer.go)
    result = burst(target, reqs, len(reqs), CLIENT_PROCESSES, rate=rate, on_start=start_round.start)
    report = trainer.report()
    start = min(s.submitted for s in result.streams)
    end = max((s.last for s in result.ok), default=start)
    out = latency(result, report["started"], report["step_ends"][-1])
    out["train_steps_per_s"] = steps_per_s(report, start, end)
    out["governor"] = report["governor"]
    out["handoff"] = report.get("handoff")
    out["micro_batch_mean"] = sum(report["micro_batch"]) / len(report["micro_batch"])
    out["full_micro_batch"] = report["full_micro_batch"]
    out["trace"] = {k: report[k] for k in ("step_ends", "duty", "seen_tpot_p99_ms", "micro_batch")}
    if governor and not (report["governor"] or {}).get("load"):
        log.warning(
            "the governor saw no load report: is kiln-infer publishing kiln:load:* (issue 10 wiring)?"
        )
    return out


def run_model(spec: str, home: Path, plan: Plan, cpu: bool, out: Path) -> dict[str, Any]:
    """The chosen scenarios for one model against one kiln-infer; `out` holds the results so far after each one.

    Results in `plan.reuse` (an earlier run's JSON, same model, machine and commit) are kept and not run again,
    so a run too long for one call can be split: capacity and standalone, then idle, then each load scenario.
    """
    w = workload(spec, cpu)
    os.environ["KILN_KV_MEMORY_FRACTION"] = str(plan.kv_memory_fraction)
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_kiln_infer(w, home, port, home)
    from benchmarks.governor_trainer import model_config

    vocab = int(model_config(spec, home).vocab_size)
    result: dict[str, Any] = {"model": spec, **plan.reuse}
    try:
        if "capacity" not in result:  # every load's rate is a fraction of it (the probes warm serving up)
            result["capacity"] = capacity(target, w, vocab, plan.probe_s)
        else:  # reused: warm this server as the probes would have, or its first run pays the cold paths
            warm = requests(w, vocab, max(8, int(result["capacity"]["rps"] * plan.probe_s / 2)), seed=7)
            burst(target, warm, len(warm), CLIENT_PROCESSES, rate=result["capacity"]["rps"] / 2)
        result["capacity_rps"] = result["capacity"]["rps"]
        if "standalone" not in result:  # the reference throughput, and how long a load must last
            result["standalone"] = train_alone(spec, home, plan, governor=False)
            log.info("%s standalone: %s", spec, result["standalone"])
        out.write_text(json.dumps([result], indent=1))
        if "idle" in plan.scenarios and "idle_governed" not in result:
            result["idle_governed"] = train_alone(spec, home, plan, governor=True)
            log.info("%s governed, no traffic: %s", spec, result["idle_governed"])
            out.write_text(json.dumps([result], indent=1))
        _loads(target, spec, home, plan, w, vocab, result, out)
    finally:
        stop(proc)
    return result


def _loads(
    target: str,
    spec: str,
    home: Path,
    plan: Plan,
    w: w1.Workload,
    vocab: int,
    result: dict[str, Any],
    out: Path,
) -> None:
    """Per serving load: serving alone, beside governed training, beside ungoverned (those chosen and not reused)."""
    earlier = {e["load"]: e for e in result.get("loads", [])}
    result["loads"] = loads = []
    for i, fraction in enumerate(plan.loads):
        rate = fraction * result["capacity_rps"]
        # long enough to cover the warm-up and the round, which the governor may stretch
        n = max(8, int(rate * (result["standalone"]["seconds"] * plan.cover + plan.warmup_s)))
        entry: dict[str, Any] = earlier.get(fraction) or {"load": fraction, "rate_rps": rate, "requests": n}
        loads.append(entry)
        reqs = requests(w, vocab, entry["requests"], seed=100 + i)
        if "alone" in plan.scenarios and "alone" not in entry:
            entry["alone"] = latency(burst(target, reqs, len(reqs), CLIENT_PROCESSES, rate=entry["rate_rps"]))
            log.info("%s at %.2f of capacity, alone: %s", spec, fraction, json.dumps(entry["alone"]))
            out.write_text(json.dumps([result], indent=1))
        if "governed" in plan.scenarios and "governed" not in entry:
            if "alone" not in entry:
                raise SystemExit(
                    "the governed scenario needs serving alone at the same load (scenario 'alone')"
                )
            # The governor's budget is relative to serving's own TPOT and TTFT p99 as kiln-infer reports them
            # (a few seconds' window per API process), read before the round's first step, 5 s into steady
            # load; the slacks leave a margin under the judged +15% / +25%. (Until d535d67 the bench gave it
            # the alone run's p99 over the whole run as an absolute budget: a different statistic, about twice
            # the windowed one here, so the governor saw room it did not have.)
            env = {
                "KILN_TRAIN_TPOT_P99_SLACK": f"{plan.budget_factor - 1:g}",
                "KILN_TRAIN_TTFT_P99_SLACK": f"{plan.ttft_budget_factor - 1:g}",
            }
            entry["budget"] = env
            entry["governed"] = serve_beside(target, spec, home, plan, reqs, entry["rate_rps"], True, env=env)
            shown = {k: v for k, v in entry["governed"].items() if k != "trace"}
            log.info("%s governed: %s", spec, json.dumps(shown))
            out.write_text(json.dumps([result], indent=1))
        if "ungoverned" in plan.scenarios and "ungoverned" not in entry:
            entry["ungoverned"] = serve_beside(target, spec, home, plan, reqs, entry["rate_rps"])
            log.info("%s ungoverned: %s", spec, json.dumps(entry["ungoverned"]))
            out.write_text(json.dumps([result], indent=1))
        if "handoff" in plan.scenarios and "handoff" not in entry:
            entry["handoff"] = serve_beside(target, spec, home, plan, reqs, entry["rate_rps"], handoff=True)
            shown = {k: v for k, v in entry["handoff"].items() if k != "trace"}
            log.info("%s hand-off: %s", spec, json.dumps(shown))
            out.write_text(json.dumps([result], indent=1))
        for duty in plan.duties if "duty" in plan.scenarios else ():
            key = f"duty_{duty:g}"
            if key not in entry:
                entry[key] = fixed_duty(target, spec, home, plan, reqs, entry["rate_rps"], duty)
                shown = {k: v for k, v in entry[key].items() if k != "trace"}
                log.info("%s at duty %g: %s", spec, duty, json.dumps(shown))
                out.write_text(json.dumps([result], indent=1))


def fixed_duty(
    target: str, spec: str, home: Path, plan: Plan, reqs: list[dict[str, Any]], rate: float, duty: float
) -> dict[str, Any]:
    """Serving beside a round held at `duty` of the time while serving is busy (no latency budget binds):
    one point of the trade-off between serving's latency and training's throughput."""
    env = {
        "KILN_TRAIN_START_DUTY": str(duty),
        "KILN_TRAIN_MAX_DUTY": str(duty),
        "KILN_TRAIN_MIN_DUTY": str(min(duty, 0.02)),
    }
    return serve_beside(target, spec, home, plan, reqs, rate, True, (NO_BUDGET_MS, NO_BUDGET_MS), env)


def scenarios(names: str, ungoverned: bool) -> frozenset[str]:
    """The scenarios named (comma-separated), plus 'ungoverned' with --ungoverned; SystemExit on an unknown one."""
    chosen = {n.strip() for n in names.split(",") if n.strip()} | ({"ungoverned"} if ungoverned else set())
    unknown = chosen - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"--scenarios: unknown {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return frozenset(chosen)


def reused(path: Path) -> dict[str, Any]:
    """An earlier run's results to keep: its OUT.json (a list, one entry per model) or one model's dict."""
    try:
        data = json.loads(path.read_text())
        return dict(data[0] if isinstance(data, list) else data)
    except (OSError, ValueError, IndexError, TypeError) as exc:
        raise SystemExit(f"--reuse {path}: not an earlier run's JSON ({exc})") from exc


def arg_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.governor_bench", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="tiny run on CPU (SmolLM2, a few short steps)")
    parser.add_argument("--models", default=GPU_MODELS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--loads", default="0.5", help="serving rates as fractions of capacity [0.5]")
    parser.add_argument("--ungoverned", action="store_true", help="also train without the governor")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"of {','.join(SCENARIOS)}; with --reuse, splits a long run over several calls [%(default)s]",
    )
    parser.add_argument("--kv-memory-fraction", type=float, default=0.4)
    parser.add_argument("--train-memory-fraction", type=float, default=0.35)
    parser.add_argument("--budget-factor", type=float, default=1.10, help="budget: alone's TPOT p99 x this")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--cover", type=float, default=1.6, help="load length in standalone rounds [1.6]")
    parser.add_argument(
        "--reuse",
        type=str,
        help="an earlier run's OUT.json (same model, machine and commit): its results are kept and those "
        "scenarios skipped, so a run can be split over calls (with --scenarios)",
    )
    parser.add_argument(
        "--paced-micro-batch",
        type=int,
        default=0,
        help="KILN_TRAIN_PACED_MICRO_BATCH for governed rounds (graphed on a GPU); 0 = the whole micro-batch",
    )
    parser.add_argument(
        "--duties", default="", help="scenario 'duty': training held at these shares, e.g. 0.1,0.3"
    )
    parser.add_argument("--out", type=Path, default=Path("governor"), help="writes OUT.json and OUT.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for each model; print the table, write JSON and the PNG."""
    args = arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plan = Plan(args.steps, args.batch, args.seq_len, tuple(float(x) for x in args.loads.split(",")),
                args.kv_memory_fraction, args.train_memory_fraction, args.ungoverned, args.budget_factor)  # fmt: skip
    models = ["smollm2"] if args.cpu else args.models.split(",")
    if args.cpu:
        steps = args.steps if args.steps != 200 else 3
        plan = Plan(steps, 2, 64, plan.loads, 0.5, 0.0, args.ungoverned, args.budget_factor, warmup_s=1.0)
    home = args.home or Path(os.environ.get("KILN_HOME") or tempfile.mkdtemp(prefix="kiln-governor-"))
    duties = tuple(float(x) for x in args.duties.split(",") if x.strip())
    if not all(0.0 < d <= 1.0 for d in duties):  # NaN fails too
        raise SystemExit(f"--duties: each share must be in (0, 1], got {args.duties}")
    plan = replace(
        plan,
        cover=args.cover,
        scenarios=scenarios(args.scenarios, args.ungoverned) | ({"duty"} if duties else set()),
        paced_micro_batch=args.paced_micro_batch,
        duties=duties,
    )
    if args.reuse:  # "" (an unset GOV_REUSE in gpu_suite) reuses nothing
        plan = replace(plan, reuse=reused(Path(args.reuse)))
    results = [run_model(spec, home, plan, args.cpu, args.out.with_suffix(".json")) for spec in models]
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    if not all(complete(r) for r in results):  # a part of a split run: the next call --reuse-s this JSON
        print(f"partial results written to {args.out.with_suffix('.json')} (not judged)")
        print("\n".join(tradeoff(results)))
        return 0
    print(table(results))
    plot(results, args.out.with_suffix(".png"))
    return 0 if all(v["pass"] for r in results for v in judge(r)) or args.cpu else 1


def complete(result: dict[str, Any]) -> bool:
    """Whether a model's results hold everything the table and the verdicts read."""
    loads = result.get("loads") or []
    return "idle_governed" in result and bool(loads) and all("alone" in e and "governed" in e for e in loads)


if __name__ == "__main__":
    sys.exit(main())
