"""A standalone Prometheus /metrics endpoint (`--metrics-port`), for a process without the HTTP front."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def start_metrics_server(
    port: int, registry: CollectorRegistry, host: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` on http://host:port/metrics from a daemon thread; `.shutdown()` the server to stop."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
