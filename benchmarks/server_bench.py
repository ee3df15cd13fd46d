"""`kiln bench --server`: W1 through kiln-infer as users reach it, beside the in-process engine and transformers.

In one run: the in-process engine (base, 16 adapters, batch 1); then kiln-infer started by its real entry
point (`python -m kiln_infer`, a separate process tree) and driven by gRPC clients in 4 other processes (W1 at
256 and at 64 concurrent streams, 16 adapters, batch 1, and 2,000 streams opened at once); then transformers
`generate`, warmed with a full batch of the measured shape, the best of static batches 64 and 256, bf16 with
sdpa attention, and its batch-1 TPOT from two timed generate calls (no per-token callback). Every engine is
warmed with one whole burst on other prompts before its three measured bursts; the median burst is reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import hf_baseline, w1
from benchmarks.grpc_load import BurstResult, burst, generate_request
from kiln.v1 import adapter_pb2, adapter_pb2_grpc
from kiln_infer.lora.random_adapter import write_random_adapter

log = logging.getLogger("kiln.bench.server")

ADAPTERS = 16
CLIENT_PROCESSES = 4


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_kiln_infer(w: w1.Workload, home: Path, port: int, import_root: Path) -> subprocess.Popen[bytes]:
    """kiln-infer by its entry point, sized like the in-process engine; returns once health says SERVING."""
    max_len = w.prompt_len + w.new_tokens + 16
    cmd = [
        sys.executable,
        "-m",
        "kiln_infer",
        "--home",
        str(home),
        "--model",
        w.model,
        "--device",
        w.device,
        "--dtype",
        str(w.dtype).removeprefix("torch."),
        "--port",
        str(port),
        "--max-num-seqs",
        str(w.num_requests),
        "--max-model-len",
        str(-(-max_len // 16) * 16),
        "--max-lora-slots",
        str(ADAPTERS),
        "--max-lora-rank",
        str(w.rank),
        "--drain-timeout",
        "10",
    ]
    env = {**os.environ, "KILN_HOME": str(home), "KILN_IMPORT_ROOT": str(import_root)}
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 900
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kiln-infer exited with {proc.returncode} while starting")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(1.0)
    proc.terminate()
    raise RuntimeError("kiln-infer did not report SERVING within 900 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait (kiln-infer drains and exits)."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def publish_adapters(target: str, paths: list[Path]) -> list[str]:
    """Publish and promote each adapter directory (the server reads it under its import root)."""
    names = []
    with grpc.insecure_channel(target) as channel:
        stub = adapter_pb2_grpc.AdapterServiceStub(channel)
        for i, path in enumerate(paths):
            name = f"bench-a{i}"
            stub.PublishVersion(
                adapter_pb2.PublishVersionRequest(adapter=name, path=str(path), promote=True), timeout=120
            )
            names.append(name)
    time.sleep(2.0)  # the hot swapper preloads what was promoted
    return names


def server_result(name: str, result: BurstResult) -> w1.Result:
    """Tokens/s, TTFT and TPOT of one burst, from the clients' clocks."""
    ok = result.ok
    ttft = [s.first - s.submitted for s in ok]
    tpot = [(s.last - s.first) / (s.tokens - 1) for s in ok if s.tokens > 1]
    if len(ok) != len(result.streams):
        log.warning(
            "%s: %d of %d streams failed: %s",
            name,
            len(result.streams) - len(ok),
            len(result.streams),
            result.codes(),
        )
    return w1.Result(
        name, result.tokens_per_s(), w1.percentiles(ttft), w1.percentiles(tpot) if tpot else (0, 0)
    )


def measure_server(
    target: str, w: w1.Workload, vocab: int, n: int, concurrency: int, adapters: list[str], name: str
) -> w1.Result:
    """One warm-up burst on other prompts, then the median of three measured bursts."""

    def requests(seed: int) -> list[dict[str, Any]]:
        return [
            generate_request(p, w.new_tokens, adapters[i % len(adapters)])
            for i, p in enumerate(w1.prompts(w, vocab, n, seed=seed))
        ]

    burst(target, requests(77), concurrency, CLIENT_PROCESSES)
    runs = [
        server_result(name, burst(target, requests(2000 + i), concurrency, CLIENT_PROCESSES))
        for i in range(3)
    ]
    log.info("%s: bursts at %s tokens/s, the median is reported", name, [round(r.tokens_per_s) for r in runs])
    return sorted(runs, key=lambda r: r.tokens_per_s)[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, in MiB (from /proc)."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            pids += [int(c) for c in children]
        except OSError:
            continue
    return total


def many_streams(target: str, w: w1.Workload, vocab: int, pid: int, n: int = 2000) -> dict[str, Any]:
    """n streams opened at once: each completes or is refused RESOURCE_EXHAUSTED; memory before and after."""
    before = rss_mib(pid)
    reqs = [generate_request(p, 16) for p in w1.prompts(w, vocab, n, seed=555)]
    result = burst(target, reqs, n, CLIENT_PROCESSES)
    time.sleep(5.0)
    after = rss_mib(pid)
    return {
        "streams": n,
        "codes": result.codes(),
        "failures": result.failures(),
        "rss_before_mib": round(before),
        "rss_after_mib": round(after),
    }


def run_server(
    w: w1.Workload, vocab: int, adapter_paths: list[Path], home: Path
) -> tuple[list[w1.Result], dict[str, Any]]:
    """Every server scenario against one kiln-infer."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_kiln_infer(w, home, port, adapter_paths[0].parent)
    try:
        results = [
            measure_server(
                target, w, vocab, w.num_requests, w.num_requests, [""], "kiln-infer gRPC, base, 256 streams"
            ),
            measure_server(target, w, vocab, w.num_requests, 64, [""], "kiln-infer gRPC, base, 64 streams"),
        ]
        names = publish_adapters(target, adapter_paths)
        results.append(
            measure_server(
                target,
                w,
                vocab,
                w.num_requests,
                w.num_requests,
                names,
                f"kiln-infer gRPC, {ADAPTERS} adapters",
            )
        )
        results.append(measure_server(target, w, vocab, 1, 1, [""], "kiln-infer gRPC, batch-1"))
        n_many = 2000 if w.device == "cuda" else 300
        extra: dict[str, Any] = {"many_streams": many_streams(target, w, vocab, proc.pid, n_many)}
    finally:
        stop(proc)
    extra["exit_status"] = proc.returncode
    return results, extra


def hf_fair(source: Any, w: w1.Workload, reqs: list[list[int]]) -> list[w1.Result]:
    """transformers generate, bf16 + sdpa: the best of static batch 64 and 256; batch-1 TPOT without callbacks."""
    from kiln_common.model_loader import load_hf_model

    model: Any = load_hf_model(source, w.dtype, w.device)
    model.config._attn_implementation = "sdpa"
    best = max(
        (hf_baseline.run_hf(model, w, reqs, b, f"transformers static batch {b}") for b in (64, 256)),
        key=lambda r: r.tokens_per_s,
    )
    ids = torch.tensor(reqs[:1], device=w.device)

    def timed(new: int) -> float:
        w1.sync(w.device)
        t0 = time.monotonic()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        w1.sync(w.device)
        return time.monotonic() - t0

    timed(w.new_tokens)  # warm
    long = statistics.median(timed(w.new_tokens) for _ in range(3))
    short = statistics.median(timed(1) for _ in range(3))
    tpot = (long - short) / (w.new_tokens - 1) * 1000
    one = w1.Result("transformers batch-1", 1000 / tpot, (short * 1000, short * 1000), (tpot, tpot))
    w1.free(None)
    return [best, one]


def machine() -> dict[str, str]:
    """Which machine and commit produced the numbers."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
        "torch": torch.__version__,
        "grpc": grpc.__version__,
        "commit": os.environ.get("KILN_COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def report(results: list[w1.Result], extra: dict[str, Any]) -> str:
    """The table, then the server/in-process ratios the issue asks about."""
    by = {r.name: r for r in results}
    text = w1.report(results, by.get("transformers best static batch"))
    pairs = [
        ("base, 256 streams", "kiln-infer gRPC, base, 256 streams", "kiln base"),
        (f"{ADAPTERS} adapters", f"kiln-infer gRPC, {ADAPTERS} adapters", f"kiln {ADAPTERS} adapters (r=16)"),
    ]
    for label, server, engine in pairs:
        if server in by and engine in by:
            s, e = by[server], by[engine]
            text += (
                f"over gRPC / in-process, {label}: tokens/s {s.tokens_per_s / e.tokens_per_s:.2f}x, "
                f"TTFT p50 {s.ttft_ms[0] / e.ttft_ms[0]:.2f}x\n"
            )
    return (
        text
        + f"machine: {json.dumps(extra['machine'])}\nmany streams: {json.dumps(extra.get('many_streams'))}\n"
    )


def main(home: Path, json_path: Path | None, skip_baselines: bool) -> int:
    """The whole comparison in one process tree."""
    w = dataclasses.replace(w1.GPU if torch.cuda.is_available() else w1.CPU, adapter_counts=(ADAPTERS,))
    source, tokenizer, state = w1.load_model(w, home)
    vocab = min(len(tokenizer), source.config.vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-server-"))
    paths = [
        write_random_adapter(tmp / "adapters" / f"a{i}", source.config, w.rank, seed=i)
        for i in range(ADAPTERS)
    ]
    refs = [w1.AdapterRef(f"bench/a{i}@v1", p) for i, p in enumerate(paths)]
    results = w1.run_kiln(source, tokenizer, state, w, vocab, refs, overlap_off=False)
    del state
    w1.free(None)
    server_results, extra = run_server(w, vocab, paths, home)
    results += server_results
    if not skip_baselines:
        hf = hf_fair(source, w, w1.prompts(w, vocab, w.num_requests))
        hf[0] = dataclasses.replace(hf[0], name="transformers best static batch")
        results += hf
    extra["machine"] = machine()
    sys.stdout.write(f"workload: {w}\n{report(results, extra)}")
    if json_path is not None:
        payload = {"results": [dataclasses.asdict(r) for r in results], **extra}
        json_path.write_text(json.dumps(payload, indent=2))
    return 0
