"""One optimizer step's gradients computed in micro-batches: shorter kernels, the same gradient.

The governor shrinks the micro-batch when serving's latency is over budget; the step's batch (and so the
optimisation) is unchanged, only split into row chunks whose token-weighted losses add up to the full batch's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE = -100


def accumulate_backward(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    micro_batch: int,
    between: Callable[[], None] | None = None,
) -> float:
    """Backward of the batch's mean completion-token loss, `micro_batch` rows at a time; returns the loss.

    `between` is called after every micro-batch but the last (the governor's spread pause).
    """
    labels = tensors["labels"]  # [batch, width]
    rows = labels.shape[0]
    step = max(1, min(micro_batch, rows))
    total_tokens = int((labels[:, 1:] != IGNORE).sum())
    if total_tokens == 0:
        return 0.0
    loss_sum = 0.0
    for start in range(0, rows, step):
        if start > 0 and between is not None:
            between()
        chunk = {k: v[start : start + step] for k, v in tensors.items()}
        n_tokens = int((chunk["labels"][:, 1:] != IGNORE).sum())
        if n_tokens == 0:
            continue
        loss = model(**chunk).loss * (n_tokens / total_tokens)  # the chunk's share of the batch mean
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def fit_micro_batch(model: torch.nn.Module, tensors: dict[str, torch.Tensor], cap_bytes: int) -> int:
    """The most rows per micro-batch whose activations fit under `cap_bytes` of this process's CUDA memory.

    One row's forward and backward is measured (peak over what was allocated before), the rows scale from it
    with a tenth of the cap kept spare. On CPU, or with no cap, the whole batch.
    """
    rows = int(tensors["labels"].shape[0])
    device = tensors["labels"].device
    if device.type != "cuda" or cap_bytes <= 0 or rows <= 1:
        return max(rows, 1)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    accumulate_backward(model, {k: v[:1] for k, v in tensors.items()}, 1)
    torch.cuda.synchronize(device)
    per_row = max(torch.cuda.max_memory_allocated(device) - before, 1)
    model.zero_grad(set_to_none=True)
    spare = int(cap_bytes * 0.9) - before
    return max(1, min(rows, spare // per_row))
