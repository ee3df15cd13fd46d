"""One training round: parent reference → LoRA training with replay → eval gate → publish or reject."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kiln_common.registry import EventType, Registry
from kiln_train.controls import CONTROL_PROMPTS
from kiln_train.evaluator import Reference, ReferenceCache, answer_controls, build_reference, gate
from kiln_train.pipeline import Example
from kiln_train.settings import TrainSettings
from kiln_train.trainer import LoraTrainer, TextPair, TrainerConfig, encode

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """Outcome of a round, as GetTrainingStatus reports it (and as it is logged in Redis)."""

    round_id: str
    tenant: str
    adapter: str
    parent_version: int
    version: int = 0
    outcome: str = "running"  # running, published, rejected, failed
    reason: str = ""
    num_samples: int = 0
    steps: int = 0
    max_steps: int = 0
    train_loss: float = 0.0
    eval: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    sample_ids: list[str] = field(default_factory=list)
    heldout_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def split_heldout(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic train/held-out split by sample-id hash; at least one of each from two samples up."""
    if len(examples) < 2 or fraction <= 0:
        return examples, []
    ranked = sorted(examples, key=lambda e: hashlib.sha256(e.sample_id.encode()).hexdigest())
    n_held = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = {e.sample_id for e in ranked[:n_held]}
    return [e for e in examples if e.sample_id not in held], [e for e in examples if e.sample_id in held]


def to_pair(e: Example) -> TextPair:
    """The trainer's view of an example."""
    return TextPair(e.completion, e.messages, e.prompt)


def controls_vet(
    trainer: LoraTrainer, reference: Reference, replay_index: dict[str, int]
) -> Callable[[], tuple[bool, list[int]]]:
    """A checkpoint vet: controls the parent answered correctly must still be; slipped ones get pinned."""
    was_correct = reference.control_correct()

    def controls_kept() -> tuple[bool, list[int]]:
        now = answer_controls(trainer)
        broken = [
            (c, a)
            for c, a, w in zip(CONTROL_PROMPTS, now, was_correct, strict=True)
            if w and not c.is_correct(a)
        ]
        for c, a in broken:
            log.info("checkpoint refused: %r -> %r (pinned into later batches)", c.prompt, a[:80])
        return not broken, [replay_index[c.prompt] for c, _ in broken if c.prompt in replay_index]

    return controls_kept


class RoundRunner:
    """Runs rounds over the shared base model and publishes passing versions through the registry."""

    def __init__(
        self,
        registry: Registry,
        tok: PreTrainedTokenizerBase,
        settings: TrainSettings,
        references: ReferenceCache,
    ) -> None:
        self.registry = registry
        self.tok = tok
        self.settings = settings
        self.references = references

    def run(
        self,
        base: PreTrainedModel,
        record: RoundRecord,
        examples: list[Example],
        on_progress: Callable[[RoundRecord], None],
        should_stop: Callable[[], bool],
    ) -> RoundRecord:
        """Train, gate and publish (or reject); fills and returns `record`. InterruptedError if stopped."""
        s, cfg = self.settings, self.settings.trainer
        tenant, adapter, parent = record.tenant, record.adapter, record.parent_version
        parent_dir = self.registry.store.version_dir(tenant, adapter, parent) if parent > 0 else None
        trainer = LoraTrainer(base, self.tok, cfg, parent_dir)
        try:
            reference = self._reference(trainer, record)
            train_ex, held_ex = split_heldout(examples, s.heldout_fraction)
            record.sample_ids = [e.sample_id for e in train_ex]
            record.heldout_ids = [e.sample_id for e in held_ex]
            record.num_samples = len(train_ex)
            record.max_steps = cfg.max_steps
            replay_pairs = reference.replay_pairs()
            replay = [encode(self.tok, p) for p in replay_pairs]
            replay_index = {p.messages[0][1]: i for i, p in enumerate(replay_pairs)}

            def step_done(step: int, loss: float) -> None:
                record.steps, record.train_loss = step, loss
                on_progress(record)

            vet = controls_vet(trainer, reference, replay_index) if s.vet_checkpoints else None
            result = trainer.train(
                [encode(self.tok, to_pair(e)) for e in train_ex],
                [encode(self.tok, to_pair(e)) for e in held_ex],
                replay,
                on_step=step_done,
                should_stop=should_stop,
                vet=vet,
                anchors=[replay_index[c.prompt] for c in CONTROL_PROMPTS if c.prompt in replay_index],
            )
            record.steps, record.train_loss = result.steps, result.train_loss
            verdict = gate(
                reference,
                answer_controls(trainer),
                result.heldout_before,
                result.heldout_after,
                s.min_heldout_improvement,
            )
            record.eval = dict(
                verdict.scores, best_step=float(result.best_step), train_seconds=result.seconds
            )
            if should_stop():
                raise InterruptedError("round stopped")
            if verdict.passed:
                record.version = self._publish(trainer, record, cfg)
                record.outcome = "published"
            else:
                self._reject(record, verdict.reason)
        finally:
            trainer.release()
        record.finished = time.time()
        return record

    def _reference(self, trainer: LoraTrainer, record: RoundRecord) -> Reference:
        """The parent's answers to the replay and control prompts (cached per version)."""
        tenant, adapter, parent = record.tenant, record.adapter, record.parent_version
        reference = self.references.get(tenant, adapter, parent)
        if reference is None:
            log.info("asking %s/%s@v%d the replay and control prompts", tenant, adapter, parent)
            reference = build_reference(trainer, self.settings.replay_max_tokens)
            self.references.put(tenant, adapter, parent, reference)
        return reference

    def _reject(self, record: RoundRecord, reason: str) -> None:
        record.outcome, record.reason = "rejected", reason
        self.registry.emit(
            EventType.REJECTED, record.tenant, record.adapter, record.parent_version, reason[:500]
        )
        log.warning("round %s for %s/%s rejected: %s", record.round_id, record.tenant, record.adapter, reason)

    def _publish(self, trainer: LoraTrainer, record: RoundRecord, cfg: TrainerConfig) -> int:
        with tempfile.TemporaryDirectory(prefix="kiln-round-") as tmp:
            out = trainer.save(Path(tmp) / "adapter")
            hyper: dict[str, object] = {
                **asdict(cfg),
                "round_id": record.round_id,
                "heldout_sample_ids": record.heldout_ids,
                "replay": "parent's own greedy answers to built-in general prompts",
            }
            meta = self.registry.publish(
                record.tenant,
                record.adapter,
                out,
                origin="trained",
                parent=record.parent_version,
                sample_ids=record.sample_ids,
                num_samples=len(record.sample_ids),
                hyperparameters=hyper,
                eval_scores=record.eval,
                promote=True,
            )
        log.info("round %s published %s/%s@v%d", record.round_id, record.tenant, record.adapter, meta.version)
        return meta.version


def new_round(tenant: str, adapter: str, parent: int) -> RoundRecord:
    """A fresh round record."""
    return RoundRecord(round_id=uuid.uuid4().hex[:12], tenant=tenant, adapter=adapter, parent_version=parent)
