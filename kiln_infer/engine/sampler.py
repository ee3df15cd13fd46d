"""Token selection on the device: repetition penalty, temperature, top-k, top-p, seeded noise, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln_infer.engine.types import SamplingParams, TokenLogprob
from kiln_infer.kernels.argmax import greedy_tokens

_MASK32 = 0xFFFFFFFF
_NUCLEUS_HEAD = 1024  # candidates tried before a full-vocabulary sort for top-p


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32-style) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform noise [B, N] in (0, 1) for candidates `token_ids` [B, N]: a function of (seed, step, id) only.

    semantics: u[b, n] = (hash(hash(hash(seed_b) ^ step_b) ^ token_ids[b, n]) + 0.5) / 2**32
    """
    base = _hash32(_hash32(seeds & _MASK32) ^ (steps & _MASK32))  # [B]
    bits = _hash32(base[:, None] ^ token_ids)
    return (bits.double() + 0.5).div_(2.0**32).float()


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for one step."""

    params: list[SamplingParams]
    seeds: list[int]
    steps: list[int]  # index of the token being sampled (the sequence length): noise position
    history: list[list[int]]  # prompt + generated ids, for the repetition penalty
    outputs: list[list[int]] | None = None  # generated ids per row, for presence / frequency penalties


@dataclass
class SamplerOutput:
    """Chosen token per row and, where asked, logprobs."""

    token_ids: list[int]
    logprobs: list[tuple[TokenLogprob, list[TokenLogprob]] | None]


@torch.inference_mode()  # the logits come out of the inference-mode forward: editing them needs the same mode
def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalties: list[float]) -> None:
    """HF semantics in place: a seen token's logit is divided by p when positive, multiplied when negative."""
    for row, (ids, p) in enumerate(zip(history, penalties, strict=True)):
        if p == 1.0 or not ids:
            continue
        idx = torch.tensor(sorted(set(ids)), device=logits.device)
        seen = logits[row, idx]
        logits[row, idx] = torch.where(seen > 0, seen / p, seen * p)


@torch.inference_mode()
def apply_output_penalties(
    logits: torch.Tensor, outputs: list[list[int]], params: list[SamplingParams]
) -> None:
    """OpenAI presence / frequency penalties in place, over each row's generated tokens.

    semantics: logits[b, t] -= frequency_b * count_b[t] + presence_b * (count_b[t] > 0)
    where count_b[t] is how many times token t was generated in row b.
    """
    rows = [i for i, p in enumerate(params) if p.uses_output_penalties and outputs[i]]
    if not rows:
        return
    device = logits.device
    counts = torch.zeros((len(rows), logits.shape[-1]), dtype=torch.float32)  # [R, vocab] on the host
    for j, i in enumerate(rows):
        counts[j].index_add_(0, torch.tensor(outputs[i]), torch.ones(len(outputs[i])))
    counts = counts.to(device, non_blocking=True)
    freq = _on(device, [params[i].frequency_penalty for i in rows], torch.float32)[:, None]
    pres = _on(device, [params[i].presence_penalty for i in rows], torch.float32)[:, None]
    rows_t = _on(device, rows, torch.int64)
    penalty = freq * counts + pres * (counts > 0).float()
    logits[rows_t] = (logits[rows_t].float() - penalty).to(logits.dtype)


def _on(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[type-arg]
    """A small host list on the device without a blocking copy (which would wait for queued GPU work)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _candidates(
    logits: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidate logits and token ids [B, N], best first, outside top-k / top-p set to -inf.

    The decisions below use the host lists, never device values, so no step waits on the GPU here.
    """
    batch, vocab = logits.shape
    device = logits.device
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits, torch.arange(vocab, device=device).expand(batch, vocab)
    top_k_t, top_p_t = _on(device, top_k, torch.int64), _on(device, top_p, torch.float32)
    if all(k > 0 for k in top_k):
        values, ids = logits.topk(min(max(top_k), vocab), dim=-1)  # sorted, best first
    elif logits.is_cuda:  # a full sort is cheap on the GPU and needs no data-dependent decision
        values, ids = logits.sort(dim=-1, descending=True)
    else:
        # The nucleus nearly always lies in a short head: if the head holds >= top_p of the mass in every row,
        # everything after it would be dropped anyway, so the exact result needs no full sort.
        values, ids = logits.topk(min(_NUCLEUS_HEAD, vocab), dim=-1)
        head_mass = (values.logsumexp(-1) - logits.logsumexp(-1)).exp()
        if not bool((head_mass >= top_p_t).all()):
            values, ids = logits.sort(dim=-1, descending=True)
    n = values.shape[-1]
    k = torch.where(top_k_t > 0, top_k_t, torch.full_like(top_k_t, vocab)).clamp(max=n)
    ranks = torch.arange(n, device=device)[None, :]
    drop = ranks >= k[:, None]
    in_top_k = values.masked_fill(drop, float("-inf"))
    # top-p acts on the top-k distribution (HF warper order); without top-k, on the full vocabulary
    norm = torch.where(top_k_t > 0, in_top_k.logsumexp(-1), logits.logsumexp(-1))
    probs = (in_top_k - norm[:, None]).exp()
    above = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    drop |= (above > top_p_t[:, None]) & (ranks > 0)
    return values.masked_fill(drop, float("-inf")), ids


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]
) -> torch.Tensor:
    """Sampled token per row of temperature > 0 rows."""
    device = logits.device
    sub = logits / _on(device, [p.temperature for p in params], torch.float32)[:, None]
    values, ids = _candidates(sub, [p.top_k for p in params], [p.top_p for p in params])
    probs = values.softmax(dim=-1)
    seeds_t = _on(device, seeds, torch.int64)
    steps_t = _on(device, steps, torch.int64)
    noise = -seeded_uniform(seeds_t, steps_t, ids).log()  # Exp(1) per token: argmax p/E ~ Categorical(p)
    return ids.gather(1, (probs / noise).argmax(dim=-1, keepdim=True)).squeeze(1)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor into pinned host memory; the copy must be waited for before reading."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class PendingSample:
    """Sampled tokens (and logprobs) still on the device, copied to the host without blocking."""

    def __init__(
        self,
        chosen: torch.Tensor,
        params: list[SamplingParams],
        want: list[int],
        logprob_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self.tokens = chosen  # [B] int64 on the device: the next step may read it before the host does
        self.params, self.want = params, want
        on_cuda = chosen.is_cuda
        self._host = [_to_host(t) for t in (chosen, *(logprob_tensors or ()))]
        self._event = torch.cuda.Event() if on_cuda else None
        if self._event is not None:
            self._event.record()

    def result(self) -> SamplerOutput:
        """Wait for the copies and build the host-side output."""
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._host[0].tolist()
        out: list[tuple[TokenLogprob, list[TokenLogprob]] | None] = [None] * len(token_ids)
        if self.want:
            chosen_lp, top_vals, top_ids = (t.tolist() for t in self._host[1:])
            for j, i in enumerate(self.want):
                n = self.params[i].logprobs
                alts = [TokenLogprob(t, v) for t, v in zip(top_ids[j][:n], top_vals[j][:n], strict=True)]
                out[i] = (TokenLogprob(token_ids[i], chosen_lp[j]), alts)
        return SamplerOutput(token_ids=token_ids, logprobs=out)


def sample_async(logits: torch.Tensor, batch: SamplingBatch) -> PendingSample:
    """Pick one token per row of `logits` [B, vocab] without waiting for the device.

    The logits may be in the model's dtype: greedy rows take the argmax as is (a widening cast changes no
    order), and everything else (penalty, temperature, filtering, logprobs) works on an fp32 copy.
    """
    params = batch.params
    penalized = any(p.repetition_penalty != 1.0 or p.uses_output_penalties for p in params)
    if logits.dtype != torch.float32 and penalized:
        logits = logits.float()
    apply_repetition_penalty(logits, batch.history, [p.repetition_penalty for p in params])
    if batch.outputs is not None and any(p.uses_output_penalties for p in params):
        apply_output_penalties(logits, batch.outputs, params)
    device = logits.device
    chosen = greedy_tokens(logits)
    # Filtered and unfiltered rows go separately so one top-p row never forces a full sort on the others.
    for filtered in (False, True):
        group = [
            i for i, p in enumerate(params) if p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) == filtered
        ]
        if group:
            rows = _on(device, group, torch.int64)
            chosen[rows] = _sample_rows(
                logits[rows].float(),
                [params[i] for i in group],
                [batch.seeds[i] for i in group],
                [batch.steps[i] for i in group],
            )
    want = [i for i, p in enumerate(params) if p.logprobs > 0]
    tensors = None
    if want:
        rows = _on(device, want, torch.int64)
        lp = logits[rows].float().log_softmax(dim=-1)
        top_vals, top_ids = lp.topk(max(params[i].logprobs for i in want), dim=-1)
        tensors = (lp.gather(1, chosen[rows][:, None]).squeeze(1), top_vals, top_ids)
    return PendingSample(chosen, params, want, tensors)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row of `logits` [B, vocab] (blocking)."""
    return sample_async(logits, batch).result()
