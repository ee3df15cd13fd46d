"""`kiln-train` entry point: flags + environment → daemon + gRPC TrainingService (health, reflection)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from transformers import PreTrainedTokenizerBase

from kiln.v1 import training_pb2, training_pb2_grpc
from kiln_common.adapter_store import AdapterStore
from kiln_common.auth import Authenticator
from kiln_common.config import (
    DEFAULT_TRAIN_PORT,
    TrainConfig,
    environ_snapshot,
    train_config_from,
)
from kiln_common.flags import add_common_flags
from kiln_common.grpc_decode import DecodeErrorInterceptor
from kiln_common.logging_setup import LOG_FORMATS, setup_logging
from kiln_common.metrics_server import start_metrics_server
from kiln_common.model_loader import load_tokenizer, resolve_model
from kiln_common.peft_format import BaseShapes
from kiln_common.redis_server import RedisServer, connect
from kiln_common.reflection import enable_reflection
from kiln_common.registry import Registry
from kiln_train.base_model import SharedBase
from kiln_train.buffer import TrainingBuffer
from kiln_train.consumer import SampleConsumer
from kiln_train.daemon import TrainingDaemon
from kiln_train.evaluator import PromptSets, ReferenceCache
from kiln_train.governor import GovernorSettings, start_governor
from kiln_train.governor_metrics import GovernorCollector
from kiln_train.metrics import TrainMetrics
from kiln_train.parent_client import ParentClient, ParentUnavailableError, infer_key
from kiln_train.pipeline import Pipeline
from kiln_train.servicer import TrainingServicer
from kiln_train.settings import TrainSettings
from kiln_train.training_round import RoundRunner

WARM_TENANT = "kiln-train"  # who asks kiln-infer for the base model's reference answers at start
log = logging.getLogger("kiln_train")
SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


class TrainServer:
    """kiln-train assembled: Redis, tokenizer, shared base, daemon, gRPC."""

    def __init__(
        self,
        config: TrainConfig,
        settings: TrainSettings,
        metrics_port: int | None = None,
        governor: GovernorSettings | None = None,
    ) -> None:
        self.config = config
        self.governor_settings = governor or GovernorSettings()
        self.metrics = TrainMetrics()
        self._metrics_port = metrics_port
        self.settings = settings
        self.port = 0
        self._redis_server = RedisServer(config.redis)
        self._daemon: TrainingDaemon | None = None
        self._grpc: grpc.Server | None = None
        self._stopping = threading.Event()

    def start(self) -> int:
        """Bring everything up; returns the bound port."""
        cfg, s = self.config, self.settings
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        cfg.home.mkdir(parents=True, exist_ok=True)
        client = connect(self._redis_server.start())
        source = resolve_model(cfg.model, cfg.home)
        tok = load_tokenizer(source)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        buffer = TrainingBuffer(client)
        pipeline = Pipeline(s, lambda text: len(tok.encode(text, add_special_tokens=False)), buffer)
        consumer = SampleConsumer(client, buffer, pipeline, s)
        registry = Registry(client, AdapterStore(cfg.home, base=BaseShapes.from_config(source.config)))
        runner = self._runner(registry, tok, source.spec)
        governor = start_governor(client, self.governor_settings, s.trainer.batch_size)
        self.metrics.registry.register(GovernorCollector(governor.state))
        base = SharedBase(client, source.config)
        self._daemon = TrainingDaemon(
            consumer, buffer, base, runner, s, metrics=self.metrics, governor=governor
        )
        self.metrics.watch(self._daemon.status)
        self._daemon.start()
        if s.warm_reference and torch.cuda.is_available():
            runner.warm_published = runner.prepare_ahead = True
            threading.Thread(target=self._warm, args=(runner,), name="kiln-train-warm", daemon=True).start()
        if self._metrics_port is not None:
            start_metrics_server(self._metrics_port, self.metrics.registry, cfg.host)

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="kiln-train-grpc"),
            options=[("grpc.so_reuseport", 0)],
            interceptors=[DecodeErrorInterceptor()],  # malformed request bytes: INVALID_ARGUMENT
        )
        training_pb2_grpc.add_TrainingServiceServicer_to_server(
            TrainingServicer(self._daemon, Authenticator.from_file(cfg.api_keys_file)), server
        )
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
        self.port = server.add_insecure_port(cfg.address)
        if self.port == 0:
            raise OSError(f"could not bind {cfg.address}")
        server.start()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._grpc = server
        log.info(
            "kiln-train listening on %s:%d (model %s, consumer %s/%s)",
            cfg.host,
            self.port,
            source.spec,
            s.group,
            s.consumer,
        )
        return self.port

    def _runner(self, registry: Registry, tok: PreTrainedTokenizerBase, spec: str) -> RoundRunner:
        """The round runner: the parent's reference answers (cached per model) and kiln-infer's client."""
        cfg, s = self.config, self.settings
        model_key = hashlib.sha256(spec.encode()).hexdigest()[:12]
        ref_dir = Path(s.reference_dir).expanduser() if s.reference_dir else cfg.home / "train" / "reference"
        references = ReferenceCache(
            ref_dir, model_key, PromptSets.builtin(s.gate_questions_limit, s.replay_general)
        )
        parent = ParentClient(
            cfg.infer_address, infer_key(cfg.extra.get("KILN_TRAIN_INFER_KEY", "")), s.parent_concurrency
        )
        return RoundRunner(registry, tok, s, references, parent)

    def _warm(self, runner: RoundRunner, attempts: int = 150, wait_s: float = 2.0) -> None:
        """The base model's reference answers, asked of kiln-infer once it answers (a first round then only
        asks its own near neighbours). Best effort: a round asks for them itself if this has not finished."""
        for _ in range(attempts):
            try:
                runner.warm_base(WARM_TENANT)
                return
            except ParentUnavailableError as exc:
                log.debug("base reference not warmed yet: %s", exc)
            except Exception as exc:  # noqa: BLE001 - best effort: the first round asks again and reports
                log.warning("warming the base reference failed: %s", exc)
                return
            if self._stopping.wait(wait_s):
                return
        log.warning("kiln-infer did not answer for the base reference; the first round will ask")

    def stop(self) -> None:
        """Stop serving, stop the daemon (a running round's samples stay buffered), stop owned Redis."""
        self._stopping.set()
        if self._grpc is not None:
            self._grpc.stop(grace=5.0).wait()
        if self._daemon is not None:
            self._daemon.stop()
        self._redis_server.stop()
        log.info("kiln-train stopped")


def main(argv: list[str] | None = None) -> int:
    """Run kiln-train until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="kiln-train", description="Kiln training daemon (gRPC)")
    add_common_flags(parser, DEFAULT_TRAIN_PORT)
    parser.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="log line format [text]")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "kiln-train", args.log_format)
    environ = environ_snapshot()
    try:
        config = train_config_from(args, environ)
        governor, rest = GovernorSettings.from_environ(config.extra)
        settings = TrainSettings.from_environ(rest)
    except ValueError as exc:
        parser.error(str(exc))
    server = TrainServer(config, settings, args.metrics_port, governor)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported, not dumped
        log.exception("kiln-train failed to start: %s", exc)
        server.stop()
        return 1
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
