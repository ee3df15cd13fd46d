"""The batch-1 decode strategy: one token without LoRA, four GEMVs a layer, the ops around each folded in."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln_infer.kernels.backend import Kernels
from kiln_infer.kernels.fused_ops import add_rms_norm
from kiln_infer.kernels.gemv import ADD_NORM, NORM, PLAIN, SILU_MUL, gemv, gemv_qkv_rope
from kiln_infer.model.attention import StepMetadata, paged_attention
from kiln_infer.model.weights import LayerWeights


class BatchOneDecode:
    """`LlamaModel.forward` for one token without LoRA; built only for a model on the Triton kernels."""

    def __init__(
        self,
        layers: list[LayerWeights],
        embed: torch.Tensor,
        norm: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        heads: tuple[int, int],
        eps: float,
        scale: float,
        kernels: Kernels,
    ) -> None:
        assert kernels.triton and all(w.qkv is not None and w.gate_up is not None for w in layers)
        self.layers, self.embed, self.norm, self.eps, self.scale = layers, embed, norm, eps, scale
        self.cos, self.sin = rope  # [max_positions, D] each
        self.num_heads, self.num_kv_heads = heads
        self.decode_attention = kernels.decode_attention

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: StepMetadata,
    ) -> torch.Tensor:
        """Final-norm hidden state [1, hidden] of one token: same math and rounding as the general forward.

        The residual stream is a new tensor after each add (the GEMV that folds the add writes it) instead of
        being added to in place.
        """
        residual = F.embedding(input_ids, self.embed)  # [1, hidden]
        rope = (self.cos[positions], self.sin[positions])
        pending: torch.Tensor | None = None  # the last MLP output, not yet added to the residual
        for i, w in enumerate(self.layers):
            assert w.qkv is not None and w.gate_up is not None
            # q|k|v with RoPE and the cache write in its epilogue; the residual add and norm in its prologue
            q, new = gemv_qkv_rope(
                residual if pending is None else pending,
                w.qkv,
                NORM if pending is None else ADD_NORM,
                None if pending is None else residual,
                w.input_norm,
                self.eps,
                rope,
                kv_caches[i],
                meta.slot_mapping,
                self.num_heads,
                self.num_kv_heads,
            )
            residual = residual if new is None else new
            attn = paged_attention(q, *kv_caches[i], meta, self.scale, self.decode_attention)
            o, _ = gemv(attn.reshape(1, -1), w.o, PLAIN)
            gate_up, new = gemv(o, w.gate_up, ADD_NORM, residual, w.post_norm, self.eps)
            assert new is not None
            residual = new
            pending, _ = gemv(gate_up, w.down, SILU_MUL)
        assert pending is not None
        return add_rms_norm(pending, residual, self.norm, self.eps)
