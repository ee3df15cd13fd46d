"""LoRA kernels for decode-sized batches (Triton): each token block reads only its own slot's A and B rows.

Tokens are grouped by slot once per step (`segment_tokens`); every shrink and expand of the step then runs
one program per (block of up to BLOCK_M tokens of one slot, slice of the work), so a layer costs two launches
per shrink group and reads the weights of the slots in use, whatever the number of slots. Shapes are static
and nothing is read back on the host, so all of it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from kiln_infer.kernels.lora_segments import BLOCK_M, SlotSegments, cdiv, pow2
from kiln_infer.kernels.triton_import import tl, triton

MAX_MODULES = 3  # modules per shrink group the expand kernel covers in one launch (q, k, v)
_SHRINK_BLOCK_K = 128
_EXPAND_BLOCK_N = 128
# Programs to aim for per launch (a few per SM of an H100/H200): the shrink splits its input features and
# the expand its output columns until a launch has about this many, so batch-1 steps still fill the GPU.
SHRINK_PROGRAMS = 256
# The shrink's splits are a power of two up to this: the expand reads them all in one load of compile-time
# shape (all in flight at once), so each distinct count is a compiled variant of it.
MAX_SHRINK_SPLITS = 16
EXPAND_PROGRAMS = 1 << 16  # in practice one column tile per program: empty blocks exit at once


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 exact; half types use tensor cores anyway


def bgmv_shrink(
    x: torch.Tensor,
    a_group: torch.Tensor,
    segments: SlotSegments,
    num_modules: int,
    max_rank: int,
    target_programs: int = SHRINK_PROGRAMS,
) -> torch.Tensor:
    """Rank-space activations of a shrink group, as fp32 partial sums over slices of the input features.

    semantics (out: [splits, T, G*R], summed over dim 0; A_{g,s} = a_group[(g*S + s)*R : (g*S + s + 1)*R]):
        for t in range(T):                          # x: [T, in], a_group: [G*S*R, in]
            s = slot[t]
            out[:, t, g*R:(g+1)*R] = A_{g,s} @ x[t] if s >= 0 else 0       (for each module g)
    splits is a power of two (at most MAX_SHRINK_SPLITS). Rows of A_{g,s} past the slot's rank must be zero
    padding (as `LoraSlots.load` leaves them): all R rows of a slot are read. Rows of tokens in
    no block (base tokens, when the segments give them none) are left unwritten.
    """
    assert triton is not None and x.dim() == 2 and a_group.is_contiguous()
    assert x.dtype == a_group.dtype and x.shape[0] == segments.num_tokens
    x = x if x.stride(1) == 1 else x.contiguous()
    t, in_features = x.shape
    nb = segments.blocks.shape[1]
    k_tiles = cdiv(in_features, _SHRINK_BLOCK_K)
    # split the input features until the launch has about target_programs programs; a power of two of splits
    # (rounded down) keeps the expand's variants few. Split i takes k-tiles [i*k_tiles//splits, ...) up to
    # the next split's first: the slices differ by one tile at most and none is empty.
    want = min(k_tiles, MAX_SHRINK_SPLITS, max(1, cdiv(target_programs, nb * num_modules)))
    splits = 1 << (want.bit_length() - 1)
    out = torch.empty(splits, t, num_modules * max_rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(nb, num_modules, splits)](
        x,
        a_group,
        segments.order,
        segments.blocks,
        out,
        x.stride(0),
        in_features,
        t,
        nb,
        a_group.shape[0] // num_modules,
        R=max_rank,
        GR=num_modules * max_rank,
        BLOCK_M=BLOCK_M,
        BLOCK_R=pow2(max_rank),
        BLOCK_K=_SHRINK_BLOCK_K,
        PRECISION=_precision(x.dtype),
    )
    return out


def bgmv_expand_add(
    shrunk: torch.Tensor,
    b: torch.Tensor,
    segments: SlotSegments,
    out: torch.Tensor,
    module_sizes: list[int],
    first_module: int,
    max_rank: int,
    target_programs: int = EXPAND_PROGRAMS,
) -> None:
    """Add each token's B @ shrunk into `out` in place, for consecutive modules with side-by-side outputs.

    semantics (shrunk: [splits, T, G*R] from `bgmv_shrink`; b: [sum(module_sizes), S*R], module i's rows
    first, each row's slot s at columns s*R:(s+1)*R; out: [T, sum(module_sizes)], row stride free):
        for t in range(T):
            s = slot[t]
            if s < 0: continue                        # base tokens are left untouched
            for i, n in enumerate(module columns):    # module i covers out[:, off_i : off_i + size_i]
                g = first_module + i
                h = shrunk[:, t, g*R:(g+1)*R].sum(0)    # fp32, rounded to b.dtype for the product
                out[t, n] += b[n, s*R:(s+1)*R] @ h     # fp32 accumulation, one rounding into out
    Only tokens in blocks of a slot >= 0 are read from `shrunk` (the rows the shrink writes). Columns past
    a slot's rank in b are multiplied by the shrink's zeros there (zero padding, as `LoraSlots.load`
    leaves it).
    """
    assert triton is not None and 1 <= len(module_sizes) <= MAX_MODULES
    assert out.dim() == 2 and out.stride(1) == 1 and b.stride(1) == 1 and out.dtype == b.dtype
    assert out.shape == (segments.num_tokens, sum(module_sizes)) and b.shape[0] == out.shape[1]
    splits, t, gr = shrunk.shape
    assert splits & (splits - 1) == 0, "shrunk comes from bgmv_shrink: a power of two of splits"
    n_features = out.shape[1]
    bounds = [sum(module_sizes[: i + 1]) for i in range(len(module_sizes))]
    bounds += [n_features] * (MAX_MODULES - len(bounds))
    nb = segments.blocks.shape[1]
    n_tiles = cdiv(n_features, _EXPAND_BLOCK_N)
    chunks = min(n_tiles, max(1, cdiv(target_programs, nb)))
    tiles_per_program = cdiv(n_tiles, chunks)
    _expand_kernel[(nb, cdiv(n_tiles, tiles_per_program))](
        shrunk,
        b,
        segments.order,
        segments.blocks,
        out,
        out.stride(0),
        b.stride(0),
        n_features,
        bounds[0],
        bounds[1],
        t,
        nb,
        tiles_per_program,
        first_module * max_rank,
        R=max_rank,
        GR=gr,
        SPLITS=splits,
        NUM_MODULES=len(module_sizes),
        BLOCK_M=BLOCK_M,
        BLOCK_R=pow2(max_rank),
        BLOCK_N=_EXPAND_BLOCK_N,
        PRECISION=_precision(out.dtype),
    )


if triton is not None:
    # The shrink and expand are latency-bound at decode sizes (a few KB per program), so each program is laid
    # out as few rounds of dependent loads as possible, with independent loads issued together: the block's
    # metadata (slot, start, length); then the block's token indices (in the shrink with the A rows, which
    # need only the slot); then what the tokens address (x rows; shrunk rows and the output tile, with the B
    # tile). Slots are zero-padded beyond their rank, so the kernels read all R rank rows of a slot instead
    # of loading its rank first; unused blocks (length 0) hold stale slot/start values, loaded but not used.

    # Arguments that change from step to step are not specialised on (Triton would otherwise build a variant
    # per divisibility-by-16 of each, and a prefill step meeting a new one would stall for a compile).
    @triton.jit(do_not_specialize=["num_tokens", "num_blocks"])
    def _shrink_kernel(
        x_ptr,
        a_ptr,
        order_ptr,
        blocks_ptr,
        out_ptr,
        x_stride,
        in_features,
        num_tokens,
        num_blocks,
        module_rows,
        R: tl.constexpr,
        GR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        blk, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(blocks_ptr + blk)
        start = tl.load(blocks_ptr + num_blocks + blk)
        length = tl.load(blocks_ptr + 2 * num_blocks + blk)
        if length > 0:
            m = tl.arange(0, BLOCK_M)
            rows = m < length
            tok = tl.load(order_ptr + start + m, mask=rows, other=0)
            r = tl.arange(0, BLOCK_R)
            in_r = r < R  # BLOCK_R may exceed R: the rows past R are the next slot's
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            if slot >= 0:  # base tokens keep zeros
                a_rows = a_ptr + (g * module_rows + slot * R + r).to(tl.int64) * in_features  # [BLOCK_R]
                x_rows = x_ptr + tok.to(tl.int64) * x_stride  # [BLOCK_M]
                # this split's k-tiles (see bgmv_shrink): none is empty, neighbours differ by one at most
                k_tiles = tl.cdiv(in_features, BLOCK_K)
                splits = tl.num_programs(2)
                k_lo = split * k_tiles // splits * BLOCK_K
                k_hi = (split + 1) * k_tiles // splits * BLOCK_K
                for k in range(k_lo, k_hi, BLOCK_K):
                    kk = k + tl.arange(0, BLOCK_K)
                    in_k = kk < in_features
                    # A first: its address needs only the slot, so it is in flight while `tok` still loads
                    at = tl.load(a_rows[:, None] + kk[None, :], mask=in_r[:, None] & in_k[None, :], other=0.0)
                    xt = tl.load(x_rows[:, None] + kk[None, :], mask=rows[:, None] & in_k[None, :], other=0.0)
                    acc = tl.dot(xt, tl.trans(at), acc, input_precision=PRECISION)
            dst = out_ptr + (split * num_tokens + tok.to(tl.int64))[:, None] * GR + g * R + r[None, :]
            tl.store(dst, acc, mask=rows[:, None] & in_r[None, :])

    @triton.jit
    def _shrunk_rows(
        shrunk_ptr,
        tok,
        rows,
        r,
        col,
        need,
        num_tokens,
        R: tl.constexpr,
        GR: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Sum over splits of shrunk[:, tok, col + r] -> [BLOCK_M, BLOCK_R] fp32; zeros (nothing read) if not
        `need`.

        All the splits are one [BLOCK_M, SPLITS, BLOCK_R] load, so they are in flight together, summed in each
        thread's registers. (An unrolled loop of 2-D loads compiles worse: Triton moves each partial through
        shared memory into the dot's layout before adding it.)
        """
        sp = tl.arange(0, SPLITS)
        row = (sp[None, :] * num_tokens + tok.to(tl.int64)[:, None]) * GR + col  # [BLOCK_M, SPLITS]
        mask = (rows & need)[:, None] & (r < R)[None, :]  # [BLOCK_M, BLOCK_R]
        parts = tl.load(shrunk_ptr + row[:, :, None] + r[None, None, :], mask=mask[:, None, :], other=0.0)
        return tl.sum(parts, axis=1)

    @triton.jit(do_not_specialize=["num_tokens", "num_blocks", "tiles_per_program"])
    def _expand_kernel(
        shrunk_ptr,
        b_ptr,
        order_ptr,
        blocks_ptr,
        out_ptr,
        out_stride,
        b_stride,
        n_features,
        bound1,
        bound2,
        num_tokens,
        num_blocks,
        tiles_per_program,
        col0,
        R: tl.constexpr,
        GR: tl.constexpr,
        SPLITS: tl.constexpr,
        NUM_MODULES: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        blk, chunk = tl.program_id(0), tl.program_id(1)
        slot = tl.load(blocks_ptr + blk)
        start = tl.load(blocks_ptr + num_blocks + blk)
        length = tl.load(blocks_ptr + 2 * num_blocks + blk)
        if (length > 0) & (slot >= 0):
            m = tl.arange(0, BLOCK_M)
            rows = m < length
            tok = tl.load(order_ptr + start + m, mask=rows, other=0)
            r = tl.arange(0, BLOCK_R)
            in_r = r < R  # BLOCK_R may exceed R: the columns past R are the next slot's
            dt = b_ptr.dtype.element_ty
            # the program's columns are [lo, hi): the rank-space rows of the modules they meet, read once for
            # all its tiles (those of the other modules are not read)
            lo = chunk * tiles_per_program * BLOCK_N
            hi = lo + tiles_per_program * BLOCK_N
            h0 = _shrunk_rows(
                shrunk_ptr, tok, rows, r, col0, lo < bound1, num_tokens, R, GR, SPLITS, BLOCK_M, BLOCK_R
            )
            h1 = h0
            h2 = h0
            if NUM_MODULES > 1:
                need1 = (hi > bound1) & (lo < bound2)
                h1 = _shrunk_rows(
                    shrunk_ptr, tok, rows, r, col0 + R, need1, num_tokens, R, GR, SPLITS, BLOCK_M, BLOCK_R
                )
            if NUM_MODULES > 2:
                need2 = hi > bound2
                h2 = _shrunk_rows(
                    shrunk_ptr, tok, rows, r, col0 + 2 * R, need2, num_tokens, R, GR, SPLITS, BLOCK_M, BLOCK_R
                )
            b_cols = b_ptr + slot * R + r  # [BLOCK_R]: this slot's columns of B
            out_rows = out_ptr + tok.to(tl.int64) * out_stride  # [BLOCK_M]
            for i in range(0, tiles_per_program):
                n0 = lo + i * BLOCK_N
                n = n0 + tl.arange(0, BLOCK_N)
                in_n = n < n_features
                dst = out_rows[:, None] + n[None, :]
                mask = rows[:, None] & in_n[None, :]
                y = tl.load(dst, mask=mask, other=0.0)  # issued before the B tile's load: in flight together
                # [BLOCK_N, BLOCK_R] = B[n, s*R + r]: each row's R values are contiguous (coalesced loads)
                b_tile = b_cols[None, :] + n.to(tl.int64)[:, None] * b_stride
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                # a tile usually lies inside one module; only tiles across a boundary take a second product
                # (one more round of loads, for a few tiles of a fused output)
                if n0 < bound1:
                    bt = tl.load(b_tile, mask=(in_n & (n < bound1))[:, None] & in_r[None, :], other=0.0)
                    acc = tl.dot(h0.to(dt), tl.trans(bt), acc, input_precision=PRECISION)
                if NUM_MODULES > 1:
                    if (n0 + BLOCK_N > bound1) & (n0 < bound2):
                        in_m = in_n & (n >= bound1) & (n < bound2)
                        bt = tl.load(b_tile, mask=in_m[:, None] & in_r[None, :], other=0.0)
                        acc = tl.dot(h1.to(dt), tl.trans(bt), acc, input_precision=PRECISION)
                if NUM_MODULES > 2:
                    if n0 + BLOCK_N > bound2:
                        bt = tl.load(b_tile, mask=(in_n & (n >= bound2))[:, None] & in_r[None, :], other=0.0)
                        acc = tl.dot(h2.to(dt), tl.trans(bt), acc, input_precision=PRECISION)
                tl.store(dst, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)
