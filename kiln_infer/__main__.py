"""`kiln-infer` entry point: flags + environment → InferConfig → the supervisor; SIGTERM/SIGINT drain."""

from __future__ import annotations

import argparse
import signal
import sys

from kiln_common.config import environ_snapshot, infer_config_from
from kiln_common.flags import add_infer_flags
from kiln_common.logging_setup import setup_logging
from kiln_infer.supervisor import Supervisor


def main(argv: list[str] | None = None) -> int:
    """Run kiln-infer (engine core + API process) until SIGTERM or Ctrl-C, then drain and exit 0."""
    parser = argparse.ArgumentParser(prog="kiln-infer", description="Kiln inference server (gRPC)")
    add_infer_flags(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    args = parser.parse_args(argv)
    try:
        config = infer_config_from(args, environ_snapshot())
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level, "kiln-infer", config.log_format)
    supervisor = Supervisor(config, args.log_level)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
