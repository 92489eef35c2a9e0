"""Variable-length attention with dropout in Triton, tiles of 64 x 64 (`train.attention_kernel`).

Why: FlashAttention 2's varlen kernel (the default) works on tiles of 128 query x 128 key
rows in its backward (128 x 64 forward). The packed rows hold sequences of ~70-170 tokens, so
most of every tile is past the sequence's end: over `benchmarks/data/lengths.json` the padded
tiles do 1.8-2.9x the attention's real work in the backward, against 1.3-1.6x with tiles of 64
(benchmarks/attention_kernels.py measures both kernels). Same maths: softmax(q k^T * scale)
with dropout on the probabilities, scaled by 1/(1 - p), times v; each sequence of `cu_seqlens`
attends to itself only. Only the dropout mask's random numbers differ from FlashAttention's
(Philox, seeded per call from the CUDA generator, so CUDA graphs and RNG checkpoints work as
for any dropout).

q, k, v: (tokens, heads, head_dim) with a unit last stride (views of one fused q/k/v output
are fine). Every token must lie in one of the `cu_seqlens` sequences, none longer than
`max_seqlen` (data.collate_packed's rows do: the pad tail is a sequence of its own); the
outputs of other tokens are left unwritten. The forward keeps the log-sum-exp of each row for the backward, which recomputes
the probabilities: one kernel for dk and dv (a program per key block, looping over the query
blocks of its sequence), one for dq (a program per query block).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# (BLOCK_M query rows, BLOCK_N key rows, warps, pipeline stages) of each kernel
TILES = {"forward": (64, 64, 4, 2), "dk_dv": (64, 64, 4, 2), "dq": (64, 64, 4, 2)}
DQ_ATOMIC = False
# dropout's random numbers: bits per entry (16, or 8 as FlashAttention: p to within 1/512) and
# Philox rounds (10 as torch and curand; 7 is the fewest Random123 calls crush-resistant)
MASK_BITS, PHILOX_ROUNDS = 16, 10
LOG2_E = 1.4426950408889634


@triton.jit
def _halves(word):
    """A uint32 tensor as its two 16-bit halves, joined on a new last axis."""
    return tl.join((word & 0xFFFF).to(tl.int32), ((word >> 16) & 0xFFFF).to(tl.int32))


@triton.jit
def _quarters(word):
    """A uint32 tensor as its four bytes, joined on two new last axes."""
    return tl.join(tl.join((word & 0xFF).to(tl.int32), ((word >> 8) & 0xFF).to(tl.int32)),
                   tl.join(((word >> 16) & 0xFF).to(tl.int32), ((word >> 24) & 0xFF).to(tl.int32)))


@triton.jit
def _random_bits(seed, head, q_tokens, k_start, n_tokens, WIDTH: tl.constexpr,
                 BLOCK_N: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr):
    """BITS (16 or 8) random bits (int32) for each entry of a (queries, BLOCK_N keys) tile of
    `head`: queries `q_tokens` (global token indices), keys k_start.. (positions within their
    sequence, k_start a multiple of 16). One Philox call (ROUNDS rounds) gives 4 x 32 bits, for
    128 / BITS keys of a query, so the forward and both backward kernels draw the same tile
    whatever their tiling."""
    groups = k_start // (128 // BITS) + tl.arange(0, BLOCK_N // (128 // BITS))
    counter = (head * n_tokens + q_tokens[:, None]) * (WIDTH // (128 // BITS)) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter, ROUNDS)
    if BITS == 16:
        bits = tl.join(tl.join(_halves(r0), _halves(r1)), tl.join(_halves(r2), _halves(r3)))
    else:
        bits = tl.join(tl.join(_quarters(r0), _quarters(r1)),
                       tl.join(_quarters(r2), _quarters(r3)))
    return tl.reshape(bits, (q_tokens.shape[0], BLOCK_N))


@triton.jit
def _keep(seed, head, q_tokens, k_start, threshold, n_tokens, WIDTH: tl.constexpr,
          BLOCK_N: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr):
    """Dropout's keep mask of the tile: kept where its bits are >= round(p * 2^BITS)."""
    return _random_bits(seed, head, q_tokens, k_start, n_tokens, WIDTH, BLOCK_N, BITS,
                        ROUNDS) >= threshold


@triton.jit
def _fp32(x):
    """A float argument in fp32: Triton's launcher passes Python floats as fp32, but Inductor
    (the kernels inside a compiled layer) passes them as fp64, which would promote the tiles."""
    return tl.cast(x, tl.float32)


@triton.jit
def _sequence(CU, seq):
    """(first token, length) of packed sequence `seq`."""
    start = tl.load(CU + seq)
    return start, tl.load(CU + seq + 1) - start


@triton.jit
def _row_offsets(start, index, head, stride_t, stride_h, D: tl.constexpr):
    """Offsets of rows `index` (within a sequence from token `start`) of `head` in a
    (tokens, heads, D) tensor with these token and head strides."""
    return (start + index)[:, None] * stride_t + head * stride_h + tl.arange(0, D)[None, :]


@triton.jit
def _tile(X, start, index, ok, head, stride_t, stride_h, D: tl.constexpr):
    """Rows `index` of `head` in X; rows past the sequence's end (not `ok`) read as 0."""
    return tl.load(X + _row_offsets(start, index, head, stride_t, stride_h, D),
                   mask=ok[:, None], other=0.0)


@triton.jit
def _dense_offsets(start, index, head, D: tl.constexpr):
    """Offsets of rows `index` of `head` in a contiguous (tokens, heads, D) gradient."""
    return _row_offsets(start, index, head, D * tl.num_programs(2), D, D)


@triton.jit
def _per_row(X, head, n_tokens, start, index, ok):
    """Rows `index` of `head` in a (heads, tokens) fp32 statistic (lse, delta); 0 past the end."""
    return tl.load(X + head * n_tokens + start + index, mask=ok, other=0.0)


@triton.jit
def _forward_kernel(Q, K, V, OUT, LSE, CU, SEED,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, n_tokens, qk_scale, rescale, threshold,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    WIDTH: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr,
                    DROPOUT: tl.constexpr):
    m_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = _sequence(CU, seq)
    if m_block * BLOCK_M >= length:
        return
    qk_scale, rescale = _fp32(qk_scale), _fp32(rescale)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    q = _tile(Q, start, rows, row_ok, head, stride_qt, stride_qh, D)
    seed = tl.load(SEED)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        k = _tile(K, start, cols, col_ok, head, stride_kt, stride_kh, D)
        v = _tile(V, start, cols, col_ok, head, stride_vt, stride_vh, D)
        s = tl.dot(q, tl.trans(k)) * qk_scale          # log2 domain
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)                 # the softmax sums all probabilities
        if DROPOUT:
            keep = _keep(seed, head, start + rows, n0, threshold, n_tokens, WIDTH, BLOCK_N,
                         BITS, ROUNDS)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * rescale
    tl.store(OUT + _row_offsets(start, rows, head, stride_ot, stride_oh, D),
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head * n_tokens + start + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _backward_dk_dv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_SUM, CU, SEED,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_dot, stride_doh, n_tokens, qk_scale, scale, rescale, threshold,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           WIDTH: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr,
                           DROPOUT: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    n_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = _sequence(CU, seq)
    if n_block * BLOCK_N >= length:
        return
    qk_scale, scale, rescale = _fp32(qk_scale), _fp32(scale), _fp32(rescale)
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < length
    k = _tile(K, start, cols, col_ok, head, stride_kt, stride_kh, D)
    v = _tile(V, start, cols, col_ok, head, stride_vt, stride_vh, D)
    seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for m0 in range(0, length, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        # rows past the end load q = do = 0, so they add nothing to dk and dv
        q = _tile(Q, start, rows, row_ok, head, stride_qt, stride_qh, D)
        do = _tile(DO, start, rows, row_ok, head, stride_dot, stride_doh, D)
        lse = _per_row(LSE, head, n_tokens, start, rows, row_ok)
        delta = _per_row(DELTA, head, n_tokens, start, rows, row_ok)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])   # (keys, queries)
        p_t = tl.where(col_ok[:, None], p_t, 0.0)  # as in the dq kernel (atomic dq reads it)
        dp_t = tl.dot(v, tl.trans(do))
        if DROPOUT:
            keep_t = tl.trans(_random_bits(seed, head, start + rows, n_block * BLOCK_N,
                                           n_tokens, WIDTH, BLOCK_N, BITS, ROUNDS)) >= threshold
            dropped_t = tl.where(keep_t, p_t * rescale, 0.0)
            dp_t = tl.where(keep_t, dp_t * rescale, 0.0)
        else:
            dropped_t = p_t
        dv += tl.dot(dropped_t.to(do.dtype), do)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q)
        if DQ_ATOMIC:  # this key block's share of dq, summed over key blocks in fp32
            tl.atomic_add(DQ_SUM + _dense_offsets(start, rows, head, D),
                          tl.dot(tl.trans(ds_t), k) * scale, mask=row_ok[:, None],
                          sem="relaxed")
    offsets = _dense_offsets(start, cols, head, D)
    tl.store(DK + offsets, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, SEED,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, n_tokens, qk_scale, scale, rescale, threshold,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        WIDTH: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr,
                        DROPOUT: tl.constexpr):
    m_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = _sequence(CU, seq)
    if m_block * BLOCK_M >= length:
        return
    qk_scale, scale, rescale = _fp32(qk_scale), _fp32(scale), _fp32(rescale)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    q = _tile(Q, start, rows, row_ok, head, stride_qt, stride_qh, D)
    do = _tile(DO, start, rows, row_ok, head, stride_dot, stride_doh, D)
    lse = _per_row(LSE, head, n_tokens, start, rows, row_ok)
    delta = _per_row(DELTA, head, n_tokens, start, rows, row_ok)
    seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        k = _tile(K, start, cols, col_ok, head, stride_kt, stride_kh, D)
        v = _tile(V, start, cols, col_ok, head, stride_vt, stride_vh, D)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        # keys past the end (k = 0) score 0, which exp2(0 - lse) can overflow: inf * 0 = NaN
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = _keep(seed, head, start + rows, n0, threshold, n_tokens, WIDTH, BLOCK_N,
                         BITS, ROUNDS)
            dp = tl.where(keep, dp * rescale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    offsets = _dense_offsets(start, rows, head, D)
    tl.store(DQ + offsets, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _rescale(dropout_p: float) -> float:
    """What kept probabilities are multiplied by: 1 / (1 - p), as nn.Dropout does."""
    return 1.0 / (1.0 - dropout_p)


def _threshold(dropout_p: float) -> int:
    """Threshold of the keep test on MASK_BITS bits: drops p to within 2^-(MASK_BITS + 1)."""
    return round(dropout_p * 2 ** MASK_BITS)


def _width(max_seqlen: int) -> int:
    return triton.next_power_of_2(max(max_seqlen, 16))


def _check(q: torch.Tensor, max_seqlen: int, dropout_p: float) -> None:
    tokens, heads, dim = q.shape
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"train.attention_kernel=triton: dropout must be in [0, 1), got "
                         f"{dropout_p}")
    if dim not in (16, 32, 64, 128):
        raise ValueError(f"train.attention_kernel=triton: head_dim must be 16, 32, 64 or 128, "
                         f"got {dim}")
    if heads * tokens * _width(max_seqlen) >= 2 ** 31:
        raise ValueError(f"train.attention_kernel=triton: {tokens} tokens x {heads} heads x "
                         f"max length {max_seqlen} overflow the dropout counter (2^31)")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(q, k, v, cu_seqlens, seed, max_seqlen: int, dropout_p: float,
                      scale: float):
    """(out, lse): out (tokens, heads, dim) like q, lse (heads, tokens) in fp32, log2 domain."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    tokens, heads, dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, tokens), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = TILES["forward"]
    grid = (triton.cdiv(max_seqlen, block_m), cu_seqlens.numel() - 1, heads)
    # wrap_triton(<kernel>) written out: torch finds an op's kernels in its source (compile
    # caches key on them); Triton's CPU interpreter (tests) runs the kernel itself
    (_forward_kernel if _interpreted() else wrap_triton(_forward_kernel))[grid](
        q, k, v, out, lse, cu_seqlens, seed, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), tokens, scale * LOG2_E,
        _rescale(dropout_p), _threshold(dropout_p), D=dim, BLOCK_M=block_m, BLOCK_N=block_n,
        WIDTH=_width(max_seqlen), BITS=MASK_BITS, ROUNDS=PHILOX_ROUNDS, DROPOUT=dropout_p > 0,
        num_warps=warps, num_stages=stages)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, seed, max_seqlen: int,
                       dropout_p: float, scale: float):
    """(dq, dk, dv), each (tokens, heads, dim) contiguous."""
    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    tokens, heads, dim = q.shape
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O), dropout included (O holds it)
    delta = (grad_out.float() * out.float()).sum(-1).t().contiguous()
    dk, dv = (torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device) for _ in range(2))
    # with DQ_ATOMIC, dq is summed over key blocks in fp32 by atomic adds (not bit-reproducible
    # run to run, like FlashAttention 2's dq); else dq's own kernel writes it
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if DQ_ATOMIC else \
        torch.empty(q.shape, dtype=q.dtype, device=q.device)
    sequences, width = cu_seqlens.numel() - 1, _width(max_seqlen)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1), tokens, scale * LOG2_E, scale,
               _rescale(dropout_p), _threshold(dropout_p))

    interpreted = _interpreted()
    dk_dv_kernel = _backward_dk_dv_kernel if interpreted else wrap_triton(_backward_dk_dv_kernel)
    dq_kernel = _backward_dq_kernel if interpreted else wrap_triton(_backward_dq_kernel)

    def launch(kernel, tiles: str, own_block: int, *tensors, **flags):
        block_m, block_n, warps, stages = TILES[tiles]
        grid = (triton.cdiv(max_seqlen, (block_m, block_n)[own_block]), sequences, heads)
        kernel[grid](*tensors, cu_seqlens, seed, *strides, D=dim, BLOCK_M=block_m,
                     BLOCK_N=block_n, WIDTH=width, BITS=MASK_BITS, ROUNDS=PHILOX_ROUNDS,
                     DROPOUT=dropout_p > 0, num_warps=warps, num_stages=stages, **flags)

    # dk/dv: a program per key block; dq: a program per query block, or (DQ_ATOMIC) summed
    # by the dk/dv programs with atomic adds, which saves recomputing the probabilities
    launch(dk_dv_kernel, "dk_dv", 1, q, k, v, grad_out, lse, delta, dk, dv, dq,
           DQ_ATOMIC=DQ_ATOMIC)
    if DQ_ATOMIC:
        return dq.to(q.dtype), dk, dv
    launch(dq_kernel, "dq", 0, q, k, v, grad_out, lse, delta, dq)
    return dq, dk, dv


@torch.library.triton_op("mtl_dist::varlen_attention_fwd", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                seed: torch.Tensor, max_seqlen: int, dropout_p: float,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, cu_seqlens, seed, max_seqlen, dropout_p, scale)


@torch.library.triton_op("mtl_dist::varlen_attention_bwd", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                 seed: torch.Tensor, max_seqlen: int, dropout_p: float,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, seed, max_seqlen,
                              dropout_p, scale)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, seed, max_seqlen, dropout_p, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.args = (max_seqlen, dropout_p, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, cu_seqlens, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh 63-bit Philox seed per call, drawn from the device's generator: graph-safe
    (a new one at each CUDA-graph replay) and restored with the generator's state."""
    return torch.randint(0, 2 ** 63 - 1, (1,), device=device, dtype=torch.int64)


def varlen_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float,
                            scale: float | None) -> torch.Tensor:
    """Attention over the packed sequences of `cu_seqlens` (int32, starts and the end)."""
    _check(q, max_seqlen, dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = dropout_seed(q.device) if dropout_p > 0 else \
        torch.zeros(1, device=q.device, dtype=torch.int64)
    return _forward_op(q, k, v, cu_seqlens, seed, max_seqlen, float(dropout_p), float(scale))[0]
