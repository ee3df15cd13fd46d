"""The baselines W1 is measured against: transformers `generate` in static batches, and PEFT adapters mixed."""

from __future__ import annotations

import time

import torch

from benchmarks.w1 import Result, Workload, percentiles, sync
from kiln_common.model_loader import ModelSource
from kiln_infer.engine.types import AdapterRef


class StepClock:
    """A transformers logits processor that records when each generation step's logits are ready."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.monotonic())
        return scores


def run_hf(
    model: torch.nn.Module,
    w: Workload,
    reqs: list[list[int]],
    batch: int,
    name: str,
    adapter_names: list[str] | None = None,
) -> Result:
    """Static batches through `generate` (greedy, exactly w.new_tokens each)."""
    from transformers import LogitsProcessorList

    def generate(ids: torch.Tensor, new_tokens: int, **kwargs: object) -> torch.Tensor:
        """Greedy, exactly `new_tokens` each; adapters assigned round-robin over the rows."""
        if adapter_names:
            kwargs["adapter_names"] = [adapter_names[j % len(adapter_names)] for j in range(len(ids))]
        with torch.no_grad():
            return model.generate(  # type: ignore[operator, no-any-return]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

    ttft, tpot, total, elapsed = [], [], 0, 0.0
    # warm-up: one full batch of the measured shape (not timed), so kernel selection and allocator growth
    # for every sequence length are paid before the clock starts
    generate(torch.tensor(reqs[:batch], device=w.device), w.new_tokens)
    for i in range(0, len(reqs), batch):
        ids = torch.tensor(reqs[i : i + batch], device=w.device)
        clock = StepClock(w.device)
        sync(w.device)
        start = time.monotonic()
        out = generate(ids, w.new_tokens, logits_processor=LogitsProcessorList([clock]))
        sync(w.device)
        elapsed += time.monotonic() - start
        total += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        ttft += [clock.times[0] - start] * len(ids)
        tpot += [(clock.times[-1] - clock.times[0]) / max(1, len(clock.times) - 1)] * len(ids)
    return Result(name, total / elapsed, percentiles(ttft), percentiles(tpot))


def run_baselines(
    source: ModelSource, w: Workload, reqs: list[list[int]], refs: list[AdapterRef]
) -> tuple[Result, list[Result]]:
    """transformers static batches, batch 1, and PEFT with 4 adapters mixed in one batch."""
    from peft import PeftModel

    from kiln_common.model_loader import load_hf_model

    model = load_hf_model(source, w.dtype, w.device)
    baseline = run_hf(model, w, reqs, w.baseline_batch, f"transformers static batch {w.baseline_batch}")
    one = run_hf(model, w, reqs[:1], 1, "transformers batch-1")
    peft = PeftModel.from_pretrained(model, str(refs[0].path), adapter_name="a0")
    for i, ref in enumerate(refs[1:], start=1):
        peft.load_adapter(str(ref.path), adapter_name=f"a{i}")
    peft.to(w.dtype)
    names = [f"a{i}" for i in range(len(refs))]
    mixed = run_hf(
        peft, w, reqs[: w.peft_requests], w.peft_requests, f"PEFT {len(refs)} adapters mixed", names
    )
    return baseline, [one, mixed]
