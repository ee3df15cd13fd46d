"""Batch-1 projections of a Llama-3.2-1B layer on the GPU: cuBLAS against our GEMV (`kiln_infer/kernels/gemv.py`).

    python -m benchmarks.gemv_probe

Each variant is captured 50 times in a CUDA graph and replayed, so launch overhead is excluded; prints µs per
call and the effective bandwidth, the default config's time beside the best of a sweep, and one layer's
projection chain (norm, q|k|v, o, add+norm, gate|up, SiLU·up, down) unfused with cuBLAS against the folded
GEMVs. Used to pick the batch-1 decode path and `gemv_config` (issue 4).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kiln_infer.kernels.fused_ops import add_rms_norm, rms_norm, silu_mul
from kiln_infer.kernels.gemv import ADD_NORM, NORM, PLAIN, SILU_MUL, gemv, gemv_config

SHAPES = {
    "qkv": (3072, 2048),
    "o": (2048, 2048),
    "gate_up": (16384, 2048),
    "down": (2048, 8192),
    "lm_head": (128256, 2048),
}
SWEEP = [
    (bn, bk, w, s)
    for bn, bk in [(1, 2048), (2, 2048), (4, 2048), (8, 1024), (4, 1024), (8, 512), (16, 512), (2, 4096)]
    for w in (4, 8)
    for s in (1, 3)
]


def timed(fn: Callable[[], object], reps: int = 50) -> float:
    """µs per call of fn, replayed from a CUDA graph of `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000 / (5 * reps)


def probe(name: str, n: int, k: int) -> tuple[float, float, float]:
    """(cuBLAS µs, default-config µs, best-of-sweep µs) for one [n, k] weight."""
    dt = torch.bfloat16
    copies = 2 if name == "lm_head" else 16  # distinct weights in turn, so L2 (50 MB) does not hold them
    ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=dt)
    ref = F.linear(x, ws[0])
    idx = [0]

    def nxt() -> torch.Tensor:
        idx[0] = (idx[0] + 1) % copies
        return ws[idx[0]]

    mb = n * k * 2 / 1e6  # MB; MB/µs = TB/s
    cublas = timed(lambda: F.linear(x, nxt()))
    default_cfg = gemv_config(n, k)
    results = {}
    for cfg in [default_cfg, *SWEEP]:
        if cfg in results:
            continue
        out, _ = gemv(x, ws[0], PLAIN, config=cfg)
        err = (out.float() - ref.float()).abs().max().item()
        if err > 0.05:
            print(f"{name} {cfg} WRONG err {err}")
            continue
        results[cfg] = timed(lambda: gemv(x, nxt(), PLAIN, config=cfg))  # noqa: B023
    best = min(results, key=results.__getitem__)
    print(f"{name:<8} cuBLAS                 {cublas:7.2f} µs  {mb / cublas:5.2f} TB/s")
    for cfg in sorted(results, key=results.__getitem__)[:5]:
        print(f"{name:<8} gemv {str(cfg):<18} {results[cfg]:7.2f} µs  {mb / results[cfg]:5.2f} TB/s")
    print(f"{name:<8} gemv default {default_cfg} {results[default_cfg]:7.2f} µs")
    return cublas, results[default_cfg], results[best]


def layer_chain() -> tuple[float, float]:
    """One layer's projections with the ops between them: (unfused with cuBLAS µs, folded GEMVs µs)."""
    dt, h, inter = torch.bfloat16, 2048, 8192
    layers = []
    for _ in range(16):
        layers.append(
            {
                "qkv": torch.randn(3072, h, device="cuda", dtype=dt) * 0.02,
                "o": torch.randn(h, h, device="cuda", dtype=dt) * 0.02,
                "gu": torch.randn(2 * inter, h, device="cuda", dtype=dt) * 0.02,
                "down": torch.randn(h, inter, device="cuda", dtype=dt) * 0.02,
                "n1": torch.ones(h, device="cuda", dtype=dt),
                "n2": torch.ones(h, device="cuda", dtype=dt),
            }
        )
    residual = torch.randn(1, h, device="cuda", dtype=dt)
    attn = torch.randn(1, h, device="cuda", dtype=dt)
    idx = [0]

    def unfused() -> None:
        w = layers[idx[0] % 16]
        idx[0] += 1
        x = rms_norm(residual, w["n1"], 1e-5)
        F.linear(x, w["qkv"])
        o = F.linear(attn, w["o"])
        x = add_rms_norm(o, residual, w["n2"], 1e-5)
        d = F.linear(silu_mul(F.linear(x, w["gu"])), w["down"])
        residual.sub_(d)  # the next layer's add (keeps the values bounded)

    def folded() -> None:
        w = layers[idx[0] % 16]
        idx[0] += 1
        gemv(residual, w["qkv"], NORM, norm_weight=w["n1"], eps=1e-5)
        o, _ = gemv(attn, w["o"], PLAIN)
        gu, _ = gemv(o, w["gu"], ADD_NORM, residual, w["n2"], 1e-5)
        gemv(gu, w["down"], SILU_MUL)

    return timed(unfused, 16), timed(folded, 16)


def main() -> int:
    torch.manual_seed(0)
    totals = {name: probe(name, *shape) for name, shape in SHAPES.items()}
    per_layer = [sum(v[i] for name, v in totals.items() if name != "lm_head") for i in range(3)]
    print(
        f"per layer: cuBLAS {per_layer[0]:.1f} µs, gemv default {per_layer[1]:.1f} µs, best per shape "
        f"{per_layer[2]:.1f} µs; x16 layers + lm_head: {16 * per_layer[0] + totals['lm_head'][0]:.0f} vs "
        f"{16 * per_layer[1] + totals['lm_head'][1]:.0f} vs {16 * per_layer[2] + totals['lm_head'][2]:.0f} µs"
    )
    unfused, folded = layer_chain()
    print(f"layer chain (norms, activation, 4 projections): unfused {unfused:.1f} µs, folded {folded:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
