"""Can training share serving's GPU inside one process? A probe of CUDA stream priorities (issue 10).

Two processes on one GPU are time-sliced: the driver gives the GPU to one context at a time, so a training
kernel in front of a decode step delays it by up to a time slice. The hand-off (kiln_common/gpu_turn.py) lets
training run only in serving's gaps, and on the H200 at half of serving's capacity there were almost none: the
decode loop keeps the GPU busy whenever any request is running. Inside one CUDA context, kernels of different
streams run at the same time, and a stream's priority decides whose thread blocks the SMs take first. This probe
measures whether that lever is worth moving training into the serving process, on the 1B shape:

- serve: a decode-shaped step (a one-token forward of `decode_rows` rows through the model, replayed as a CUDA
  graph: like a decode step it reads every weight once) back to back, with `gap_ms` of host time between steps
  as the engine's scheduling and sampling take; each step's latency from launch to its stream's completion;
- train: LoRA r=16 steps of 8 rows x 1,024 tokens (forward and backward one CUDA graph, AdamW eager);
- modes: each alone; both in one process with serving's stream at the highest priority and training's at the
  lowest; both in one process at equal priority; both in two processes (training in a child: time-slicing);
  with --green-sms, training confined to that many SMs by a CUDA green context, beside serving in one process.

It prints one JSON line (and a table on stderr): per mode, decode step p50/p99 ms and training steps/s, with
ratios to each alone. The decode step is a stand-in (no KV cache, no attention over a context), so the numbers
say how kernels of the two jobs share the GPU, not what kiln-infer's TPOT would be.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import torch

from benchmarks.governor_trainer import GraphedMicroBatch, _PadOnly, synthetic_batch
from kiln_common.model_loader import DUMMY_SHAPES
from kiln_common.side_stream import side_stream
from kiln_train.graph_step import capture
from kiln_train.trainer import LoraTrainer, TrainerConfig

log = logging.getLogger("benchmarks.co_run")
MODES = ("serve_alone", "train_alone", "one_process_priority", "one_process_equal", "two_processes")


def build(shape: str, device: torch.device) -> LoraTrainer:
    """A randomly initialised model of `shape` in bf16 on `device`, wrapped for LoRA training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**DUMMY_SHAPES[shape])  # type: ignore[arg-type]
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16)
    model.requires_grad_(False)
    return LoraTrainer(model, _PadOnly(), TrainerConfig())  # type: ignore[arg-type]


class DecodeStep:
    """One-token forward of `rows` rows through the model, captured as a CUDA graph."""

    def __init__(self, model: torch.nn.Module, rows: int, vocab: int, device: torch.device) -> None:
        self.ids = torch.randint(10, vocab, (rows, 1), device=device)

        def body() -> torch.Tensor:
            out: torch.Tensor = model(input_ids=self.ids, use_cache=False).logits
            return out

        with torch.no_grad():
            with side_stream(device):
                for _ in range(2):
                    body()
            self.graph, _ = capture(body, device)

    def run(self, stream: torch.cuda.Stream, seconds: float, gap_ms: float) -> list[float]:
        """Steps back to back on `stream` for `seconds`; each step's latency in ms."""
        latencies = []
        end = time.monotonic() + seconds
        with torch.cuda.stream(stream):
            while time.monotonic() < end:
                t = time.perf_counter()
                self.graph.replay()
                stream.synchronize()
                latencies.append((time.perf_counter() - t) * 1e3)
                if gap_ms > 0:
                    time.sleep(gap_ms / 1e3)
        return latencies


class TrainStep:
    """A LoRA step of 8 rows x `seq_len` tokens: forward and backward one graph replay, then AdamW."""

    def __init__(
        self, trainer: LoraTrainer, seq_len: int, rows: int = 8, stream: torch.cuda.Stream | None = None
    ) -> None:
        self.params = trainer.trainable()
        self.graphed = GraphedMicroBatch(trainer.model, self.params, rows, seq_len, stream)
        vocab = int(trainer.model.config.vocab_size)
        self.tensors = synthetic_batch(vocab, rows, seq_len, 0, trainer.device)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)

    def step(self) -> None:
        self.graphed.step_grads(self.tensors)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()

    def run(self, stream: torch.cuda.Stream, stop: threading.Event | float) -> tuple[int, float]:
        """Steps on `stream` until `stop` is set (or for that many seconds); (steps, seconds)."""
        t0 = time.monotonic()
        steps = 0
        with torch.cuda.stream(stream):
            while not _done(stop, t0):
                self.step()
                stream.synchronize()
                steps += 1
        return steps, time.monotonic() - t0


def _done(stop: threading.Event | float, t0: float) -> bool:
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return time.monotonic() - t0 >= stop


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) of `values` (nearest rank), 0s for none."""
    if not values:
        return 0.0, 0.0
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return pick(0.50), pick(0.99)


def co_run_threads(
    decode: DecodeStep, train: TrainStep, serve_stream: Any, train_stream: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Serving and training at once in this process, each in a thread on its own stream."""
    stop = threading.Event()
    trained: dict[str, tuple[int, float]] = {}
    worker = threading.Thread(target=lambda: trained.update(r=train.run(train_stream, stop)))
    worker.start()
    time.sleep(1.0)  # training under way before serving is timed
    latencies = decode.run(serve_stream, args.seconds, args.gap_ms)
    stop.set()
    worker.join()
    steps, seconds = trained["r"]
    return {"decode_ms": percentiles(latencies), "steps_per_s": steps / seconds}


def co_run_processes(decode: DecodeStep, serve_stream: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Serving here, training in a child process of its own (the GPU time-sliced between the two)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.co_run", "--role", "train", "--shape", args.shape,
         "--seq-len", str(args.seq_len), "--train-rows", str(args.train_rows),
         "--seconds", str(args.seconds + 2.0)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    if json.loads(child.stdout.readline()).get("ready") is not True:
        raise RuntimeError("the training child did not start")
    child.stdin.write("go\n")
    child.stdin.flush()
    time.sleep(1.0)
    latencies = decode.run(serve_stream, args.seconds, args.gap_ms)
    report = json.loads(child.stdout.readline())
    child.wait(timeout=60)
    return {"decode_ms": percentiles(latencies), "steps_per_s": report["steps_per_s"]}


def train_role(args: argparse.Namespace) -> int:
    """The child of `two_processes`: build, report ready, wait for a line, train for --seconds, report."""
    device = torch.device("cuda")
    train = TrainStep(build(args.shape, device), args.seq_len, args.train_rows)
    train.run(torch.cuda.current_stream(device), 2.0)  # warm
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    steps, seconds = train.run(torch.cuda.Stream(device), args.seconds)
    print(json.dumps({"steps_per_s": steps / seconds}), flush=True)
    return 0


def summary(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per co-run mode: decode p50/p99 and training steps/s, each as a ratio to its alone run (modes that
    failed, with an `error`, are left out)."""
    alone_p50, alone_p99 = results["serve_alone"]["decode_ms"]
    alone_train = results["train_alone"]["steps_per_s"]
    out = {}
    for mode, r in results.items():
        if mode in MODES[:2] or "decode_ms" not in r:
            continue
        p50, p99 = r["decode_ms"]
        out[mode] = {
            "decode_p50_x": p50 / alone_p50 if alone_p50 else 0.0,
            "decode_p99_x": p99 / alone_p99 if alone_p99 else 0.0,
            "training_x": r["steps_per_s"] / alone_train if alone_train else 0.0,
        }
    return out


class GreenTraining:
    """Training confined to `sms` of the GPU's SMs: a CUDA green context (no MPS, no change to the GPU's
    settings). Kernels run on the SMs of the context their stream belongs to, so training runs on a stream made
    in the green context: torch's own `GreenContext.Stream()` where it has one (2.12+), else a stream created
    through the CUDA runtime while the green context is current (torch's pooled streams belong to the primary
    context and would ignore it). `stream_green` says whether the driver sees the stream as green.

    torch's API for green contexts is in beta: this uses `GreenContext.create(num_sms=..., device_id=...)`
    with `set_context()` / `pop_context()` (torch 2.10-2.11)."""

    def __init__(self, trainer: LoraTrainer, sms: int, seq_len: int, rows: int = 8) -> None:
        from torch.cuda import green_contexts

        device = trainer.device
        self.ctx: Any = green_contexts.GreenContext.create(num_sms=sms, device_id=device.index or 0)
        self.stream = self._green_stream(device)
        self.stream_green = _stream_is_green(self.stream)
        with self._current():
            self.train = TrainStep(trainer, seq_len, rows, self.stream)  # captured on the green stream
            self.train.run(self.stream, 2.0)  # warm

    def _green_stream(self, device: torch.device) -> Any:
        if hasattr(self.ctx, "Stream"):
            return self.ctx.Stream()
        import ctypes

        handle = ctypes.c_void_p()
        with self._current():
            err = ctypes.CDLL("libcudart.so", mode=ctypes.RTLD_GLOBAL).cudaStreamCreateWithFlags(
                ctypes.byref(handle),
                1,  # cudaStreamNonBlocking
            )
        if err != 0:
            raise RuntimeError(f"cudaStreamCreateWithFlags failed with error {err}")
        return torch.cuda.ExternalStream(handle.value, device=device)

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        self.ctx.set_context()
        try:
            yield
        finally:
            self.ctx.pop_context()

    def run(self, _stream: Any, stop: threading.Event | float) -> tuple[int, float]:
        """As TrainStep.run, on the green context's stream (in the calling thread)."""
        with self._current():
            return self.train.run(self.stream, stop)


def _stream_is_green(stream: Any) -> bool | None:
    """Whether the driver ties `stream` to a green context (cuStreamGetGreenCtx); None if it can't say."""
    import ctypes

    try:
        green = ctypes.c_void_p()
        err = ctypes.CDLL("libcuda.so.1").cuStreamGetGreenCtx(
            ctypes.c_void_p(stream.cuda_stream), ctypes.byref(green)
        )
    except (OSError, AttributeError):
        return None
    return None if err != 0 else bool(green.value)


def green_modes(
    trainer: LoraTrainer, decode: DecodeStep, high: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Per SM count in --green-sms: training alone on that many SMs, and beside serving in this process."""
    out: dict[str, Any] = {}
    for sms in args.green_sms:
        try:
            torch.cuda.empty_cache()
            green = GreenTraining(trainer, sms, args.seq_len, args.train_rows)
            steps, seconds = green.run(None, args.seconds)
            both = co_run_threads(decode, cast(TrainStep, green), high, None, args)
            out[f"one_process_green_{sms}"] = {
                **both,
                "train_alone_steps_per_s": steps / seconds,
                "stream_green": green.stream_green,
            }
            del green  # its graphs' memory goes before the next count's are captured
            gc.collect()
        except (RuntimeError, AttributeError, TypeError, ImportError) as exc:  # a beta API: say what failed
            out[f"one_process_green_{sms}"] = {"error": f"{type(exc).__name__}: {exc}"}
        log.info("green context of %d SMs: %s", sms, json.dumps(out[f"one_process_green_{sms}"]))
    return out


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode in turn on one model; the results and their ratios."""
    device = torch.device("cuda")
    trainer = build(args.shape, device)
    decode = DecodeStep(trainer.model, args.decode_rows, int(trainer.model.config.vocab_size), device)
    train = TrainStep(trainer, args.seq_len, args.train_rows)
    high, low = torch.cuda.Stream(device, priority=-100), torch.cuda.Stream(device, priority=0)
    normal = torch.cuda.Stream(device, priority=0)
    train.run(low, 2.0)  # warm both
    decode.run(high, 1.0, args.gap_ms)
    results: dict[str, Any] = {
        "serve_alone": {"decode_ms": percentiles(decode.run(high, args.seconds, args.gap_ms))}
    }
    steps, seconds = train.run(low, args.seconds)
    results["train_alone"] = {"steps_per_s": steps / seconds}
    results["one_process_priority"] = co_run_threads(decode, train, high, low, args)
    results["one_process_equal"] = co_run_threads(decode, train, normal, low, args)
    log.info("so far: %s", json.dumps(results))  # a run cut short still shows the modes done
    torch.cuda.empty_cache()  # the child needs the memory this process cached but no longer uses
    results["two_processes"] = co_run_processes(decode, high, args)
    results.update(green_modes(trainer, decode, high, args))
    return {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(),
        "decode_rows": args.decode_rows,
        "gap_ms": args.gap_ms,
        "seq_len": args.seq_len,
        "train_rows": args.train_rows,
        "priority_range": list(torch.cuda.Stream.priority_range()),  # type: ignore[call-arg]
        "results": results,
        "ratios": summary(results),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.co_run", description=__doc__)
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(DUMMY_SHAPES))
    p.add_argument("--seconds", type=float, default=10.0, help="per mode")
    p.add_argument("--decode-rows", type=int, default=32)
    p.add_argument(
        "--train-rows",
        type=int,
        default=8,
        help="rows per training step (the 8B shape needs fewer: OOM at 8)",
    )
    p.add_argument("--gap-ms", type=float, default=0.5, help="host time between decode steps")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--role", choices=("probe", "train"), default="probe")
    p.add_argument(
        "--green-sms",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[],
        help="also train on a green context of this many SMs (comma-separated counts), beside serving",
    )
    p.add_argument("--json", default="", help="also write the result here")
    return p


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    args = parser().parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.co_run needs a CUDA GPU (stream priorities and graphs)")
    if args.role == "train":
        return train_role(args)
    report = probe(args)
    line = json.dumps(report)
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    for mode, r in report["ratios"].items():
        print(
            f"{mode}: decode p50 x{r['decode_p50_x']:.2f}, p99 x{r['decode_p99_x']:.2f}, "
            f"training x{r['training_x']:.2f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
