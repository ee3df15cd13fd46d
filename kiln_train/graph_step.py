"""A round's training step as one CUDA graph: fixed shapes, replayed each step.

Beside serving on one GPU, an eager step of a few short rows is launch-bound: thousands of small kernels, each
waiting for the driver to switch the GPU back from serving's context. The H200 probe (docs/benchmarks.md,
`benchmarks/step_probe.py`) measured 1.43 s a step eager and 0.06-0.20 s as a graph beside the same load.

So on a GPU the whole step (zero the gradients, forward, loss, backward, clipping, AdamW) is captured once per
round over tensors of one shape and replayed: each step's rows are right-padded to the round's widest row
(padding is ignored by the labels and, with causal attention, by every real position, so no attention mask is
needed), and the divergence from the parent is computed densely with per-position weights instead of picking
positions, and the contrast rows' unlikelihood term likewise. `dense_loss` is the same loss as
`LoraTrainer._step_loss` (tests check they agree on a CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln_common.side_stream import side_stream
from kiln_train.distillation import completion_positions, rest_mass
from kiln_train.encoding import IGNORE, Encoded
from kiln_train.fact_tokens import unlikelihood, unlikelihood_weights
from kiln_train.null_space import NullSpace
from kiln_train.round_data import Rows
from kiln_train.settings import TrainerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossWeights:
    """The step loss's settings a captured graph bakes in (`TrainerConfig`'s kl_weight, anchor_weight,
    kl_top_k, unlikelihood_weight)."""

    kl: float
    anchor: float
    top_k: int
    unlikelihood: float

    @classmethod
    def of(cls, cfg: TrainerConfig) -> LossWeights:
        return cls(cfg.kl_weight, cfg.anchor_weight, cfg.kl_top_k, cfg.unlikelihood_weight)


@dataclass
class Slots:
    """One forward pass's inputs at a fixed shape: [rows, width] ids and labels, and the parent's top-k
    distributions at every predicting position ([rows, width - 1, k]) with weights (0 where none), and the
    unlikelihood term's weights ([rows, width - 1]: where a contrast row's next token is pushed down)."""

    ids: torch.Tensor
    labels: torch.Tensor
    target_ids: torch.Tensor
    target_logp: torch.Tensor
    weights: torch.Tensor
    unlikely: torch.Tensor
    ce: torch.Tensor  # [rows]: each row's cross-entropy weight

    @classmethod
    def empty(cls, rows: int, width: int, k: int, device: torch.device) -> Slots:
        long = torch.long
        return cls(
            torch.zeros((rows, width), dtype=long, device=device),
            torch.full((rows, width), IGNORE, dtype=long, device=device),
            torch.zeros((rows, width - 1, k), dtype=long, device=device),
            torch.zeros((rows, width - 1, k), dtype=torch.float32, device=device),
            torch.zeros((rows, width - 1), dtype=torch.float32, device=device),
            torch.zeros((rows, width - 1), dtype=torch.float32, device=device),
            torch.ones((rows,), dtype=torch.float32, device=device),
        )

    def fill(self, rows: Rows, pad_id: int) -> None:
        """Copy `rows` in (right-padded); positions without a parent distribution get weight 0.

        A row's divergence is the mean over its first n completion positions (n = its targets' length), and
        the pass's divergence the mean over the rows that have any: so weight = 1 / (n x rows with targets).
        """
        n_rows, width = self.ids.shape
        ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
        labels = torch.full((n_rows, width), IGNORE, dtype=torch.long)
        weights = torch.zeros((n_rows, width - 1), dtype=torch.float32)
        self.target_ids.zero_()
        self.target_logp.zero_()
        spans: list[tuple[int, torch.Tensor, int]] = []
        for r, (e, target) in enumerate(zip(rows.examples, rows.targets, strict=True)):
            ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids[:width])
            labels[r, : len(e.labels)] = torch.tensor(e.labels[:width])
            if target is None:
                continue
            pos = completion_positions(labels[r])
            n = min(len(pos), target.ids.shape[0])
            if n:
                spans.append((r, pos[:n], n))
        for r, pos, n in spans:
            weights[r, pos] = 1.0 / (n * len(spans))
            target = rows.targets[r]
            assert target is not None
            index = pos.to(self.ids.device)
            self.target_ids[r, index] = target.ids[:n]
            self.target_logp[r, index] = target.logp[:n].float()
        self.ids.copy_(ids)
        self.labels.copy_(labels)
        self.weights.copy_(weights)
        self.unlikely.copy_(unlikelihood_weights(rows.unlikely, width))
        ce = torch.ones(n_rows, dtype=torch.float32)
        ce[: len(rows.ce)] = torch.tensor(rows.ce, dtype=torch.float32)
        self.ce.copy_(ce)


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over a collated batch's labelled tokens, each row's tokens weighed by `ce[row]`
    (all ones: the model's own loss). The denominator counts every labelled token, so a row weighed 0 drops
    out without the other rows' tokens counting more."""
    return _mean_nll(torch.log_softmax(logits[:, :-1].float(), dim=-1), labels, ce)


def _mean_nll(log_q: torch.Tensor, labels: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """`weighted_ce` from the log-softmax at each predicting position ([rows, width - 1, vocab])."""
    shift = labels[:, 1:]
    valid = shift != IGNORE
    nll = -log_q.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * valid * ce.unsqueeze(-1)).sum() / valid.sum()


def pass_loss(model: torch.nn.Module, s: Slots, kl_weight: float, unlikelihood_weight: float) -> torch.Tensor:
    """Mean cross-entropy on the labelled tokens + kl_weight x the weighted divergence from the parent +
    unlikelihood_weight x the weighted unlikelihood of the contrast rows' fact tokens."""
    logits = model(input_ids=s.ids, use_cache=False).logits[:, :-1].float()
    log_q_all = torch.log_softmax(logits, dim=-1)  # [rows, width - 1, vocab]
    loss = _mean_nll(log_q_all, s.labels, s.ce)
    if unlikelihood_weight > 0:
        loss = loss + unlikelihood_weight * unlikelihood(log_q_all, s.ids, s.unlikely)
    if kl_weight <= 0:
        return loss
    log_q = log_q_all.gather(-1, s.target_ids)  # [rows, width - 1, k]
    log_p = s.target_logp
    p_rest = rest_mass(log_p)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) + p_rest * (p_rest.log() - rest_mass(log_q).log())
    return loss + kl_weight * (kl * s.weights).sum()


def dense_loss(
    model: torch.nn.Module, batch: Slots, anchors: Slots | None, weights: LossWeights
) -> torch.Tensor:
    """One step's loss over fixed-shape slots: the batch, plus anchor_weight x the anchors' own loss."""
    loss = pass_loss(model, batch, weights.kl, weights.unlikelihood)
    if anchors is not None:
        loss = loss + weights.anchor * pass_loss(model, anchors, weights.kl, weights.unlikelihood)
    return loss


def width_of(examples: list[Encoded], multiple: int = 16, wider: int = 0) -> int:
    """The widest example's length (or `wider` if more), rounded up to `multiple` (at least 2)."""
    widest = max([wider, *(len(e.input_ids) for e in examples)], default=2)
    return max(2, -(-widest // multiple) * multiple)


def optimiser_step(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor, space: NullSpace | None
) -> None:
    """backward → gradients projected by `space` → clipped to norm 1 → optimiser step → `space` projected:
    the same in an eager step and in a captured one."""
    loss.backward()
    if space is not None:
        space.project_gradients()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if space is not None:
        space.project()


class GraphedStep:
    """zero grads → forward → loss → backward → clip to norm 1 → AdamW, captured once, replayed per step.

    Capturing needs one real step first (cuBLAS workspaces, AdamW's state); its effect on the weights and the
    optimiser's state is undone before the first real step, so a graphed round trains exactly as many steps
    as an eager one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        opt: torch.optim.Optimizer,
        shapes: tuple[tuple[int, int], tuple[int, int]],  # (rows, width) of the batch and of the anchors
        weights: LossWeights,
        first: tuple[Rows, Rows],
        pad_id: int,
        space: NullSpace | None = None,
    ) -> None:
        device = params[0].device
        (b_rows, b_width), (a_rows, a_width) = shapes
        self.shapes, self.weights = shapes, weights
        self.pad_id, self.space = pad_id, space  # the space's projections are captured with the step
        self.model, self.params, self.opt = model, params, opt
        self.batch = Slots.empty(b_rows, b_width, weights.top_k, device)
        self.anchors = Slots.empty(a_rows, a_width, weights.top_k, device) if a_rows else None
        self._fill(*first)
        saved = [p.detach().clone() for p in params]
        t = time.monotonic()
        try:
            with side_stream(device):
                self._body()
        finally:
            _undo(params, saved, opt)
        torch.cuda.synchronize(device)
        self.timings = {"warm_up_s": time.monotonic() - t}
        t = time.monotonic()
        self.graph, self.loss = capture(self._body, device)
        self.timings["capture_s"] = time.monotonic() - t
        t = time.monotonic()
        self.graph.replay()  # the first replay uploads the graph; its step is undone like the warm-up's
        torch.cuda.synchronize(device)
        _undo(params, saved, opt)
        self.timings["first_replay_s"] = time.monotonic() - t
        log.info("step captured as a CUDA graph: %s", {k: round(v, 3) for k, v in self.timings.items()})

    def fits(
        self,
        params: list[torch.nn.Parameter],
        cfg: TrainerConfig,
        shapes: tuple[tuple[int, int], ...],
        space: NullSpace | None = None,
    ) -> bool:
        """Whether a round with these parameters, settings and shapes can replay this graph: the same
        tensors, optimiser and loss settings, null-space constraint and row counts, rows no wider."""
        same = len(params) == len(self.params) and space is self.space
        same_params = same and all(a is b for a, b in zip(params, self.params, strict=True))
        settings = self.weights == LossWeights.of(cfg) and self.opt.defaults["lr"] == cfg.lr
        rows = all(
            want[0] == have[0] and want[1] <= have[1] for want, have in zip(shapes, self.shapes, strict=True)
        )
        return same_params and settings and rows

    @torch.no_grad()
    def reset(self) -> None:
        """A new round from the parameters' current values: the optimiser's state zeroed in place."""
        _zero_state(self.opt)

    def _fill(self, batch: Rows, anchored: Rows) -> None:
        self.batch.fill(batch, self.pad_id)
        if self.anchors is not None:
            self.anchors.fill(anchored, self.pad_id)

    def _body(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=False)
        loss = dense_loss(self.model, self.batch, self.anchors, self.weights)
        optimiser_step(self.opt, self.params, loss, self.space)
        return loss.detach()

    def __call__(self, batch: Rows, anchored: Rows) -> float:
        """One optimiser step on these rows; returns its loss."""
        self._fill(batch, anchored)
        self.graph.replay()
        return float(self.loss)


def capture(
    body: Callable[[], torch.Tensor], device: torch.device, stream: torch.cuda.Stream | None = None
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`body` captured as a CUDA graph on a side stream (`stream`, else a new one), and the tensor it returns
    (refilled by each replay). A graph's kernels keep the context of the stream they were captured on.

    Not `torch.cuda.graph(...)`: that context first synchronises the device, collects garbage and empties the
    allocator's cache, which beside serving costs seconds (every freed block must be allocated again).
    """
    graph = torch.cuda.CUDAGraph()
    with side_stream(device, stream):
        graph.capture_begin()
        try:
            out = body()
        finally:
            graph.capture_end()
    return graph, out


@torch.no_grad()
def _undo(params: list[torch.nn.Parameter], saved: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """The weights back as saved and the optimiser's state zeroed in place (the graph keeps its addresses)."""
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)
    _zero_state(opt)


@torch.no_grad()
def _zero_state(opt: torch.optim.Optimizer) -> None:
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()


def round_shapes(
    steps: list[tuple[Rows, Rows]], multiple: int = 16, wider: int = 0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, width) of the batch and of the anchors for a round whose steps' rows are `steps`.

    Widths are the widest row over all the steps (at least `wider`), rounded up to `multiple`; ValueError if
    the steps differ in row counts.
    """
    counts = {(len(b.examples), len(a.examples)) for b, a in steps}
    if len(counts) != 1:
        raise ValueError(f"steps differ in rows per pass: {sorted(counts)}")
    ((b_rows, a_rows),) = counts
    b_width = width_of([e for b, _ in steps for e in b.examples], multiple, wider)
    a_width = width_of([e for _, a in steps for e in a.examples], multiple, wider)
    return (b_rows, b_width), (a_rows, a_width)


def graphed(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    cfg: TrainerConfig,
    steps: list[tuple[Rows, Rows]],
    pad_id: int,
    shapes: tuple[tuple[int, int], tuple[int, int]] | None = None,
    space: NullSpace | None = None,
) -> GraphedStep:
    """A GraphedStep for a round whose steps' rows are `steps` (every step has the same row counts), at
    `shapes` (default: `round_shapes(steps)`), projected by `space`; ValueError if the row counts differ."""
    shapes = shapes or round_shapes(steps)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, capturable=True)
    return GraphedStep(model, params, opt, shapes, LossWeights.of(cfg), steps[0], pad_id, space)


class GraphedForward:
    """The model's logits for up to `rows` right-padded rows of up to `width` tokens, as a CUDA graph.

    A round's evaluations (vetting losses, the parent's distributions, the gate's losses and log-likelihoods)
    are a dozen forward passes of the same few shapes; eager, each waits for the GPU thousands of times beside
    serving. One graph over the largest shape serves them all: inputs are padded to it, and causal attention
    keeps padding after a row's end from changing its real positions. The logits returned are a view of the
    graph's output buffer, valid until the next call.
    """

    def __init__(self, model: torch.nn.Module, rows: int, width: int, pad_id: int) -> None:
        device = next(model.parameters()).device
        self.model, self.rows, self.width, self.pad_id = model, rows, width, pad_id
        self.ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        with side_stream(device), torch.no_grad():
            self._logits()
        with torch.no_grad():
            self.graph, self.logits = capture(self._logits, device)

    def _logits(self) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids=self.ids, use_cache=False).logits
        return out

    def fits(self, input_ids: torch.Tensor) -> bool:
        """Whether a [rows, width] batch fits the captured shape."""
        return input_ids.shape[0] <= self.rows and input_ids.shape[1] <= self.width

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [n, w, vocab] of right-padded `input_ids` [n, w] (n <= rows, w <= width)."""
        n, w = input_ids.shape
        self.ids.fill_(self.pad_id)
        self.ids[:n, :w].copy_(input_ids)
        self.graph.replay()
        return self.logits[:n, :w]
