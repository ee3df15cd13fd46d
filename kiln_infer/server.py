"""kiln-infer assembled: Redis, model, shared weights, engine, registry view, gRPC services, health, drain."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import PreTrainedTokenizerBase

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2, inference_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.auth import Authenticator
from kiln_common.base_beacon import BaseBeacon, share_base_weights
from kiln_common.config import InferConfig, resolve_device, resolve_dtype
from kiln_common.model_loader import ModelSource, load_state_dict, load_tokenizer, resolve_model
from kiln_common.redis_server import RedisServer, connect
from kiln_common.registry import Registry
from kiln_common.sample_recorder import SampleRecorder
from kiln_common.weight_share import remove_stale_shm
from kiln_infer.adapter_servicer import AdapterServicer
from kiln_infer.convert import Limits
from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.types import EngineRequest, SamplingParams
from kiln_infer.inference_servicer import InferenceServicer, ModelInfo
from kiln_infer.prompt_renderer import PromptRenderer
from kiln_infer.request_log import RequestLog
from kiln_infer.swapper import AdapterView, HotSwapper

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
)
MAX_CONTEXT = 2048  # CPU-friendly cap on prompt + generated tokens per sequence


def kiln_version() -> str:
    """Installed package version."""
    try:
        return version("kiln")
    except PackageNotFoundError:
        return "0.0.0+local"


def shm_dir_for(home: Path) -> Path:
    """Where CPU shared-memory weight buckets live: /dev/shm when usable, else under $KILN_HOME."""
    dev_shm = Path("/dev/shm")
    if dev_shm.is_dir() and os.access(dev_shm, os.W_OK):
        return dev_shm
    path = home / "shm"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class _Parts:
    """Everything start() builds that stop() tears down."""

    redis_server: RedisServer
    engine: AsyncEngine
    beacon: BaseBeacon | None
    swapper: HotSwapper
    recorder: SampleRecorder
    grpc_server: grpc.Server
    health: health.HealthServicer


class InferServer:
    """The kiln-infer process: start(), then drain() on SIGTERM."""

    def __init__(self, config: InferConfig) -> None:
        self.config = config
        self.stopping = threading.Event()
        self.serving = threading.Event()
        self.port = 0
        self._parts: _Parts | None = None

    def _engine(
        self,
        source: ModelSource,
        tokenizer: PreTrainedTokenizerBase,
        client: object,
        device: str,
        dtype: torch.dtype,
    ) -> tuple[AsyncEngine, BaseBeacon | None]:
        """Load the base weights once, share them with kiln-train, and build the engine over them."""
        max_len = min(MAX_CONTEXT, int(getattr(source.config, "max_position_embeddings", MAX_CONTEXT)))
        engine_config = EngineConfig(
            max_model_len=max_len,
            max_lora_slots=self.config.max_lora_slots,
            max_lora_rank=self.config.max_lora_rank,
            max_waiting=self.config.max_waiting,
            max_cpu_loras=max(32, self.config.max_lora_slots),
            use_cuda_graphs=device.startswith("cuda"),
        )
        state = load_state_dict(source, dtype, device)
        beacon = None
        try:
            shm_dir = shm_dir_for(self.config.home)
            remove_stale_shm(shm_dir)
            shared, beacon = share_base_weights(state, device, client, shm_dir)
            state = shared.views
        except Exception as exc:  # noqa: BLE001 - serving without sharing beats not serving
            log.warning("could not share base weights with kiln-train (%s); serving unshared", exc)
        engine = AsyncEngine.from_weights(
            source.config,
            state,
            tokenizer,
            config=engine_config,  # type: ignore[arg-type]
            source_path=source.path,
        )
        return engine, beacon

    def start(self) -> int:
        """Bring everything up and listen (NOT_SERVING until start_warm_up is done); returns the port."""
        cfg = self.config
        cfg.home.mkdir(parents=True, exist_ok=True)
        redis_server = RedisServer(cfg.redis)
        url = redis_server.start()
        client = connect(url)
        source = resolve_model(cfg.model, cfg.home)
        tokenizer = load_tokenizer(source)
        device = resolve_device(cfg.device)
        dtype_name = resolve_dtype(cfg.dtype, device)
        engine, beacon = self._engine(source, tokenizer, client, device, getattr(torch, dtype_name))
        registry = Registry(client, AdapterStore(cfg.home, cfg.max_lora_rank), cfg.events_maxlen)
        view = AdapterView(registry)
        swapper = HotSwapper(view, engine, max_preload=cfg.max_lora_slots)
        swapper.start()
        recorder = SampleRecorder(client, maxlen=cfg.samples_maxlen, buffer_size=cfg.sample_queue_size)
        auth = Authenticator.from_file(cfg.api_keys_file)
        info = ModelInfo(
            model=source.spec,
            architecture=str(getattr(source.config, "model_type", "llama")),
            max_context_tokens=engine.config.max_model_len,
            vocab_size=int(source.config.vocab_size),
            dtype=dtype_name,
            device=device,
            max_lora_rank=cfg.max_lora_rank,
            max_lora_slots=cfg.max_lora_slots,
            version=kiln_version(),
        )
        limits = Limits(
            max_request_bytes=cfg.max_request_bytes,
            max_stop_strings=cfg.max_stop_strings,
            max_stop_chars=cfg.max_stop_chars,
            max_messages=cfg.max_messages,
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="kiln-grpc"),
            options=[
                ("grpc.max_receive_message_length", 4 * cfg.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.max_workers,
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(
                engine=engine,
                renderer=PromptRenderer(tokenizer),
                info=info,
                limits=limits,
                auth=auth,
                view=view,
                registry=registry,
                recorder=recorder,
                requests=RequestLog(client, cfg.request_record_ttl_s),
                stopping=self.stopping,
            ),
            server,
        )
        adapter_pb2_grpc.add_AdapterServiceServicer_to_server(
            AdapterServicer(registry=registry, swapper=swapper, auth=auth, stopping=self.stopping), server
        )
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", *SERVICE_NAMES):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(cfg.address)
        if self.port == 0:
            raise OSError(f"could not bind {cfg.address}")
        server.start()
        self._parts = _Parts(redis_server, engine, beacon, swapper, recorder, server, health_servicer)
        log.info(
            "kiln-infer listening on %s:%d (model %s, %s, %s; Redis %s)",
            cfg.host,
            self.port,
            source.spec,
            device,
            dtype_name,
            url,
        )
        return self.port

    def start_warm_up(self) -> None:
        """Warm up in the background; health turns SERVING when done (see `serving`)."""
        threading.Thread(target=self._warm_up, name="kiln-warmup", daemon=True).start()

    def _warm_up(self) -> None:
        """Run one real generation, then report SERVING."""
        assert self._parts is not None
        started = time.monotonic()
        if self.config.warmup:
            try:
                request = EngineRequest(
                    request_id=f"warmup-{uuid.uuid4().hex}",
                    prompt_token_ids=[1, 2, 3, 4],
                    sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                )
                for _ in self._parts.engine.submit(request):
                    pass
            except Exception:  # noqa: BLE001 - a failed warm-up leaves the server NOT_SERVING
                log.exception("warm-up generation failed; health stays NOT_SERVING")
                return
        if self.stopping.is_set():
            return
        for name in ("", *SERVICE_NAMES):
            self._parts.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.serving.set()
        log.info("warm-up done in %.1fs: SERVING", time.monotonic() - started)

    def drain(self) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, let in-flight streams finish, then stop everything."""
        if self._parts is None or self.stopping.is_set():
            return
        parts = self._parts
        self.stopping.set()
        parts.health.enter_graceful_shutdown()
        # Keep answering health (NOT_SERVING) a moment so load balancers see it before the port closes.
        time.sleep(self.config.drain_notice_s)
        in_flight = parts.engine.num_unfinished()
        log.info("draining: %d requests in flight (grace %.0fs)", in_flight, self.config.drain_timeout_s)
        parts.grpc_server.stop(grace=self.config.drain_timeout_s).wait()
        parts.swapper.stop()
        parts.recorder.close()
        parts.engine.shutdown()
        if parts.beacon is not None:
            parts.beacon.stop()
        parts.redis_server.stop()
        log.info("kiln-infer stopped")

    def wait(self) -> None:
        """Block until the gRPC server has stopped."""
        if self._parts is not None:
            self._parts.grpc_server.wait_for_termination()
