"""Prompt text or chat messages → token ids, one rule for serving and training alike.

A raw prompt is tokenized with the tokenizer's default special tokens (e.g. a BOS); chat messages are
rendered with the model's own chat template, which writes its special tokens itself, and the assistant turn
opened. A prompt trained on is thus the same token ids as the prompt served.

Chat content is text, never markup: a special-token string inside a message ("<|im_end|>", "<|im_start|>")
is escaped with a zero-width space after its first character, so it tokenizes as ordinary text and a user
message cannot close its turn and forge another one.
"""

from __future__ import annotations

import threading

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from kiln_common.errors import InvalidArgumentError

Messages = tuple[tuple[str, str], ...]  # (role, content) turns
ZERO_WIDTH_SPACE = "\u200b"


def special_strings(tok: PreTrainedTokenizerBase) -> list[str]:
    """The texts the tokenizer turns into special tokens (longest first, so nested ones are escaped whole)."""
    added = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    return sorted({*tok.all_special_tokens, *added} - {""}, key=len, reverse=True)


def escape_content(text: str, specials: list[str]) -> str:
    """Chat content with every special-token string broken up, so it tokenizes as plain text."""
    for special in specials:
        if special in text:
            text = text.replace(special, special[0] + ZERO_WIDTH_SPACE + special[1:])
    return text


def chat_text(tok: PreTrainedTokenizerBase, messages: Messages, open_assistant_turn: bool = True) -> str:
    """Messages rendered by the model's chat template (with the assistant turn opened by default)."""
    specials = special_strings(tok)
    try:
        return str(
            tok.apply_chat_template(
                [{"role": r, "content": escape_content(c, specials)} for r, c in messages],
                tokenize=False,
                add_generation_prompt=open_assistant_turn,
            )
        )
    except TemplateError as exc:  # e.g. a template that refuses a system turn or role order
        raise InvalidArgumentError("messages", f"the model's chat template refused them: {exc}") from exc


def prompt_token_ids(tok: PreTrainedTokenizerBase, prompt: str, messages: Messages) -> list[int]:
    """Token ids of a raw prompt, or of messages rendered with the assistant turn opened."""
    if messages:
        return list(tok(chat_text(tok, messages), add_special_tokens=False)["input_ids"])
    return list(tok(prompt)["input_ids"])


class PromptRenderer:
    """prompt_token_ids over one tokenizer shared between threads."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # fast tokenizers are not safe to share between threads

    def token_ids(self, prompt: str, messages: Messages) -> list[int]:
        """Token ids of a raw prompt, or of messages rendered with the assistant turn opened."""
        with self._lock:
            return prompt_token_ids(self.tokenizer, prompt, messages)

    def decode_one(self, token_id: int) -> str:
        """Text of a single token (for log-probabilities)."""
        with self._lock:
            return str(self.tokenizer.decode([token_id]))
