"""An embedding table's weight gradient by a sort and one Triton kernel
(`train.triton_embedding_grads`).

Why: with `train.gemm_embedding_grads` the position and token-type tables take one GEMM each,
but the vocabulary (21,128 rows) is too large for a one-hot GEMM and keeps aten's backward:
a fill of the whole (rows × hidden) gradient (~14 µs) plus, up to 3,072 tokens, a kernel that
serialises each row's tokens (~92–101 µs), above that a sort-based path of ~30 kernels
(~180 µs) — 129–288 µs per step for the three tables in run Y's H100 profile.

How: the gradient is zeroed, the ids are sorted (stable: a row's tokens stay in token order),
and a program per (sorted token, BLOCK_H columns) that starts its row's run sums that row's
output gradients, BLOCK_S tokens at a time, in fp32, and writes the row; the other programs
end at once. Each row's tokens are summed in the same order by the same reduction tree: the
same bits on every run (no atomics). Padding tokens are skipped (their row stays zero, and a
non-finite gradient there reaches no other row, as with aten). No host sync: it runs inside
CUDA graphs. Tile sizes untuned: no GPU has measured this kernel yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S, BLOCK_H, WARPS = 32, 256, 4  # tokens summed per step, columns per program


@triton.jit
def _row_sums_kernel(sorted_ids_ptr, order_ptr, grad_ptr, out_ptr, tokens, rows, hidden,
                     padding_idx, grad_stride, out_stride, BLOCK_S: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    first = tl.program_id(0)
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row = tl.load(sorted_ids_ptr + first)
    before = tl.load(sorted_ids_ptr + first - 1, mask=first > 0, other=-1)
    starts = (row != before) & (row != padding_idx) & (row >= 0) & (row < rows)
    if starts:  # this token starts its row's run
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        start = first
        more = True
        while more:
            at = start + tl.arange(0, BLOCK_S)
            same = tl.load(sorted_ids_ptr + at, mask=at < tokens, other=-1) == row
            token = tl.load(order_ptr + at, mask=same, other=0).to(tl.int64)
            block = tl.load(grad_ptr + token[:, None] * grad_stride + col[None, :],
                            mask=same[:, None] & (col[None, :] < hidden), other=0.0)
            acc += tl.sum(block.to(tl.float32), axis=0)
            start += BLOCK_S
            more = tl.min(same.to(tl.int32), axis=0) > 0  # the run may go on past this block
        tl.store(out_ptr + row.to(tl.int64) * out_stride + col, acc.to(out_ptr.dtype.element_ty),
                 mask=col < hidden)


def embedding_grad_triton(ids: torch.Tensor, grad: torch.Tensor, rows: int,
                          padding_idx: int | None, out: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """d(loss)/d(weight) of `F.embedding(ids, weight, padding_idx)` given d(loss)/d(output)
    `grad` (..., hidden), in `grad`'s dtype (fp32 sums), written into `out` (rows, hidden)
    if given (`train.direct_embedding_grads`: a view of the flat gradient buffer), else into a
    new tensor. Ids must lie in [0, rows), as `F.embedding`'s forward checks; others are left
    out."""
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
    grid = (ids.numel(), triton.cdiv(hidden, BLOCK_H))
    _row_sums_kernel[grid](sorted_ids, order, grad, out, ids.numel(), rows, hidden,
                           -1 if padding_idx is None else padding_idx, grad.stride(0),
                           out.stride(0), BLOCK_S=BLOCK_S, BLOCK_H=BLOCK_H, num_warps=WARPS)
    return out


def _check_out(out: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype) -> None:
    if out.shape != (rows, hidden) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"embedding_grad_triton: out must be a ({rows}, {hidden}) {dtype} "
                         f"tensor with unit column stride, got {tuple(out.shape)} {out.dtype} "
                         f"strides {out.stride()}")
