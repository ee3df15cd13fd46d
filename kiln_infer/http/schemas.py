"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic (unknown parameters refused)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln_infer.http.errors import ApiError, bad_request, unsupported

MAX_N = 16
MAX_COMPLETION_LOGPROBS = 20
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    """`stream_options`: only include_usage is known."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Parameters both endpoints share; extra keys are kept so they can be refused by name."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: str | None = Field(None, max_length=256)
    # Kiln (and vLLM) extensions
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)

    def check_supported(self) -> None:
        """Refuse any parameter Kiln does not implement (null values count as absent)."""
        for name, value in (self.model_extra or {}).items():
            if value is not None:
                raise unsupported(name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stops(self) -> list[str]:
        """The stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def prompts(self) -> list[str]:
        """The prompt(s) as a non-empty list."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise bad_request("prompt", "must be a string or a non-empty list of strings")
        return prompts


class ChatMessage(BaseModel):
    """One chat turn: text content, as a string or a list of text parts."""

    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self, index: int) -> str:
        """The content as one string; a part that is not text is refused by name."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content[{j}]", "only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def check_supported(self) -> None:
        """As for every request, and top_logprobs needs logprobs."""
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "requires logprobs to be true")


def _param_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as an OpenAI param: ("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("str", "list[", "function-", "constrained-")):  # union-branch labels
            out += f".{part}" if out else part
    return out or "body"


def parse_body(model: type[_GenerationRequest], body: Any) -> Any:
    """Validate a JSON body into `model`, as a 400 naming the first bad parameter."""
    if not isinstance(body, dict):
        raise bad_request("body", "must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param_path(tuple(first["loc"]))
        raise bad_request(param, first["msg"]) from None
    request.check_supported()
    return request


__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "parse_body"]
