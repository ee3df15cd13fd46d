"""The frozen base model of kiln-train, built over kiln-infer's shared tensors (no second copy)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kiln_common.base_beacon import heartbeat_generation, read_base_manifest
from kiln_common.weight_share import SharedWeights, attach

log = logging.getLogger(__name__)


def build_model_over(views: dict[str, torch.Tensor], config: PretrainedConfig) -> PreTrainedModel:
    """A transformers causal LM whose parameters ARE `views` (meta init + assign), frozen, in eval mode."""
    device = next(iter(views.values())).device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(views, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"shared weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary frequencies) are not in the state dict: rebuild them on the real device.
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):
                rebuilt = type(module)(config=config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"tensors left on the meta device: {still_meta[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class SharedBase:
    """Attaches to the live exporter's weights through Redis; notices when kiln-infer restarted."""

    def __init__(self, client: Any, config: PretrainedConfig) -> None:
        self._redis = client
        self._config = config
        self._shared: SharedWeights | None = None
        self._model: PreTrainedModel | None = None

    @property
    def generation(self) -> str | None:
        """Generation id attached to, or None."""
        return self._shared.generation if self._shared else None

    @property
    def views(self) -> dict[str, torch.Tensor]:
        """The attached tensors by HF name (empty when detached)."""
        return self._shared.views if self._shared else {}

    def alive(self) -> bool:
        """True while the exporter we attached to still heartbeats with the same generation."""
        return self._shared is not None and heartbeat_generation(self._redis) == self._shared.generation

    def detach(self) -> None:
        """Drop the model and our mappings of the exporter's memory."""
        if self._shared is not None:
            log.info("detaching from base weights generation %s", self._shared.generation)
        self._model = None
        self._shared = None

    def model(self) -> PreTrainedModel | None:
        """The frozen base model over the live shared weights (re-attaching after a restart), or None."""
        if self._model is not None and self.alive():
            return self._model
        self.detach()
        manifest = read_base_manifest(self._redis)
        if manifest is None:
            return None
        try:
            self._shared = attach(manifest)
        except (FileNotFoundError, RuntimeError, ValueError) as exc:
            log.warning("could not attach to base weights: %s", exc)
            self._shared = None
            return None
        self._model = build_model_over(self._shared.views, self._config)
        log.info(
            "attached to base weights generation %s (%d tensors, %d bucket(s))",
            self._shared.generation,
            len(self._shared.views),
            len(self._shared.buckets),
        )
        return self._model
