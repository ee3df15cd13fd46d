"""What the null-space constraint costs at a model shape: preparation seconds and GPU memory (GPU or CPU).

    python -m benchmarks.null_space_probe --model dummy:llama-3.1-8b --home $KILN_HOME [--json out.json]

kiln-train measures the constraint once, at start (kiln_train/null_space.py): the replay rows run through
the model, each LoRA input's covariance is accumulated and eigendecomposed, and the kept-out (or free)
directions stay in memory for every later round. This probe does exactly that over a LoRA of the default
shape on the given base: the default replay and anchor prompts, each answered by `--answer-tokens` tokens
of filler (a dummy shape's answers run to the limit), and reports the seconds, the memory the directions
hold and the peak the measurement took above the base weights. A dummy shape's random weights spread
activations more evenly than a trained model's, so the share kept out (and the memory) can differ there.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kiln_common.model_loader import load_hf_model, load_tokenizer, resolve_model
from kiln_train.encoding import TextPair, encode
from kiln_train.prompt_sets import replay_prompts
from kiln_train.trainer import LoraTrainer, TrainerConfig

GIB = 2**30
FILLER = " ".join(f"word{i}" for i in range(400))


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--energy", type=float, default=0.95)
    parser.add_argument("--answer-tokens", type=int, default=96)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    source = resolve_model(args.model, args.home)
    tok = load_tokenizer(source)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    base = load_hf_model(source, dtype, args.device)
    device = next(base.parameters()).device
    trainer = LoraTrainer(base, tok, TrainerConfig())  # type: ignore[arg-type]
    answer = str(tok.decode(tok(FILLER, add_special_tokens=False).input_ids[: args.answer_tokens]))
    rows = [encode(tok, TextPair(answer, (("user", p),), complete=False)) for p in replay_prompts()]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _allocated(device)
    t0 = time.monotonic()
    space = trainer.workspace.null_space(rows, args.energy, tok.pad_token_id or 0, fresh=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - t0
    assert space is not None
    held = sum(
        layer.directions.basis.numel() * layer.directions.basis.element_size() for layer in space.layers
    )
    unique = {id(layer.directions.basis): layer.directions.basis for layer in space.layers}
    held_unique = sum(b.numel() * b.element_size() for b in unique.values())
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "energy": args.energy,
        "replay_rows": len(rows),
        "replay_tokens": sum(len(r.input_ids) for r in rows),
        "lora_layers": len(space.layers),
        "kept_out_share": round(space.kept_out(), 4),
        "seconds": round(seconds, 2),
        "directions_gib": round(held_unique / GIB, 3),
        "directions_gib_if_unshared": round(held / GIB, 3),
        "allocated_after_gib": round((_allocated(device) - before) / GIB, 3),
        "peak_above_start_gib": round(
            ((torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0) - before) / GIB, 3
        ),
    }
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
