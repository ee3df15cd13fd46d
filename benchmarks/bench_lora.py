"""LoRA cost of one decode step on CUDA: dense masked math vs the BGMV kernels, in captured CUDA graphs.

python -m benchmarks.bench_lora                       # Llama-3.2-1B shapes, 16 layers, rank 16, bf16
options: --layers N  --rank R  --max-rank R (slot padding, default = rank)  --slots 4 16 64  --tokens 256 1

Every slot holds an adapter and the tokens are spread over all of them (S distinct adapters when T >= S).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kiln_infer.kernels.backend import TRITON_KERNELS
from kiln_infer.kernels.triton_import import triton_available
from kiln_infer.lora.layers import LoraBatch, LoraSlots, add_lora

log = logging.getLogger(__name__)

LLAMA_1B: dict[str, tuple[int, int]] = {  # module -> (in, out) of Llama-3.2-1B
    "q_proj": (2048, 2048),
    "k_proj": (2048, 512),
    "v_proj": (2048, 512),
    "o_proj": (2048, 2048),
    "gate_proj": (2048, 8192),
    "up_proj": (2048, 8192),
    "down_proj": (8192, 2048),
}


def graph_ms(step: Callable[[], None], iters: int = 50) -> float:
    """GPU time of one replay of `step` captured in a CUDA graph, in milliseconds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def lora_step_ms(
    num_layers: int,
    num_slots: int,
    num_tokens: int,
    rank: int,
    max_rank: int,
    device: str = "cuda",
) -> tuple[float, float, float]:
    """(base matmuls, dense LoRA, BGMV LoRA) ms of one step: every layer's four shrink groups."""
    dev, dtype = torch.device(device), torch.bfloat16
    slots = LoraSlots(num_layers, LLAMA_1B, num_slots, max_rank, dtype, dev, TRITON_KERNELS)
    for layer in range(num_layers):
        for m in LLAMA_1B:
            for s in range(num_slots):
                slots.a[layer][m][s * max_rank : s * max_rank + rank].normal_(std=0.02)
                slots.b[layer][m][:, s * max_rank : s * max_rank + rank].normal_(std=0.02)
    slots.ranks.fill_(rank)
    gen = torch.Generator(device=dev).manual_seed(0)
    token_slots = (torch.arange(num_tokens, device=dev) % num_slots)[
        torch.randperm(num_tokens, device=dev, generator=gen)
    ]
    groups = slots.groups
    xs = {
        g: torch.randn(num_tokens, LLAMA_1B[mods[0]][0], device=dev, dtype=dtype)
        for g, mods in groups.items()
    }
    weights = {
        g: torch.randn(sum(LLAMA_1B[m][1] for m in mods), LLAMA_1B[mods[0]][0], device=dev, dtype=dtype)
        * 0.02
        for g, mods in groups.items()
    }
    outs = {g: F.linear(xs[g], weights[g]) for g in groups}  # fused base outputs, LoRA added in place
    base_outs = {g: torch.empty_like(outs[g]) for g in groups}
    sizes = {g: [LLAMA_1B[m][1] for m in mods] for g, mods in groups.items()}

    def base() -> None:  # the layer's projections themselves, for scale
        for _ in range(num_layers):
            for g in groups:
                torch.mm(xs[g], weights[g].t(), out=base_outs[g])

    def lora_step(use_kernels: bool) -> Callable[[], None]:
        batch = LoraBatch.for_tokens if use_kernels else LoraBatch.dense

        def step() -> None:
            lora = batch(slots, token_slots)
            for layer in range(num_layers):
                for g in groups:
                    add_lora(xs[g], list(outs[g].split(sizes[g], dim=1)), layer, g, lora)

        return step

    return graph_ms(base), graph_ms(lora_step(False)), graph_ms(lora_step(True))


def main(argv: list[str] | None = None) -> None:
    """Print the LoRA cost per decode step for each (slots, tokens), dense vs BGMV."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-rank", type=int, default=None)
    parser.add_argument("--slots", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available() or not triton_available():
        raise SystemExit("bench_lora needs a CUDA device and Triton")
    max_rank = args.max_rank or args.rank
    log.info(
        "%d layers of Llama-3.2-1B shapes, rank %d in slots of rank %d, bf16; ms per decode step",
        args.layers,
        args.rank,
        max_rank,
    )
    log.info("%6s %6s %12s %10s %10s %8s", "slots", "tokens", "base matmuls", "dense", "bgmv", "dense/bgmv")
    for num_tokens in args.tokens:
        for num_slots in args.slots:
            base, dense, bgmv = lora_step_ms(args.layers, num_slots, num_tokens, args.rank, max_rank)
            log.info(
                "%6d %6d %12.3f %10.3f %10.3f %8.2fx", num_slots, num_tokens, base, dense, bgmv, dense / bgmv
            )


if __name__ == "__main__":
    main()
