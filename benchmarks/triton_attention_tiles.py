"""Tiles, warps and stages of mtl_dist's Triton attention kernels (train.attention_kernel=triton),
swept kernel by kernel on packed rows, against FlashAttention 2 in the same run.

    python benchmarks/triton_attention_tiles.py --out benchmarks/results/triton_attention_tiles_h200.json

Per candidate: forward + backward per layer (BERT-large heads, 16 x 64, bf16, attention dropout
0.1), CUDA-event time of calls captured in one CUDA graph, averaged over the packed rows of
`attention_kernels.py` (2 per task). Each kernel's candidates are tried with the best of the
kernels swept before it; then dq summed by the dk/dv kernel's atomic adds (DQ_ATOMIC); then the
dropout mask's bits per entry and Philox rounds; then the best set (default mask) with and
without dropout beside FlashAttention 2. GPU only.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import attention_kernels as ak  # this folder's, first on sys.path when run as a script
import torch
import triton

from mtl_dist import triton_attention as ta

CANDIDATES = {"forward": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
              "dk_dv": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2)],
              "dq": [(64, 64, 4, 2), (64, 64, 8, 2)]}
MASKS = [(16, 10), (16, 7), (8, 10), (8, 7)]  # (MASK_BITS, PHILOX_ROUNDS), the default first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = ak.packed_rows(json.loads((Path(__file__).parent / "data" / "lengths.json")
                                     .read_text()), 2, 0)

    def per_layer_us(fn, dropout: float) -> float:
        return ak.mean(ak.attention_case(fn, w, cu, dropout, args.iters)["us"] for w, cu in rows)

    log: dict = {"flash2_p0.1": per_layer_us(ak.flash, 0.1)}
    best = dict(ta.TILES)
    for kernel, options in CANDIDATES.items():
        times = {}
        for tiles in options:
            ta.TILES.update(best)
            ta.TILES[kernel] = tiles
            times[tiles] = log[f"{kernel} {tiles}"] = per_layer_us(ak.triton_varlen, 0.1)
            print(kernel, tiles, round(times[tiles], 1), flush=True)
        best[kernel] = min(times, key=times.get)
    ta.TILES.update(best)
    log["best_separate_dq"] = per_layer_us(ak.triton_varlen, 0.1)
    ta.DQ_ATOMIC = True
    atomic = {}
    for tiles in dict.fromkeys([best["dk_dv"], (64, 64, 8, 2)]):
        ta.TILES["dk_dv"] = tiles
        atomic[tiles] = log[f"atomic dk_dv {tiles}"] = per_layer_us(ak.triton_varlen, 0.1)
    if min(atomic.values()) < log["best_separate_dq"]:
        best["dk_dv"] = min(atomic, key=atomic.get)
    else:
        ta.DQ_ATOMIC = False
    ta.TILES.update(best)
    masks = {}
    for bits, rounds in MASKS:  # the dropout mask's cost: bits per entry, Philox rounds
        ta.MASK_BITS, ta.PHILOX_ROUNDS = bits, rounds
        masks[(bits, rounds)] = log[f"mask bits={bits} rounds={rounds}"] = \
            per_layer_us(ak.triton_varlen, 0.1)
        print("mask", bits, rounds, round(masks[(bits, rounds)], 1), flush=True)
    ta.MASK_BITS, ta.PHILOX_ROUNDS = MASKS[0]
    log.update(best={k: list(v) for k, v in best.items()}, dq_atomic=ta.DQ_ATOMIC,
               best_us=per_layer_us(ak.triton_varlen, 0.1),
               flash2_again=per_layer_us(ak.flash, 0.1),
               no_dropout={"triton": per_layer_us(ak.triton_varlen, 0.0),
                           "flash2": per_layer_us(ak.flash, 0.0)})
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(),
              "widths": [w for w, _ in rows], "us_per_layer_fwd_bwd": log}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
