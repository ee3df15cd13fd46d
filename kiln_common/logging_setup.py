"""One logging format for every Kiln process (called by entry points only): dated text lines or JSON lines."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
_TEXT_DATE = "%Y-%m-%d %H:%M:%S"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601 UTC), level, process, logger, message, `request` fields."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def make_formatter(process: str, fmt: str = "text") -> logging.Formatter:
    """The formatter of one log format ("text" or "json")."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format: must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    if fmt == "json":
        return JsonFormatter(process)
    return logging.Formatter(
        f"%(asctime)s.%(msecs)03d {process} %(levelname)s %(name)s: %(message)s", datefmt=_TEXT_DATE
    )


def setup_logging(level: str = "INFO", process: str = "kiln", fmt: str = "text") -> None:
    """Dated log lines (text) or JSON lines tagged with the process name on stderr; quiet noisy libraries."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(process, fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for noisy in ("urllib3", "filelock", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
