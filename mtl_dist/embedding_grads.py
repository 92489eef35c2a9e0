"""`train.gemm_embedding_grads`: small embedding tables take their gradients from one GEMM.

Why: aten's embedding backward on CUDA takes 276-501 us per step (median 386) of the reference
workload on an H100 (runs S and T: `benchmarks/profile_groups.py`, `benchmarks/README.md`): up
to 3,072 tokens a kernel per table that serialises the tokens of one row (the token-type
table's 2 rows: ~140 us), above that a sort-based path of ~30 kernels per table (radix sorts,
segment offsets). For a table with at most as many rows as the batch has tokens (positions
with packed batches: 512, token types: 2), the same sums come from one GEMM: a one-hot
(rows x tokens) matrix times the output gradient (tokens x hidden), accumulated in fp32 by
cuBLAS as aten's CUDA kernels accumulate in fp32 (CPU tests: aten's gradients to fp32 rounding,
the exact sums rounded to bf16 in bf16; GPU test: run Y1). Larger tables (the vocabulary)
keep aten's backward, or with `train.triton_embedding_grads` on CUDA take mtl_dist's Triton
kernel (`mtl_dist/triton_embedding.py`). The forward is aten's embedding, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

# Above this many rows a table keeps aten's backward whatever the batch: the one-hot GEMM's
# cost grows with rows x tokens, aten's with tokens (a vocabulary under a batch of 32k padded
# tokens would take a 2 GB one-hot matrix and ~2 TFLOP)
MAX_GEMM_ROWS = 4096
# the Triton kernel's gradient dtypes (tl.dot's); others, e.g. fp64, keep aten's backward
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LARGE_TABLE_KERNELS = ("aten", "triton")  # what computes the tables above the GEMM's reach


def embedding_weight_grad(ids: torch.Tensor, grad: torch.Tensor, rows: int,
                          padding_idx: int | None, large_tables: str = "aten",
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """d(loss)/d(weight) of `F.embedding(ids, weight, padding_idx)` given d(loss)/d(output)
    `grad` (..., hidden): row r sums the output gradients of the tokens whose id is r; the
    padding row gets zeros. By a GEMM where the table has at most as many rows as there are
    tokens (and at most MAX_GEMM_ROWS), else by aten's own backward, or by mtl_dist's Triton
    kernel on CUDA with `large_tables="triton"`. `out` (rows, hidden): written there and
    returned (`train.direct_embedding_grads`); the GEMM and the Triton kernel write it
    themselves when it has `grad`'s dtype, other cases copy."""
    ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
    if out is not None and out.shape != (rows, grad.shape[1]):
        raise ValueError(f"embedding_weight_grad: out has shape {tuple(out.shape)}, the "
                         f"gradient {(rows, grad.shape[1])}")
    writes_out = out is not None and out.dtype == grad.dtype and out.is_contiguous()
    if rows > min(ids.numel(), MAX_GEMM_ROWS):
        if large_tables == "triton" and grad.is_cuda and grad.dtype in TRITON_DTYPES:
            from .triton_embedding import embedding_grad_triton

            if writes_out:
                return embedding_grad_triton(ids, grad, rows, padding_idx, out)
            return _into(out, embedding_grad_triton(ids, grad, rows, padding_idx))
        return _into(out, torch.ops.aten.embedding_dense_backward(
            grad, ids, rows, -1 if padding_idx is None else padding_idx, False))
    row = torch.arange(rows, device=ids.device).unsqueeze(1)
    one_hot = row == ids.unsqueeze(0)  # (rows, tokens), built on the device: no host sync
    if padding_idx is not None:
        one_hot &= row != padding_idx
    if writes_out:
        return torch.mm(one_hot.to(grad.dtype), grad, out=out)
    return _into(out, one_hot.to(grad.dtype) @ grad)


def _into(out: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    return grad if out is None else out.copy_(grad)


class _EmbeddingWithGemmGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, large_tables, target):
        ctx.save_for_backward(ids)
        ctx.rows, ctx.padding_idx, ctx.large_tables = weight.shape[0], padding_idx, large_tables
        # Not saved for backward, as LinearGradInto's: a view of the flat buffer that every
        # other target's write bumps the version counter of
        ctx.target = target
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        # An eager step's backward runs inside the trainer's autocast: the GEMM would then
        # round the fp32 gradient to bf16 (or overflow in fp16); the sums stay in its dtype
        with torch.autocast(grad.device.type, enabled=False):
            weight_grad = embedding_weight_grad(ids, grad, ctx.rows, ctx.padding_idx,
                                                ctx.large_tables, ctx.target)
        # Written into the target: autograd gets none (the weight's .grad stays None)
        return None, (None if ctx.target is not None else weight_grad), None, None, None


class GemmGradEmbedding(nn.Embedding):
    """An nn.Embedding whose weight gradient comes from `embedding_weight_grad` (same
    parameters, state dict and forward); `large_tables`: see embedding_weight_grad."""

    large_tables = "aten"
    # train.direct_embedding_grads: the weight gradient is written here (a tensor of the
    # weight's shape), not handed to autograd (see write_embedding_grads_into)
    weight_grad_target: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(ids)
        return _EmbeddingWithGemmGrad.apply(ids, self.weight, self.padding_idx,
                                            self.large_tables, self.weight_grad_target)


def enable_gemm_embedding_grads(encoder: nn.Module, large_tables: str = "aten") -> int:
    """`train.gemm_embedding_grads`: every nn.Embedding of the encoder becomes a
    GemmGradEmbedding; returns how many. `large_tables="triton"`
    (`train.triton_embedding_grads`): the tables too large for the GEMM take the Triton kernel
    on CUDA. Before DDP/compile wrap the model."""
    if large_tables not in LARGE_TABLE_KERNELS:
        raise ValueError(f"large_tables={large_tables!r}: expected one of {LARGE_TABLE_KERNELS}")
    tables = [m for m in encoder.modules() if isinstance(m, nn.Embedding)]
    for table in tables:  # all checked before any is changed
        if type(table) not in (nn.Embedding, GemmGradEmbedding):
            raise ConfigError(
                f"config key 'train.gemm_embedding_grads': {type(table).__name__} is not a plain "
                "nn.Embedding (its own forward would be lost); set train.gemm_embedding_grads=false")
        if table.max_norm is not None or table.scale_grad_by_freq or table.sparse:
            raise ConfigError(
                "config key 'train.gemm_embedding_grads': an embedding table with max_norm, "
                "scale_grad_by_freq or sparse gradients has aten's backward only; set "
                "train.gemm_embedding_grads=false")
    for table in tables:
        table.__class__ = GemmGradEmbedding
        table.large_tables = large_tables
    return len(tables)


def write_embedding_grads_into(embeddings: nn.Module,
                               targets: dict[int, torch.Tensor]) -> set[int]:
    """`train.direct_embedding_grads`: every GemmGradEmbedding in `embeddings` (BERT/RoBERTa:
    `encoder.embeddings`) whose weight has a target (id(weight) -> tensor of its shape) writes
    its weight gradient there from then on (its `.grad` stays None); returns the ids of those
    weights. As for graphs.write_weight_grads_into, only for tables that run exactly once in
    every forward (BERT/RoBERTa's word, position and token-type tables): one that did not run
    would leave its target as it was, one that ran twice would keep only its last gradient
    (StepGraphs refuses a routed weight that autograd hands a gradient, e.g. one read outside
    its table's forward)."""
    tables = [m for m in embeddings.modules() if isinstance(m, GemmGradEmbedding)]
    for table in tables:  # all checked before any is changed
        target = targets.get(id(table.weight))
        if target is not None and target.shape != table.weight.shape:
            raise ValueError(f"write_embedding_grads_into: the target of a "
                             f"{tuple(table.weight.shape)} table has shape {tuple(target.shape)}")
    for table in tables:
        table.weight_grad_target = targets.get(id(table.weight))  # None: autograd's gradient
    return {id(t.weight) for t in tables if t.weight_grad_target is not None}
