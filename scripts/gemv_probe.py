"""Batch-1 projections of a Llama-3.2-1B layer on the GPU: cuBLAS paths against a plain Triton GEMV.

    python scripts/gemv_probe.py

Each variant is captured 50 times in a CUDA graph and replayed, so launch overhead is excluded; prints µs per
call and the effective bandwidth. Used to pick the batch-1 decode path (issue 4).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


@triton.jit
def _gemv(x_ptr, w_ptr, out_ptr, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        c = start + cols
        x = tl.load(x_ptr + c, mask=c < k, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * k + c[None, :], mask=(rows[:, None] < n) & (c[None, :] < k), other=0.0
        )
        acc += w.to(tl.float32) * x[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rows < n)


@triton.jit
def _gemv_splitk(x_ptr, w_ptr, out_ptr, n, k, k_per_split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * k_per_split
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(k0, k0 + k_per_split, BLOCK_K):
        c = start + cols
        x = tl.load(x_ptr + c, mask=c < k, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None] * k + c[None, :], mask=(rows[:, None] < n) & (c[None, :] < k), other=0.0
        )
        acc += w.to(tl.float32) * x[None, :]
    tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1), mask=rows < n, sem="relaxed")


def triton_gemv_splitk(
    x: torch.Tensor,
    w: torch.Tensor,
    out32: torch.Tensor,
    block_n: int,
    block_k: int,
    split: int,
    warps: int,
    stages: int,
) -> None:
    n, k = w.shape
    out32.zero_()
    _gemv_splitk[(triton.cdiv(n, block_n), split)](
        x, w, out32, n, k, k // split, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages
    )


def triton_gemv(
    x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, block_n: int, block_k: int, warps: int
) -> None:
    n, k = w.shape
    _gemv[(triton.cdiv(n, block_n),)](x, w, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)


def timed(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
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


def probe(name: str, n: int, k: int) -> dict[str, float]:
    """µs per call of every variant for one [n, k] weight."""
    dt = torch.bfloat16
    # 16 distinct weights in turn, so L2 (50 MB) does not hold them between calls
    ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(16)]
    x = torch.randn(1, k, device="cuda", dtype=dt)
    out = torch.empty(1, n, device="cuda", dtype=dt)
    out32 = torch.empty(n, device="cuda", dtype=torch.float32)
    ref = F.linear(x, ws[0])
    idx = [0]

    def nxt() -> torch.Tensor:
        idx[0] = (idx[0] + 1) % 16
        return ws[idx[0]]

    res = {
        "F.linear": timed(lambda: F.linear(x, nxt())),
        "torch.mv": timed(lambda: torch.mv(nxt(), x[0])),
    }
    for bn, bk, nw in [(4, 512, 4), (8, 512, 4), (16, 512, 8), (8, 1024, 8), (4, 1024, 4)]:
        triton_gemv(x[0], ws[0], out[0], bn, bk, nw)
        err = (out.float() - ref.float()).abs().max().item()
        if err > 0.05:
            print(f"{name} triton {bn}x{bk} w{nw} WRONG err {err}")
            continue
        res[f"triton {bn}x{bk} w{nw}"] = timed(lambda: triton_gemv(x[0], nxt(), out[0], bn, bk, nw))  # noqa: B023
    splits = [(8, 512, 2, 4, 2), (8, 512, 4, 4, 2), (8, 256, 8, 4, 2), (16, 512, 4, 8, 2), (4, 1024, 4, 4, 2)]
    splits += [(8, 512, 4, 4, 4), (16, 256, 8, 4, 3), (32, 256, 4, 8, 3)]
    for bn, bk, split, nw, st in splits:
        if k % (split * bk):
            continue
        triton_gemv_splitk(x[0], ws[0], out32, bn, bk, split, nw, st)
        err = (out32 - ref[0].float()).abs().max().item()
        if err > 0.05:
            print(f"{name} splitk {bn}x{bk}/{split} WRONG err {err}")
            continue
        res[f"splitk {bn}x{bk}/{split} w{nw} s{st}"] = timed(
            lambda: triton_gemv_splitk(x[0], nxt(), out32, bn, bk, split, nw, st)  # noqa: B023
        )
    mb = n * k * 2 / 1e6  # MB; MB/µs = TB/s
    for key, us in res.items():
        print(f"{name:<8} {key:<26} {us:7.2f} µs  {mb / us:6.2f} TB/s")
    return res


def main() -> int:
    torch.manual_seed(0)
    total = {}
    for name, (n, k) in SHAPES.items():
        res = probe(name, n, k)
        best = min(res, key=res.__getitem__)
        total[name] = (res["F.linear"], res[best], best)
    lin = sum(v[0] for v in total.values())
    best_sum = sum(v[1] for v in total.values())
    picks = {k: v[2] for k, v in total.items()}
    print(f"per layer: F.linear {lin:.1f} µs, best per shape {best_sum:.1f} µs {picks}")
    print(f"x16 layers: {16 * lin:.0f} µs vs {16 * best_sum:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
