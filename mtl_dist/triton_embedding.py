"""An embedding table's weight gradient by a sort and one Triton kernel
(`train.triton_embedding_grads`).

Why: with `train.gemm_embedding_grads` the position and token-type tables take one GEMM each,
but the vocabulary (21,128 rows) is too large for a one-hot GEMM and keeps aten's backward:
a fill of the whole (rows × hidden) gradient (~14 µs) plus, up to 3,072 tokens, a kernel that
serialises each row's tokens (~92–101 µs), above that a sort-based path of ~30 kernels
(~180 µs) — 129–288 µs per step for the three tables in run Y's H100 profile.

How: the gradient is zeroed and the ids sorted (stable: a row's tokens stay in token order).
A program per (BLOCK_T sorted tokens, BLOCK_H columns) gathers those tokens' output gradients
and sums each row's tokens within the block by one small matrix product, (same row? 0/1) ×
gradients, with fp32 accumulation (exact products: the 0/1 factors), then writes every row
whose run of sorted tokens starts in the block. The block's last run may go on into the next
blocks: its program then adds the following tokens' gradients, BLOCK_S at a time, before
writing the row; the programs after it skip that row. Every row's sum is taken in the same
order on every run: the same bits each time (no atomics). Padding tokens are skipped (their
row stays zero, and a non-finite gradient there reaches no other row, as with aten). A
non-finite gradient on a real token would reach every row of its block through the product
(0 × inf is NaN): a block holding one sums its rows by selection instead, token by token
(the rare case: slower; aten's sums to fp32 rounding); so, as with aten, it reaches its own
row only. That check costs ~3–5 µs per call (run AC, below). No host sync: it runs inside
CUDA graphs.

The tiles: the first design, a program per sorted token (run AB's H100 profile: 122 µs per
step at ~3,600 tokens), spent its time in ~16,000 small programs' memory round trips.
`benchmarks/embedding_grads.py` (run AB5, H100, 3,584 tokens, bf16, zero fill and sort
included): 64.0 µs against its 175.7 and aten's 181.0 with uniform ids, 79.7 against 135.0 and
167.6 with Zipf-distributed ids (a run of ~530 tokens); (64, 128, 4) was the fastest of six
tiles with Zipf's ids and within 2.3 µs of the fastest with uniform ones. Run AC (H100, with
the non-finite check): 67.2 and 84.6 µs, against 177.0/135.4 and aten's 181.8/168.0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .embedding_grads import TRITON_DTYPES

# sorted tokens per program, columns per program, warps; tokens per step of a run's tail
TILES = (64, 128, 4)
BLOCK_S = 32


@triton.jit
def _block_sums_kernel(sorted_ids_ptr, order_ptr, grad_ptr, out_ptr, tokens, rows, hidden,
                       padding_idx, grad_stride, out_stride, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    first = tl.program_id(0) * BLOCK_T
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols_in = col < hidden
    at = first + tl.arange(0, BLOCK_T)
    inside = at < tokens
    row = tl.load(sorted_ids_ptr + at, mask=inside, other=-1)
    before = tl.load(sorted_ids_ptr + at - 1, mask=inside & (at > 0), other=-1)
    real = inside & (row != padding_idx) & (row >= 0) & (row < rows)
    starts = real & (row != before)  # a row's run of sorted tokens starts here
    token = tl.load(order_ptr + at, mask=real, other=0).to(tl.int64)
    grads = tl.load(grad_ptr + token[:, None] * grad_stride + col[None, :],
                    mask=real[:, None] & cols_in[None, :], other=0.0)
    same_row = (row[:, None] == row[None, :]).to(grads.dtype)
    # each position's row summed over the block: (BLOCK_T × BLOCK_T) 0/1 × gradients
    sums = tl.dot(same_row, grads, input_precision="ieee")
    finite = tl.abs(grads.to(tl.float32)) <= 3.4028234663852886e38  # false for inf and NaN
    if tl.sum((~finite).to(tl.int32)) > 0:  # 0 × inf is NaN: here each row's tokens by selection
        sums = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for k in range(BLOCK_T):
            k_at = first + k
            k_row = tl.load(sorted_ids_ptr + k_at, mask=k_at < tokens, other=-1)
            k_real = (k_at < tokens) & (k_row != padding_idx) & (k_row >= 0) & (k_row < rows)
            k_token = tl.load(order_ptr + k_at, mask=k_real, other=0).to(tl.int64)
            k_grad = tl.load(grad_ptr + k_token * grad_stride + col,
                             mask=tl.where(cols_in, k_real.to(tl.int32), 0) != 0, other=0.0)
            sums += tl.where((row == k_row)[:, None], k_grad.to(tl.float32)[None, :], 0.0)
    last = tl.load(sorted_ids_ptr + first + BLOCK_T - 1, mask=first + BLOCK_T - 1 < tokens,
                   other=-1)
    after = tl.load(sorted_ids_ptr + first + BLOCK_T, mask=first + BLOCK_T < tokens, other=-2)
    tail_starts_here = starts & (row == last)
    goes_on = (last == after) & (tl.sum(tail_starts_here.to(tl.int32), axis=0) > 0)
    # (a where, not `goes_on & (row == last)`: Triton 3.9's interpreter refuses that mask)
    done = starts & (tl.where(row == last, goes_on.to(tl.int32), 0) == 0)
    out_type = out_ptr.dtype.element_ty
    tl.store(out_ptr + row.to(tl.int64)[:, None] * out_stride + col[None, :],
             sums.to(out_type), mask=done[:, None] & cols_in[None, :])
    if goes_on:  # the last run goes on past the block: sum its tail, then write the row
        acc = tl.sum(tl.where(tail_starts_here[:, None], sums, 0.0), axis=0)
        start = first + BLOCK_T
        more = True
        while more:  # (names of their own: Triton keeps a loop variable's shape)
            tail_at = start + tl.arange(0, BLOCK_S)
            same = tl.load(sorted_ids_ptr + tail_at, mask=tail_at < tokens, other=-1) == last
            tail_token = tl.load(order_ptr + tail_at, mask=same, other=0).to(tl.int64)
            block = tl.load(grad_ptr + tail_token[:, None] * grad_stride + col[None, :],
                            mask=same[:, None] & cols_in[None, :], other=0.0)
            acc += tl.sum(block.to(tl.float32), axis=0)
            start += BLOCK_S
            more = tl.min(same.to(tl.int32), axis=0) > 0  # the run may go on past this step
        tl.store(out_ptr + last.to(tl.int64) * out_stride + col, acc.to(out_type), mask=cols_in)


def embedding_grad_triton(ids: torch.Tensor, grad: torch.Tensor, rows: int,
                          padding_idx: int | None, out: torch.Tensor | None = None,
                          tiles: tuple[int, int, int] = TILES) -> torch.Tensor:
    """d(loss)/d(weight) of `F.embedding(ids, weight, padding_idx)` given d(loss)/d(output)
    `grad` (..., hidden), in `grad`'s dtype (fp32 sums), written into `out` (rows, hidden)
    if given (`train.direct_embedding_grads`: a view of the flat gradient buffer), else into a
    new tensor. Ids must lie in [0, rows), as `F.embedding`'s forward checks; others are left
    out. `tiles`: (sorted tokens, columns, warps) per program, powers of two, tokens ≥ 16
    (`benchmarks/embedding_grads.py` compares them)."""
    block_t, block_h, warps = tiles
    if min(tiles) < 1 or any(t & (t - 1) for t in tiles) or block_t < 16:
        raise ValueError(f"embedding_grad_triton: tiles must be powers of two, at least 16 "
                         f"sorted tokens (tl.dot's smallest size), got {tiles}")
    if grad.dtype not in TRITON_DTYPES:
        names = ", ".join(map(str, TRITON_DTYPES))
        raise ValueError(f"embedding_grad_triton: gradients in {names} only, got {grad.dtype}")
    ids = ids.reshape(-1)
    grad = grad.reshape(-1, grad.shape[-1]).contiguous()
    hidden = grad.shape[1]
    if out is None:
        out = grad.new_zeros(rows, hidden)
    else:
        _check_out(out, rows, hidden, grad.dtype)
        out.zero_()
    if ids.numel() == 0:
        return out
    if padding_idx is not None and padding_idx < 0:  # as nn.Embedding reads it
        padding_idx += rows
    sorted_ids, order = torch.sort(ids, stable=True)
    grid = (triton.cdiv(ids.numel(), block_t), triton.cdiv(hidden, block_h))
    _block_sums_kernel[grid](sorted_ids, order, grad, out, ids.numel(), rows, hidden,
                             -1 if padding_idx is None else padding_idx, grad.stride(0),
                             out.stride(0), BLOCK_T=block_t, BLOCK_H=block_h,
                             BLOCK_S=BLOCK_S, num_warps=warps)
    return out


def _check_out(out: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype) -> None:
    if out.shape != (rows, hidden) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"embedding_grad_triton: out must be a ({rows}, {hidden}) {dtype} "
                         f"tensor with unit column stride, got {tuple(out.shape)} {out.dtype} "
                         f"strides {out.stride()}")
