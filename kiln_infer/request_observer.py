"""Watches one Generate as its outputs stream: feeds the metrics and writes the access-log line at the end."""

from __future__ import annotations

import time

from kiln_common.load_report import LoadWindow
from kiln_infer.access_log import RequestRecord, log_request
from kiln_infer.engine.types import FinishReason, RequestOutput
from kiln_infer.metrics import RequestMetrics

# engine finish reasons -> the `finished_reason` label (vLLM's words)
_REASON = {
    FinishReason.STOP: "stop",
    FinishReason.STOP_STRING: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORTED: "abort",
}


class RequestObserver:
    """Times one request from its arrival; `output` per engine output, then `done` exactly once."""

    def __init__(
        self,
        metrics: RequestMetrics | None,
        request_id: str,
        tenant: str,
        adapter_version: str,
        arrived: float | None = None,  # time.monotonic() at arrival
        load_window: LoadWindow | None = None,  # recent TTFT / TPOT for the load report kiln-train reads
    ) -> None:
        self.metrics = metrics
        self.load_window = load_window
        self.request_id, self.tenant, self.adapter_version = request_id, tenant, adapter_version
        self.arrived = time.monotonic() if arrived is None else arrived
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.final: RequestOutput | None = None

    def output(self, out: RequestOutput) -> None:
        """Note one engine output (its emitted_at, else now): first-token time and the gaps between tokens."""
        at = out.emitted_at or time.monotonic()
        n = len(out.token_ids)
        if n and self.first is None:
            self.first = at
            self.gaps.extend([0.0] * (n - 1))
            if self.load_window is not None:
                self.load_window.add_ttft(at - self.arrived)
        elif n:
            self.gaps.extend([(at - self.last) / n] * n)
        if n:
            self.last = at
        if out.finished:
            self.final = out
            if self.load_window is not None and self.first is not None and self.gaps:
                self.load_window.add_tpots([(self.last - self.first) / len(self.gaps)])

    def done(self, status: str = "OK", queue_s: float | None = None) -> None:
        """Record the finished request: metrics when it finished (status OK), the access-log line always."""
        total = time.monotonic() - self.arrived
        ttft = None if self.first is None else self.first - self.arrived
        final = self.final
        reason = _REASON.get(final.finish_reason, "stop") if final and final.finish_reason else ""
        prompt = final.prompt_tokens if final else 0
        completion = final.completion_tokens if final else 0
        if self.metrics is not None and final is not None and status == "OK":
            self.metrics.finished(
                self.adapter_version, prompt, completion, ttft, total, queue_s, self.gaps, reason
            )
        log_request(
            RequestRecord(
                self.request_id,
                self.tenant,
                self.adapter_version,
                prompt,
                completion,
                ttft,
                total,
                reason,
                status,
            )
        )
