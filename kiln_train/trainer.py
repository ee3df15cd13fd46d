"""LoRA SFT on the shared frozen base: replay-mixed batches, completion-only loss, early stopping."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kiln_common.lora_targets import TARGET_MODULES
from kiln_common.peft_format import WEIGHTS_FILE
from kiln_common.prompt import chat_text, prompt_token_ids
from kiln_train.settings import TrainerConfig

__all__ = ["Encoded", "LoraTrainer", "TextPair", "TrainResult", "TrainerConfig", "collate", "encode"]

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class TextPair:
    """A prompt (chat turns, or raw text when `messages` is empty) and the completion to learn."""

    completion: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + completion; labels are IGNORE on the prompt (loss only on the completion)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    train_loss: float
    heldout_before: float
    heldout_after: float
    best_step: int
    seconds: float
    losses: list[float] = field(default_factory=list)


@dataclass
class _Progress:
    """A run's best checkpoint so far, evaluations since it improved, and the anchors pinned by vetting."""

    best: float  # held-out loss of `state`
    state: list[torch.Tensor]  # the LoRA parameters at the best step
    best_step: int = 0
    bad_evals: int = 0
    pinned: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _optimise(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor) -> float:
    """One optimiser step on `loss` (gradients clipped to norm 1); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def _restore(params: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    """Copy a saved checkpoint back into the parameters."""
    for p, saved in zip(params, state, strict=True):
        p.copy_(saved)


def prompt_ids(tok: PreTrainedTokenizerBase, pair: TextPair) -> list[int]:
    """The prompt's token ids exactly as the server renders them."""
    return prompt_token_ids(tok, pair.prompt, pair.messages)


def encode(tok: PreTrainedTokenizerBase, pair: TextPair, max_len: int = 1024) -> Encoded:
    """Prompt + completion + end-of-turn tokens, with the prompt masked out of the labels."""
    prompt = prompt_ids(tok, pair)
    completion = tok(pair.completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    full = prompt + completion
    if pair.messages:
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


class LoraTrainer:
    """Wraps the frozen base in a fresh PEFT LoRA (optionally loaded from a parent version) for one round."""

    def __init__(
        self,
        base: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        cfg: TrainerConfig,
        parent_dir: Path | None = None,
    ) -> None:
        self.tok = tok
        self.cfg = cfg
        self.device = next(base.parameters()).device
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=list(TARGET_MODULES),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(cfg.seed)
        self.model: PeftModel = get_peft_model(base, lora)  # type: ignore[assignment]
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # LoRA in fp32 even over a bf16 base
        if parent_dir is not None:
            state = load_file(str(parent_dir / WEIGHTS_FILE), device=str(self.device))
            result = set_peft_model_state_dict(self.model, {k: v.float() for k, v in state.items()})
            unexpected = list(getattr(result, "unexpected_keys", None) or [])
            if unexpected:
                raise ValueError(f"parent adapter {parent_dir} has unexpected keys {unexpected[:3]}")
            log.info("continuing from parent adapter %s", parent_dir)
        self.model.eval()

    def trainable(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters (everything else is frozen)."""
        return [p for n, p in self.model.named_parameters() if p.requires_grad]

    def release(self) -> PreTrainedModel:
        """Remove the LoRA layers and hand back the untouched base model."""
        return self.model.unload()  # type: ignore[no-any-return]

    @torch.no_grad()
    def loss(self, data: list[Encoded], batch_size: int = 8) -> float:
        """Mean completion-token loss over `data` (token-weighted)."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(data), batch_size):
            batch = collate(data[i : i + batch_size], self.tok.pad_token_id or 0, self.device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = batch["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            total += float(ce)
            count += int((shift_labels != IGNORE).sum())
        return total / max(count, 1)

    @torch.no_grad()
    def generate(self, prompts: list[TextPair], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """Greedy completions of `prompts` by the current weights (left-padded batches)."""
        self.model.eval()
        out: list[str] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for i in range(0, len(prompts), batch_size):
            ids = [prompt_ids(self.tok, p) for p in prompts[i : i + batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
            gen = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            out.extend(str(self.tok.decode(g[width:], skip_special_tokens=True)).strip() for g in gen)
        return out

    def _completion_logits(self, data: list[Encoded]) -> list[torch.Tensor]:
        """Per example: logits predicting each completion token, [n_completion_tokens, vocab]."""
        batch = collate(data, self.tok.pad_token_id or 0, self.device)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["labels"][:, 1:] != IGNORE
        return [logits[i, :-1][mask[i]].float() for i in range(len(data))]

    @torch.no_grad()
    def teacher_targets(self, replay: list[Encoded], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The current (parent) weights' top-k next-token distribution on each replay completion."""
        self.model.eval()
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(0, len(replay), 8):
            for logits in self._completion_logits(replay[i : i + 8]):
                top = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # [n, k]
                out.append((top.indices, top.values / top.values.sum(-1, keepdim=True)))
        return out

    def _distill_loss(
        self, data: list[Encoded], targets: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy against the parent's top-k distribution (KL up to a constant), and its count."""
        total, count = None, 0
        for logits, (idx, probs) in zip(self._completion_logits(data), targets, strict=True):
            logq = torch.log_softmax(logits, dim=-1).gather(-1, idx)  # [n, k]
            term = -(probs * logq).sum()
            total = term if total is None else total + term
            count += idx.shape[0]
        assert total is not None
        return total / max(count, 1), count

    def train(
        self,
        train: list[Encoded],
        heldout: list[Encoded],
        replay: list[Encoded],
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        vet: Callable[[], tuple[bool, list[int]]] | None = None,
        anchors: list[int] | None = None,
    ) -> TrainResult:
        """Optimise LoRA on `train` mixed with `replay`; keep the weights with the best held-out loss.

        `anchors` (replay indices, e.g. the control prompts) get their own loss term every step:
        `anchors_per_step` of them at random, plus every pinned one. `vet` (e.g. "the controls are still
        answered correctly") checks each new best checkpoint and returns (accepted, replay indices that
        slipped); a refused checkpoint counts as no improvement and the slipped examples are pinned.
        """
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        params = self.trainable()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        n_replay = int(round(cfg.batch_size * cfg.replay_fraction)) if replay else 0
        n_new = max(1, cfg.batch_size - n_replay)
        eval_set = heldout or train
        t0 = time.monotonic()
        targets = self.teacher_targets(replay, cfg.kl_topk) if n_replay and cfg.kl_topk > 0 else None
        before = self.loss(eval_set)
        progress = _Progress(best=before, state=[p.detach().clone() for p in params])
        pool = [i for i in (anchors or []) if 0 <= i < len(replay)]
        order: list[Encoded] = []
        step = 0
        for step in range(1, cfg.max_steps + 1):
            if should_stop is not None and should_stop():
                raise InterruptedError("round stopped")
            if len(order) < n_new:
                order += rng.sample(train, len(train))
            batch = [order.pop() for _ in range(n_new)]
            picked = rng.sample(range(len(replay)), min(n_replay, len(replay)))
            anchored = rng.sample(pool, min(cfg.anchors_per_step, len(pool)))
            anchored += [i for i in progress.pinned if i not in anchored]
            loss = self._step_loss(batch, replay, picked, targets, anchored)
            progress.losses.append(_optimise(opt, params, loss))
            if on_step is not None:
                on_step(step, progress.losses[-1])
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                if self._checkpoint(step, eval_set, params, progress, vet, len(replay)):
                    log.info("early stop at step %d (best step %d)", step, progress.best_step)
                    break
        _restore(params, progress.state)
        self.model.eval()
        return TrainResult(
            steps=step,
            train_loss=progress.losses[-1] if progress.losses else 0.0,
            heldout_before=before,
            heldout_after=progress.best,
            best_step=progress.best_step,
            seconds=time.monotonic() - t0,
            losses=progress.losses,
        )

    def _step_loss(
        self,
        batch: list[Encoded],
        replay: list[Encoded],
        picked: list[int],
        targets: list[tuple[torch.Tensor, torch.Tensor]] | None,
        anchored: list[int],
    ) -> torch.Tensor:
        """One step's loss: new samples with replay (as labels, or distilled), plus the anchors' own mean."""
        cfg = self.cfg
        self.model.train()
        if targets is None:  # plain replay: the parent's greedy answers as ordinary labels
            batch = batch + [replay[i] for i in picked]
        tensors = collate(batch, self.tok.pad_token_id or 0, self.device)
        loss = self.model(**tensors).loss
        if targets is not None and picked:
            # Token-weighted like plain replay, so the new samples do not get a larger share of the step.
            n_tok = int((tensors["labels"][:, 1:] != IGNORE).sum())
            kl, n_kl = self._distill_loss([replay[i] for i in picked], [targets[i] for i in picked])
            loss = (loss * n_tok + cfg.kl_weight * kl * n_kl) / (n_tok + n_kl)
        if anchored:  # a separate mean, so anchoring does not dilute the new samples' share
            anchor_batch = collate([replay[i] for i in anchored], self.tok.pad_token_id or 0, self.device)
            loss = loss + cfg.anchor_weight * self.model(**anchor_batch).loss
        return loss  # type: ignore[no-any-return]

    def _checkpoint(
        self,
        step: int,
        eval_set: list[Encoded],
        params: list[torch.nn.Parameter],
        progress: _Progress,
        vet: Callable[[], tuple[bool, list[int]]] | None,
        n_replay: int,
    ) -> bool:
        """Evaluate; keep a better (and vetted) checkpoint; True when patience has run out."""
        current = self.loss(eval_set)
        log.info("step %d: train loss %.4f, held-out loss %.4f", step, progress.losses[-1], current)
        accepted = True
        if current < progress.best and vet is not None:
            accepted, slipped = vet()
            progress.pinned += [i for i in slipped if i not in progress.pinned and 0 <= i < n_replay]
        if current < progress.best and accepted:
            progress.best, progress.best_step, progress.bad_evals = current, step, 0
            progress.state = [p.detach().clone() for p in params]
            return False
        progress.bad_evals += 1
        return progress.bad_evals >= self.cfg.patience

    def save(self, out: Path) -> Path:
        """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(str(out), safe_serialization=True)
        return out
