"""The clip norm of a flat bf16 gradient buffer alone: torch's reductions against
mtl_dist's Triton kernel (`train.triton_clip_norm`) at several tiles.

    python benchmarks/clip_norm.py --out benchmarks/results/clip_norm.json

The buffer: BERT-large's encoder gradients as `train.flat_masters` lays them out with CUDA
graphs (324 M bf16 values, run AB3's profile), random normal. Each method is timed as
`--iters` calls captured in one CUDA graph (as the step runs them: no host launch overhead),
`--repeats` replays, the median kept; every result is checked against an fp64 norm first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from attention_kernels import save_kernel_rows, time_us  # this folder's, first on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl_dist.triton_norm import TILES, sum_of_squares  # noqa: E402

SIZE = 324_000_000
OTHER_TILES = [(1024, 8, 4), (2048, 8, 8), (4096, 4, 8), (4096, 16, 8), (8192, 4, 16),
               (2048, 32, 8), (1024, 64, 4)]


def methods() -> dict:
    timed = {
        "torch linalg.vector_norm (dtype fp32)":
            lambda x: torch.linalg.vector_norm(x, 2.0, dtype=torch.float32),
        "torch _foreach_norm (dtype fp32, the trainer's)":
            lambda x: torch._foreach_norm([x], 2.0, dtype=torch.float32)[0],
    }
    for tiles in [TILES, *[t for t in OTHER_TILES if t != TILES]]:
        mark = " (TILES)" if tiles == TILES else ""
        timed[f"triton {tiles}{mark}"] = lambda x, tiles=tiles: sum_of_squares(x, tiles).sqrt()
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--iters", type=int, default=10, help="calls per timed graph replay")
    parser.add_argument("--repeats", type=int, default=5, help="replays; the median is kept")
    parser.add_argument("--out", default="benchmarks/results/clip_norm.json")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.size, generator=gen, device="cuda", dtype=torch.bfloat16)
    exact = torch.linalg.vector_norm(x.double()).item()
    rows = []
    for name, fn in methods().items():
        error = abs(fn(x).item() - exact) / exact
        if not error < 1e-4:  # fp32 sums of 3e8 squares: ~1e-6 off; a wrong kernel is not timed
            raise SystemExit(f"{name}: relative error {error:.2e} from the fp64 norm")
        times = sorted(time_us(lambda fn=fn: fn(x), args.iters) for _ in range(args.repeats))
        us = times[len(times) // 2]
        rows.append({"method": name, "us_per_call": us, "relative_error": error,
                     "tb_per_s": args.size * 2 / us / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["x_foreach_norm"] = rows[1]["us_per_call"] / r["us_per_call"]
    save_kernel_rows(args.out, {"size": args.size, "dtype": "bf16"}, rows)
    print(f"\n{'method':50s} {'us':>8s} {'TB/s':>6s} {'x foreach':>9s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['method'][:50]:50s} {r['us_per_call']:8.1f} {r['tb_per_s']:6.2f} "
              f"{r['x_foreach_norm']:9.2f} {r['relative_error']:9.2e}")


if __name__ == "__main__":
    main()
