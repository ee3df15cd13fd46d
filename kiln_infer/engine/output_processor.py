"""Turns sampled tokens into streamed outputs: detokenize, detect stops, emit RequestOutput increments."""

from __future__ import annotations

import time

from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.detokenizer import Detokenizer, find_stop, streamable_text
from kiln_infer.engine.sequence import Sequence
from kiln_infer.engine.types import FinishReason, RequestOutput, TokenLogprob


class OutputProcessor:
    """Per-token host work for one sequence; the engine core decides what a finish means for resources."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int], max_model_len: int
    ) -> None:
        self.detokenizer = Detokenizer(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def accept(
        self, seq: Sequence, index: int, token: int, logprob: tuple[TokenLogprob, list[TokenLogprob]] | None
    ) -> FinishReason | None:
        """Record the token sampled for position `index` of seq.token_ids; returns why it stops, if so."""
        seq.token_ids[index] = token
        seq.num_resolved = index + 1
        seq.pending_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        delta = self.detokenizer.append(seq, token)
        params = seq.request.sampling
        stop_at = find_stop(seq, len(delta))
        if stop_at >= 0:
            seq.text = seq.text[:stop_at]
            return FinishReason.STOP_STRING
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP
        if (
            seq.num_resolved - seq.num_prompt_tokens >= params.max_tokens
            or seq.num_resolved >= self.max_model_len
        ):
            return FinishReason.LENGTH
        return None

    @staticmethod
    def emit(seq: Sequence, now: float | None = None) -> None:
        """Push the sequence's new tokens and text to its stream (the final output carries the reason)."""
        finished = seq.is_finished
        text = streamable_text(seq, finished)
        if not (seq.pending_ids or text or finished):
            return
        seq.outputs.put(
            RequestOutput(
                request_id=seq.request.request_id,
                token_ids=seq.pending_ids,
                text=text,
                finished=finished,
                finish_reason=seq.finish_reason,
                prompt_tokens=seq.num_prompt_tokens,
                completion_tokens=seq.num_resolved - seq.num_prompt_tokens,
                logprobs=seq.pending_logprobs,
                emitted_at=time.monotonic() if now is None else now,
            )
        )
        seq.pending_ids, seq.pending_logprobs = [], []
        if finished:
            seq.outputs.put(None)
