"""Microbenchmark of the decode-attention and fused RoPE/KV-write kernels on the GPU (µs per call).

    python -m benchmarks.kernel_bench [--context 320] [--max-len 400] [--layers 16]

Shapes of Llama-3.2-1B (32 q heads, 8 kv heads, head_dim 64, bf16, block_size 16). Each variant is timed
as a CUDA graph of `--layers` calls over distinct per-layer caches (as the decode graph replays it), so
launch gaps are those of a replay; at batch 1 the K/V of every layer fits in L2, as it may in the model.
Every variant is also checked against the torch reference and its max error printed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

import torch

from kiln_infer.kernels.decode_attention import (
    decode_attention_reference,
    decode_attention_triton,
    sm_count,
    split_blocks,
)
from kiln_infer.kernels.rope_cache import launch_rope_cache, rope_and_cache_reference, rope_tokens_per_program

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 64, 16
DTYPE = torch.bfloat16


def time_graph(calls: Sequence[Callable[[], object]], replays: int = 50) -> float:
    """Mean µs per call of `calls` captured back to back in one CUDA graph."""
    for fn in calls:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * len(calls))


def bench_decode(batch: int, context: int, max_len: int, layers: int, device: str = "cuda") -> list[str]:
    """One-pass vs split-K (the chosen chunk and a sweep) at one batch size."""
    gen = torch.Generator(device=device).manual_seed(0)
    width = -(-max_len // BLOCK)
    blocks = batch * width + 1
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, generator=gen).to(DTYPE)
    caches = [
        tuple(
            torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device, generator=gen).to(DTYPE)
            for _ in range(2)
        )
        for _ in range(layers)
    ]
    tables = torch.randperm(blocks - 1, device=device, generator=gen)[: batch * width].view(batch, width)
    tables = tables.to(torch.int32)
    lens = torch.randint(max(1, context - 64), context + 1, (batch,), device=device, generator=gen)
    lens = lens.to(torch.int32)
    scale = HEAD_DIM**-0.5
    ref = decode_attention_reference(
        q.float(), caches[0][0].float(), caches[0][1].float(), tables, lens, scale
    )
    chosen = split_blocks(batch, KV_HEADS, width, BLOCK, sm_count(q.device))
    chunks = dict.fromkeys([width, chosen, 1, 2, 4, 8, 16])  # ordered, no repeats
    lines = []
    for chunk in chunks:
        if chunk > width:
            continue
        splits = -(-width // chunk)

        def call(kv: tuple[torch.Tensor, ...], c: int = chunk) -> torch.Tensor:
            return decode_attention_triton(q, kv[0], kv[1], tables, lens, scale, c)

        err = (call(caches[0]).float() - ref).abs().max().item()
        us = time_graph([functools.partial(call, kv) for kv in caches])
        kind = "one-pass" if splits == 1 else f"split-K {splits:>3} x {chunk * BLOCK:>4} tokens"
        mark = "  <- chosen" if chunk == chosen else ""
        lines.append(
            f"decode  batch {batch:>3}  ctx ~{context}  width {width:>3}  {kind:<28}{us:8.2f} µs"
            f"  x{layers} = {us * layers:7.1f} µs  err {err:.1e}{mark}"
        )
    return lines


def bench_rope(tokens: int, layers: int, device: str = "cuda") -> list[str]:
    """The fused RoPE + KV write at `tokens` tokens: the chosen tokens-per-program and a sweep."""
    gen = torch.Generator(device=device).manual_seed(0)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = [torch.randn(tokens, width, device=device, generator=gen).to(DTYPE) for _ in range(layers)]
    angles = torch.rand(tokens, HEAD_DIM, device=device, generator=gen) * 6.3
    cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)
    blocks = -(-tokens // BLOCK) + 1
    slots = torch.randperm(blocks * BLOCK, device=device, generator=gen)[:tokens]
    caches = [
        tuple(torch.zeros(blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE) for _ in range(2))
        for _ in range(layers)
    ]
    q_out = torch.empty(tokens, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    split = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    views = []  # strided q/k/v views of one projection, as in the model
    for x in qkv:
        q, k, v = x.split(split, dim=-1)
        views.append((q, k, v))
    ref_caches = tuple(torch.zeros_like(c) for c in caches[0])
    ref = rope_and_cache_reference(
        *views[0], (cos, sin), (ref_caches[0], ref_caches[1]), slots, HEADS, KV_HEADS
    )
    moved = tokens * (2 * width + 2 * HEAD_DIM) * 2  # bytes: q/k/v in, q/k/v out, cos/sin in
    chosen = (rope_tokens_per_program(tokens), 1)
    tilings = [chosen] + [(bt, h) for bt in (2, 8, 16, 32, 64, 128) for h in (1, 2, 8)]
    lines = []
    for block_t, heads in dict.fromkeys(tilings):
        if block_t > max(2, 2 * tokens):
            continue

        def call(i: int, bt: int = block_t, hp: int = heads) -> None:
            q, k, v = views[i]
            launch_rope_cache(q, k, v, q_out, (cos, sin), (caches[i][0], caches[i][1]), slots, bt, hp)

        call(0)
        err = max(
            (q_out.float() - ref.float()).abs().max().item(),
            (caches[0][0].float() - ref_caches[0].float()).abs().max().item(),
            (caches[0][1].float() - ref_caches[1].float()).abs().max().item(),
        )
        us = time_graph([functools.partial(call, i) for i in range(layers)])
        mark = "  <- chosen" if (block_t, heads) == chosen else ""
        lines.append(
            f"rope_cache  T {tokens:>5}  {block_t:>3} tokens x {heads} heads/program{us:10.2f} µs"
            f"  {moved / us / 1e6:6.2f} TB/s  err {err:.1e}{mark}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print µs per call of decode attention (batch 1 and 256, and between) and the fused RoPE/KV write."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bench", description=__doc__)
    parser.add_argument("--context", type=int, default=320, help="context length per sequence (about)")
    parser.add_argument("--max-len", type=int, default=400, help="max_model_len: sets the block-table width")
    parser.add_argument("--layers", type=int, default=16, help="calls per graph, each on its own caches")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256, 16384])
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not torch.cuda.is_available():
        sys.stderr.write("kernel_bench needs a CUDA device\n")
        return 1
    context = min(args.context, args.max_len)
    sys.stdout.write(f"{torch.cuda.get_device_name()}, {sm_count(torch.device('cuda'))} SMs\n")
    for batch in args.batches:
        sys.stdout.write("\n".join(bench_decode(batch, context, args.max_len, args.layers)) + "\n")
    for tokens in args.tokens:
        layers = args.layers if tokens <= 4096 else 2
        sys.stdout.write("\n".join(bench_rope(tokens, layers)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
