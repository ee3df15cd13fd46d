"""A training row's forward and backward cut into short chunks, so training can fill serving's GPU gaps.

The hand-off (kiln_common/gpu_turn.py) lets kiln-train put work on the GPU only while serving has none there.
That pays only if training's work comes in pieces shorter than the gaps between serving's steps (a few
milliseconds): a serving step that arrives while a piece runs waits for the piece. A whole row of 1,024 tokens
through a 1B model is ~30 ms of forward and backward; a decoder layer's forward is a fiftieth of that.

So one row is computed as 2L + 1 + S chunks, each a CUDA graph on a GPU (one launch):
- embed: h[0] = embed(ids);
- forward i (0..L-1), no autograd: h[i+1] = layer_i(h[i]);
- head, in S slices of the row's positions (the vocabulary projection of a whole row is the longest piece of
  work, ~4x a layer's on the 1B shape): the loss on norm(h[L]) there (its share of the step's mean), and
  its gradient g[L] with respect to those positions of h[L];
- backward i (L-1..0): layer i's forward recomputed from h[i] with autograd, and its backward from g[i+1]:
  g[i] and the gradients of layer i's LoRA weights (added to fixed buffers).
The same gradient as one backward through the model (a CPU test checks it); the price is one more forward per
layer (activation recomputation) and memory for L + 1 hidden states of one row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from kiln_common.side_stream import side_stream
from kiln_train.micro_batch import IGNORE

log = logging.getLogger(__name__)


def _hidden(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A decoder layer's hidden states (some transformers versions return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


class LayerChunks:
    """Forward and backward of one row through a PEFT-wrapped Llama, as short chunks (graphs on a GPU)."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        seq_len: int,
        graphs: bool,
        head_slices: int = 4,
    ) -> None:
        wrapped: Any = model
        causal: Any = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
        inner: Any = causal.model
        self.layers: list[Any] = list(inner.layers)
        self.norm: Any = inner.norm
        self.head: Any = causal.lm_head
        self.embed: Any = inner.embed_tokens
        device, dtype = params[0].device, self.embed.weight.dtype
        n, hidden = len(self.layers), int(causal.config.hidden_size)
        self.params = params
        self.ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)
        self.labels = torch.full((1, seq_len), IGNORE, dtype=torch.long, device=device)
        self.pos = torch.arange(seq_len, device=device).unsqueeze(0)
        self.h = [torch.zeros(1, seq_len, hidden, dtype=dtype, device=device) for _ in range(n + 1)]
        self.g = [torch.zeros(1, seq_len, hidden, dtype=dtype, device=device) for _ in range(n + 1)]
        with torch.no_grad():  # the positions never change: cos/sin once
            self.rope = tuple(t.clone() for t in inner.rotary_emb(self.h[0], self.pos))
        self.scale = torch.ones((), device=device)  # 1 / the step's completion tokens
        self.loss = torch.zeros((), device=device)
        self.grads = [torch.zeros_like(p) for p in params]
        grad_of = {id(p): g for p, g in zip(params, self.grads, strict=True)}
        self.layer_params = [[p for p in layer.parameters() if id(p) in grad_of] for layer in self.layers]
        self.layer_grads = [[grad_of[id(p)] for p in ps] for ps in self.layer_params]
        head = list(self.norm.parameters()) + list(self.head.parameters())
        self.head_params = [p for p in head if id(p) in grad_of]
        self.head_grads = [grad_of[id(p)] for p in self.head_params]
        if sum(map(len, self.layer_params)) + len(self.head_params) != len(params):
            raise ValueError("trainable parameters outside the decoder layers and the head (embeddings?)")
        steps: list[Callable[[], None]] = [self._embed]
        steps += [partial(self._forward, i) for i in range(n)]
        slices = max(1, min(head_slices, seq_len // 2))  # each slice predicts at least one label
        cuts = [seq_len * k // slices for k in range(slices + 1)]
        steps += [partial(self._head, a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        steps += [partial(self._backward, i) for i in reversed(range(n))]
        self.chunks = steps
        self.graphs: list[torch.cuda.CUDAGraph] = []
        if graphs and device.type == "cuda":
            self.graphs = self._capture(device)
            log.info("a row's forward and backward captured as %d chunk graphs", len(self.graphs))

    @torch.no_grad()
    def _embed(self) -> None:
        self.h[0].copy_(self.embed(self.ids))

    @torch.no_grad()
    def _forward(self, i: int) -> None:
        out = self.layers[i](self.h[i], position_embeddings=self.rope, position_ids=self.pos)
        self.h[i + 1].copy_(_hidden(out))

    def _head(self, a: int, b: int) -> None:
        """Positions [a, b) of the last hidden state: their logits predict labels a + 1 .. b."""
        with torch.enable_grad():
            x = self.h[-1][:, a:b].detach().requires_grad_(True)
            targets = self.labels[
                0, a + 1 : b + 1
            ]  # at the row's end one fewer: its last position predicts none
            logits = self.head(self.norm(x))[0, : targets.shape[0]].float()
            loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
            loss = loss * self.scale
            grads = torch.autograd.grad(loss, [x, *self.head_params])
        with torch.no_grad():
            self.g[-1][:, a:b].copy_(grads[0])
            if self.head_grads:
                torch._foreach_add_(self.head_grads, list(grads[1:]))
            self.loss.add_(loss.detach())

    def _backward(self, i: int) -> None:
        with torch.enable_grad():
            x = self.h[i].detach().requires_grad_(True)
            y = _hidden(self.layers[i](x, position_embeddings=self.rope, position_ids=self.pos))
            grads = torch.autograd.grad(y, [x, *self.layer_params[i]], grad_outputs=self.g[i + 1])
        with torch.no_grad():
            self.g[i].copy_(grads[0])
            if self.layer_grads[i]:
                torch._foreach_add_(self.layer_grads[i], list(grads[1:]))

    def _capture(self, device: torch.device) -> list[torch.cuda.CUDAGraph]:
        """Each chunk as a graph, all in one memory pool (replayed in the order captured, never at once)."""
        with side_stream(device):  # cuBLAS workspaces and allocator pools before capture
            for _ in range(2):
                for chunk in self.chunks:
                    chunk()
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        with side_stream(device):
            for chunk in self.chunks:
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pool)
                try:
                    chunk()
                finally:
                    graph.capture_end()
                graphs.append(graph)
        torch.cuda.synchronize(device)
        self.zero()
        return graphs

    @torch.no_grad()
    def zero(self) -> None:
        """Gradient buffers and the loss to zero (a new step)."""
        torch._foreach_zero_(self.grads)
        self.loss.zero_()

    def step_grads(
        self, tensors: dict[str, torch.Tensor], before: Callable[[], object] | None = None
    ) -> float:
        """The batch's gradient (mean completion-token loss), row by row and chunk by chunk, left in the
        parameters' .grad; `before` is called ahead of every chunk (the hand-off's wait). Returns the loss.

        On a GPU each chunk is waited for before the next is considered, so training never has more than one
        chunk queued when serving's turn comes.
        """
        labels = tensors["labels"]
        self.zero()
        self.scale.fill_(1.0 / max(1, int((labels[:, 1:] != IGNORE).sum())))
        cuda = self.ids.device.type == "cuda"
        run = [g.replay for g in self.graphs] if self.graphs else self.chunks
        for row in range(labels.shape[0]):
            self.ids.copy_(tensors["input_ids"][row : row + 1])
            self.labels.copy_(labels[row : row + 1])
            for chunk in run:
                if before is not None:
                    before()
                chunk()
                if cuda:
                    torch.cuda.current_stream().synchronize()
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        return float(self.loss)
