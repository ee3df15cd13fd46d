"""The training side of the governor benchmark: kiln-train's role in a process of its own.

It attaches to the base weights kiln-infer announced in Redis (CUDA IPC on a GPU, shared memory on CPU), caps its
memory share (KILN_TRAIN_MEMORY_FRACTION, checked against kiln-infer's published --kv-memory-fraction), then trains
a LoRA on synthetic sequences: `steps` optimizer steps of `batch` rows of `seq_len` tokens, each step's gradient
accumulated over the micro-batch the governor chose (or the whole batch with the governor off). It prints one
`ready` line, waits for a line on stdin, trains, and prints its report (step end times on CLOCK_MONOTONIC, which
the serving clients share) as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from benchmarks.layer_chunks import LayerChunks
from kiln_common.config import RedisConfig
from kiln_common.gpu_turn import TrainingTurn, read_turn
from kiln_common.load_report import read_load
from kiln_common.model_loader import DUMMY_PREFIX, DUMMY_SHAPES, ModelNotFoundError, resolve_model
from kiln_common.redis_server import connect
from kiln_common.side_stream import side_stream
from kiln_train.base_model import SharedBase
from kiln_train.governor import Governor, GovernorSettings
from kiln_train.graph_step import capture
from kiln_train.memory_split import enforce_memory_split
from kiln_train.micro_batch import IGNORE, accumulate_backward, fit_micro_batch
from kiln_train.trainer import LoraTrainer, TrainerConfig

log = logging.getLogger("benchmarks.governor_trainer")
PROMPT_TOKENS = 128  # the loss covers the rest of each sequence, as a completion
PROGRESS_EVERY = 10  # steps between progress lines on stderr


class _PadOnly:
    """The trainer's tokenizer needs are pad/eos ids only: sequences are synthetic."""

    pad_token_id = 0
    eos_token_id = 0


def model_config(spec: str, home: Path) -> Any:
    """The model's transformers config (a dummy shape needs no files)."""
    try:
        return resolve_model(spec, home).config
    except ModelNotFoundError:
        if not spec.startswith(DUMMY_PREFIX):
            raise
        from transformers import LlamaConfig

        return LlamaConfig(**DUMMY_SHAPES[spec[len(DUMMY_PREFIX) :].lower()])  # type: ignore[arg-type]


def attach_base(client: Any, config: Any, timeout_s: float = 600.0) -> tuple[SharedBase, Any]:
    """The frozen base over kiln-infer's shared weights, once they are announced."""
    base = SharedBase(client, config)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        model = base.model()
        if model is not None:
            return base, model
        time.sleep(1.0)
    raise RuntimeError("kiln-infer announced no base weights in time")


def synthetic_batch(vocab: int, batch: int, seq_len: int, seed: int, device: torch.device) -> dict[str, Any]:
    """`batch` random sequences of `seq_len` tokens; the first PROMPT_TOKENS are prompt (no loss)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : min(PROMPT_TOKENS, seq_len // 2)] = IGNORE
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


class GraphedMicroBatch:
    """Forward and backward of `rows` rows, their gradient added to fixed buffers: one CUDA graph launch.

    Under time-slicing every launch of an eager pass can wait behind serving's work; a replayed graph is one
    launch, so short governed micro-batches keep their speed. The optimizer step stays eager.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        rows: int,
        seq_len: int,
        stream: torch.cuda.Stream | None = None,  # where to warm and capture (a green context's stream)
    ):
        device = params[0].device
        self.model, self.params, self.rows = model, params, rows
        self.ids = torch.zeros(rows, seq_len, dtype=torch.long, device=device)
        self.labels = torch.full((rows, seq_len), IGNORE, dtype=torch.long, device=device)
        self.scale = torch.ones((), device=device)  # 1 / the step's completion tokens
        self.grads = [torch.zeros_like(p) for p in params]
        with side_stream(device, stream):  # cuBLAS workspaces and the allocator's pools, before capture
            for _ in range(2):
                self._body()
        self.graph, self.loss = capture(self._body, device, stream)
        self.zero()

    def _body(self) -> torch.Tensor:
        logits = self.model(input_ids=self.ids).logits[:, :-1].float()
        flat = logits.reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(
            flat, self.labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        loss = loss * self.scale
        grads = torch.autograd.grad(loss, self.params)
        torch._foreach_add_(self.grads, grads)
        return loss.detach()

    @torch.no_grad()
    def zero(self) -> None:
        torch._foreach_zero_(self.grads)

    def step_grads(
        self, tensors: dict[str, torch.Tensor], between: Callable[[], None] | None = None
    ) -> float:
        """The batch's gradient, `rows` rows per replay, left in the parameters' .grad; returns the loss."""
        labels = tensors["labels"]
        self.zero()
        self.scale.fill_(1.0 / max(1, int((labels[:, 1:] != IGNORE).sum())))
        total = 0.0
        for start in range(0, labels.shape[0], self.rows):
            if start > 0 and between is not None:
                between()
            self.ids.copy_(tensors["input_ids"][start : start + self.rows])
            self.labels.copy_(labels[start : start + self.rows])
            self.graph.replay()
            total += float(self.loss)  # waits for the replay: the governor times the span it took
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        return total


def train_steps(
    trainer: LoraTrainer,
    args: argparse.Namespace,
    governor: Governor | None,
    full: int,
    graphed: GraphedMicroBatch | None = None,
    handoff: tuple[LayerChunks, TrainingTurn | None] | None = None,
) -> dict[str, Any]:
    """The round: `steps` optimizer steps; per step its end time, micro-batch, the governor's mode and duty.

    With `handoff` (layer chunks and serving's turn) each step runs chunk by chunk, each chunk (and the
    optimizer step) waiting until serving has no work on the GPU; the governor is then not used.
    """
    params = trainer.trainable()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    vocab = int(trainer.model.config.vocab_size)
    cuda = trainer.device.type == "cuda"
    trainer.model.train()
    ends, micro, modes, pace, duty, seen = [], [], [], [], [], []
    t0 = time.monotonic()
    for step in range(args.steps):
        size = governor.before_step() if governor is not None else full
        tensors = synthetic_batch(vocab, args.batch, args.seq_len, step, trainer.device)
        between = governor.between_micro_batches if governor is not None else None
        _gradients(trainer, opt, tensors, size, between, graphed, handoff)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.monotonic())
        if (step + 1) % PROGRESS_EVERY == 0:  # a run cut short still shows how far training got, and when
            _progress(step + 1, args.steps, ends[-1] - t0, handoff[1] if handoff is not None else None)
        micro.append(size)
        modes.append(governor.mode.value if governor is not None else "off")
        pace.append(governor.pace_ms if governor is not None else 0.0)
        duty.append(governor.duty if governor is not None else 1.0)
        seen.append(governor.load.tpot_p99_ms if governor is not None and governor.load is not None else 0.0)
    if governor is not None:
        governor.finished()
    return {
        "started": t0,
        "step_ends": ends,
        "micro_batch": micro,
        "modes": modes,
        "pace_ms": pace,
        "duty": duty,
        "seen_tpot_p99_ms": seen,  # serving's TPOT p99 as the governor read it before each step
        "full_micro_batch": full,
        "tokens_per_step": args.batch * args.seq_len,
        "governor": governor.state() if governor is not None else None,
        "handoff": _handoff_state(handoff),
    }


def _gradients(
    trainer: LoraTrainer,
    opt: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    size: int,
    between: Callable[[], None] | None,
    graphed: GraphedMicroBatch | None,
    handoff: tuple[LayerChunks, TrainingTurn | None] | None,
) -> None:
    """One step's gradient into the parameters' .grad: chunk by chunk with the hand-off (then waiting for
    serving once more before the optimizer step), in graphed micro-batches, or eagerly in `size`-row ones."""
    if handoff is not None:
        chunks, turn = handoff
        chunks.step_grads(tensors, turn.wait if turn is not None else None)
        if turn is not None:
            turn.wait()
    elif graphed is not None and size == graphed.rows:
        graphed.step_grads(tensors, between)
    else:
        opt.zero_grad(set_to_none=True)
        accumulate_backward(trainer.model, tensors, size, between)


def _progress(step: int, steps: int, elapsed_s: float, turn: TrainingTurn | None) -> None:
    waited = f"; waited for serving {turn.waits} times, {turn.waited_s:.1f} s" if turn is not None else ""
    log.info("step %d of %d at %.1f s%s", step, steps, elapsed_s, waited)


def _handoff_state(handoff: tuple[LayerChunks, TrainingTurn | None] | None) -> dict[str, Any] | None:
    """How the hand-off went: chunks per row, how often and how long training waited for serving."""
    if handoff is None:
        return None
    chunks, turn = handoff
    waited = {"waits": turn.waits, "waited_s": turn.waited_s} if turn is not None else {}
    return {"chunks_per_row": len(chunks.chunks), "graphed": bool(chunks.graphs), **waited}


def run(args: argparse.Namespace) -> int:
    """Attach, cap memory, report ready, wait for the go line, train, report."""
    home = Path(args.home)
    client = connect(RedisConfig(home=home).effective_url)
    config = model_config(args.model, home)
    shared, base = attach_base(client, config)  # `shared` keeps the mappings of kiln-infer's memory alive
    device = next(base.parameters()).device
    env = {k: v for k, v in os.environ.items() if k.startswith("KILN_TRAIN_")}  # e.g. the TPOT budget
    settings, _ = GovernorSettings.from_environ(
        {**env, "KILN_TRAIN_MEMORY_FRACTION": str(args.memory_fraction)}
    )
    enforce_memory_split(client, device, settings.memory_fraction, settings.memory_headroom_gib)
    trainer = LoraTrainer(base, cast(Any, _PadOnly()), TrainerConfig())  # r=16 on every projection
    # the largest micro-batch whose activations fit in the cap (also warms kernels and allocator)
    cap = int(settings.memory_fraction * torch.cuda.mem_get_info(device)[1]) if device.type == "cuda" else 0
    full = fit_micro_batch(
        trainer.model, synthetic_batch(int(config.vocab_size), args.batch, args.seq_len, 99, device), cap
    )
    log.info("micro-batch %d of %d rows fits the memory cap", full, args.batch)
    governor = Governor(settings, lambda: read_load(client), full) if args.governor == "on" else None
    graphed = None
    paced = int(settings.paced_micro_batch)
    if governor is not None and paced > 0 and device.type == "cuda" and args.graph == "on":
        try:
            graphed = GraphedMicroBatch(trainer.model, trainer.trainable(), min(paced, full), args.seq_len)
            log.info("micro-batches of %d rows replayed as a CUDA graph", graphed.rows)
        except RuntimeError as exc:  # the paced micro-batches then run eagerly
            log.warning("paced micro-batches run eagerly: capture failed (%s)", exc)
    handoff = None
    if args.handoff == "on":
        handle = read_turn(client, shared.generation)
        if handle is None:
            raise SystemExit("--handoff on: kiln-infer announced no GPU turn for these base weights")
        turn = TrainingTurn.open(handle, device)
        cuda_graphs = device.type == "cuda" and args.graph == "on"
        handoff = (LayerChunks(trainer.model, trainer.trainable(), args.seq_len, cuda_graphs), turn)
        governor = None
    print(json.dumps({"ready": True, "device": str(device)}), flush=True)
    sys.stdin.readline()
    report = train_steps(trainer, args, governor, full, graphed, handoff)
    report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    print(json.dumps(report), flush=True)
    trainer.release()
    shared.detach()
    return 0


def parser() -> argparse.ArgumentParser:
    """The trainer role's flags (the bench passes them)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.governor_trainer", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--home", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--governor", choices=("on", "off"), default="on")
    p.add_argument("--memory-fraction", type=float, default=0.0)
    p.add_argument(
        "--graph", choices=("on", "off"), default="on", help="graph the paced micro-batch (on a GPU)"
    )
    p.add_argument(
        "--handoff",
        choices=("on", "off"),
        default="off",
        help="train in layer chunks, each only while serving has no work on the GPU (kiln_common/gpu_turn.py)",
    )
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(run(parser().parse_args()))
