"""The base model wrapped in LoRA layers, with its CUDA graphs: kept from round to round.

Wrapping the base (`get_peft_model`) and capturing a round's CUDA graphs cost seconds beside serving on a GPU:
on the H200, capturing one round's step took 4.2 s of a 16.8 s round. kiln-train's rounds share one
workspace (`shared=True`): the LoRA layers stay in the base between rounds, each round copies its starting
weights into the same parameters (a fresh adapter's initial weights, or its parent's), and the graphs captured
for one round are replayed by the next when its shapes fit. kiln-train captures them once before its first
round (`LoraTrainer.prepare`).

Between rounds the layers hold the fresh initial weights, whose B matrices are zero: the wrapped base then
computes exactly what the base computes. A round whose adapter has another shape (rank, alpha, target modules)
or a new base model (kiln-infer restarted) wraps afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from kiln_train.encoding import IGNORE, Encoded
from kiln_train.graph_step import GraphedForward, GraphedStep, graphed, round_shapes
from kiln_train.null_space import NullSpace, measure
from kiln_train.round_data import Rows
from kiln_train.settings import TrainerConfig

log = logging.getLogger(__name__)
WIDTH_MULTIPLE = 64  # a shared workspace's step graph pads rows to this multiple, so later rounds fit it


@dataclass(frozen=True)
class LoraShape:
    """What the LoRA layers look like: a workspace is reused only by rounds of the same shape."""

    rank: int
    alpha: float
    targets: tuple[str, ...]


class LoraWorkspace:
    """One wrapping of one base model, its fresh initial LoRA weights and its CUDA graphs."""

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared  # kept between rounds (else dropped when the trainer is released)
        self.model: PeftModel | None = None
        self._base: PreTrainedModel | None = None
        self._shape: LoraShape | None = None
        self._fresh: list[torch.Tensor] = []  # the initial LoRA weights (A random, B zero)
        self.forward: GraphedForward | None = None  # evaluation passes (GPU)
        self.forward_failed = False
        self.step: GraphedStep | None = None  # the last captured training step (GPU)
        self._space: NullSpace | None = None  # the last null-space constraint measured, and for which rows
        self._space_key = ""
        # called before each evaluation pass over the base (the gate's measures, vetting): the daemon sets
        # the governor's pacing here, so those passes yield to serving as training steps do
        self.before_pass: Callable[[], object] = bool

    def checkout(self, base: PreTrainedModel, shape: LoraShape, seed: int) -> PeftModel:
        """The wrapped base with fresh initial LoRA weights (wrapping it first if needed)."""
        if self.model is not None and self._base is base and self._shape == shape:
            torch.manual_seed(seed)  # the global generator as a fresh wrapping leaves it seeded
            restore_fresh(self.model, self._fresh)
            return self.model
        self.drop()
        lora = LoraConfig(
            r=shape.rank,
            lora_alpha=shape.alpha,  # type: ignore[arg-type]  # typed int, used as a float scale
            target_modules=list(shape.targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(seed)
        model: PeftModel = get_peft_model(base, lora)  # type: ignore[assignment]
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # LoRA in fp32 even over a bf16 base
        self.model, self._base, self._shape = model, base, shape
        self._fresh = [p.detach().clone() for p in trainable(model)]
        return model

    def checkin(self) -> PreTrainedModel:
        """A round is done: a shared workspace puts the fresh weights back (the base computes as the base);
        one that is not shared unwraps the base. Returns the base model."""
        model, base = self.model, self._base
        assert model is not None and base is not None, "checkin without checkout"
        if not self.shared:
            self.drop()
            return base
        restore_fresh(model, self._fresh)
        return base

    def drop(self) -> None:
        """Remove the LoRA layers from the base and forget the graphs (nothing if not wrapped)."""
        model = self.model
        self.model, self._base, self._shape, self._fresh = None, None, None, []
        self.forward, self.forward_failed, self.step = None, False, None
        self._space, self._space_key = None, ""
        if model is not None:
            model.unload()

    def stepper(
        self,
        params: list[torch.nn.Parameter],
        cfg: TrainerConfig,
        steps: list[tuple[Rows, Rows]],
        pad_id: int,
        wider: int = 0,
        space: NullSpace | None = None,
    ) -> GraphedStep:
        """A captured step for these steps' rows: the last one when the rows fit it (its optimiser state
        zeroed), else a new capture (padded to WIDTH_MULTIPLE when shared, and to at least `wider`)."""
        assert self.model is not None
        multiple = WIDTH_MULTIPLE if self.shared else 16
        shapes = round_shapes(steps, multiple, wider)
        step = self.step
        if step is not None and step.fits(params, cfg, shapes, space):
            step.reset()
            return step
        self.step = None  # its memory goes before the next capture takes more
        self.step = graphed(self.model, params, cfg, steps, pad_id, shapes, space)
        return self.step

    def null_space(
        self, rows: list[Encoded], energy: float, pad_id: int, fresh: bool, extra: list[Encoded] | None = None
    ) -> NullSpace | None:
        """The null-space constraint for the replay rows `rows`, restarted at the weights as they are now.

        Measured once per base model, energy and replay prompts (the rows' prompt tokens: a child's round,
        whose replayed answers are its parent's, reuses what its first round measured) and `extra` rows
        (null_space.measure), so a captured step keeps replaying it."""
        assert self.model is not None, "checkout first"
        prompts = [
            e.input_ids[: next((i for i, t in enumerate(e.labels) if t != IGNORE), len(e.labels))]
            for e in rows
        ]
        more = [[e.input_ids, e.labels] for e in extra or []]
        key = hashlib.sha256(json.dumps([energy, prompts, more]).encode()).hexdigest()
        if self._space is not None and self._space_key == key:
            self._space.restart(fresh)
            return self._space
        self._space, self._space_key = measure(self.model, rows, energy, pad_id, fresh, extra=extra), key
        return self._space


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (the LoRA layers; everything else is frozen)."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def restore_fresh(model: PeftModel, fresh: list[torch.Tensor]) -> None:
    """Copy the initial weights back in place (graphs keep the parameters' addresses)."""
    for p, f in zip(trainable(model), fresh, strict=True):
        p.copy_(f)
