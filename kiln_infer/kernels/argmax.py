"""Row-wise greedy argmax: a two-level max (Triton on CUDA) for a few long rows, torch's argmax otherwise."""

from __future__ import annotations

import torch

from kiln_infer.kernels.triton_import import tl, triton

_ARGMAX_CHUNKS = 512
_ARGMAX_BLOCK = 4096  # vocabulary entries per program of the Triton argmax

if triton is not None:

    @triton.jit
    def _chunk_argmax_kernel(
        logits_ptr, vals_ptr, idx_ptr, vocab, row_stride, chunks, BLOCK: tl.constexpr
    ):  # pragma: no cover - GPU only
        """Per (row, chunk of BLOCK entries): the chunk's maximum and the first index holding it."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * row_stride + offs, mask=offs < vocab, other=float("-inf"))
        x = x.to(tl.float32)
        best = tl.argmax(x, axis=0, tie_break_left=True)
        tl.store(vals_ptr + row * chunks + chunk, tl.max(x, axis=0))
        tl.store(idx_ptr + row * chunks + chunk, chunk * BLOCK + best)

    @triton.jit
    def _pick_argmax_kernel(vals_ptr, idx_ptr, out_ptr, chunks, CHUNKS: tl.constexpr):  # pragma: no cover
        """Per row: the first chunk holding the overall maximum, and its index."""
        row = tl.program_id(0)
        c = tl.arange(0, CHUNKS)
        vals = tl.load(vals_ptr + row * chunks + c, mask=c < chunks, other=float("-inf"))
        best = tl.argmax(vals, axis=0, tie_break_left=True)
        tl.store(out_ptr + row, tl.load(idx_ptr + row * chunks + best).to(tl.int64))


def _argmax_triton(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise first argmax in two small launches (a chunk per program, then a pick per row)."""
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, _ARGMAX_BLOCK)
    vals = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _chunk_argmax_kernel[(rows, chunks)](
        logits, vals, idx, vocab, logits.stride(0), chunks, BLOCK=_ARGMAX_BLOCK
    )
    _pick_argmax_kernel[(rows,)](vals, idx, out, chunks, CHUNKS=triton.next_power_of_2(chunks))
    return out


def greedy_tokens(logits: torch.Tensor, two_level: bool | None = None) -> torch.Tensor:
    """Row-wise argmax (the first index of the maximum), [B, vocab] -> [B].

    A plain argmax of a few long rows runs on few GPU blocks (about 35 µs for one 128k-vocabulary row on an
    H200, a third of a batch-1 decode step's slack); for those, a two-level max spreads the work: each chunk's
    maximum, then the first chunk holding the overall one (two Triton launches on CUDA, else torch ops).
    `two_level` forces the choice (tests). Rows holding NaN: torch's argmax points at the NaN, the two-level
    paths at the largest number.
    """
    rows, vocab = logits.shape
    if two_level is None:
        two_level = logits.is_cuda and rows <= 16 and vocab >= 16 * _ARGMAX_CHUNKS
    if not two_level:
        return logits.argmax(dim=-1)
    if logits.is_cuda and triton is not None and logits.stride(1) == 1:
        return _argmax_triton(logits)
    chunks = min(_ARGMAX_CHUNKS, vocab)
    width = vocab // chunks
    body = chunks * width
    values, index = logits[:, :body].unflatten(1, (chunks, width)).max(dim=-1)  # [rows, chunks]
    best = values.argmax(dim=-1, keepdim=True)  # first chunk holding the maximum
    token = best * width + index.gather(1, best)
    if body < vocab:  # the tail after the last whole chunk; a tie keeps the earlier index
        tail_value, tail_index = logits[:, body:].max(dim=-1, keepdim=True)
        token = torch.where(tail_value > values.gather(1, best), body + tail_index, token)
    return token.squeeze(1)
