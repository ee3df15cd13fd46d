"""Prompt text or chat messages → token ids, with the model's own tokenizer and chat template."""

from __future__ import annotations

import threading

from transformers import PreTrainedTokenizerBase


class PromptRenderer:
    """Turns a prompt or chat messages into token ids with the model's own tokenizer and chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # fast tokenizers are not safe to share between threads

    def token_ids(self, prompt: str, messages: tuple[tuple[str, str], ...]) -> list[int]:
        """Token ids of a raw prompt, or of messages rendered with the assistant turn opened."""
        with self._lock:
            if messages:
                text = self.tokenizer.apply_chat_template(
                    [{"role": r, "content": c} for r, c in messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return list(self.tokenizer(prompt)["input_ids"])

    def decode_one(self, token_id: int) -> str:
        """Text of a single token (for log-probabilities)."""
        with self._lock:
            return str(self.tokenizer.decode([token_id]))
