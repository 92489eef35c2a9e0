"""The vocabulary's weight gradient alone (one GPU): aten's backward against mtl_dist's Triton
kernel (`train.triton_embedding_grads`, `mtl_dist/triton_embedding.py`) at several tiles, and
optionally against an earlier version of that module (`--before FILE`, e.g. the kernel of
1d67896, a program per sorted token: `git show 1d67896:mtl_dist/triton_embedding.py`).

Each is timed as the step runs it: the zero fill, the sort and the kernel, captured in a CUDA
graph and replayed (`attention_kernels.time_us`); all in one process, on the same inputs. Two
id distributions at the step's ~3,584 tokens, bf16, 21,128 × 1,024: `uniform`, throughput.py's
(words drawn uniformly, a [CLS] and a [SEP] per sample, a padding tail), and `zipf`, text-like
(word ranks drawn from Zipf's law, s = 1.1: the commonest word takes ~530 of the tokens, one long run
of sorted tokens). Each result is checked against aten's fp32 sums first.

    python benchmarks/embedding_grads.py --before old_triton_embedding.py \\
        --out benchmarks/results/embedding_grads_h100.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from attention_kernels import (  # this folder's, first on sys.path when run as a script
    save_kernel_rows,
    time_us,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtl_dist.triton_embedding import TILES, embedding_grad_triton  # noqa: E402

ROWS, HIDDEN, SAMPLES, PAD, CLS, SEP = 21128, 1024, 32, 0, 2, 3
CANDIDATE_TILES = [TILES, (32, 128, 4), (64, 256, 8), (128, 128, 8), (32, 256, 4), (16, 128, 4)]


def make_ids(kind: str, tokens: int, gen: torch.Generator) -> torch.Tensor:
    words = tokens - 2 * SAMPLES - 64  # 64 padding tokens at the packed batch's tail
    if kind == "uniform":
        drawn = torch.randint(5, ROWS, (words,), generator=gen)
    else:  # ranks from Zipf's law, s = 1.1, over the vocabulary's words, in shuffled id order
        ranks = torch.arange(1, ROWS - 5 + 1, dtype=torch.float64)
        drawn = torch.multinomial(ranks ** -1.1, words, replacement=True, generator=gen)
        drawn = torch.randperm(ROWS - 5, generator=gen)[drawn] + 5
    ids = torch.cat([torch.full((SAMPLES,), CLS), torch.full((SAMPLES,), SEP), drawn])
    ids = ids[torch.randperm(len(ids), generator=gen)]
    return torch.cat([ids, torch.full((64,), PAD)]).cuda()


def relative_error(ours: torch.Tensor, ids, grad) -> float:
    expected = torch.ops.aten.embedding_dense_backward(grad.float(), ids, ROWS, PAD, False)
    return ((ours.float() - expected).norm() / expected.norm()).item()


def load_before(path: str):
    # named inside mtl_dist, so that a version's relative imports resolve against the package
    spec = importlib.util.spec_from_file_location("mtl_dist._triton_embedding_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.embedding_grad_triton


def methods(before: str | None) -> dict:
    found = {"aten embedding_dense_backward":
             lambda ids, grad, out: out.copy_(torch.ops.aten.embedding_dense_backward(
                 grad, ids, ROWS, PAD, False))}
    if before:
        kernel = load_before(before)
        found[f"before ({Path(before).name})"] = \
            lambda ids, grad, out: kernel(ids, grad, ROWS, PAD, out)
    for tiles in CANDIDATE_TILES:
        found[f"triton tiles {tiles}"] = \
            lambda ids, grad, out, tiles=tiles: embedding_grad_triton(ids, grad, ROWS, PAD, out,
                                                                      tiles=tiles)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3584)
    parser.add_argument("--iters", type=int, default=50, help="calls per timed graph replay")
    parser.add_argument("--repeats", type=int, default=5, help="replays; the median is kept")
    parser.add_argument("--before", help="an earlier triton_embedding.py to time beside")
    parser.add_argument("--out", default="benchmarks/results/embedding_grads.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(args.tokens, HIDDEN, generator=gen).to("cuda", torch.bfloat16)
    out = torch.empty(ROWS, HIDDEN, device="cuda", dtype=torch.bfloat16)
    rows, timed = [], methods(args.before)
    for kind in ("uniform", "zipf"):
        ids = make_ids(kind, args.tokens, gen)
        longest = torch.unique(ids[ids != PAD], return_counts=True)[1].max().item()
        for name, fn in timed.items():
            fn(ids, grad, out)
            error = relative_error(out, ids, grad)
            if not error < 1e-2:  # bf16 rounding is ~1e-3: a wrong kernel is not timed
                raise SystemExit(f"{name} on {kind} ids: relative error {error:.2e} "
                                 "from aten's fp32 sums")
            call = lambda fn=fn, ids=ids: fn(ids, grad, out)  # noqa: E731
            times = sorted(time_us(call, args.iters) for _ in range(args.repeats))
            rows.append({"ids": kind, "longest_run": longest, "method": name,
                         "us_per_call": times[len(times) // 2], "relative_error": error})
            print(json.dumps(rows[-1]), flush=True)
    for kind in ("uniform", "zipf"):
        base = next(r["us_per_call"] for r in rows if r["ids"] == kind)
        for r in rows:
            if r["ids"] == kind:
                r["x_aten"] = base / r["us_per_call"]
    save_kernel_rows(args.out, {"shape": {"rows": ROWS, "hidden": HIDDEN, "tokens": args.tokens,
                                          "dtype": "bf16"}}, rows)
    print(f"\n{'ids':8s} {'method':45s} {'us':>8s} {'x aten':>7s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['ids']:8s} {r['method'][:45]:45s} {r['us_per_call']:8.1f} "
              f"{r['x_aten']:7.2f} {r['relative_error']:9.2e}")


if __name__ == "__main__":
    main()
