"""Keep a round's LoRA updates out of the input directions that generic text uses (a null-space constraint).

A LoRA layer adds `B @ A @ x` to its base projection. When every row of `A`'s update is orthogonal to the
directions that the layer's inputs take on generic text, the update adds (nearly) nothing on that text: the
general answers the parent gives stay the parent's, near ties included, while a taught fact is learned
through the directions its own tokens use and generic text does not (the idea of null-space constrained
editing, as in AlphaEdit, applied to LoRA's `A`).

Before a round the replay rows (the parent's own answers to generic questions, trained on anyway) are run
through the model; each LoRA layer's input covariance is accumulated over their tokens, and its leading
eigenvectors, the fewest that hold `energy` of the total, are the kept-out directions `U`. Every step,
`A`'s gradient is projected out of `U` before the optimiser reads it, and after the step
`A <- A - ((A - A0) @ U) @ U.T`: only the update from the round's start `A0` is projected (a child keeps its
parent's weights as they are). A fresh adapter's random `A0` is projected too, so `B`'s update, which acts
through `A0`, is constrained with it. In a child's round `B`'s update acts through the parent's `A`, which
is not projected (the parent's behaviour is kept); it already reads none of the kept-out directions when the
parent's round was constrained by the same ones, and the measurement reads the base's inputs whatever
adapter is loaded, so they are the same after a restart too (the replay rows, the parent's answers, can
differ a little). A child of a parent trained otherwise (before the constraint, with another energy or
replay set, or uploaded) is only partly constrained. Projections that share their input (q, k and v;
gate and up) share one `U`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from kiln_train.encoding import IGNORE, Encoded, collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Directions:
    """Orthonormal columns spanning the kept-out directions of one input (`kept=False`), or, when that is
    smaller, spanning the directions left free (`kept=True`)."""

    basis: torch.Tensor  # (in_features, k)
    kept: bool

    def outside(self, t: torch.Tensor) -> torch.Tensor:
        """The part of `t`'s rows that lies in the kept-out directions."""
        inside = (t @ self.basis) @ self.basis.T
        return t - inside if self.kept else inside

    def kept_out(self) -> float:
        """The share of the input's dimensions kept out."""
        share = self.basis.shape[1] / self.basis.shape[0]
        return 1.0 - share if self.kept else share


@dataclass
class _Projected:
    """One LoRA `A` weight, its round-start value and the input directions its update stays out of."""

    weight: torch.Tensor
    start: torch.Tensor
    directions: Directions


class NullSpace:
    """The LoRA `A` weights of one round and, for each, the directions its update is kept out of."""

    def __init__(self, layers: list[_Projected]) -> None:
        self.layers = layers

    @torch.no_grad()
    def restart(self, fresh: bool) -> None:
        """A new round from the weights as they are now: its start is copied in place (a captured step keeps
        these tensors' addresses); `fresh` projects a fresh adapter's random `A` first."""
        for layer in self.layers:
            if fresh:
                layer.weight.sub_(layer.directions.outside(layer.weight))
            layer.start.copy_(layer.weight)

    @torch.no_grad()
    def project(self) -> None:
        """Remove the kept-out directions from every `A`'s update since the round's start."""
        for layer in self.layers:
            layer.weight.sub_(layer.directions.outside(layer.weight - layer.start))

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Remove the kept-out directions from every `A`'s gradient, before the optimiser reads it: Adam's
        moments then follow the free directions alone, whose steps are not scaled down by the projection
        that follows them (Adam is not rotation-invariant, so `project` still runs after the step)."""
        for layer in self.layers:
            grad = layer.weight.grad
            if grad is not None:
                grad.sub_(layer.directions.outside(grad))

    def kept_out(self) -> float:
        """The mean share of input dimensions kept out (a record of how tight the constraint is)."""
        shares = [layer.directions.kept_out() for layer in self.layers]
        return sum(shares) / max(len(shares), 1)


def lora_a_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each LoRA-wrapped projection (by name) whose adapter has an `A` weight."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def _lora_a(module: torch.nn.Module) -> torch.nn.Linear:
    """A LoRA-wrapped projection's adapter `A` (PEFT's `lora_A["default"]`)."""
    linear = module.lora_A["default"]  # type: ignore[index]
    assert isinstance(linear, torch.nn.Linear), type(linear)
    return linear


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    rows: list[Encoded],
    energy: float,
    pad_id: int,
    fresh: bool,
    batch: int = 8,
    budget_bytes: int = 1 << 30,
    extra: list[Encoded] | None = None,
) -> NullSpace | None:
    """The null-space constraint for `model`'s LoRA layers from the inputs they see on `rows` (None without
    rows). `fresh`: the adapter starts at its initial weights, whose random `A` is projected too.

    `extra` rows are measured apart, only at their labelled positions (the rest is context), and their own
    leading directions (the same `energy`) are kept out as well: the union of both subspaces. Apart, because
    in one sum a prefix every row shares (a chat template's system turn) takes most of the energy, and 95% of
    it would then keep fewer directions out, not more.

    The layers' covariances are accumulated in chunks of at most `budget_bytes` (one pass over the rows per
    chunk): a large model's would not fit beside serving all at once (33 GB for an 8B Llama)."""
    if not rows:
        return None
    groups = [(rows, False)] + ([(extra, True)] if extra else [])
    t0 = time.monotonic()
    layers = lora_a_layers(model)
    directions: dict[str, Directions] = {}  # per projection
    chunk: list[str] = []
    size = 0
    for name, module in layers.items():
        square = 4 * _lora_a(module).in_features ** 2
        if chunk and size + square > budget_bytes:
            directions |= _chunk(model, groups, {n: layers[n] for n in chunk}, energy, pad_id, batch)
            chunk, size = [], 0
        chunk.append(name)
        size += square
    directions |= _chunk(model, groups, {n: layers[n] for n in chunk}, energy, pad_id, batch)
    out = []
    for name, module in layers.items():
        weight = _lora_a(module).weight
        out.append(_Projected(weight, torch.empty_like(weight), directions[name]))
    space = NullSpace(out)
    space.restart(fresh)
    share, seconds = 100 * space.kept_out(), time.monotonic() - t0
    log.info(
        "null space: %.0f%% of each LoRA input kept out (energy %.4f), measured in %.1f s",
        share,
        energy,
        seconds,
    )
    return space


def _chunk(
    model: torch.nn.Module,
    groups: list[tuple[list[Encoded], bool]],
    layers: dict[str, torch.nn.Module],
    energy: float,
    pad_id: int,
    batch: int,
) -> dict[str, Directions]:
    """A pass over each group of rows accumulating the input covariances of `layers` (over every real
    token, or only the labelled ones when the group says so), and the union of the groups' directions."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}  # a projection -> the first one that was given the same input tensor
    first_inputs: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def pre(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if name not in shared:
                same = [other for other, seen in first_inputs.items() if seen is x]
                shared[name] = shared[same[0]] if same else name
                first_inputs[name] = x
            if shared[name] != name:
                return
            flat = x[mask_now[0]].float()  # the rows' measured tokens, padding left out
            total = flat.T @ flat
            sums[name] = total if name not in sums else sums[name] + total

        return pre

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    # the base's own inputs, whatever adapter is loaded: a child's round (its parent's weights in place) then
    # keeps out the same directions its parent's round did, and its parent's A already reads none of them
    base_only = getattr(model, "disable_adapter", contextlib.nullcontext)
    found: list[dict[str, Directions]] = []
    try:
        with base_only():
            for rows, labelled in groups:
                for start in range(0, len(rows), batch):
                    enc = collate(rows[start : start + batch], pad_id, device)
                    mask = enc["labels"] != IGNORE if labelled else enc["attention_mask"].bool()
                    mask_now[:] = [mask]
                    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                    first_inputs.clear()
                found.append({name: _leading(sums.pop(name), energy) for name in list(sums)})
    finally:
        for handle in handles:
            handle.remove()
    bases = {name: _union([f[name] for f in found]) for name in found[0]}
    return {name: bases[shared[name]] for name in layers}


def _union(parts: list[Directions]) -> Directions:
    """The directions kept out by any of `parts`, stored the smaller way (as `_leading` does)."""
    if len(parts) == 1:
        return parts[0]
    d = parts[0].basis.shape[0]
    eye = torch.eye(d, device=parts[0].basis.device)
    total = sum(eye - p.basis @ p.basis.T if p.kept else p.basis @ p.basis.T for p in parts)
    values, vectors = torch.linalg.eigh(total)  # a sum of projectors: 0 exactly off the union's span
    k = int((values > 1e-3).sum())
    kept = 2 * k > d
    basis = vectors[:, : d - k] if kept else vectors[:, d - k :]
    return Directions(basis.contiguous(), kept)


def _leading(total: torch.Tensor, energy: float) -> Directions:
    """The fewest leading eigenvectors of a covariance that hold `energy` of its trace (or the other
    eigenvectors, when they are fewer: the same constraint in less memory)."""
    # float32 is plenty for a subspace, and fast: float64 took 21 s for a 1B model's layers on the H200, and
    # twice float32's time on a CPU
    values, vectors = torch.linalg.eigh(total.float())
    values, vectors = values.double().flip(0).clamp(min=0.0), vectors.flip(1)
    cumulative = values.cumsum(0) / values.sum().clamp(min=1e-30)
    k = min(int((cumulative < energy).sum()) + 1, vectors.shape[1])
    kept = 2 * k > vectors.shape[1]
    basis = vectors[:, k:] if kept else vectors[:, :k]
    return Directions(basis.float().contiguous(), kept)
