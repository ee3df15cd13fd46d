"""AsyncEngine: the thread-safe front of the engine; a background thread runs EngineCore.step in a loop."""

from __future__ import annotations

import gc
import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from kiln_common.model_loader import ModelSource, load_state_dict
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.engine_core import EngineCore
from kiln_infer.engine.sequence import Sequence
from kiln_infer.engine.types import AdapterRef, EngineOverloadedError, EngineRequest, RequestOutput

log = logging.getLogger(__name__)


class OutputSink(Protocol):
    """Anything a sequence's outputs can be put into (None marks the end)."""

    def put(self, item: RequestOutput | None) -> None: ...


class OutputStream:
    """Blocking iterator over one request's outputs, fed by the engine thread."""

    def __init__(self, outputs: queue.SimpleQueue[RequestOutput | None]) -> None:
        self._outputs = outputs

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            out = self._outputs.get()
            if out is None:
                return
            yield out


def eos_ids(
    source_path: Path | None, model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> set[int]:
    """End-of-sequence token ids from the generation config, model config and tokenizer."""
    ids: set[int] = set()
    candidates: list[object] = [getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id]
    if source_path is not None and (source_path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        candidates.append(GenerationConfig.from_pretrained(source_path).eos_token_id)
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return ids


class AsyncEngine:
    """Implements the `Engine` protocol of kiln_infer.engine.types."""

    def __init__(
        self,
        source: ModelSource,
        tokenizer: PreTrainedTokenizerBase,
        *,
        dtype: torch.dtype,
        device: str,
        config: EngineConfig,
    ) -> None:
        state = load_state_dict(source, dtype, device)
        self._start(source.config, state, tokenizer, config, eos_ids(source.path, source.config, tokenizer))

    @classmethod
    def from_weights(
        cls,
        model_config: PretrainedConfig,
        state: dict[str, torch.Tensor],
        tokenizer: PreTrainedTokenizerBase,
        *,
        config: EngineConfig,
        eos_token_ids: set[int] | None = None,
        source_path: Path | None = None,
    ) -> AsyncEngine:
        """An engine over a loaded HF-named state dict; its tensors are used as given, never copied."""
        engine = cls.__new__(cls)
        eos = eos_token_ids if eos_token_ids is not None else eos_ids(source_path, model_config, tokenizer)
        engine._start(model_config, state, tokenizer, config, eos)
        return engine

    def _start(
        self,
        model_config: PretrainedConfig,
        state: dict[str, torch.Tensor],
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig,
        eos: set[int],
    ) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.core = EngineCore(model_config, state, tokenizer, config, eos, on_finished=self._on_finished)
        # What exists now (weights, tokenizer tables, ...) lives as long as the process: keep the cyclic GC
        # from re-scanning it on every collection, which otherwise costs milliseconds per decode step.
        gc.freeze()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._unfinished = 0
        self._arrivals = 0
        self._rng = random.Random(config.seed)
        self._stopped = False
        # Called on the engine thread after every loop turn (an engine-core process flushes its outbox here).
        self.on_step_end: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest, sink: OutputSink | None = None) -> OutputStream:
        """Queue a request; raises EngineOverloadedError when full, AdapterLoadError for a bad adapter.

        Outputs go to the returned stream, or to `sink` when given (its put() runs on the engine thread).
        """
        if not request.prompt_token_ids:
            raise ValueError("prompt_token_ids is empty")
        if len(request.prompt_token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {len(request.prompt_token_ids)} tokens does not fit max_model_len "
                f"{self.config.max_model_len}"
            )
        lora = None
        if request.adapter is not None:
            lora = self.core.adapters.get_host(request.adapter.key, request.adapter.path)
        with self._lock:
            if self._stopped:
                raise EngineOverloadedError("engine is shut down")
            if self._unfinished >= self.config.max_waiting + self.config.max_num_seqs:
                raise EngineOverloadedError(f"{self._unfinished} requests in flight; try again later")
            seed = request.sampling.seed if request.sampling.seed is not None else self._rng.getrandbits(62)
            seq = Sequence(request=request, seed=seed, arrival=self._arrivals, lora=lora)
            if sink is not None:
                seq.outputs = sink  # type: ignore[assignment]
            self._arrivals += 1
            self._unfinished += 1
            self._inbox.append(seq)
            self._wake.notify()
        return OutputStream(seq.outputs)

    def abort(self, request_id: str) -> None:
        """Cancel a request: its stream ends with ABORTED; resources are freed on the next loop turn."""
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    def preload_adapter(self, adapter: AdapterRef) -> None:
        """Load an adapter into the host cache now (raises AdapterLoadError for a bad one)."""
        self.core.adapters.get_host(adapter.key, adapter.path)

    def stats(self) -> dict[str, float]:
        """Running and waiting sequences and the share of KV blocks in use (a racy but cheap snapshot)."""
        scheduler, blocks = self.core.scheduler, self.core.blocks
        return {
            "running": float(len(scheduler.running)),
            "waiting": float(sum(len(q) for q in list(scheduler.waiting.values()))),
            "kv_usage": 1.0 - blocks.num_free / max(1, blocks.num_blocks),
            "unfinished": float(self._unfinished),
        }

    def num_unfinished(self) -> int:
        """Requests admitted and not yet finished."""
        with self._lock:
            return self._unfinished

    def shutdown(self) -> None:
        """Stop the loop thread; unfinished requests end as ABORTED."""
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join()
        gc.unfreeze()  # let the collector reclaim this engine (its KV cache) once the caller drops it

    def _drain_inbox(self) -> bool:
        """Move submitted requests and aborts into the core; False when asked to stop."""
        with self._lock:
            while not (self._inbox or self._aborts or self._stopped or self.core.has_work()):
                self._wake.wait()
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            stopped = self._stopped
        for seq in inbox:
            self.core.add(seq)
        for request_id in aborts:
            self.core.abort(request_id)
        return not stopped

    def _on_finished(self) -> None:
        with self._lock:
            self._unfinished -= 1

    def _loop(self) -> None:
        while True:
            running = self._drain_inbox()
            if not running:
                self.core.fail_all()
            else:
                try:
                    self.core.step()
                except Exception:  # noqa: BLE001 - a failed step must not leave clients hanging
                    log.exception("engine step failed; aborting all requests")
                    self.core.fail_all()
            self.on_step_end()
            if not running:
                return
