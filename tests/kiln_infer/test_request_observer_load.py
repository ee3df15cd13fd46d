"""The request observer feeds the load window the governor reads: a TTFT per request, every token gap."""

from __future__ import annotations

import time

from kiln_common.load_report import LoadWindow
from kiln_infer.engine.types import FinishReason, RequestOutput
from kiln_infer.request_observer import RequestObserver


def test_observer_feeds_ttft_and_token_gaps_as_they_arrive() -> None:
    window = LoadWindow()
    now = time.monotonic()
    observer = RequestObserver(None, "r1", "t", "", arrived=now - 0.3, load_window=window)
    observer.output(RequestOutput("r1", [1], "a", emitted_at=now - 0.1))  # first token 200 ms after arrival
    assert window.percentiles()["ttft_p99_ms"] > 199.0
    observer.output(RequestOutput("r1", [2, 3], "bc", emitted_at=now - 0.06))  # two tokens, 20 ms each
    observer.output(
        RequestOutput("r1", [4], "d", True, FinishReason.LENGTH, 4, 4, emitted_at=now - 0.02)
    )  # 40 ms
    p = window.percentiles()
    assert p["tpot_samples"] == 3
    assert abs(p["tpot_p50_ms"] - 20.0) < 1e-6 and abs(p["tpot_p99_ms"] - 40.0) < 1e-6
    observer.done()


def test_observer_without_a_window_still_times_the_request() -> None:
    observer = RequestObserver(None, "r2", "t", "")
    observer.output(RequestOutput("r2", [1, 2], "ab", True, FinishReason.STOP, 3, 2))
    assert observer.first is not None and len(observer.gaps) == 1
