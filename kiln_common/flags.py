"""The command-line flags of kiln-infer and kiln-train (each defaults from its KILN_* variable)."""

from __future__ import annotations

import argparse

from kiln_common.config import DEFAULT_INFER_PORT, DTYPES


def add_common_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Flags shared by kiln-infer and kiln-train (each defaults from its KILN_* variable)."""
    parser.add_argument("--home", help="state directory [KILN_HOME, ./.kiln or ~/.kiln]")
    parser.add_argument(
        "--model", help="'smollm2', a local HF model directory, or 'dummy:<shape>' [KILN_MODEL]"
    )
    parser.add_argument("--host", help="interface to bind [KILN_HOST, 127.0.0.1]")
    parser.add_argument("--port", type=int, help=f"gRPC port [KILN_PORT, {default_port}]")
    parser.add_argument("--dtype", choices=DTYPES, help="compute dtype [KILN_DTYPE, auto]")
    parser.add_argument("--device", help="'auto', 'cpu' or 'cuda[:N]' [KILN_DEVICE, auto]")
    parser.add_argument("--redis-url", help="external Redis; default embedded valkey-server [KILN_REDIS_URL]")
    parser.add_argument("--api-keys", help="API key file, JSON or 'key tenant' lines [KILN_API_KEYS]")


def add_infer_flags(parser: argparse.ArgumentParser) -> None:
    """All kiln-infer flags."""
    add_common_flags(parser, DEFAULT_INFER_PORT)
    parser.add_argument(
        "--max-workers",
        type=int,
        help="threads for short admin RPCs; streams need none [KILN_MAX_WORKERS, 16]",
    )
    parser.add_argument("--drain-timeout", type=float, help="seconds SIGTERM waits for streams [60]")
    parser.add_argument(
        "--no-warmup", action="store_true", help="report SERVING without a warm-up generation"
    )
    _add_size_flags(parser)
    _add_serving_flags(parser)


def _add_size_flags(parser: argparse.ArgumentParser) -> None:
    """Engine sizes and the admission queue."""
    sizes = parser.add_argument_group("engine sizes (0 = chosen for the device)")
    sizes.add_argument(
        "--max-num-seqs", type=int, help="sequences per step [KILN_MAX_NUM_SEQS; GPU 256, CPU 64]"
    )
    sizes.add_argument(
        "--max-background-seqs",
        type=int,
        help="background requests (kiln-train's) running at once [KILN_MAX_BACKGROUND_SEQS; 0 = no cap]",
    )
    sizes.add_argument(
        "--max-model-len", type=int, help="tokens per sequence [KILN_MAX_MODEL_LEN; the model's context]"
    )
    sizes.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens per engine step [KILN_MAX_NUM_BATCHED_TOKENS; GPU 16384, CPU 2048]",
    )
    sizes.add_argument(
        "--kv-memory-fraction",
        type=float,
        help="share of free GPU memory for the KV cache [KILN_KV_MEMORY_FRACTION, 0.5]",
    )
    sizes.add_argument(
        "--max-lora-slots",
        type=int,
        help="adapters on the device at once [KILN_MAX_LORA_SLOTS; GPU 32, CPU 8]",
    )
    sizes.add_argument(
        "--max-waiting",
        type=int,
        help="requests queued behind the running batch before RESOURCE_EXHAUSTED [KILN_MAX_WAITING, 256]",
    )
    sizes.add_argument(
        "--max-queue-time",
        type=float,
        help="seconds a request may wait to start (0 = no limit) [KILN_MAX_QUEUE_TIME, 30]",
    )
    sizes.add_argument("--max-lora-rank", type=int, help="largest adapter rank [KILN_MAX_LORA_RANK, 64]")
    sizes.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every engine step op by op: no CUDA graphs (slower; for debugging) [KILN_ENFORCE_EAGER]",
    )


def _add_serving_flags(parser: argparse.ArgumentParser) -> None:
    """API processes, HTTP, metrics, logs, adapter import, canaries and per-tenant limits."""
    parser.add_argument(
        "--api-processes",
        type=int,
        help="API processes sharing the gRPC port; 0 = 4 on a GPU, 1 on CPU [KILN_API_PROCESSES, 0]",
    )
    parser.add_argument(
        "--http-port", type=int, help="OpenAI-compatible HTTP + /metrics port [KILN_HTTP_PORT; off]"
    )
    parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port [KILN_METRICS_PORT; off]")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="log line format [KILN_LOG_FORMAT, text]"
    )
    parser.add_argument(
        "--import-root", help="server directory admins may import adapters from [KILN_IMPORT_ROOT]"
    )
    parser.add_argument(
        "--canary-share", type=float, help="traffic share of a canary [KILN_CANARY_SHARE, 0.1]"
    )
    limits = parser.add_argument_group("per-tenant limits (0 = off; over a limit: RESOURCE_EXHAUSTED)")
    limits.add_argument(
        "--tenant-max-streams", type=int, help="open Generate streams [KILN_TENANT_MAX_STREAMS, 0]"
    )
    limits.add_argument(
        "--tenant-requests-per-s",
        type=float,
        help="Generate calls per second [KILN_TENANT_REQUESTS_PER_S, 0]",
    )
    limits.add_argument(
        "--tenant-samples-per-min",
        type=float,
        help="feedback + examples per minute [KILN_TENANT_SAMPLES_PER_MIN, 0]",
    )
    parser.add_argument(
        "--canary-requests",
        type=int,
        help="rated requests before a canary is judged [KILN_CANARY_REQUESTS, 100]",
    )
