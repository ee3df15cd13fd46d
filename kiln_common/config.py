"""Frozen configuration built once at an entry point from flags and the environment."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln_common.auth import load_key_file

DEFAULT_INFER_PORT = 50051
DEFAULT_TRAIN_PORT = 50052
DTYPES = ("auto", "float32", "bfloat16", "float16")
# sun_path in sockaddr_un holds 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107


def default_home(environ: Mapping[str, str], cwd: Path | None = None) -> Path:
    """KILN_HOME, else ./.kiln when it exists (a checkout), else ~/.kiln."""
    if environ.get("KILN_HOME"):
        return Path(environ["KILN_HOME"]).expanduser().resolve()
    local = (cwd or Path.cwd()) / ".kiln"
    if local.is_dir():
        return local.resolve()
    return (Path.home() / ".kiln").resolve()


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be in 0..65535, got {port}")


def _check_dtype_device(dtype: str, device: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis is: an external URL, or an embedded valkey-server under `home`."""

    home: Path
    url: str = ""  # KILN_REDIS_URL; empty = embedded

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"KILN_REDIS_URL must start with redis://, rediss:// or unix://, got {self.url!r}"
            )

    @property
    def embedded(self) -> bool:
        """True when Kiln starts its own valkey-server."""
        return not self.url

    @property
    def data_dir(self) -> Path:
        """Append-only files of the embedded server."""
        return self.home / "redis"

    @property
    def socket_path(self) -> Path:
        """Unix socket of the embedded server (shortened under /tmp when $KILN_HOME is too deep)."""
        path = self.home / "redis.sock"
        if len(str(path)) <= _MAX_UNIX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:16]
        return Path("/tmp") / f"kiln-redis-{digest}.sock"

    @property
    def effective_url(self) -> str:
        """The URL clients connect to."""
        return self.url or f"unix://{self.socket_path}"


@dataclass(frozen=True)
class ServiceConfig:
    """What every Kiln server is configured with: state, Redis, the model, where to listen, who may call."""

    home: Path
    redis: RedisConfig
    model: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = DEFAULT_INFER_PORT
    dtype: str = "auto"
    device: str = "auto"
    api_keys_file: Path | None = None

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        _check_dtype_device(self.dtype, self.device)
        if not self.model.strip():
            raise ValueError("model must not be empty")
        if self.api_keys_file is not None:
            load_key_file(self.api_keys_file)  # one clear line now, not a traceback after the model loads

    @property
    def address(self) -> str:
        """host:port the gRPC server binds."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class InferConfig(ServiceConfig):
    """Settings of kiln-infer."""

    max_workers: int = 16  # threads for the short admin RPCs (streams run on the event loop, no thread each)
    max_request_bytes: int = 1 << 20
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_messages: int = 256
    max_lora_rank: int = 64
    max_lora_slots: int = 0  # adapters resident on the device at once; 0 = per device (GPU 32, CPU 8)
    max_waiting: int = 256
    # Engine sizes; 0 = chosen for the device when the engine is built.
    max_num_seqs: int = 0  # sequences decoded together (GPU 256, CPU 64)
    # background requests (kiln-train's answers) running at once; 0 = no cap beyond max_num_seqs
    max_background_seqs: int = 0
    max_model_len: int = (
        0  # prompt + generated tokens per sequence (the model's context, as the KV cache allows)
    )
    max_num_batched_tokens: int = 0  # tokens per engine step (GPU 16384, CPU 2048)
    # every engine step eager, op by op: no CUDA graphs, no static padded batches (a fallback for debugging)
    enforce_eager: bool = False
    kv_memory_fraction: float = 0.5  # share of free GPU memory given to the KV cache
    max_queue_time_s: float = (
        30.0  # a request not started after this long gets RESOURCE_EXHAUSTED; 0 = no limit
    )
    api_processes: int = 0  # API processes sharing the gRPC port (SO_REUSEPORT); 0 = GPU 4, CPU 1
    http_port: int | None = None  # OpenAI-compatible HTTP (and /metrics) on this port; None = off
    metrics_port: int | None = None  # Prometheus /metrics alone, for gRPC-only deployments
    log_format: str = "text"  # "text" or "json"
    drain_timeout_s: float = 60.0
    drain_notice_s: float = 1.0  # health says NOT_SERVING this long before the port closes
    sample_queue_size: int = 10_000
    samples_maxlen: int = 1_000_000
    events_maxlen: int = 10_000
    request_record_ttl_s: int = 7 * 24 * 3600
    warmup: bool = True
    # adapters (issue 9): server paths an admin may import from (None = path import off), upload limit, canary
    import_root: Path | None = None
    max_adapter_bytes: int = 512 * 1024 * 1024
    canary_share: float = 0.1  # traffic a canary gets before it is judged
    canary_min_requests: int = 100  # requests with feedback on the canary before promote / rollback
    # per-tenant limits (0 = off): concurrent Generate streams, Generate calls per second, samples per minute
    tenant_max_streams: int = 0
    tenant_requests_per_s: float = 0.0
    tenant_samples_per_min: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.canary_share < 1.0:
            raise ValueError(f"canary_share must be in (0, 1), got {self.canary_share}")
        if self.canary_min_requests <= 0 or self.max_adapter_bytes <= 0:
            raise ValueError("canary_min_requests and max_adapter_bytes must be > 0")
        for name in (
            "max_workers",
            "max_request_bytes",
            "max_stop_strings",
            "max_stop_chars",
            "max_messages",
            "max_lora_rank",
            "max_waiting",
            "sample_queue_size",
            "samples_maxlen",
            "events_maxlen",
            "request_record_ttl_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.drain_timeout_s < 0 or self.drain_notice_s < 0:
            raise ValueError(
                f"drain times must be >= 0, got {self.drain_timeout_s} and {self.drain_notice_s}"
            )
        self._check_engine_sizes()

    def _check_engine_sizes(self) -> None:
        for name, limit in ENGINE_SIZE_LIMITS.items():
            value = getattr(self, name)
            if not 0 <= value <= limit:
                flag, var = _flag_and_var(name)
                raise ValueError(f"{flag} / {var} must be in 0..{limit} (0 = chosen per device), got {value}")
        if not math.isfinite(self.kv_memory_fraction) or not 0.0 < self.kv_memory_fraction < 1.0:
            raise ValueError(
                "--kv-memory-fraction / KILN_KV_MEMORY_FRACTION must be in (0, 1), "
                f"got {self.kv_memory_fraction}"
            )
        for name in ("http_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None:
                _check_port(name, port)
        if not math.isfinite(self.max_queue_time_s) or not 0 <= self.max_queue_time_s <= 3600:
            raise ValueError(
                f"--max-queue-time / KILN_MAX_QUEUE_TIME must be in 0..3600 s, got {self.max_queue_time_s}"
            )
        if self.log_format not in ("text", "json"):
            raise ValueError(
                f"--log-format / KILN_LOG_FORMAT must be 'text' or 'json', got {self.log_format!r}"
            )


# Upper bounds of the engine sizes (0 = per device): far above any real deployment, low enough to catch typos.
ENGINE_SIZE_LIMITS = {
    "max_num_seqs": 4096,
    "max_background_seqs": 4096,
    "max_model_len": 1 << 20,
    "max_num_batched_tokens": 1 << 20,
    "max_lora_slots": 1024,
    "api_processes": 64,
}


def _flag_and_var(name: str) -> tuple[str, str]:
    return "--" + name.replace("_", "-"), "KILN_" + name.upper()


@dataclass(frozen=True)
class TrainConfig(ServiceConfig):
    """Settings of kiln-train shared with the rest of the stack (its training knobs live in kiln_train)."""

    port: int = DEFAULT_TRAIN_PORT
    infer_address: str = f"127.0.0.1:{DEFAULT_INFER_PORT}"
    extra: Mapping[str, str] = field(default_factory=dict)  # KILN_TRAIN_* variables, for kiln_train to parse


def _pick(flag: object, environ: Mapping[str, str], var: str, default: str) -> str:
    if flag is not None:
        return str(flag)
    return environ.get(var) or default


def _common(args: argparse.Namespace, environ: Mapping[str, str], default_port: int) -> dict[str, object]:
    home = Path(args.home).expanduser().resolve() if args.home else default_home(environ)
    keys = _pick(args.api_keys, environ, "KILN_API_KEYS", "")
    return dict(
        home=home,
        redis=RedisConfig(home=home, url=_pick(args.redis_url, environ, "KILN_REDIS_URL", "")),
        model=_pick(args.model, environ, "KILN_MODEL", "smollm2"),
        host=_pick(args.host, environ, "KILN_HOST", "127.0.0.1"),
        port=int(_pick(args.port, environ, "KILN_PORT", str(default_port))),
        dtype=_pick(args.dtype, environ, "KILN_DTYPE", "auto"),
        device=_pick(args.device, environ, "KILN_DEVICE", "auto"),
        api_keys_file=Path(keys).expanduser() if keys else None,
    )


def infer_config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> InferConfig:
    """Build InferConfig from parsed flags (see add_infer_flags) and the environment."""
    common = _common(args, environ, DEFAULT_INFER_PORT)
    drain = _pick(getattr(args, "drain_timeout", None), environ, "KILN_DRAIN_TIMEOUT", "60")
    return InferConfig(
        **common,  # type: ignore[arg-type]
        max_workers=int(_pick(getattr(args, "max_workers", None), environ, "KILN_MAX_WORKERS", "16")),
        drain_timeout_s=float(drain),
        warmup=not getattr(args, "no_warmup", False),
        **_engine_sizes(args, environ),
        **_adapter_settings(args, environ),  # type: ignore[arg-type]
    )


def _adapter_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, object]:
    """--import-root / KILN_IMPORT_ROOT and the canary settings."""
    root = _pick(getattr(args, "import_root", None), environ, "KILN_IMPORT_ROOT", "")
    share = _pick(getattr(args, "canary_share", None), environ, "KILN_CANARY_SHARE", "0.1")
    requests = _pick(getattr(args, "canary_requests", None), environ, "KILN_CANARY_REQUESTS", "100")
    return dict(
        import_root=Path(root).expanduser().resolve() if root else None,
        canary_share=float(share),
        canary_min_requests=int(requests),
        tenant_max_streams=_number(args, environ, "tenant_max_streams", int, "0"),
        tenant_requests_per_s=_number(args, environ, "tenant_requests_per_s", float, "0"),
        tenant_samples_per_min=_number(args, environ, "tenant_samples_per_min", float, "0"),
    )


def _number(args: argparse.Namespace, environ: Mapping[str, str], name: str, kind: type, default: str) -> Any:
    """A numeric setting from its flag or KILN_* variable; an error names both when it does not parse."""
    flag, var = _flag_and_var(name)
    raw = _pick(getattr(args, name, None), environ, var, default)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(
            f"{flag} / {var} must be a{'n integer' if kind is int else ' number'}, got {raw!r}"
        ) from None


def _engine_sizes(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    sizes: dict[str, Any] = {
        name: _number(args, environ, name, int, "0")
        for name in (
            "max_num_seqs",
            "max_background_seqs",
            "max_model_len",
            "max_num_batched_tokens",
            "max_lora_slots",
            "api_processes",
        )
    }
    sizes["max_lora_rank"] = _number(args, environ, "max_lora_rank", int, "64")
    sizes["max_waiting"] = _number(args, environ, "max_waiting", int, "256")
    sizes["kv_memory_fraction"] = _number(args, environ, "kv_memory_fraction", float, "0.5")
    raw = _pick(getattr(args, "max_queue_time", None), environ, "KILN_MAX_QUEUE_TIME", "30")
    try:
        sizes["max_queue_time_s"] = float(raw)
    except ValueError:
        raise ValueError(f"--max-queue-time / KILN_MAX_QUEUE_TIME must be a number, got {raw!r}") from None
    for name in ("http_port", "metrics_port"):
        raw = _pick(getattr(args, name, None), environ, _flag_and_var(name)[1], "")
        sizes[name] = _number(args, environ, name, int, raw) if raw else None
    sizes["log_format"] = _pick(getattr(args, "log_format", None), environ, "KILN_LOG_FORMAT", "text")
    sizes["enforce_eager"] = getattr(args, "enforce_eager", False) or _switch(environ, "KILN_ENFORCE_EAGER")
    return sizes


def _switch(environ: Mapping[str, str], var: str) -> bool:
    """An on/off KILN_* variable: 1/true/yes/on or 0/false/no/off (unset = off); anything else is an error."""
    raw = environ.get(var, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{var} must be 1/true/yes/on or 0/false/no/off, got {environ[var]!r}")


def train_config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> TrainConfig:
    """Build TrainConfig from parsed flags (see add_common_flags) and the environment."""
    common = _common(args, environ, DEFAULT_TRAIN_PORT)
    infer = environ.get("KILN_INFER_ADDRESS") or f"127.0.0.1:{DEFAULT_INFER_PORT}"
    extra = {k: v for k, v in environ.items() if k.startswith("KILN_TRAIN_")}
    return TrainConfig(**common, infer_address=infer, extra=extra)  # type: ignore[arg-type]


def resolve_device(device: str) -> str:
    """'auto' → cuda:0 when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' → bfloat16 on CUDA, float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def environ_snapshot() -> dict[str, str]:
    """A copy of the process environment, for entry points only."""
    return dict(os.environ)
