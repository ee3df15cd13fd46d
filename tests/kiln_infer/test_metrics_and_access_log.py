"""kiln-infer's metrics helpers (what the servicer calls) and the one-line-per-request access log."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiln_common.logging_setup import make_formatter
from kiln_infer.access_log import RequestRecord, log_request
from kiln_infer.engine.types import FinishReason, RequestOutput
from kiln_infer.metrics import InferMetrics
from kiln_infer.request_observer import RequestObserver


def _samples(metrics: InferMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_request_and_engine_metrics_use_vllm_names_under_kiln() -> None:
    metrics = InferMetrics()
    metrics.requests.finished("support@v3", 10, 5, 0.02, 0.3, 0.001, [0.05] * 4, "length")
    metrics.requests.finished("", 7, 2, None, 0.1, None, [], "stop")
    metrics.engine.set_stats({"running": 3, "waiting": 1, "kv_usage": 0.25})
    s = _samples(metrics)
    v3 = (("adapter", "support"), ("version", "v3"))
    assert s[("kiln:prompt_tokens_total", v3)] == 10
    assert s[("kiln:generation_tokens_total", v3)] == 5
    assert s[("kiln:generation_tokens_total", (("adapter", "base"), ("version", "")))] == 2
    assert (
        s[("kiln:request_success_total", (("adapter", "support"), ("finished_reason", "length"), *v3[1:]))]
        == 1
    )
    assert s[("kiln:inter_token_latency_seconds_count", v3)] == 4
    assert s[("kiln:time_to_first_token_seconds_count", v3)] == 1
    assert s[("kiln:request_queue_time_seconds_count", v3)] == 1
    assert s[("kiln:e2e_request_latency_seconds_count", v3)] == 1
    assert (s[("kiln:num_requests_running", ())], s[("kiln:kv_cache_usage_perc", ())]) == (3, 0.25)


def _record() -> RequestRecord:
    return RequestRecord("req-1", "alice", "support@v3", 10, 5, 0.0123, 0.456, "length", "OK")


def test_access_log_line_text_and_json() -> None:
    logger = logging.getLogger("test.access")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_request(_record(), logger)
    finally:
        logger.removeHandler(handler)
    text = make_formatter("kiln-infer", "text").format(records[0])
    assert text[:4].isdigit() and text[4] == "-"  # a date leads every line
    assert "id=req-1 tenant=alice adapter=support@v3 tokens=10+5 ttft_ms=12.3 total_ms=456.0" in text
    assert "finish=length status=OK" in text
    entry = json.loads(make_formatter("kiln-infer", "json").format(records[0]))
    assert entry["request_id"] == "req-1" and entry["tenant"] == "alice" and entry["completion_tokens"] == 5
    assert entry["time"][:4].isdigit() and entry["process"] == "kiln-infer"


def test_request_observer_feeds_metrics_and_writes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    metrics = InferMetrics()
    observer = RequestObserver(metrics.requests, "req-9", "bob", "tips@v2", arrived=100.0)
    observer.output(RequestOutput("e", [5], "a", emitted_at=100.5))
    observer.output(RequestOutput("e", [6, 7], "bc", emitted_at=100.9))
    observer.output(
        RequestOutput(
            "e", [], "", True, FinishReason.LENGTH, prompt_tokens=4, completion_tokens=3, emitted_at=101
        )
    )
    with caplog.at_level(logging.INFO, logger="kiln.access"):
        observer.done("OK")
    s = _samples(metrics)
    v2 = (("adapter", "tips"), ("version", "v2"))
    assert s[("kiln:generation_tokens_total", v2)] == 3 and s[("kiln:prompt_tokens_total", v2)] == 4
    assert s[("kiln:time_to_first_token_seconds_sum", v2)] == pytest.approx(0.5)
    assert s[("kiln:inter_token_latency_seconds_count", v2)] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "kiln.access"]
    assert len(lines) == 1 and "id=req-9 tenant=bob adapter=tips@v2 tokens=4+3" in lines[0]
    assert "finish=length status=OK" in lines[0]
