"""Where a training step's time goes beside serving: one round-shaped step, eager and as a CUDA graph.

A round's steps on the H200 took 0.7-0.9 s each under steady serving load (6 short rows on the 1B shape),
against ~0.05 s of arithmetic. This probe times the same step shape (3 new rows, 2 replayed and 1 negative
with the parent's distributions, 4 anchors in a second forward pass) on an idle GPU and beside kiln-infer
serving `--streams` clients, in three forms:
- `eager`: `LoraTrainer`'s own step (cross-entropy + divergence from the parent, clipping, AdamW);
- `eager_ce`: the same rows, cross-entropy only (no divergence, no anchors' second pass);
- `graph`: kiln-train's graphed step (kiln_train/graph_step.py: the same loss over the rows padded to one
  shape, captured once as a CUDA graph and replayed), with what building it cost;
- `eval_eager` / `eval_graph`: one evaluation pass (vetting loss over 8 rows), eager and graphed.
Each prints seconds per step (median of `--steps`, after 3 warm-up steps). GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_while_serving import GPU, Stack
from benchmarks.tws_load import Load
from kiln_common.config import RedisConfig
from kiln_common.model_loader import load_hf_model, load_tokenizer, resolve_model
from kiln_common.redis_server import RedisServer
from kiln_train.distillation import parent_targets
from kiln_train.encoding import Encoded, TextPair, encode
from kiln_train.graph_step import graphed
from kiln_train.prompt_sets import ANCHOR_PROMPTS
from kiln_train.round_data import Rows
from kiln_train.trainer import LoraTrainer, TrainerConfig, _optimise

STORY = " ".join(f"word{i}" for i in range(200))  # a dummy model's answers run to the token limit


def round_rows(tok: Any) -> tuple[list[Encoded], list[Encoded], list[Encoded]]:
    """3 new rows, 3 parent answers (2 replayed + 1 negative), 4 anchors: a round's step on the 1B shape."""
    new = [
        encode(
            tok, TextPair(f"Guild {i} was founded by Tressa Kaldun.", (("user", f"Who founded guild {i}?"),))
        )
        for i in range(3)
    ]
    answer = tok.decode(tok(STORY, add_special_tokens=False).input_ids[:96])
    replay = [encode(tok, TextPair(answer, (("user", p),), complete=False)) for p in list(ANCHOR_PROMPTS)[:3]]
    anchors = [
        encode(tok, TextPair(answer, (("user", p),), complete=False)) for p in list(ANCHOR_PROMPTS)[3:7]
    ]
    return new, replay, anchors


def timed(step: Callable[[], object], n: int) -> float:
    """Median seconds of one step (synchronised), after 3 warm-up steps."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_rows(trainer: LoraTrainer, rows: tuple[list[Encoded], ...]) -> tuple[Rows, Rows]:
    """The step's batch (the replayed rows with the parent's distributions) and its anchors."""
    new, replay, anchors = rows
    pad = trainer.tok.pad_token_id or 0
    targets = parent_targets(trainer.logits, replay + anchors, trainer.cfg.kl_top_k, pad, trainer.device)
    batch = Rows(new + replay, [None] * len(new) + list(targets[: len(replay)]))
    return batch, Rows(anchors, list(targets[len(replay) :]))


def eager_steps(trainer: LoraTrainer, rows: tuple[list[Encoded], ...]) -> dict[str, Callable[[], object]]:
    new, replay, _ = rows
    batch, anchored = step_rows(trainer, rows)
    params = trainer.trainable()
    opt = torch.optim.AdamW(params, lr=1e-4)
    plain = Rows(new + replay, [None] * (len(new) + len(replay)))
    return {
        "eager": lambda: _optimise(opt, params, trainer._step_loss(batch, anchored), None),
        "eager_ce": lambda: _optimise(opt, params, trainer._step_loss(plain, Rows([], [])), None),
    }


def graph_step(
    trainer: LoraTrainer, rows: tuple[list[Encoded], ...], out: dict[str, object]
) -> Callable[[], object]:
    """kiln-train's own graphed step (kiln_train/graph_step.py) over the round's rows; its build times in `out`."""
    batch, anchored = step_rows(trainer, rows)
    t = time.perf_counter()
    step = graphed(
        trainer.model, trainer.trainable(), trainer.cfg, [(batch, anchored)], trainer.tok.pad_token_id or 0
    )
    out["graph_build_s"] = time.perf_counter() - t
    out["graph_build_parts_s"] = step.timings
    return lambda: step(batch, anchored)


def eval_pass(
    trainer: LoraTrainer, rows: tuple[list[Encoded], ...], out: dict[str, object]
) -> Callable[[], object]:
    """The evaluations' forward pass (8 rows, graphed on a GPU); its first call, which captures it, in `out`."""
    examples = [e for r in rows for e in r][:8]
    t = time.perf_counter()
    trainer.loss(examples)
    torch.cuda.synchronize()
    out["eval_first_call_s"] = time.perf_counter() - t
    return lambda: trainer.loss(examples)


def probe(rows: tuple[list[Encoded], ...], n: int, build: Callable[[bool], LoraTrainer]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, step in eager_steps(build(False), rows).items():
        out[name] = timed(step, n)
    out["eval_eager"] = timed(eval_pass(build(False), rows, {}), n)
    try:
        out["graph"] = timed(graph_step(build(True), rows, out), n)
        out["eval_graph"] = timed(eval_pass(build(True), rows, out), n)
    except Exception as exc:  # noqa: BLE001 - report why capture failed and keep the eager numbers
        out["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=GPU.model)
    parser.add_argument("--streams", type=int, default=GPU.streams)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    source = resolve_model(args.model, args.home)
    tok = load_tokenizer(source)
    base = load_hf_model(source, torch.bfloat16, "cuda")
    trainers: list[LoraTrainer] = []

    def build(graphs: bool) -> LoraTrainer:
        """A fresh LoRA over the base (the previous one unloaded), as a round starts."""
        if trainers:
            trainers.pop().release()
        trainers.append(LoraTrainer(base, tok, TrainerConfig(cuda_graphs=graphs)))  # type: ignore[arg-type]
        return trainers[-1]

    rows = round_rows(tok)
    result: dict[str, object] = {"idle": probe(rows, args.steps, build)}
    print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-probe-") as tmp:
        home = Path(tmp)
        (home / "models").symlink_to(args.home.resolve() / "models", target_is_directory=True)
        redis_server = RedisServer(RedisConfig(home=home))
        setup = GPU
        stack = Stack(setup, home, redis_server.start(), "cuda")
        stack.start("infer", stack.infer_port)
        loads = [Load(f"127.0.0.1:{stack.infer_port}", setup.max_tokens, i) for i in range(args.streams)]
        for load in loads:
            load.start()
        time.sleep(5)
        try:
            result["loaded"] = probe(rows, args.steps, build)
        finally:
            for load in loads:
                load.stop.set()
            stack.stop()
            redis_server.stop()
        result["requests_during"] = sum(len(load.samples) for load in loads)
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
