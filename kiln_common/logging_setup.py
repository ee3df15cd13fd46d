"""One logging format for every Kiln process (called by entry points only)."""

from __future__ import annotations

import logging


def setup_logging(level: str = "INFO", process: str = "kiln") -> None:
    """Timestamped log lines tagged with the process name on stderr; quiet noisy libraries."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
