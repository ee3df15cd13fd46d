"""Engine test fixtures: the real SmolLM2 (converted once per KILN_HOME), its reference, PEFT adapters."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kiln_common.model_loader import (
    ModelSource,
    load_hf_model,
    load_state_dict,
    load_tokenizer,
    resolve_model,
)
from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.types import AdapterRef, EngineRequest, RequestOutput, SamplingParams

REPO = Path(__file__).resolve().parents[3]
ADAPTER_SPECS: dict[str, dict[str, object]] = {
    # every linear projection, r=8 (the brief's adapter)
    "all8": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    # attention only, a different rank and scaling
    "qv4": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    # rank-stabilised scaling on the MLP and o_proj
    "mlp16": dict(
        r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]
    ),
}


@pytest.fixture(scope="session")
def kiln_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """KILN_HOME shared by the whole session (the repo's .kiln unless the environment names one)."""
    home = Path(os.environ.get("KILN_HOME", REPO / ".kiln"))
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def smol(kiln_home: Path) -> ModelSource:
    """The embedded SmolLM2-135M-Instruct."""
    return resolve_model("smollm2", kiln_home)


@pytest.fixture(scope="session")
def tokenizer(smol: ModelSource) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer."""
    return load_tokenizer(smol)


@pytest.fixture(scope="session")
def smol_state(smol: ModelSource) -> dict[str, torch.Tensor]:
    """fp32 base weights, shared by every engine in the session (engines never copy them)."""
    return load_state_dict(smol, torch.float32, "cpu")


@pytest.fixture(scope="session")
def hf_model(smol: ModelSource) -> torch.nn.Module:
    """transformers' reference model."""
    return load_hf_model(smol)


@pytest.fixture(scope="session")
def peft_model(smol: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """A PEFT model holding the three ADAPTER_SPECS adapters, random with non-zero lora_B, saved to disk."""
    from peft import LoraConfig, get_peft_model

    base = load_hf_model(smol)
    model = None
    gen = torch.Generator().manual_seed(1234)
    for name, spec in ADAPTER_SPECS.items():
        cfg = LoraConfig(init_lora_weights=False, **spec)  # type: ignore[arg-type]
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        for pname, p in model.named_parameters():
            if f".{name}." in pname and "lora_" in pname:
                p.data.normal_(0.0, 0.05 if "lora_B" in pname else 0.1, generator=gen)
    assert model is not None
    root = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(str(root))  # each named adapter lands in root/<name>
    model.adapter_dirs = {n: root / n for n in ADAPTER_SPECS}  # type: ignore[attr-defined]
    return model.eval()


@pytest.fixture(scope="session")
def adapters(peft_model: torch.nn.Module) -> dict[str, AdapterRef]:
    """AdapterRef per adapter name."""
    dirs: dict[str, Path] = peft_model.adapter_dirs  # type: ignore[attr-defined]
    return {name: AdapterRef(key=f"test/{name}@v1", path=Path(d)) for name, d in dirs.items()}


EngineFactory = Callable[..., AsyncEngine]


@pytest.fixture
def make_engine(
    smol: ModelSource, smol_state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase
) -> Iterator[EngineFactory]:
    """Build engines over the shared weights with config overrides; shut down after the test."""
    made: list[AsyncEngine] = []
    defaults = EngineConfig(
        max_model_len=256,
        max_num_seqs=16,
        max_num_batched_tokens=512,
        max_lora_slots=4,
        max_lora_rank=16,
        num_kv_blocks=128,
    )

    def make(**overrides: object) -> AsyncEngine:
        config = dataclasses.replace(defaults, **overrides)  # type: ignore[arg-type]
        engine = AsyncEngine.from_weights(
            smol.config, smol_state, tokenizer, config=config, source_path=smol.path
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


def collect(outputs: list[RequestOutput]) -> tuple[list[int], str]:
    """All token ids and text of one finished stream."""
    return [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs)


def run_all(engine: AsyncEngine, requests: list[EngineRequest]) -> list[list[RequestOutput]]:
    """Submit every request at once (so they share batches) and drain each stream."""
    streams = [engine.submit(r) for r in requests]
    return [list(s) for s in streams]


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    """Greedy sampling params."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of "
    "worms and an oozy smell, nor yet a dry, bare, sandy hole with nothing in it to sit down on or to eat: "
    "it was a hobbit-hole, and that means comfort. The hobbit was",
    "def fibonacci(n):",
    "Q: What is 2 + 2?\nA:",
]
