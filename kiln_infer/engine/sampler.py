"""Token selection on the device: repetition penalty, temperature, top-k, top-p, seeded noise, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln_infer.engine.types import SamplingParams, TokenLogprob

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32-style) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise [B, vocab] in (0, 1) that depends only on (seed, step, token id), never on the batch.

    semantics: u[b, v] = (hash(hash(hash(seed_b) ^ step_b) ^ v) + 0.5) / 2**32, strictly inside (0, 1).
    """
    base = _hash32(_hash32(seeds & _MASK32) ^ (steps & _MASK32))  # [B]
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _hash32(base[:, None] ^ ids[None, :])
    return (bits.double() + 0.5).div_(2.0**32).float()


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for one step."""

    params: list[SamplingParams]
    seeds: list[int]
    steps: list[int]  # index of the token being sampled (the sequence length): noise position
    history: list[list[int]]  # prompt + generated ids, for the repetition penalty


@dataclass
class SamplerOutput:
    """Chosen token per row and, where asked, logprobs."""

    token_ids: list[int]
    logprobs: list[tuple[TokenLogprob, list[TokenLogprob]] | None]


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalties: list[float]) -> None:
    """HF semantics in place: a seen token's logit is divided by p when positive, multiplied when negative."""
    for row, (ids, p) in enumerate(zip(history, penalties, strict=True)):
        if p == 1.0 or not ids:
            continue
        idx = torch.tensor(sorted(set(ids)), device=logits.device)
        seen = logits[row, idx]
        logits[row, idx] = torch.where(seen > 0, seen / p, seen * p)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus top-p; k = 0 and p = 1 disable them."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    drop |= (before > top_p[:, None]) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row of fp32 `logits` [B, vocab]."""
    params = batch.params
    apply_repetition_penalty(logits, batch.history, [p.repetition_penalty for p in params])
    device = logits.device
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=device)
        sub = (
            logits[rows] / torch.tensor([params[i].temperature for i in sampled_rows], device=device)[:, None]
        )
        top_k = torch.tensor([params[i].top_k for i in sampled_rows], device=device)
        top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=device, dtype=torch.float32)
        sub = _filter_top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        seeds = torch.tensor([batch.seeds[i] for i in sampled_rows], device=device, dtype=torch.int64)
        steps = torch.tensor([batch.steps[i] for i in sampled_rows], device=device, dtype=torch.int64)
        noise = -seeded_uniform(seeds, steps, logits.shape[-1]).log()  # Exp(1): argmax p/E ~ Categorical(p)
        chosen[rows] = (probs / noise).argmax(dim=-1)
    token_ids = chosen.tolist()
    out_logprobs: list[tuple[TokenLogprob, list[TokenLogprob]] | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs > 0]
    if want:
        rows = torch.tensor(want, device=device)
        lp = logits[rows].log_softmax(dim=-1)
        k = max(params[i].logprobs for i in want)
        top_vals, top_ids = lp.topk(k, dim=-1)
        chosen_lp = lp.gather(1, chosen[rows][:, None]).squeeze(1).tolist()
        top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(want):
            n = params[i].logprobs
            alts = [TokenLogprob(t, v) for t, v in zip(top_ids_l[j][:n], top_vals_l[j][:n], strict=True)]
            out_logprobs[i] = (TokenLogprob(token_ids[i], chosen_lp[j]), alts)
    return SamplerOutput(token_ids=token_ids, logprobs=out_logprobs)
