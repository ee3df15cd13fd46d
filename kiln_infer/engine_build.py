"""Build the engine a server runs: load the base weights once, share them with kiln-train, size the engine."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from kiln_common.base_beacon import BaseBeacon, share_base_weights
from kiln_common.config import InferConfig, resolve_device, resolve_dtype
from kiln_common.gpu_turn import ServingTurn
from kiln_common.model_loader import load_state_dict, load_tokenizer, resolve_model
from kiln_common.redis_server import connect
from kiln_common.weight_share import remove_stale_shm
from kiln_infer.engine.async_engine import AsyncEngine
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.kv_cache import kv_bytes_per_token
from kiln_infer.engine_link import EngineInfo
from kiln_infer.engine_warm import warm_lora

log = logging.getLogger(__name__)

CPU_MAX_MODEL_LEN = 2048  # on a CPU the KV cache lives in host memory: keep one sequence's share modest
CPU_KV_SEQUENCES = 8  # the CPU KV cache holds this many full-length sequences
# Default context on a GPU when the model's own is longer: the decode step's block table is as wide as one
# sequence of max_model_len, so a 128k default would copy megabytes per step. --max-model-len raises it.
GPU_DEFAULT_MAX_MODEL_LEN = 8192
# decode batch sizes captured as CUDA graphs; a step pads to the next one, so 32 users and a few background
# requests take a 48-row graph, not a 64-row one
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class EngineSizeError(ValueError):
    """The configured sizes cannot work on this device (the message names the setting)."""


def shm_dir_for(home: Path) -> Path:
    """Where CPU shared-memory weight buckets live: /dev/shm when usable, else under $KILN_HOME."""
    dev_shm = Path("/dev/shm")
    if dev_shm.is_dir() and os.access(dev_shm, os.W_OK):
        return dev_shm
    path = home / "shm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def engine_config_for(
    cfg: InferConfig, device: str, model_context: int, kv_bytes_token: int, free_bytes: int
) -> EngineConfig:
    """Engine sizes from the server's settings; 0 means "chosen for this device"."""
    on_gpu = device.startswith("cuda")
    max_num_seqs = cfg.max_num_seqs or (256 if on_gpu else 64)
    background = cfg.max_background_seqs or max_num_seqs
    batched = cfg.max_num_batched_tokens or (16384 if on_gpu else 2048)
    slots = cfg.max_lora_slots or (32 if on_gpu else 8)
    if on_gpu:
        kv_tokens = int(free_bytes * cfg.kv_memory_fraction) // kv_bytes_token
        max_len = cfg.max_model_len or min(model_context, kv_tokens, GPU_DEFAULT_MAX_MODEL_LEN)
        if max_len > kv_tokens:
            raise EngineSizeError(
                f"--max-model-len / KILN_MAX_MODEL_LEN: one sequence of {max_len} tokens needs "
                f"{max_len * kv_bytes_token / 2**30:.1f} GiB of KV cache, but --kv-memory-fraction "
                f"{cfg.kv_memory_fraction} of the free memory holds {kv_tokens} tokens"
            )
        num_kv_blocks = None
    else:
        max_len = cfg.max_model_len or min(model_context, CPU_MAX_MODEL_LEN)
        num_kv_blocks = -(-max_len // 16) * min(max_num_seqs, CPU_KV_SEQUENCES)
    if max_len > model_context:
        raise EngineSizeError(
            f"--max-model-len / KILN_MAX_MODEL_LEN: {max_len} is past the model's context of {model_context}"
        )
    if batched < max_num_seqs:
        raise EngineSizeError(
            f"--max-num-batched-tokens / KILN_MAX_NUM_BATCHED_TOKENS: {batched} is below --max-num-seqs "
            f"{max_num_seqs} (every running sequence needs one token per step)"
        )
    return EngineConfig(
        max_num_seqs=max_num_seqs,
        max_background_seqs=min(background, max_num_seqs),
        max_num_batched_tokens=batched,
        num_kv_blocks=num_kv_blocks,
        kv_memory_fraction=cfg.kv_memory_fraction,
        max_model_len=max_len,
        max_lora_slots=slots,
        max_lora_rank=cfg.max_lora_rank,
        max_cpu_loras=max(32, slots),
        max_waiting=cfg.max_waiting,
        max_queue_time_s=cfg.max_queue_time_s or None,
        use_cuda_graphs=on_gpu and not cfg.enforce_eager,
        static_decode=False if cfg.enforce_eager else None,
        cuda_graph_batch_sizes=tuple(b for b in GRAPH_BATCH_SIZES if b < max_num_seqs) + (max_num_seqs,),
    )


@dataclass
class BuiltEngine:
    """An engine over shared base weights, what it reports, and how to tear it down."""

    engine: AsyncEngine
    info: EngineInfo
    beacon: BaseBeacon | None
    close_hooks: list[Callable[[], None]]

    def close(self) -> None:
        """Stop the engine and stop sharing the weights."""
        self.engine.shutdown()
        if self.beacon is not None:
            self.beacon.stop()
        for hook in self.close_hooks:
            hook()


def _prepare_steps(engine: AsyncEngine, config: PretrainedConfig, device: str) -> None:
    """Capture the step graphs and warm the LoRA kernels, before kiln-infer reports SERVING.

    The warm-up runs its steps eagerly, as steps too large for the mixed-step graphs will run: it is there
    to compile the eager LoRA kernels' variants (engine_warm.py). The mixed-step graphs are captured after.
    """
    runner = engine.core.runner
    mixed, runner.mixed = runner.mixed, None
    if runner.decoder is not None:
        runner.decoder.capture_all(with_lora=False)
        runner.decoder.capture_all(with_lora=True)
    if device.startswith("cuda"):
        try:
            log.info("LoRA prefill kernels warmed in %.2f s", warm_lora(engine, config))
        except Exception as exc:  # noqa: BLE001 - serving without the warm-up beats not serving
            log.warning("could not warm the LoRA prefill kernels (%s); the first adapter request will", exc)
    runner.mixed = mixed
    if mixed is not None:
        mixed.capture_all(with_lora=False)
        mixed.capture_all(with_lora=True)


def build_engine(cfg: InferConfig, redis_url: str) -> BuiltEngine:
    """Load the model once, share its weights with kiln-train, and build the engine over them."""
    source = resolve_model(cfg.model, cfg.home)
    tokenizer = load_tokenizer(source)
    device = resolve_device(cfg.device)
    dtype_name = resolve_dtype(cfg.dtype, device)
    dtype = getattr(torch, dtype_name)
    state = load_state_dict(source, dtype, device)
    client = connect(redis_url)
    beacon = None
    try:
        shm_dir = shm_dir_for(cfg.home)
        remove_stale_shm(shm_dir)
        shared, beacon = share_base_weights(state, device, client, shm_dir)
        state = shared.views
    except Exception as exc:  # noqa: BLE001 - serving without sharing beats not serving
        log.warning("could not share base weights with kiln-train (%s); serving unshared", exc)
    gc.collect()
    model_context = int(getattr(source.config, "max_position_embeddings", CPU_MAX_MODEL_LEN))
    free = torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else 0
    engine_config = engine_config_for(
        cfg, device, model_context, kv_bytes_per_token(source.config, dtype), free
    )
    engine = AsyncEngine.from_weights(
        source.config, state, tokenizer, config=engine_config, source_path=source.path
    )
    close_hooks: list[Callable[[], None]] = []
    if beacon is not None:  # kiln-train shares this GPU: say when serving's work is on it
        try:
            turn = ServingTurn(shm_dir, torch.device(device))
            turn.announce(client, beacon.generation)
            engine.core.turn = turn
            close_hooks.append(turn.close)
        except Exception as exc:  # noqa: BLE001 - serving without the hand-off beats not serving
            log.warning("could not announce serving's GPU turn (%s); kiln-train will pace by duty only", exc)
    _prepare_steps(engine, source.config, device)
    ec = engine.config
    info = EngineInfo(
        max_model_len=ec.max_model_len,
        max_num_seqs=ec.max_num_seqs,
        max_waiting=ec.max_waiting,
        max_num_batched_tokens=ec.max_num_batched_tokens,
        max_lora_slots=ec.max_lora_slots,
        max_lora_rank=ec.max_lora_rank,
        kv_blocks=engine.core.blocks.num_blocks,
        block_size=ec.block_size,
        device=device,
        dtype=dtype_name,
    )
    log.info("engine core ready: %s", info)
    return BuiltEngine(engine, info, beacon, [*close_hooks, client.close])
