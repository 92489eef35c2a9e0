"""The clip norm's sum of squares of a flat gradient buffer by one Triton kernel
(`train.triton_clip_norm`).

Why: with `train.flat_masters` and `train.fused_clipping` the clip norm is one reduction over
the encoder's flat gradient buffer (bf16 with CUDA graphs: ~650 MB for BERT-large). Run AB3's
H100 profile: aten's reduce kernel took 231 µs per step for it, ~2.8 TB/s, where a read at
the H100's bandwidth would take ~195 µs.

How: a program per BLOCK × ITERS elements squares them in fp32 and sums them in registers,
then writes one partial sum; torch sums the partials. No atomics: the same bits every run.
No host sync. Only flat 1-D CUDA tensors of the Triton dtypes take it (`takes_triton`); the
trainer leaves others to torch's foreach norm.

Measured (run AC, H100): alone it reads 324 M bf16 values in 210.7 µs (3.08 TB/s) against
torch's vector norm's 233.3, but in the recommended step it gained nothing (−0.25 %, one run),
so the switch is off by default and not in the recommended set.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# elements per load, loads per program, warps (benchmarks/clip_norm.py compares them)
TILES = (4096, 8, 8)


@triton.jit
def _sum_of_squares_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        at = first + i * BLOCK + tl.arange(0, BLOCK)
        # read once: no use keeping it in L2
        x = tl.load(x_ptr + at, mask=at < n, other=0.0, eviction_policy="evict_first")
        x = x.to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def takes_triton(x: torch.Tensor) -> bool:
    """Whether the trainer hands `x` to `sum_of_squares`: a contiguous CUDA tensor of DTYPES
    (on CPU the kernel runs only in Triton's interpreter, for tests)."""
    return x.is_cuda and x.dtype in DTYPES and x.is_contiguous()


def sum_of_squares(x: torch.Tensor, tiles: tuple[int, int, int] = TILES) -> torch.Tensor:
    """Σ x², a 0-dim fp32 tensor on x's device (fp32 squares and sums, whatever x's dtype)."""
    block, iters, warps = tiles
    if min(tiles) < 1 or any(t & (t - 1) for t in (block, warps)):
        raise ValueError(f"sum_of_squares: tiles (elements, loads, warps): elements and warps "
                         f"powers of two, all at least 1, got {tiles}")
    if x.dtype not in DTYPES or not x.is_contiguous():
        raise ValueError(f"sum_of_squares: a contiguous tensor of "
                         f"{', '.join(map(str, DTYPES))} only, got "
                         f"{'' if x.is_contiguous() else 'a non-contiguous '}{x.dtype}")
    programs = max(1, triton.cdiv(x.numel(), block * iters))
    partials = torch.empty(programs, device=x.device, dtype=torch.float32)
    # Triton launches on the current device, whatever x's
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _sum_of_squares_kernel[(programs,)](x.view(-1), partials, x.numel(), BLOCK=block,
                                            ITERS=iters, num_warps=warps)
    return partials.sum()
