"""kiln-infer's API process: an asyncio gRPC server in front of the engine-core process.

The engine core (kiln_infer.engine_process) owns the weights and runs the step loop in a process of its own.
This side tokenizes, resolves adapters, streams outputs and answers every other RPC. Generate and WatchEvents
are coroutines, so an open stream costs no thread; the short admin RPCs run in a small thread pool. If the
engine core dies, health turns NOT_SERVING, open streams end UNAVAILABLE and `engine_lost` is set.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.auth import Authenticator
from kiln_common.canary import Canaries
from kiln_common.config import InferConfig
from kiln_common.grpc_decode import AsyncDecodeErrorInterceptor
from kiln_common.load_report import LoadPublisher, LoadWindow
from kiln_common.metrics_server import start_metrics_server
from kiln_common.model_loader import ModelSource, load_tokenizer, resolve_model
from kiln_common.peft_format import BaseShapes
from kiln_common.redis_server import RedisServer, connect
from kiln_common.reflection import enable_reflection
from kiln_common.registry import Registry
from kiln_common.sample_recorder import SampleRecorder
from kiln_common.tenant_limits import LimitSettings, TenantLimits
from kiln_infer.adapter_servicer import AdapterServicer
from kiln_infer.convert import Limits
from kiln_infer.engine.types import EngineRequest, SamplingParams
from kiln_infer.engine_link import EngineClient, EngineInfo
from kiln_infer.engine_process import EngineProcess
from kiln_infer.event_hub import EventHub
from kiln_infer.inference_servicer import InferenceServicer, ModelInfo
from kiln_infer.metrics import InferMetrics
from kiln_infer.prompt_renderer import PromptRenderer
from kiln_infer.request_log import RequestLog
from kiln_infer.swapper import AdapterView, HotSwapper

if TYPE_CHECKING:
    from kiln_infer.http.server import HttpServer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
)
STATS_PERIOD_S = 0.5  # how often the engine core's load is read into the metrics


def kiln_version() -> str:
    """Installed package version."""
    try:
        return version("kiln")
    except PackageNotFoundError:
        return "0.0.0+local"


@dataclass(frozen=True)
class EngineAddress:
    """Where a running engine-core process listens, and the secret it asks for."""

    address: str
    authkey: bytes


@dataclass
class _Parts:
    """Everything start() builds that drain() tears down (touched on the loop)."""

    engine: EngineClient
    swapper: HotSwapper
    recorder: SampleRecorder
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    events: EventHub
    http: HttpServer | None
    tasks: list[asyncio.Task[None]]


class InferServer:
    """The kiln-infer API process: start(), then drain() on SIGTERM.

    With no `engine` address it starts an engine-core process of its own (and stops it in drain()); under the
    kiln-infer supervisor the engine core outlives this process, so a restart here does not reload weights.
    """

    def __init__(
        self, config: InferConfig, engine: EngineAddress | None = None, index: int = 0, count: int = 1
    ) -> None:
        self.config = config
        self.index, self.count = index, count  # which of `count` API processes sharing the port this is
        self.stopping = threading.Event()
        self.serving = threading.Event()
        self.engine_lost = threading.Event()
        self.port = 0
        self._engine_address = engine
        self._engine_process: EngineProcess | None = None
        self._redis_server: RedisServer | None = None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="kiln-aio", daemon=True)
        self._parts: _Parts | None = None
        self.metrics = InferMetrics()
        self.load_window = LoadWindow()  # recent TTFT / TPOT, published for kiln-train's governor
        self.http_port = 0

    def start(self) -> int:
        """Bring everything up and listen (NOT_SERVING until start_warm_up is done); returns the port."""
        cfg = self.config
        cfg.home.mkdir(parents=True, exist_ok=True)
        self._redis_server = RedisServer(cfg.redis)
        url = self._redis_server.start()
        if self._engine_address is None:
            self._engine_process = EngineProcess(cfg, url)
            self._engine_process.start()
            self._engine_address = EngineAddress(self._engine_process.address, self._engine_process.authkey)
        self._loop_thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(url), self._loop).result()

    async def _start(self, redis_url: str) -> int:
        cfg = self.config
        assert self._engine_address is not None
        engine = EngineClient(self._engine_address.address, self._engine_address.authkey, self._loop)
        engine.on_lost = self._on_engine_lost
        client = connect(redis_url)
        source = resolve_model(cfg.model, cfg.home)
        store = AdapterStore(
            cfg.home,
            cfg.max_lora_rank,
            base=BaseShapes.from_config(source.config),
            max_bytes=cfg.max_adapter_bytes,
        )
        registry = Registry(client, store, cfg.events_maxlen)
        swapper = HotSwapper(AdapterView(registry), engine, max_preload=engine.info.max_lora_slots)
        events = EventHub(self._loop)
        swapper.listeners.append(events.publish)
        await self._loop.run_in_executor(None, swapper.start)  # preloads adapters: off the loop
        # samples served while Redis is down wait in a spool of this process's own
        spool = cfg.home / "spool" / f"samples-{self.index}"
        recorder = SampleRecorder(
            client, maxlen=cfg.samples_maxlen, buffer_size=cfg.sample_queue_size, spool_dir=spool
        )
        server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(
                cfg.max_workers, thread_name_prefix="kiln-admin"
            ),
            interceptors=[AsyncDecodeErrorInterceptor()],  # malformed request bytes: INVALID_ARGUMENT
            options=[
                ("grpc.max_receive_message_length", 4 * cfg.max_request_bytes),
                ("grpc.so_reuseport", int(self.count > 1)),  # several API processes share one port
            ],
        )
        self._add_servicers(server, source, engine, registry, swapper, events, recorder, client)
        health_servicer = await self._add_health_and_reflection(server)
        self.port = server.add_insecure_port(cfg.address)
        if self.port == 0:
            raise OSError(f"could not bind {cfg.address}")
        await server.start()
        http = await self._start_http()
        publisher = LoadPublisher(client, f"{socket.gethostname()}:{os.getpid()}")
        tasks = [self._loop.create_task(self._watch_load(engine, recorder, publisher))]
        self._parts = _Parts(engine, swapper, recorder, server, health_servicer, events, http, tasks)
        log.info(
            "kiln-infer listening on %s:%d (model %s; %s)", cfg.host, self.port, source.spec, engine.info
        )
        return self.port

    def _add_servicers(
        self,
        server: grpc.aio.Server,
        source: ModelSource,
        engine: EngineClient,
        registry: Registry,
        swapper: HotSwapper,
        events: EventHub,
        recorder: SampleRecorder,
        client: redis.Redis,
    ) -> None:
        """InferenceService and AdapterService over the engine link and the registry."""
        cfg = self.config
        auth = Authenticator.from_file(cfg.api_keys_file)
        canaries = Canaries(registry, cfg.canary_share, cfg.canary_min_requests)
        limits = Limits(
            cfg.max_request_bytes,
            cfg.max_stop_strings,
            cfg.max_stop_chars,
            cfg.max_messages,
            int(source.config.vocab_size),
        )
        tenant_limits = TenantLimits(
            LimitSettings(cfg.tenant_max_streams, cfg.tenant_requests_per_s, cfg.tenant_samples_per_min)
        )
        inference = InferenceServicer(
            engine=engine,
            renderer=PromptRenderer(load_tokenizer(source)),
            info=model_info(source, engine.info, cfg),
            limits=limits,
            auth=auth,
            view=swapper.view,
            registry=registry,
            recorder=recorder,
            requests=RequestLog(client, cfg.request_record_ttl_s),
            stopping=self.stopping,
            metrics=self.metrics.requests,
            canaries=canaries,
            tenant_limits=tenant_limits,
            load_window=self.load_window,
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
        adapters = AdapterServicer(
            registry=registry,
            swapper=swapper,
            auth=auth,
            stopping=self.stopping,
            events=events,
            import_root=cfg.import_root,
            canaries=canaries,
        )
        adapter_pb2_grpc.add_AdapterServiceServicer_to_server(adapters, server)

    async def _start_http(self) -> HttpServer | None:
        """The OpenAI-compatible front (and /metrics) on --http-port, over this server's own gRPC port."""
        cfg = self.config
        if self.index != 0:  # HTTP and metrics ports are not shared: the first API process serves them
            return None
        if cfg.metrics_port is not None:
            start_metrics_server(cfg.metrics_port, self.metrics.registry, cfg.host)
        if cfg.http_port is None:
            return None
        from kiln_infer.http.server import HttpServer  # FastAPI and uvicorn load only when HTTP is on

        # The servicer records the request metrics; the HTTP front only serves them.
        http = HttpServer(
            cfg.host,
            cfg.http_port,
            f"127.0.0.1:{self.port}",
            self.metrics.registry,
            None,
            cfg.drain_timeout_s,
        )
        await http.start()
        self.http_port = http.port
        return http

    async def _watch_load(
        self, engine: EngineClient, recorder: SampleRecorder, publisher: LoadPublisher
    ) -> None:
        """Read the engine core's load and the recorder's counters into the gauges every second."""
        while engine.alive:
            try:
                self.metrics.recorder.set_counters(recorder.counters())
                stats = await self._loop.run_in_executor(None, engine.stats)
                self.metrics.engine.set_stats(stats)
                kv_fraction = self.config.kv_memory_fraction
                await self._loop.run_in_executor(
                    None, publisher.publish, stats, self.load_window, kv_fraction
                )
            except Exception as exc:  # noqa: BLE001 - metrics must never take the server down
                log.debug("engine stats: %s", exc)
            await asyncio.sleep(STATS_PERIOD_S)

    @staticmethod
    async def _add_health_and_reflection(server: grpc.aio.Server) -> health.aio.HealthServicer:
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME))
        return health_servicer

    def _on_engine_lost(self) -> None:
        """On the loop: the engine core is gone; say so to load balancers and to whoever supervises us."""
        log.error("the engine core stopped: health NOT_SERVING; open streams ended UNAVAILABLE")
        self.engine_lost.set()
        self.serving.clear()
        if self._parts is not None:
            for name in ("", *SERVICE_NAMES):
                self._loop.create_task(
                    self._parts.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                )

    def start_warm_up(self) -> None:
        """Warm up in the background; health turns SERVING when done (see `serving`)."""
        asyncio.run_coroutine_threadsafe(self._warm_up(), self._loop)

    async def _warm_up(self) -> None:
        """Run one real generation through the engine core, then report SERVING."""
        assert self._parts is not None
        started = time.monotonic()
        if self.config.warmup:
            try:
                request = EngineRequest(
                    request_id=f"warmup-{uuid.uuid4().hex}",
                    prompt_token_ids=[1, 2, 3, 4],
                    sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                )
                async for _ in self._parts.engine.submit(request).outputs():
                    pass
            except Exception:  # noqa: BLE001 - a failed warm-up leaves the server NOT_SERVING
                log.exception("warm-up generation failed; health stays NOT_SERVING")
                return
        if self.stopping.is_set() or self.engine_lost.is_set():
            return
        for name in ("", *SERVICE_NAMES):
            await self._parts.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving.set()
        log.info("warm-up done in %.1fs: SERVING", time.monotonic() - started)

    def num_in_flight(self) -> int:
        """Generations admitted by this process and not yet finished."""
        return self._parts.engine.num_unfinished() if self._parts is not None else 0

    def drain(self) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, let in-flight streams finish, then stop everything."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self._parts is not None:
            asyncio.run_coroutine_threadsafe(self._drain(), self._loop).result()
        if self._engine_process is not None:
            self._engine_process.stop()
        if self._redis_server is not None:
            self._redis_server.stop()
        if self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5)
        log.info("kiln-infer stopped")

    async def _drain(self) -> None:
        parts = self._parts
        assert parts is not None
        await parts.health.enter_graceful_shutdown()
        parts.events.close()  # watchers end now; generations get the grace period
        for task in parts.tasks:
            task.cancel()
        # Keep answering health (NOT_SERVING) a moment so load balancers see it before the port closes.
        await asyncio.sleep(self.config.drain_notice_s)
        log.info(
            "draining: %d requests in flight (grace %.0fs)", self.num_in_flight(), self.config.drain_timeout_s
        )
        if parts.http is not None:
            await parts.http.stop()  # its open streams finish over gRPC, which is still up
        await parts.grpc_server.stop(grace=self.config.drain_timeout_s)
        await self._loop.run_in_executor(None, parts.swapper.stop)
        await self._loop.run_in_executor(None, parts.recorder.close)
        parts.engine.close()

    def wait(self) -> None:
        """Block until the server has been drained."""
        self._loop_thread.join()


def model_info(source: ModelSource, engine: EngineInfo, cfg: InferConfig) -> ModelInfo:
    """What GetModelInfo reports: the model and the engine's sizes."""
    return ModelInfo(
        model=source.spec,
        architecture=str(getattr(source.config, "model_type", "llama")),
        max_context_tokens=engine.max_model_len,
        vocab_size=int(source.config.vocab_size),
        dtype=engine.dtype,
        device=engine.device,
        max_lora_rank=engine.max_lora_rank,
        max_lora_slots=engine.max_lora_slots,
        version=kiln_version(),
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        kv_cache_tokens=engine.kv_blocks * engine.block_size,
    )
