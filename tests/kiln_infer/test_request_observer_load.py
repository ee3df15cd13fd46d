"""The request observer feeds the load window the governor reads: a TTFT per request, a TPOT per request."""

from __future__ import annotations

import time

from kiln_common.load_report import LoadWindow
from kiln_infer.engine.types import FinishReason, RequestOutput
from kiln_infer.request_observer import RequestObserver


def test_observer_feeds_ttft_at_the_first_token_and_tpot_when_the_request_ends() -> None:
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
    assert p["tpot_samples"] == 1  # one request: its mean time between tokens, 80 ms over 3 gaps
    assert abs(p["tpot_p50_ms"] - 80.0 / 3) < 1e-6 and abs(p["tpot_p99_ms"] - 80.0 / 3) < 1e-6
    observer.done()


def test_observer_without_a_window_still_times_the_request() -> None:
    observer = RequestObserver(None, "r2", "t", "")
    observer.output(RequestOutput("r2", [1, 2], "ab", True, FinishReason.STOP, 3, 2))
    assert observer.first is not None and len(observer.gaps) == 1
