"""Our Llama-family forward (Llama, Qwen2/3, Mistral, SmolLM) over the paged KV cache, on shared weights."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from kiln_common.lora_targets import TARGET_MODULES
from kiln_infer.kernels.backend import Kernels
from kiln_infer.kernels.fused_ops import rms_norm_reference
from kiln_infer.kernels.gemv import gemv, gemv_supported
from kiln_infer.kernels.rope_cache import (
    apply_rope,
    fused_rope_self_check,
    fused_rope_supported,
    rope_and_cache_reference,
    write_kv,
)
from kiln_infer.lora.layers import LoraBatch, add_lora
from kiln_infer.model.attention import StepMetadata, paged_attention
from kiln_infer.model.batch_one import BatchOneDecode
from kiln_infer.model.rope import rope_tables
from kiln_infer.model.weights import LayerWeights, load_layer

log = logging.getLogger(__name__)


def _check_window(config: PretrainedConfig, max_positions: int) -> None:
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and max_positions > window:
        raise ValueError(
            f"the model attends within a sliding window of {window} tokens, which this engine does not "
            f"implement: set max_model_len <= {window}"
        )


def _gemv_fits(layers: list[LayerWeights], head_dim: int) -> bool:
    """Whether every layer can decode one token through the GEMVs with the norms in their prologues."""
    return head_dim % 4 == 0 and all(
        w.qkv is not None
        and w.gate_up is not None
        and w.q_bias is None
        and w.k_bias is None
        and w.v_bias is None
        and w.q_norm is None
        # a row of this model's activations against each projection (dtype, layout, width)
        and all(gemv_supported(w.input_norm[None], m) for m in (w.qkv, w.o, w.gate_up, w.down))
        for w in layers
    )


class LlamaModel:
    """Decoder-only forward; weights borrowed from an HF-named state dict, kernels chosen by the engine."""

    def __init__(
        self, config: PretrainedConfig, state: dict[str, torch.Tensor], max_positions: int, kernels: Kernels
    ) -> None:
        _check_window(config, max_positions)
        self.config, self.kernels = config, kernels
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.embed = state["model.embed_tokens.weight"]
        self.norm = state["model.norm.weight"]
        self.lm_head = state.get("lm_head.weight", self.embed)
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.layers = [load_layer(state, i) for i in range(config.num_hidden_layers)]
        for name, t in state.items():
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(
                    f"weight {name} is {t.dtype} on {t.device}; expected {self.dtype} on {self.device}"
                )
        fused_rope = (
            kernels.triton
            and self.device.type == "cuda"
            and fused_rope_supported(self.head_dim)
            and fused_rope_self_check(
                self.num_heads, self.num_kv_heads, self.head_dim, self.dtype, self.device
            )
        )
        self.rope_and_cache = kernels.rope_and_cache if fused_rope else rope_and_cache_reference
        self.cos, self.sin = rope_tables(config, self.head_dim, max_positions, self.dtype, self.device)
        # batch-1 decode through our GEMVs (the logits too), when the kernels and every layer allow it
        self.gemv_logits = (
            kernels.triton and self.device.type == "cuda" and _gemv_fits(self.layers, self.head_dim)
        )
        self.batch_one: BatchOneDecode | None = None
        if self.gemv_logits and fused_rope:
            heads = (self.num_heads, self.num_kv_heads)
            rope = (self.cos, self.sin)
            self.batch_one = BatchOneDecode(
                self.layers, self.embed, self.norm, rope, heads, self.eps, self.scale, kernels
            )
        fused = sum(w.qkv is not None for w in self.layers)
        log.info("model: %d layers, %d with fused qkv views", len(self.layers), fused)

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LoRA target module."""
        w = self.layers[0]
        # in TARGET_MODULES order, as `load_layer` reads them
        mats = (w.q, w.k, w.v, w.o, w.gate, w.up, w.down)
        return {m: (t.shape[1], t.shape[0]) for m, t in zip(TARGET_MODULES, mats, strict=True)}

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim of any shape (Qwen3's per-head q/k norm)."""
        if x.is_cuda:  # one fused kernel instead of seven
            return F.rms_norm(x, weight.shape, weight, self.eps)
        return rms_norm_reference(x, weight, self.eps)

    @staticmethod
    def _linears(
        x: torch.Tensor,
        fused: torch.Tensor | None,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        """Base projections of one input: one matmul on a fused view when there is one, else one each."""
        if fused is not None and all(b is None for b in biases):
            return list(F.linear(x, fused).split([w.shape[0] for w in weights], dim=-1))
        return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]

    @staticmethod
    def _add_lora(
        x: torch.Tensor,
        outs: list[torch.Tensor],
        layer: int,
        group: str,
        lora: LoraBatch | None,
    ) -> list[torch.Tensor]:
        """Add the batch's LoRA deltas for one shrink group into its base outputs `outs`, in place."""
        return outs if lora is None else add_lora(x, outs, layer, group, lora)

    def _attention(
        self,
        i: int,
        w: LayerWeights,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: StepMetadata,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        t, h, kvh, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        # views of one output when q, k, v are fused (LoRA is then added into it in place)
        parts = self._linears(x, w.qkv, [w.q, w.k, w.v], [w.q_bias, w.k_bias, w.v_bias])
        q2, k2, v2 = self._add_lora(x, parts, i, "qkv", lora)
        if w.q_norm is None:
            q = self.rope_and_cache(q2, k2, v2, rope, kv, meta.slot_mapping, h, kvh)
        else:  # Qwen3: per-head RMSNorm of q and k before the rotation
            q, k, v = q2.reshape(t, h, d), k2.reshape(t, kvh, d), v2.reshape(t, kvh, d)
            assert w.k_norm is not None
            q, k = apply_rope(self._rms(q, w.q_norm), *rope), apply_rope(self._rms(k, w.k_norm), *rope)
            write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        out = paged_attention(q, kv[0], kv[1], meta, self.scale, self.kernels.decode_attention)
        return self._add_lora(out, [F.linear(out, w.o)], i, "o", lora)[0]

    def _mlp(self, i: int, w: LayerWeights, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        if w.gate_up is not None:
            gate_up = F.linear(x, w.gate_up)  # one matmul, LoRA added in place, one activation kernel
            halves = list(gate_up.split([w.gate.shape[0], w.up.shape[0]], dim=-1))  # views
            self._add_lora(x, halves, i, "gate_up", lora)
            h = self.kernels.silu_mul(gate_up)
        else:
            gate, up = self._add_lora(x, [F.linear(x, w.gate), F.linear(x, w.up)], i, "gate_up", lora)
            h = F.silu(gate) * up
        return self._add_lora(h, [F.linear(h, w.down)], i, "down", lora)[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: StepMetadata,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] for flat tokens `input_ids` [T] at `positions` [T].

        The residual stream is added to in place; each residual add runs fused with the norm after it
        (the next layer's input norm, or the final norm after the last layer). One token without LoRA takes
        the batch-1 strategy when the model was built with one (same math, see `BatchOneDecode`).
        """
        if self.batch_one is not None and lora is None and input_ids.shape[0] == 1:
            return self.batch_one.forward(input_ids, positions, kv_caches, meta)
        k = self.kernels
        residual = F.embedding(input_ids, self.embed)  # [T, hidden]
        rope = (self.cos[positions], self.sin[positions])  # [T, D] each, shared by every layer
        x = k.rms_norm(residual, self.layers[0].input_norm, self.eps)
        next_norms = [w.input_norm for w in self.layers[1:]] + [self.norm]
        for i, (w, next_norm) in enumerate(zip(self.layers, next_norms, strict=True)):
            out = self._attention(i, w, x, rope, kv_caches[i], meta, lora)
            x = k.add_rms_norm(out, residual, w.post_norm, self.eps)
            out = self._mlp(i, w, x, lora)
            x = k.add_rms_norm(out, residual, next_norm, self.eps)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in the model's dtype (the sampler widens them to fp32 where it needs to)."""
        if self.gemv_logits and hidden.shape[0] == 1 and hidden.is_contiguous():
            return gemv(hidden, self.lm_head)[0]  # batch 1: 4.4 vs 4.2 TB/s for cuBLAS on the H200
        return F.linear(hidden, self.lm_head)
