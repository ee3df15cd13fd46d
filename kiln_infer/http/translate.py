"""OpenAI request bodies -> GenerateRequests, and gRPC responses -> OpenAI choices, logprobs and usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.v1 import inference_pb2
from kiln_infer.http.schemas import ChatCompletionRequest, CompletionRequest

_UINT64 = (1 << 64) - 1
BASE_MODEL_IDS = ("", "base")
FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_STOP_STRING: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORTED: "abort",
}


@dataclass(frozen=True)
class SubRequest:
    """One gRPC Generate behind one OpenAI choice."""

    index: int  # the choice index
    counts_prompt: bool  # the first choice of its prompt: its prompt tokens count in usage
    request: inference_pb2.GenerateRequest


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[inference_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = "base"


def adapter_of(model: str) -> str:
    """The gRPC adapter of an OpenAI model id ("base" or "" = the base model)."""
    return "" if model in BASE_MODEL_IDS else model


def _sampling(body: CompletionRequest | ChatCompletionRequest, logprobs: int) -> inference_pb2.SamplingParams:
    s = inference_pb2.SamplingParams(stop=body.stops(), logprobs=logprobs, top_k=body.top_k or 0)
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is not None:
        s.max_tokens = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(body, name)
        if value is not None:
            setattr(s, name, value)
    return s


def grpc_logprobs(body: CompletionRequest | ChatCompletionRequest) -> int:
    """How many alternatives to ask gRPC for (at least 1 whenever the chosen token's logprob is wanted)."""
    if isinstance(body, ChatCompletionRequest):
        return max(body.top_logprobs or 0, 1) if body.logprobs else 0
    return max(body.logprobs, 1) if body.logprobs is not None else 0


def top_wanted(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """How many alternatives the OpenAI response shows (None = no logprobs at all)."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def sub_requests(body: CompletionRequest | ChatCompletionRequest) -> list[SubRequest]:
    """One GenerateRequest per (prompt, choice); choice i of prompt p has index p * n + i."""
    sampling = _sampling(body, grpc_logprobs(body))
    adapter = adapter_of(body.model)
    out = []
    prompts: list[str | None] = [*body.prompts()] if isinstance(body, CompletionRequest) else [None]
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            request = inference_pb2.GenerateRequest(adapter=adapter)
            request.sampling.CopyFrom(sampling)
            if body.seed is not None:  # each choice its own stream, all reproducible
                request.sampling.seed = (body.seed + i) & _UINT64
            if prompt is not None:
                request.prompt = prompt
            else:
                assert isinstance(body, ChatCompletionRequest)
                for m, message in enumerate(body.messages):
                    request.messages.add(role=message.role, content=message.text(m))
            out.append(SubRequest(p * body.n + i, i == 0, request))
    return out


def absorb(state: ChoiceState, response: inference_pb2.GenerateResponse) -> None:
    """Add one streamed response to its choice's state."""
    state.text.append(response.text)
    state.logprobs.extend(response.logprobs)
    state.model = response.adapter_version or "base"
    if response.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
        state.finish_reason = FINISH_REASONS.get(response.finish_reason, "stop")
        state.prompt_tokens = response.usage.prompt_tokens
        state.completion_tokens = response.usage.completion_tokens


def finish_reason_of(response: inference_pb2.GenerateResponse) -> str | None:
    """The OpenAI finish_reason of a response (None before the last one)."""
    if response.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return FINISH_REASONS.get(response.finish_reason, "stop")


def completion_logprobs(
    logprobs: list[inference_pb2.TokenLogprobs], top: int, offset: int = 0
) -> dict[str, Any]:
    """The legacy completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        tokens.append(lp.chosen.text)
        offset += len(lp.chosen.text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.chosen.logprob for lp in logprobs],
        "top_logprobs": [{alt.text: alt.logprob for alt in lp.top[:top]} for lp in logprobs],
        "text_offset": offsets,
    }


def _token(lp: inference_pb2.TokenLogprob) -> dict[str, Any]:
    return {"token": lp.text, "logprob": lp.logprob, "bytes": list(lp.text.encode())}


def chat_logprobs(logprobs: list[inference_pb2.TokenLogprobs], top: int) -> dict[str, Any]:
    """The chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {
        "content": [
            {**_token(lp.chosen), "top_logprobs": [_token(alt) for alt in lp.top[:top]]} for lp in logprobs
        ]
    }


def usage(states: dict[int, ChoiceState], counts_prompt: set[int]) -> dict[str, int]:
    """Token counts of the whole response: each prompt once, every choice's completion."""
    prompt = sum(s.prompt_tokens for i, s in states.items() if i in counts_prompt)
    completion = sum(s.completion_tokens for s in states.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
