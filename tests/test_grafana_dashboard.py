"""docs/grafana-kiln.json only queries metrics that kiln-infer and kiln-train export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiln_infer.metrics import InferMetrics
from kiln_train.daemon import BufferStatus, DaemonState, DaemonStatus
from kiln_train.metrics import TrainMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-kiln.json"


def test_dashboard_queries_exported_metrics() -> None:
    infer = InferMetrics()
    infer.requests.finished("a@v1", 1, 1, 0.1, 0.2, 0.01, [0.1], "stop")
    train = TrainMetrics()
    train.watch(lambda: DaemonStatus(DaemonState.IDLE, [BufferStatus("t", "a", 1, 0)], {"x": 1}, [], 0, 0))
    train.round_finished("published", 1.0)
    exported = {
        s.name
        for registry in (infer.registry, train.registry)
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"kiln:[a-z0-9_]+", e)}
    assert used and used <= exported, used - exported
