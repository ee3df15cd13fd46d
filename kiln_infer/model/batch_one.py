"""The batch-1 decode strategy: one token without LoRA, four GEMVs a layer, the ops around each folded in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kiln_infer.kernels.fused_ops import add_rms_norm
from kiln_infer.kernels.gemv import ADD_NORM, NORM, PLAIN, SILU_MUL, gemv, gemv_qkv_rope
from kiln_infer.model.attention import StepMetadata, paged_attention

if TYPE_CHECKING:
    from kiln_infer.model.llama import LlamaModel


class BatchOneDecode:
    """`LlamaModel.forward` for one token without LoRA; built only for a model on the Triton kernels."""

    def __init__(self, model: LlamaModel) -> None:
        assert all(w.qkv is not None and w.gate_up is not None for w in model.layers)
        self.model = model

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
        m = self.model
        residual = F.embedding(input_ids, m.embed)  # [1, hidden]
        rope = (m.cos[positions], m.sin[positions])
        pending: torch.Tensor | None = None  # the last MLP output, not yet added to the residual
        for i, w in enumerate(m.layers):
            assert w.qkv is not None and w.gate_up is not None
            # q|k|v with RoPE and the cache write in its epilogue; the residual add and norm in its prologue
            q, new = gemv_qkv_rope(
                residual if pending is None else pending,
                w.qkv,
                NORM if pending is None else ADD_NORM,
                None if pending is None else residual,
                w.input_norm,
                m.eps,
                rope,
                kv_caches[i],
                meta.slot_mapping,
                m.num_heads,
                m.num_kv_heads,
            )
            residual = residual if new is None else new
            attn = paged_attention(q, *kv_caches[i], meta, m.scale, m.kernels.decode_attention)
            o, _ = gemv(attn.reshape(1, -1), w.o, PLAIN)
            gate_up, new = gemv(o, w.gate_up, ADD_NORM, residual, w.post_norm, m.eps)
            assert new is not None
            residual = new
            pending, _ = gemv(gate_up, w.down, SILU_MUL)
        assert pending is not None
        return add_rms_norm(pending, residual, m.norm, m.eps)
