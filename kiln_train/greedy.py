"""Greedy answers of a model under training, generated in-process (the checkpoint vet, the probes)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from kiln_train.encoding import TextPair, prompt_ids


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    device: torch.device,
    prompts: list[TextPair],
    max_new_tokens: int,
) -> list[str]:
    """Greedy completions of `prompts` by the model's current weights (left-padded batches)."""
    model.eval()
    out: list[str] = []
    batch_size = 128 if device.type == "cuda" else 64  # rows per batch
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tok, p) for p in prompts[i : i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        out.extend(str(tok.decode(g[width:], skip_special_tokens=True)).strip() for g in gen)
    return out
