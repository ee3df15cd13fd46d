"""LoRA SFT on the shared frozen base: replay-mixed batches, completion-only loss, early stopping."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kiln_common.peft_format import WEIGHTS_FILE, read_peft_config
from kiln_train.anchor_watch import AnchorWatch
from kiln_train.distillation import ParentTargets, divergence
from kiln_train.encoding import IGNORE, Encoded, TextPair, collate, encode
from kiln_train.fact_tokens import token_margins, unlikelihood, unlikelihood_weights, worst_fact_margin
from kiln_train.graph_step import GraphedForward, optimiser_step, weighted_ce
from kiln_train.greedy import greedy_answers
from kiln_train.null_space import NullSpace
from kiln_train.round_data import Draw, RoundData, Rows, batch_rows, draw, drawn_targets
from kiln_train.settings import TrainerConfig
from kiln_train.train_progress import (
    Candidate,
    Clock,
    Progress,
    TrainResult,
    Vet,
    facts_learned,
    pick,
    plan_steps,
    train_result,
)
from kiln_train.workspace import LoraShape, LoraWorkspace, trainable

__all__ = ["Encoded", "LoraTrainer", "RoundData", "TextPair", "TrainResult", "TrainerConfig", "encode"]

log = logging.getLogger(__name__)
EVAL_WIDTH = 256  # tokens per row of the graphed evaluation pass; longer rows are evaluated eagerly


def _anchor_width(data: RoundData) -> int:
    """The widest anchor row: a step's anchor slots must fit any anchor the watch may pin into them."""
    return max((len(data.replay[i].input_ids) for i in data.anchors), default=0)


def _optimise(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor, space: NullSpace | None
) -> float:
    """One optimiser step on `loss` (gradients projected by `space`, then clipped to norm 1); returns it."""
    opt.zero_grad(set_to_none=True)
    optimiser_step(opt, params, loss, space)
    return float(loss.detach())


class LoraTrainer:
    """Wraps the frozen base in a fresh PEFT LoRA (optionally loaded from a parent version) for one round."""

    def __init__(
        self,
        base: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        cfg: TrainerConfig,
        parent_dir: Path | None = None,
        workspace: LoraWorkspace | None = None,
    ) -> None:
        self.tok = tok
        self.cfg = cfg
        self.device = next(base.parameters()).device
        # rows per evaluation pass: beside serving, eager GPU passes do best with few large kernels (32 rows);
        # a graphed pass is cheap per call (8 rows: no padding a 2-row vetting set to 32); 8 on a CPU too
        eager_gpu = self.device.type == "cuda" and not cfg.cuda_graphs
        self.eval_batch = 32 if eager_gpu else 8
        rank, alpha, targets = float(cfg.rank), float(cfg.alpha), cfg.targets()
        if parent_dir is not None:  # a child keeps its parent's shape, whatever the settings say now
            shape = read_peft_config(parent_dir, max_rank=1 << 16)
            rank, alpha, targets = shape.rank, shape.alpha, shape.target_modules
        self.workspace = workspace or LoraWorkspace()
        lora = LoraShape(int(rank), float(alpha), tuple(sorted(targets)))
        self.model: PeftModel = self.workspace.checkout(base, lora, cfg.seed)
        if parent_dir is not None:
            state = load_file(str(parent_dir / WEIGHTS_FILE), device=str(self.device))
            # in place (load_state_dict copies): a shared workspace's graphs keep the parameters' addresses
            result = set_peft_model_state_dict(self.model, {k: v.float() for k, v in state.items()})
            unexpected = list(getattr(result, "unexpected_keys", None) or [])
            if unexpected:
                raise ValueError(f"parent adapter {parent_dir} has unexpected keys {unexpected[:3]}")
            log.info("continuing from parent adapter %s", parent_dir)
        self.model.eval()
        self.fresh = parent_dir is None  # starts at the initial weights (null_space.py projects them too)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of right-padded rows: a replayed CUDA graph's on a GPU when they fit (valid until the next
        call), else the eager pass's. The workspace's `before_pass` runs first (the governor's pacing)."""
        ws = self.workspace
        ws.before_pass()
        if (
            ws.forward is None
            and not ws.forward_failed
            and self.cfg.cuda_graphs
            and self.device.type == "cuda"
        ):
            try:
                ws.forward = GraphedForward(
                    self.model, self.eval_batch, EVAL_WIDTH, self.tok.pad_token_id or 0
                )
            except RuntimeError as exc:
                ws.forward_failed = True
                log.warning("evaluating eagerly: the forward pass could not be captured (%s)", exc)
        if ws.forward is not None and ws.forward.fits(input_ids):
            return ws.forward(input_ids)
        out: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out

    def trainable(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters (everything else is frozen)."""
        return trainable(self.model)

    def release(self) -> PreTrainedModel:
        """Done with the round: hand back the base model, computing as the untouched base (a shared
        workspace keeps its LoRA layers, at their fresh zero-effect weights; any other is unwrapped)."""
        return self.workspace.checkin()

    def loss(self, data: list[Encoded]) -> float:
        """Mean completion-token loss over `data` (token-weighted)."""
        return self.vetting_scores(data, [])[0]

    @torch.no_grad()
    def vetting_scores(self, data: list[Encoded], facts: list[list[int]]) -> tuple[float, float]:
        """Mean completion-token loss over `data` (token-weighted) and, in the same pass, the worst margin
        of a fact token (`facts[i]`: example i's fact tokens, as indices of its completion tokens; inf when
        none are given). Positive: greedy decoding, forced along the answers, says every fact.
        """
        self.model.eval()
        total, count, worst = 0.0, 0, float("inf")
        batch_size = self.eval_batch
        for i in range(0, len(data), batch_size):
            batch = collate(data[i : i + batch_size], self.tok.pad_token_id or 0, self.device)
            logits = self.logits(batch["input_ids"], batch["attention_mask"])
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
            rows = facts[i : i + batch_size]
            if any(rows):
                margins = token_margins(logits, batch["labels"])
                for row, mask, positions in zip(margins, shift_labels != IGNORE, rows, strict=False):
                    worst = min(worst, worst_fact_margin(row[mask], positions))
        return total / max(count, 1), worst

    def token_logprobs(self, data: list[Encoded]) -> list[torch.Tensor]:
        """Per example, teacher-forced: each completion token's log-probability, [n_completion_tokens]."""
        return self._per_token(data, margins=False)

    def completion_margins(self, data: list[Encoded]) -> list[torch.Tensor]:
        """Per example, teacher-forced: each completion token's margin over the best other token."""
        return self._per_token(data, margins=True)

    @torch.no_grad()
    def _per_token(self, data: list[Encoded], margins: bool) -> list[torch.Tensor]:
        """Per example, each completion token's log-probability or margin (`token_margins`); an example
        without completion tokens gets an empty tensor and no forward pass."""
        self.model.eval()
        out = [torch.empty(0) for _ in data]
        todo = [i for i, e in enumerate(data) if any(t != IGNORE for t in e.labels)]
        for start in range(0, len(todo), self.eval_batch):
            rows = todo[start : start + self.eval_batch]
            batch = collate([data[i] for i in rows], self.tok.pad_token_id or 0, self.device)
            logits = self.logits(batch["input_ids"], batch["attention_mask"])
            labels = batch["labels"][:, 1:]
            if margins:
                picked = token_margins(logits, batch["labels"])
            else:
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [batch, seq]
            for i, row, mask in zip(rows, picked, labels != IGNORE, strict=True):
                out[i] = row[mask].cpu()
        return out

    def generate(self, prompts: list[TextPair], max_new_tokens: int) -> list[str]:
        """Greedy completions of `prompts` by the current weights (greedy.py)."""
        return greedy_answers(self.model, self.tok, self.device, prompts, max_new_tokens)

    @torch.no_grad()
    def next_token_logprobs(self, texts: list[str]) -> list[torch.Tensor]:
        """Per text: log-softmax of the next-token logits at every position, [n_tokens, vocab]."""
        self.model.eval()
        ids = [list(self.tok(text).input_ids) for text in texts]  # one right-padded pass: causal, so exact
        width, pad = max((len(x) for x in ids), default=0), self.tok.pad_token_id or 0
        if not ids:
            return []
        batch = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
        logits = self.logits(batch, mask).float()
        return [torch.log_softmax(logits[i, : len(x)], dim=-1) for i, x in enumerate(ids)]

    def train(
        self,
        data: RoundData,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        vet: Vet | None = None,
    ) -> TrainResult:
        """Optimise LoRA on `data.train` mixed with replay and negatives; keep the best vetted checkpoint.

        Steps follow the data (`plan_steps`); every `eval_every` steps the vetting loss is measured, each new
        best a candidate. With `fact_margin`, every step measures the vetting pairs' fact tokens too and stops
        at the first whose worst margin reaches it (vetted first); else training stops when the vetting loss
        has not improved for `patience` evaluations, at the planned steps, or when `time_budget_s` is spent.
        Candidates are vetted lazily, lowest loss first; the first `vet` accepts is kept (else the parent).
        `anchors` (replay indices): a loss term of their own every step, and watched (anchor_watch.py)."""
        cfg, rng, params, sizes = self.cfg, random.Random(self.cfg.seed), self.trainable(), self._sizes(data)
        planned = plan_steps(data.samples, sizes[0], cfg)
        clock = Clock()
        order: list[int] = []
        draws = [draw(data, order, rng, sizes) for _ in range(planned)]
        with clock("setup"):
            space = self._null_space(data)
            before, margin = self.vetting_scores(data.vetting, data.vetting_facts)
            progress = Progress(before, [p.detach().clone() for p in params], before, margin, margin)
            targets = self._parent_targets(data, draws)
            rows = [batch_rows(data, d, targets, *self._ce_weights()) for d in draws]
            watch = AnchorWatch(self.completion_margins, data, rows, targets[0]) if cfg.pin_anchors else None
        with clock("capture"):
            optimise = self._stepper(params, rows, _anchor_width(data), space)
        step, stop_reason = 0, "planned steps done"
        for step in range(1, planned + 1):
            with clock("wait"):
                stopped = should_stop is not None and should_stop()
            if stopped:
                raise InterruptedError("round stopped")
            with clock("compute"):
                progress.losses.append(optimise(*rows[step - 1]))
            if on_step is not None:
                on_step(step, progress.losses[-1])
            scheduled = step % cfg.eval_every == 0 or step == planned
            # the facts are checked every step (one cheap pass): their margin rises fast, leaks follow it
            if scheduled or (cfg.fact_margin > 0 and any(data.vetting_facts)):
                with clock("eval"):
                    why = self._checkpoint(step, data, params, progress, scheduled, watch)
                    stop_reason = why or stop_reason
                if stop_reason != "planned steps done":
                    break
            if clock.elapsed() > cfg.time_budget_s:
                stop_reason = "time budget spent"
                with clock("eval"):
                    self._checkpoint(step, data, params, progress, True, watch)
                break
        with clock("vet"):
            pick(params, progress, vet, cfg.fact_margin)
        log.info(
            "stopped at step %d of %d (%s; kept step %d)", step, planned, stop_reason, progress.best_step
        )
        self.model.eval()
        kept_out = space.kept_out() if space is not None else 0.0
        return replace(train_result(step, planned, stop_reason, before, progress, clock), null_space=kept_out)

    def prepare(self, data: RoundData) -> None:
        """On a GPU, capture ahead what a round like `data` replays: the evaluation pass, and a step as wide
        as data's widest row (a shared workspace keeps both for later rounds). The weights are left as found;
        `data.train` must not be empty."""
        if not (self.cfg.cuda_graphs and self.device.type == "cuda"):
            return
        self.loss(data.vetting[:1] or data.train[:1])
        drawn = draw(data, [], random.Random(0), self._sizes(data))
        step = batch_rows(data, drawn, ([], []), *self._ce_weights())
        contrasts = [c.example for c in data.contrasts]
        wider = max(len(e.input_ids) for e in data.train + data.replay + data.negatives + contrasts)
        self._stepper(self.trainable(), [step], wider, self._null_space(data))

    def _stepper(
        self,
        params: list[torch.nn.Parameter],
        rows: list[tuple[Rows, Rows]],
        wider: int = 0,
        space: NullSpace | None = None,
    ) -> Callable[[Rows, Rows], float]:
        """One optimiser step on a step's rows (projected by `space`): a CUDA graph on a GPU, else eager."""
        if self.cfg.cuda_graphs and self.device.type == "cuda" and rows:
            try:
                return self.workspace.stepper(
                    params, self.cfg, rows, self.tok.pad_token_id or 0, wider, space
                )
            except (RuntimeError, ValueError) as exc:
                log.warning("training eagerly: the step could not be captured as a CUDA graph (%s)", exc)
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        return lambda batch, anchored: _optimise(opt, params, self._step_loss(batch, anchored), space)

    def _ce_weights(self) -> tuple[float, float]:
        """The cross-entropy weights of the replay rows and the anchor rows."""
        return self.cfg.replay_ce_weight, self.cfg.anchor_ce_weight

    def _null_space(self, data: RoundData) -> NullSpace | None:
        """The round's null-space constraint (`null_space_energy`), measured on the replay rows (and more)."""
        energy, pad, more = self.cfg.null_space_energy, self.tok.pad_token_id or 0, data.null_space_rows
        return self.workspace.null_space(data.replay, energy, pad, self.fresh, more) if energy > 0 else None

    def _sizes(self, data: RoundData) -> tuple[int, int, int, int, int]:
        """Rows per step: new samples, replay, negatives (one batch), anchors (their own term), and contrast
        rows (as many as negatives, beside the batch; none when the unlikelihood weight is 0)."""
        cfg = self.cfg
        n_replay = int(round(cfg.batch_size * cfg.replay_fraction)) if data.replay else 0
        n_neg = min(cfg.negatives_per_step, len(data.negatives))
        n_contrasts = min(cfg.negatives_per_step, len(data.contrasts)) if cfg.unlikelihood_weight > 0 else 0
        n_new = max(1, cfg.batch_size - n_replay - n_neg)
        return n_new, n_replay, n_neg, cfg.anchors_per_step, n_contrasts

    def _parent_targets(
        self, data: RoundData, draws: list[Draw]
    ) -> tuple[list[ParentTargets | None], list[ParentTargets | None]]:
        """The parent's (the start's) top-k distributions on the drawn replay and the negative answers."""
        if self.cfg.kl_weight <= 0:
            return [], []
        pad = self.tok.pad_token_id or 0
        return drawn_targets(self.logits, data, draws, self.cfg.kl_top_k, pad, self.device, self.eval_batch)

    def _step_loss(self, batch: Rows, anchored: Rows) -> torch.Tensor:
        """One step's loss: the mixed batch, plus the anchors' own mean (not diluting new samples)."""
        self.model.train()
        loss = self._rows_loss(batch)
        if anchored.examples:
            loss = loss + self.cfg.anchor_weight * self._rows_loss(anchored)
        return loss

    def _rows_loss(self, rows: Rows) -> torch.Tensor:
        """Cross-entropy on the rows' completions, plus `kl_weight` x their divergence from the parent, plus
        `unlikelihood_weight` x the contrast rows' mean unlikelihood loss on their fact tokens.

        Contrast rows (short, unlabelled) take their own forward pass, not padded to the widest replay answer:
        the sum is the loss of one pass over every row. Each row's cross-entropy is weighed by `rows.ce`."""
        cfg = self.cfg
        pad = self.tok.pad_token_id or 0
        contrasts = [r for r, p in enumerate(rows.unlikely) if p] if cfg.unlikelihood_weight > 0 else []
        plain = [r for r in range(len(rows.examples)) if r not in contrasts]
        batch = collate([rows.examples[r] for r in plain], pad, self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce = torch.tensor([rows.ce[r] for r in plain], device=self.device)
        loss = weighted_ce(out.logits, batch["labels"], ce)  # all weights 1: the model's own mean loss
        if cfg.kl_weight > 0:
            drift = divergence(out.logits, batch["labels"], [rows.targets[r] for r in plain])
            loss = loss if drift is None else loss + cfg.kl_weight * drift
        if contrasts:
            short = collate([rows.examples[r] for r in contrasts], pad, self.device)
            ids = short["input_ids"]
            logits = self.model(input_ids=ids, attention_mask=short["attention_mask"]).logits
            log_q = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            weights = unlikelihood_weights([rows.unlikely[r] for r in contrasts], ids.shape[1])
            loss = loss + cfg.unlikelihood_weight * unlikelihood(log_q, ids, weights.to(self.device))
        return loss

    def _checkpoint(
        self,
        step: int,
        data: RoundData,
        params: list[torch.nn.Parameter],
        progress: Progress,
        scheduled: bool = True,
        watch: AnchorWatch | None = None,
    ) -> str:
        """Evaluate; keep a better checkpoint (lower vetting loss, or its facts learned) as a candidate;
        return why training should stop now, or "". Unscheduled (between `eval_every` steps), only the
        facts are judged: the vetting loss's patience counts scheduled evaluations. With a slipped anchor
        (`watch`) the facts are not learned yet, and the checkpoint ranks last (anchor_watch.py)."""
        cfg = self.cfg
        loss, margin = self.vetting_scores(data.vetting, data.vetting_facts)
        progress.evaluations.append((step, loss, margin))
        progress.margin = margin
        slipped = watch.check(step) if watch is not None else 0
        progress.anchors_pinned = len(watch.pinned) if watch is not None else 0
        line = "step %d: train loss %.4f, vetting loss %.4f, worst fact-token margin %.2f, anchors slipped %d"
        log.info(line, step, progress.losses[-1], loss, margin, slipped)
        improved = scheduled and loss < progress.best * (1.0 - cfg.min_rel_improvement)
        learned = facts_learned(margin, cfg.fact_margin) and not slipped
        if improved or learned:
            state = [p.detach().clone() for p in params]
            progress.candidates.append(Candidate(loss, margin, step, state, slipped))
        if improved:
            progress.best, progress.bad_evals = loss, 0
        elif scheduled:
            progress.bad_evals += 1
        if learned:
            return "fact tokens learned"
        if progress.bad_evals >= cfg.patience:
            return "vetting loss converged"
        return "vetting loss reached the target" if progress.best <= cfg.target_loss else ""

    def save(self, out: Path) -> Path:
        """Write the adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(str(out), safe_serialization=True)
        return out
