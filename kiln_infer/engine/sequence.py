"""One request's mutable state inside the engine."""

from __future__ import annotations

import enum
import queue
import time
from dataclasses import dataclass, field

from kiln_infer.engine.types import EngineRequest, FinishReason, RequestOutput, TokenLogprob
from kiln_infer.lora.peft_loader import LoraWeights


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens, KV blocks, adapter slot, and streaming state of one request."""

    request: EngineRequest
    seed: int  # sampling noise is a pure function of (seed, position): batch composition cannot change it
    arrival: int  # admission order, lower = older
    queued_at: float = field(default_factory=time.monotonic)  # when it joined the waiting queue
    lora: LoraWeights | None = None
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_resolved: int = 0  # leading token_ids known on the host (a newer one may still be on the device)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    lora_slot: int = -1  # device slot while running, -1 = base model
    finish_reason: FinishReason | None = None
    # detokenizer state
    text: str = ""  # all output text so far; kept only for requests with stop strings
    sent_chars: int = 0  # leading chars of `text` already streamed
    unsent_text: str = ""  # new text not yet streamed, for requests without stop strings
    prefix_offset: int = 0
    read_offset: int = 0
    utf8_tail: bytes = b""  # incomplete UTF-8 held back by the byte-level fast path of the detokenizer
    pending_ids: list[int] = field(default_factory=list)  # new tokens not yet streamed
    pending_logprobs: list[tuple[TokenLogprob, list[TokenLogprob]]] = field(default_factory=list)
    outputs: queue.SimpleQueue[RequestOutput | None] = field(default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_token_ids)
        self.num_prompt_tokens = self.num_resolved = len(self.token_ids)

    @property
    def request_id(self) -> str:
        """The request's external id."""
        return self.request.request_id

    @property
    def adapter_key(self) -> str:
        """Prefix-cache namespace: the pinned adapter version, "" for the base model."""
        return self.request.adapter.key if self.request.adapter is not None else ""

    @property
    def background(self) -> bool:
        """A background request: admitted only when no other request waits."""
        return self.request.background

    @property
    def output_ids(self) -> list[int]:
        """Generated tokens so far."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose K/V still have to be computed before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """True once the sequence has stopped."""
        return self.status == SequenceStatus.FINISHED
