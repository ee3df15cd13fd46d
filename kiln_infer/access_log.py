"""One log line per finished request (the access log), as text or as JSON fields with --log-format json."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger("kiln.access")


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request was, for its access-log line."""

    request_id: str
    tenant: str
    adapter_version: str  # "name@vN", "" for the base model
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # None when no token was produced
    total_s: float
    finish_reason: str  # stop, length, stop_string, aborted, or "" when it failed
    status: str  # gRPC status name: OK, INVALID_ARGUMENT, CANCELLED, ...


def format_record(record: RequestRecord) -> str:
    """Text form: `request id=… tenant=… adapter=name@vN tokens=12+34 ttft_ms=… total_ms=… finish=… …`."""
    ttft = "-" if record.ttft_s is None else f"{record.ttft_s * 1000:.1f}"
    return (
        f"request id={record.request_id} tenant={record.tenant} adapter={record.adapter_version or 'base'} "
        f"tokens={record.prompt_tokens}+{record.completion_tokens} ttft_ms={ttft} "
        f"total_ms={record.total_s * 1000:.1f} finish={record.finish_reason or '-'} status={record.status}"
    )


def log_request(record: RequestRecord, logger: logging.Logger = log) -> None:
    """Write the record's line; its fields also travel as `extra` so the JSON formatter emits them as keys."""
    logger.info(format_record(record), extra={"request": asdict(record)})
