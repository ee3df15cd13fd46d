"""OpenAI response bodies: whole completions, streamed chunks and the usage chunk."""

from __future__ import annotations

from typing import Any

from kiln.v1 import inference_pb2
from kiln_infer.http.translate import ChoiceState, chat_logprobs, completion_logprobs, usage


class ResponseShape:
    """Builds one request's bodies: completions or chat, with or without logprobs."""

    def __init__(self, chat: bool, response_id: str, created: int, top: int | None) -> None:
        self.chat, self.id, self.created, self.top = chat, response_id, created, top

    def _logprobs(self, logprobs: list[inference_pb2.TokenLogprobs], offset: int = 0) -> Any:
        if self.top is None:
            return None
        if self.chat:
            return chat_logprobs(logprobs, self.top)
        return completion_logprobs(logprobs, self.top, offset)

    def whole(self, states: dict[int, ChoiceState], counts_prompt: set[int]) -> dict[str, Any]:
        """A non-streamed response with every choice."""
        choices = []
        for index in sorted(states):
            s = states[index]
            choice: dict[str, Any] = {"index": index, "finish_reason": s.finish_reason}
            choice["logprobs"] = self._logprobs(s.logprobs)
            if self.chat:
                choice["message"] = {"role": "assistant", "content": "".join(s.text)}
            else:
                choice["text"] = "".join(s.text)
            choices.append(choice)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": states[min(states)].model,
            "choices": choices,
            "usage": usage(states, counts_prompt),
        }

    def chunk(
        self,
        index: int,
        response: inference_pb2.GenerateResponse,
        finish_reason: str | None,
        first: bool,
        offset: int,
        with_usage: bool,
    ) -> dict[str, Any]:
        """One streamed chunk carrying one response of one choice (usage: null when include_usage)."""
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason}
        choice["logprobs"] = self._logprobs(list(response.logprobs), offset)
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": response.text} if first else {"content": response.text}
            )
        else:
            choice["text"] = response.text
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": response.adapter_version or "base",
            "choices": [choice],
        }
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, states: dict[int, ChoiceState], counts_prompt: set[int]) -> dict[str, Any]:
        """The last chunk of a stream with include_usage: no choices, the whole request's usage."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": states[min(states)].model,
            "choices": [],
            "usage": usage(states, counts_prompt),
        }
