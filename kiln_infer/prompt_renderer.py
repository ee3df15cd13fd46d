"""Prompt text or chat messages → token ids, with the model's own tokenizer and chat template."""

from __future__ import annotations

import threading

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from kiln_infer.errors import InvalidArgumentError


class PromptRenderer:
    """Turns a prompt or chat messages into token ids with the model's own tokenizer and chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # fast tokenizers are not safe to share between threads

    def token_ids(self, prompt: str, messages: tuple[tuple[str, str], ...]) -> list[int]:
        """Token ids of a raw prompt, or of messages rendered with the assistant turn opened."""
        with self._lock:
            if messages:
                try:
                    text = self.tokenizer.apply_chat_template(
                        [{"role": r, "content": c} for r, c in messages],
                        tokenize=False,
                        add_generation_prompt=True,
                    )
                except TemplateError as exc:  # e.g. a template that refuses a system turn or role order
                    raise InvalidArgumentError(
                        "messages", f"the model's chat template refused them: {exc}"
                    ) from exc
                return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return list(self.tokenizer(prompt)["input_ids"])

    def decode_one(self, token_id: int) -> str:
        """Text of a single token (for log-probabilities)."""
        with self._lock:
            return str(self.tokenizer.decode([token_id]))
