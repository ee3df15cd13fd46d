"""Turns sampled tokens into streamed outputs: detokenize, detect stops, emit RequestOutput increments."""

from __future__ import annotations

import time

from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.detokenizer import Detokenizer, find_stop, streamable_text
from kiln_infer.engine.sequence import Sequence, SequenceStatus
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
        seq.num_resolved = resolved = index + 1
        seq.pending_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        delta = self.detokenizer.append(seq, token)
        params = seq.request.sampling
        if params.stop:  # the whole text is kept only where a stop string may need to cut it
            seq.text += delta
            stop_at = find_stop(seq, len(delta))
            if stop_at >= 0:
                seq.text = seq.text[:stop_at]
                return FinishReason.STOP_STRING
        elif delta:
            seq.unsent_text += delta
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP
        if resolved - seq.num_prompt_tokens >= params.max_tokens or resolved >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def emit(seq: Sequence, now: float | None = None) -> None:
        """Push the sequence's new tokens and text to its stream (the final output carries the reason)."""
        finished = seq.status is SequenceStatus.FINISHED
        if seq.request.sampling.stop:
            text = streamable_text(seq, finished)
        else:
            text, seq.unsent_text = seq.unsent_text, ""
        if not (seq.pending_ids or text or finished):
            return
        seq.outputs.put(
            RequestOutput(
                seq.request.request_id,
                seq.pending_ids,
                text,
                finished,
                seq.finish_reason,
                seq.num_prompt_tokens,
                seq.num_resolved - seq.num_prompt_tokens,
                seq.pending_logprobs,
                time.monotonic() if now is None else now,
            )
        )
        seq.pending_ids, seq.pending_logprobs = [], []
        if finished:
            seq.outputs.put(None)
