"""The edge between protobuf messages and plain dataclasses: validate on the way in, build on the way out."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from kiln.v1 import adapter_pb2, inference_pb2
from kiln_common.adapter_store import VersionMeta
from kiln_common.registry import AdapterEvent, AdapterState, EventType
from kiln_infer.engine.types import FinishReason, RequestOutput, SamplingParams
from kiln_infer.errors import InvalidArgumentError

ROLES = ("system", "user", "assistant")
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 256
# Sane upper bounds on numbers from clients: beyond them a value is a mistake or an attack, never a setting.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_TOP_K = 1_000_000
MAX_MAX_TOKENS = 1_000_000
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")

_FINISH = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: inference_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.ABORTED: inference_pb2.FINISH_REASON_ABORTED,
}
_EVENT = {
    EventType.PUBLISHED: adapter_pb2.ADAPTER_EVENT_TYPE_PUBLISHED,
    EventType.PROMOTED: adapter_pb2.ADAPTER_EVENT_TYPE_PROMOTED,
    EventType.ROLLED_BACK: adapter_pb2.ADAPTER_EVENT_TYPE_ROLLED_BACK,
    EventType.SPLIT: adapter_pb2.ADAPTER_EVENT_TYPE_SPLIT,
    EventType.LOADED: adapter_pb2.ADAPTER_EVENT_TYPE_LOADED,
    EventType.REJECTED: adapter_pb2.ADAPTER_EVENT_TYPE_REJECTED,
}


@dataclass(frozen=True)
class Limits:
    """Request limits enforced at the edge."""

    max_request_bytes: int
    max_stop_strings: int
    max_stop_chars: int
    max_messages: int
    vocab_size: int = 0  # top_k may not exceed it; 0 = only MAX_TOP_K applies


@dataclass(frozen=True)
class GenerateInput:
    """A validated GenerateRequest (max_tokens may still be None: it depends on the prompt length)."""

    adapter: str
    prompt: str
    messages: tuple[tuple[str, str], ...]
    sampling: SamplingParams
    max_tokens: int | None
    request_id: str
    prompt_token_ids: tuple[int, ...] = ()  # set instead of prompt / messages


def messages_from_pb(
    messages: Sequence[inference_pb2.ChatMessage], field: str, limits: Limits
) -> tuple[tuple[str, str], ...]:
    """Validate chat messages: known roles, at most max_messages, at least one non-empty turn."""
    if len(messages) > limits.max_messages:
        raise InvalidArgumentError(field, f"at most {limits.max_messages} messages, got {len(messages)}")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgumentError(
                f"{field}[{i}].role", f"must be one of {', '.join(ROLES)}, got {m.role!r}"
            )
    if not any(m.content.strip() for m in messages):
        raise InvalidArgumentError(field, "every message is empty")
    return tuple((m.role, m.content) for m in messages)


def prompt_or_messages(
    prompt: str, messages: Sequence[inference_pb2.ChatMessage], prefix: str, limits: Limits
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Exactly one of prompt or messages, validated."""
    if prompt and messages:
        raise InvalidArgumentError(f"{prefix}prompt", "set exactly one of prompt or messages, not both")
    if messages:
        return "", messages_from_pb(messages, f"{prefix}messages", limits)
    if not prompt.strip():
        raise InvalidArgumentError(f"{prefix}prompt", "must not be empty (set prompt or messages)")
    return prompt, ()


def _finite_in(field: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    """`value` when finite and in [low, high] (or (low, high] with low_open); else InvalidArgumentError."""
    above_low = value > low if low_open else value >= low
    if not (math.isfinite(value) and above_low and value <= high):
        bracket = "(" if low_open else "["
        raise InvalidArgumentError(
            field, f"must be a finite number in {bracket}{low:g}, {high:g}], got {value}"
        )
    return float(value)


def sampling_from_pb(s: inference_pb2.SamplingParams, limits: Limits) -> tuple[SamplingParams, int | None]:
    """Validate sampling settings; returns them with max_tokens as given (None when unset)."""
    max_tokens = s.max_tokens if s.HasField("max_tokens") else None
    if max_tokens is not None and not 0 < max_tokens <= MAX_MAX_TOKENS:
        raise InvalidArgumentError("sampling.max_tokens", f"must be in 1..{MAX_MAX_TOKENS}, got {max_tokens}")
    temperature = s.temperature if s.HasField("temperature") else 1.0
    temperature = _finite_in("sampling.temperature", temperature, 0.0, MAX_TEMPERATURE)
    top_p = _finite_in("sampling.top_p", s.top_p if s.HasField("top_p") else 1.0, 0.0, 1.0, low_open=True)
    max_top_k = min(MAX_TOP_K, limits.vocab_size) if limits.vocab_size > 0 else MAX_TOP_K
    if not 0 <= s.top_k <= max_top_k:
        raise InvalidArgumentError("sampling.top_k", f"must be in 0..{max_top_k}, got {s.top_k}")
    penalty = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
    penalty = _finite_in("sampling.repetition_penalty", penalty, 0.0, MAX_REPETITION_PENALTY, low_open=True)
    if not 0 <= s.logprobs <= MAX_LOGPROBS:
        raise InvalidArgumentError("sampling.logprobs", f"must be in 0..{MAX_LOGPROBS}, got {s.logprobs}")
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidArgumentError(
            "sampling.stop", f"at most {limits.max_stop_strings} strings, got {len(s.stop)}"
        )
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidArgumentError(f"sampling.stop[{i}]", f"must be 1-{limits.max_stop_chars} characters")
    presence, frequency = (_openai_penalty(s, name) for name in ("presence_penalty", "frequency_penalty"))
    params = SamplingParams(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(s.top_k),
        seed=int(s.seed) if s.HasField("seed") else None,
        stop=tuple(s.stop),
        repetition_penalty=float(penalty),
        logprobs=int(s.logprobs),
        ignore_eos=bool(s.ignore_eos),
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    return params, max_tokens


def _openai_penalty(s: inference_pb2.SamplingParams, name: str) -> float:
    """A presence / frequency penalty: finite, in [-2, 2], 0 when unset."""
    value = float(getattr(s, name)) if s.HasField(name) else 0.0
    if not -2.0 <= value <= 2.0:  # also rejects NaN and infinities
        raise InvalidArgumentError(f"sampling.{name}", f"must be a finite number in [-2, 2], got {value}")
    return value


def request_id_from_pb(request_id: str) -> str:
    """The caller's request id (printable ASCII, 1-128 characters) or a fresh one."""
    if not request_id:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(request_id):
        raise InvalidArgumentError("request_id", "must be 1-128 printable ASCII characters without spaces")
    return request_id


def generate_from_pb(req: inference_pb2.GenerateRequest, limits: Limits) -> GenerateInput:
    """Validate a GenerateRequest into a GenerateInput (no tokenization yet)."""
    size = req.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidArgumentError("request", f"{size} bytes exceeds the limit of {limits.max_request_bytes}")
    token_ids = tuple(req.prompt_token_ids)
    if token_ids:
        if req.prompt or req.messages:
            raise InvalidArgumentError(
                "prompt_token_ids", "set exactly one of prompt, messages or prompt_token_ids"
            )
        prompt, messages = "", cast(tuple[tuple[str, str], ...], ())
    else:
        prompt, messages = prompt_or_messages(req.prompt, req.messages, "", limits)
    sampling, max_tokens = sampling_from_pb(req.sampling, limits)
    return GenerateInput(
        adapter=req.adapter,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        max_tokens=max_tokens,
        request_id=request_id_from_pb(req.request_id),
        prompt_token_ids=token_ids,
    )


def generate_to_pb(
    out: RequestOutput, request_id: str, adapter_version: str, decode: Callable[[int], str]
) -> inference_pb2.GenerateResponse:
    """One streamed response from an engine output increment."""
    resp = inference_pb2.GenerateResponse(
        request_id=request_id, text=out.text, token_ids=out.token_ids, adapter_version=adapter_version
    )
    for chosen, top in out.logprobs:
        lp = resp.logprobs.add()
        lp.chosen.token_id, lp.chosen.text, lp.chosen.logprob = (
            chosen.token_id,
            decode(chosen.token_id),
            chosen.logprob,
        )
        for alt in top:
            lp.top.add(token_id=alt.token_id, text=decode(alt.token_id), logprob=alt.logprob)
    if out.finished:
        resp.finish_reason = _FINISH.get(
            out.finish_reason or FinishReason.STOP, inference_pb2.FINISH_REASON_STOP
        )
        resp.usage.prompt_tokens = out.prompt_tokens
        resp.usage.completion_tokens = out.completion_tokens
    return resp


def adapter_info_to_pb(state: AdapterState) -> adapter_pb2.AdapterInfo:
    """AdapterInfo of one alias state."""
    return adapter_pb2.AdapterInfo(
        name=state.name,
        current_version=state.current,
        latest_version=state.latest,
        split=[adapter_pb2.TrafficShare(version=v, weight=w) for v, w in state.split],
        sampling_enabled=state.sample_rate > 0,
        sample_rate=state.sample_rate,
    )


def version_to_pb(meta: VersionMeta) -> adapter_pb2.VersionInfo:
    """VersionInfo of one version's metadata."""
    return adapter_pb2.VersionInfo(
        version=meta.version,
        parent=meta.parent,
        sha256=meta.sha256,
        created=meta.created,
        rank=meta.rank,
        origin=meta.origin,
        num_samples=meta.num_samples,
        eval=dict(meta.eval),
    )


def event_to_pb(event: AdapterEvent) -> adapter_pb2.AdapterEvent:
    """AdapterEvent message of a registry event."""
    return adapter_pb2.AdapterEvent(
        type=_EVENT[event.type],
        adapter=event.adapter,
        version=event.version,
        time=event.time,
        detail=event.detail,
    )


def shares_from_pb(shares: Sequence[adapter_pb2.TrafficShare]) -> list[tuple[int, float]]:
    """Traffic shares as (version, weight) pairs, checked field by field."""
    if not shares:
        raise InvalidArgumentError("shares", "at least one share is required")
    out = []
    for i, s in enumerate(shares):
        if s.version < 0:
            raise InvalidArgumentError(f"shares[{i}].version", f"must be >= 0, got {s.version}")
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise InvalidArgumentError(f"shares[{i}].weight", f"must be a finite number > 0, got {s.weight}")
        out.append((int(s.version), float(s.weight)))
    return out
