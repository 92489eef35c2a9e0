"""An embedding table's weight gradient in one Triton kernel (`train.triton_embedding_grads`).

Why: with `train.gemm_embedding_grads` the position and token-type tables take one GEMM each,
but the vocabulary (21,128 rows) is too large for a one-hot GEMM and keeps aten's backward:
a fill of the whole (rows × hidden) gradient (~14 µs) plus, up to 3,072 tokens, a kernel that
serialises each row's tokens (~92–101 µs), above that a sort-based path of ~30 kernels
(~180 µs) — 129–288 µs per step for the three tables in run Y's H100 profile.

How: a program owns a tile of BLOCK_R rows × BLOCK_H columns of the gradient. It scans the
token ids BLOCK_T at a time, skips blocks without an id of its rows (most of them: a batch has
a few thousand tokens, spread over the vocabulary), and adds the others' output gradients as
a one-hot (BLOCK_R × BLOCK_T) matrix times the (BLOCK_T × BLOCK_H) gradient block, summed in
fp32. Then it writes its tile, zeros where no token fell: no separate fill. Each row's tokens
are summed in token order: the same bits on every run (aten's CUDA kernels are deterministic
too; an atomic-add kernel would not be). No host sync, so it runs inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# untuned (no GPU measured it yet): 64 rows x 256 columns of fp32 sums per program in 8 warps
BLOCK_R, BLOCK_T, BLOCK_H, WARPS = 64, 128, 256, 8


@triton.jit
def _embedding_grad_kernel(ids_ptr, grad_ptr, out_ptr, tokens, rows, hidden, padding_idx,
                           grad_stride, out_stride, BLOCK_R: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    first_row = tl.program_id(0) * BLOCK_R
    row = first_row + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for start in range(0, tokens, BLOCK_T):
        token = start + tl.arange(0, BLOCK_T)
        ids = tl.load(ids_ptr + token, mask=token < tokens, other=-1)
        hit = (ids >= first_row) & (ids < first_row + BLOCK_R)
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            block = tl.load(grad_ptr + token[:, None] * grad_stride + col[None, :],
                            mask=hit[:, None] & (col[None, :] < hidden), other=0.0)
            one_hot = (row[:, None] == ids[None, :]).to(block.dtype)
            if IEEE:  # fp32 gradients: no TF32 rounding of the products
                acc = tl.dot(one_hot, block, acc, input_precision="ieee")
            else:
                acc = tl.dot(one_hot, block, acc)
    acc = tl.where((row == padding_idx)[:, None], 0.0, acc)
    tl.store(out_ptr + row[:, None] * out_stride + col[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(row[:, None] < rows) & (col[None, :] < hidden))


def embedding_grad_triton(ids: torch.Tensor, grad: torch.Tensor, rows: int,
                          padding_idx: int | None) -> torch.Tensor:
    """d(loss)/d(weight) of `F.embedding(ids, weight, padding_idx)` given d(loss)/d(output)
    `grad` (..., hidden), in `grad`'s dtype (fp32 sums), from one kernel."""
    ids = ids.reshape(-1).contiguous()
    grad = grad.reshape(-1, grad.shape[-1]).contiguous()
    hidden = grad.shape[1]
    out = grad.new_empty(rows, hidden)
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(hidden, BLOCK_H))
    _embedding_grad_kernel[grid](
        ids, grad, out, ids.numel(), rows, hidden, -1 if padding_idx is None else padding_idx,
        grad.stride(0), out.stride(0), BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H,
        IEEE=grad.dtype == torch.float32, num_warps=WARPS)
    return out
