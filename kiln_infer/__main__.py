"""`kiln-infer` entry point: flags + environment → InferConfig → InferServer; SIGTERM/SIGINT drain."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from kiln_common.config import add_infer_flags, environ_snapshot, infer_config_from
from kiln_common.logging_setup import setup_logging
from kiln_infer.server import InferServer

log = logging.getLogger("kiln_infer")


def main(argv: list[str] | None = None) -> int:
    """Run kiln-infer until SIGTERM or Ctrl-C, then drain and exit 0."""
    parser = argparse.ArgumentParser(prog="kiln-infer", description="Kiln inference server (gRPC)")
    add_infer_flags(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "kiln-infer")
    try:
        config = infer_config_from(args, environ_snapshot())
    except ValueError as exc:
        parser.error(str(exc))
    server = InferServer(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        server.start_warm_up()
    except Exception as exc:  # noqa: BLE001 - a start-up failure is reported, not dumped
        log.exception("kiln-infer failed to start: %s", exc)
        server.drain()
        return 1
    while not stop.wait(0.5):
        pass
    server.drain()
    return 0


if __name__ == "__main__":
    sys.exit(main())
