"""Text pairs → token ids and labels (loss on the completion only), and padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kiln_common.prompt import chat_text, prompt_token_ids

IGNORE = -100


@dataclass(frozen=True)
class TextPair:
    """A prompt (chat turns, or raw text when `messages` is empty) and the completion to learn."""

    completion: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    complete: bool = True  # False: the text stopped at a token limit, so no end-of-turn is learned after it


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + completion; labels are IGNORE on the prompt (loss only on the completion)."""

    input_ids: list[int]
    labels: list[int]


def prompt_ids(tok: PreTrainedTokenizerBase, pair: TextPair) -> list[int]:
    """The prompt's token ids exactly as the server renders them."""
    return prompt_token_ids(tok, pair.prompt, pair.messages)


def encode(tok: PreTrainedTokenizerBase, pair: TextPair, max_len: int = 1024) -> Encoded:
    """Prompt + completion (+ end-of-turn tokens when complete), with the prompt masked out of the labels."""
    prompt = prompt_ids(tok, pair)
    completion = tok(pair.completion, add_special_tokens=False).input_ids
    full = prompt + completion + ([tok.eos_token_id] if pair.complete else [])
    if pair.messages and pair.complete:
        turns = (*pair.messages, ("assistant", pair.completion))
        chat = tok(chat_text(tok, turns, open_assistant_turn=False), add_special_tokens=False).input_ids
        if chat[: len(prompt)] == prompt:  # else the template re-renders history differently: append instead
            full = chat
    full = full[:max_len]
    n = min(len(prompt), len(full))
    return Encoded(input_ids=full, labels=[IGNORE] * n + full[n:])


def collate(batch: list[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
