"""Kernel-level candidates for the packed step's attention and q/k/v projections, timed alone.

    python benchmarks/attention_kernels.py --out benchmarks/results/attention_kernels_h200.json

On packed rows built the way `data.packing` builds them (32 samples of one task, lengths drawn
from `data/lengths.json`, the row rounded up to a multiple of 64 with the pad tail as its own
segment), BERT-large shapes (16 heads x 64, hidden 1024), bf16:

- attention forward + backward per layer: FlashAttention 2's varlen kernel (what
  `varlen_attention` runs by default) against the memory-efficient (CUTLASS) varlen kernel,
  mtl_dist's Triton kernel with tiles of 64 (`train.attention_kernel=triton`) (and, with
  `--cudnn`, cuDNN's ragged-offset kernel), with the model's attention dropout 0.1 and without it. Parity at
  dropout 0 against FlashAttention is printed beside each time.
- the q/k/v projections forward + backward per layer: three (1024 x 1024) Linears against one
  (3072 x 1024) Linear over the same weights (input gradient, weight and bias gradients).

Times are CUDA-event means over `--iters` calls per batch captured in one CUDA graph, averaged over the
batches; ratios are against the first candidate of each group, measured in the same run.
GPU only.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtl_dist.data import packed_width

HEADS, HEAD_DIM, HIDDEN, BATCH, MULTIPLE, CAP = 16, 64, 1024, 32, 64, 300


def packed_rows(lengths: dict[str, list[int]], per_task: int, seed: int) -> list[tuple[int, list[int]]]:
    """(width, cu_seqlens) of `per_task` rows per task, as data.collate_packed lays them out."""
    rng = np.random.default_rng(seed)
    rows = []
    for task_lengths in lengths.values():
        for _ in range(per_task):
            drawn = np.minimum(rng.choice(task_lengths, BATCH), CAP)
            width = int(packed_width(drawn, MULTIPLE))
            rows.append((width, [0, *np.cumsum(drawn).tolist(), width]))
    return rows


def time_us(fn, iters: int, warmup: int = 3) -> float:
    """GPU time of one call: `iters` calls captured in one CUDA graph, as the training step
    runs them, so the host's launch overhead is not counted (eager, it dominated: run 1)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()  # first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def save_kernel_rows(out: str, fields: dict, rows: list[dict]) -> None:
    """A kernel benchmark's results file: the GPU, torch, Triton, the command, `fields`, rows."""
    import sys

    import triton

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "command": " ".join(sys.argv), **fields,
              "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def flash(q, k, v, cu, max_len, p):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, p, False,
                                                   False)[0]


def cudnn(q, k, v, cu, max_len, p):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True,
                                                   p, False, False)[0]


def efficient(q, k, v, cu, max_len, p):
    out = torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu, cu,
                                                      max_len, max_len, p, 0, True)[0]
    return out[0]


def triton_varlen(q, k, v, cu, max_len, p):
    from mtl_dist.triton_attention import varlen_attention_triton
    return varlen_attention_triton(q, k, v, cu, max_len, p, None)


# cuDNN's ragged kernel is not timed by default: in run 1 (eager) it took ~140 ms per call
# (planned anew every call) and its gradients differed from FlashAttention's by up to 10.6.
ATTENTION = {"flash2_varlen": flash, "efficient_varlen": efficient,
             "triton_varlen_64": triton_varlen}
EXTRA_ATTENTION = {"cudnn_varlen": cudnn}


def attention_case(fn, width: int, cu_list: list[int], dropout: float, iters: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(width)
    q, k, v = (torch.randn(width, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(width, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor(cu_list, device="cuda", dtype=torch.int32)
    max_len = max(b - a for a, b in zip(cu_list[:-1], cu_list[1:], strict=True))

    def step():
        out = fn(q, k, v, cu, max_len, dropout)
        torch.autograd.grad(out, (q, k, v), grad)

    result = {"us": time_us(step, iters)}
    if dropout == 0.0:  # parity against FlashAttention, same inputs
        out = fn(q, k, v, cu, max_len, 0.0)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        ref = flash(q, k, v, cu, max_len, 0.0)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        result["max_abs_diff_out"] = (out - ref).abs().max().item()
        result["max_abs_diff_grad"] = max((a - b).abs().max().item()
                                          for a, b in zip(grads, ref_grads, strict=True))
    return result


def qkv_case(fused: bool, width: int, iters: int) -> float:
    gen = torch.Generator(device="cuda").manual_seed(width)
    x = torch.randn(width, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(3 * HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    bias = torch.randn(3 * HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(width, 3 * HIDDEN, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight_grad, bias_grad = torch.empty_like(weight), torch.empty_like(bias)
    parts = [slice(i * HIDDEN, (i + 1) * HIDDEN) for i in range(3)]
    grads = [grad[:, s].contiguous() for s in parts]  # three separate outputs' gradients

    def step_fused():
        F.linear(x, weight, bias)
        grad @ weight
        torch.mm(grad.t(), x, out=weight_grad)
        torch.sum(grad, 0, out=bias_grad)

    def step_split():
        for s in parts:
            F.linear(x, weight[s], bias[s])
        grad_x = grads[0] @ weight[parts[0]]
        grad_x = grad_x + grads[1] @ weight[parts[1]]
        grad_x = grad_x + grads[2] @ weight[parts[2]]
        for g, s in zip(grads, parts, strict=True):
            torch.mm(g.t(), x, out=weight_grad[s])
            torch.sum(g, 0, out=bias_grad[s])

    return time_us(step_fused if fused else step_split, iters)


def mean(values) -> float:
    return float(np.mean(list(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default=str(Path(__file__).parent / "data" / "lengths.json"))
    parser.add_argument("--rows-per-task", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cudnn", action="store_true", help="time cuDNN's ragged kernel too")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = packed_rows(json.loads(Path(args.lengths).read_text()), args.rows_per_task, args.seed)
    print(f"{len(rows)} packed rows, widths {[w for w, _ in rows]}")
    candidates = {**ATTENTION, **(EXTRA_ATTENTION if args.cudnn else {})}
    attention: dict[str, dict] = {}
    for dropout in (0.1, 0.0):
        for name, fn in candidates.items():
            key = f"{name} dropout={dropout}"
            try:
                cases = [attention_case(fn, w, cu, dropout, args.iters) for w, cu in rows]
            except RuntimeError as error:  # a kernel this torch/GPU does not have
                attention[key] = {"error": str(error).splitlines()[0][:300]}
                print(f"{key}: {attention[key]['error']}")
                continue
            entry = {"us_per_layer": mean(c["us"] for c in cases)}
            for stat in ("max_abs_diff_out", "max_abs_diff_grad"):
                if stat in cases[0]:
                    entry[stat] = max(c[stat] for c in cases)
            attention[key] = entry
    for dropout in (0.1, 0.0):
        base = attention[f"flash2_varlen dropout={dropout}"]["us_per_layer"]
        for name in candidates:
            entry = attention[f"{name} dropout={dropout}"]
            if "us_per_layer" in entry:
                entry["x_flash2"] = base / entry["us_per_layer"]
    qkv = {label: mean(qkv_case(fused, w, args.iters) for w, _ in rows)
           for label, fused in (("three_linears", False), ("one_fused_linear", True))}
    qkv_ratio = qkv["three_linears"] / qkv["one_fused_linear"]
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
        "command": "python benchmarks/attention_kernels.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "widths": [w for w, _ in rows],
        "attention_fwd_bwd": attention,
        "qkv_fwd_bwd_us_per_layer": qkv, "qkv_fused_speedup": qkv_ratio,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
