"""Plain data passed between the servicer and the engine (no gRPC, no Redis)."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (validated by the servicer before it reaches the engine)."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    logprobs: int = 0  # number of top alternatives per token
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens only
    frequency_penalty: float = 0.0

    @property
    def uses_output_penalties(self) -> bool:
        """True when presence or frequency penalty is set (the sampler then needs the generated tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class AdapterRef:
    """A concrete adapter version pinned at admission; `key` is unique per (tenant, name, version)."""

    key: str  # e.g. "default/support@v3"
    path: Path  # PEFT directory: adapter_config.json + adapter_model.safetensors


class FinishReason(enum.Enum):
    """Why a sequence stopped."""

    STOP = "stop"  # end-of-sequence token
    LENGTH = "length"  # max_tokens reached
    STOP_STRING = "stop_string"
    ABORTED = "aborted"  # cancelled or deadline passed
    QUEUE_TIMEOUT = "queue_timeout"  # waited longer than the engine's max_queue_time_s before it started


@dataclass
class EngineRequest:
    """One generation as the engine sees it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterRef | None = None  # None = base model
    deadline: float | None = None  # time.monotonic() value after which the request is aborted
    # admitted only when no other request waits (kiln-train's own answers: a round yields to users)
    background: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token."""

    token_id: int
    logprob: float


@dataclass
class RequestOutput:
    """An increment of one request's output; the last one has `finished` set."""

    request_id: str
    token_ids: list[int]  # new tokens since the previous output
    text: str  # new text since the previous output (stop strings already cut)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # per new token: (chosen, top alternatives best first); empty unless sampling.logprobs > 0
    logprobs: list[tuple[TokenLogprob, list[TokenLogprob]]] = field(default_factory=list)
    emitted_at: float = 0.0  # time.monotonic() when the engine produced this output (for TTFT / TPOT)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (maps to RESOURCE_EXHAUSTED)."""


class RequestStream(Protocol):
    """Blocking iterator over one request's outputs, safe to consume from another thread."""

    def __iter__(self) -> Iterator[RequestOutput]: ...


class Engine(Protocol):
    """What the servicer needs from the engine (implemented by kiln_infer.engine.async_engine.AsyncEngine)."""

    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; raises EngineOverloadedError when full, AdapterLoadError for a bad adapter."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request: its stream ends with FinishReason.ABORTED and its resources are freed at once."""
        ...

    def preload_adapter(self, adapter: AdapterRef) -> None:
        """Load an adapter into host memory off the hot path (used before a hot swap flips the alias)."""
        ...

    def num_unfinished(self) -> int:
        """Requests admitted and not yet finished (used by graceful drain)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine loop thread."""
        ...
