"""Runs the HTTP app on uvicorn: inside a running event loop (kiln-infer), a thread, or `kiln http`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence

import uvicorn
from prometheus_client import CollectorRegistry

from kiln_common.logging_setup import LOG_FORMATS, setup_logging
from kiln_infer.http.app import create_app
from kiln_infer.metrics import RequestMetrics

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8000
BACKLOG = 4096  # many clients connecting at once must queue, never be refused


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the host process (kiln-infer) owns SIGTERM / SIGINT."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        """Leave the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        """Leave the process's signal handlers alone."""
        yield


class HttpServer:
    """The OpenAI-compatible app on one port, started and stopped inside the caller's event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        grpc_target: str,
        registry: CollectorRegistry | None = None,
        metrics: RequestMetrics | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        app = create_app(grpc_target, registry, metrics)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            backlog=BACKLOG,
            log_level="warning",
            access_log=False,  # kiln-infer writes its own line per request
            lifespan="on",
            timeout_graceful_shutdown=int(drain_timeout_s),  # open streams get this long after stop()
        )
        self._server = _Uvicorn(config)
        self._task: asyncio.Task[None] | None = None
        self.host, self.grpc_target = host, grpc_target

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start serving; returns once the port accepts connections."""
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise RuntimeError(f"HTTP server on {self.host} did not start")
            await asyncio.sleep(0.01)
        log.info(
            "OpenAI-compatible HTTP on http://%s:%d/v1 -> kiln-infer %s",
            self.host,
            self.port,
            self.grpc_target,
        )

    async def stop(self) -> None:
        """Stop accepting, let open responses finish, close the gRPC channel."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task


async def serve_http(
    host: str,
    port: int,
    grpc_target: str,
    registry: CollectorRegistry | None = None,
    metrics: RequestMetrics | None = None,
    drain_timeout_s: float = 30.0,
) -> None:
    """Serve the HTTP front until cancelled (kiln-infer runs this as a task in its asyncio API process)."""
    server = HttpServer(host, port, grpc_target, registry, metrics, drain_timeout_s)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


class HttpThread:
    """The HTTP front on its own event loop in a daemon thread (for synchronous hosts and tests)."""

    def __init__(self, host: str, port: int, grpc_target: str, registry: CollectorRegistry | None = None,
                 metrics: RequestMetrics | None = None) -> None:  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._server = HttpServer(host, port, grpc_target, registry, metrics)
        self._thread = threading.Thread(target=self._loop.run_forever, name="kiln-http", daemon=True)

    def start(self) -> int:
        """Start serving; returns the bound port."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(timeout=30)
        return self._server.port

    def stop(self) -> None:
        """Stop serving and end the thread."""
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    """`kiln http`: the OpenAI-compatible front in front of a (remote) kiln-infer, until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="kiln http", description="OpenAI-compatible HTTP front for kiln-infer"
    )
    parser.add_argument("--target", "--address", dest="target", default="127.0.0.1:50051",
                        help="kiln-infer gRPC host:port [127.0.0.1:50051]")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen host [127.0.0.1]")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_HTTP_PORT, help=f"HTTP port [{DEFAULT_HTTP_PORT}]"
    )
    parser.add_argument("--api-key", default="", help="unused: clients send their own Authorization header")
    parser.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="log line format [text]")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "kiln-http", args.log_format)
    registry = CollectorRegistry()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_http(args.host, args.port, args.target, registry, RequestMetrics(registry)))
    return 0
