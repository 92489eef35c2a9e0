"""The 4-byte memsets before the step's cuBLAS GEMMs, and what they cost (one GPU).

Run S's H100 trace (`results/throughput_h100_s3_trace.json.gz`) has ~59 four-byte
`Memset (Device)` nodes per step inside the CUDA graphs right before `nvjet` GEMMs, each
costing ~5.6-8 us of GPU time (the gap before it, the memset, the gap after it) where two
kernels in a row cost ~0.4 us: ~0.4 ms of a ~23 ms step. This replays one BERT-large layer's
GEMMs (the fused q/k/v, output, FFN up and down projections with their biases, forward and
backward) from a CUDA graph on the step's packed shape and reports, per replay: the GPU time,
the memsets and GEMM kernels in it, which host call issued the memsets (an eager call
profiled with the CUDA runtime's API calls), and the same calls run eagerly (host time to
issue one, wall time per call). Run it once per setting to compare, e.g.:

    python benchmarks/gemm_memsets.py --out benchmarks/results/gemm_memsets_h100.json
    CUBLASLT_WORKSPACE_SIZE=0 python benchmarks/gemm_memsets.py --out ...   # appends a row
    python benchmarks/gemm_memsets.py --blas cublaslt --out ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from attention_kernels import time_us  # this folder's, first on sys.path when run as a script
from profile_groups import GEMMS, group_of
from torch.profiler import ProfilerActivity, profile

HIDDEN, FFN = 1024, 4096
ENV_KEYS = ("CUBLASLT_WORKSPACE_SIZE", "CUBLAS_WORKSPACE_CONFIG", "TORCH_BLAS_PREFER_CUBLASLT")


def layer_weights(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of the four projections, bf16, as the trainer's bf16 weights."""
    shapes = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
    return [(torch.randn(out, inp, device=device, dtype=torch.bfloat16, requires_grad=True),
             torch.randn(out, device=device, dtype=torch.bfloat16, requires_grad=True))
            for out, inp in shapes]


def forward_backward(x: torch.Tensor, weights, grad_out: torch.Tensor,
                     linear=F.linear) -> None:
    """The layer's GEMMs in the order the step runs them (attention and norms left out)."""
    (wqkv, bqkv), (wo, bo), (w1, b1), (w2, b2) = weights
    qkv = linear(x, wqkv, bqkv)
    attended = qkv[:, :HIDDEN]  # stands for attention's output
    if linear is not F.linear:  # mtl_dist's attention hands over a contiguous output
        attended = attended.contiguous()
    attended = linear(attended, wo, bo)
    up = linear(attended, w1, b1)
    down = linear(up, w2, b2)
    down.backward(grad_out)


def mtl_linear(weights, cublaslt_gemms: bool):
    """train.direct_weight_grads' Linear (weight gradients into targets), its GEMMs by torch
    or, with train.cublaslt_gemms, by cuBLASLt without a workspace."""
    from mtl_dist.model import LinearGradInto

    targets = {id(w): torch.empty_like(w) for w, _ in weights}
    return lambda x, w, b: LinearGradInto.apply(x, w, b, targets[id(w)], cublaslt_gemms)


def memsets_in(trace_events) -> dict:
    kernels = [e for e in trace_events if e.device_type == torch.autograd.DeviceType.CUDA]
    names = [e.name for e in kernels]
    return {"memsets": sum(n.startswith("Memset") for n in names),
            "gemm_kernels": sum(group_of(n) == GEMMS for n in names),
            "kernels": len(names)}


def memset_callers(x, weights, grad_out, linear=F.linear) -> dict[str, int]:
    """Which aten ops issue cudaMemsetAsync, from one eager call's runtime API trace."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward_backward(x, weights, grad_out, linear)
        torch.cuda.synchronize()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    ops = [e for e in events if e.name.startswith("aten::") and e.device_type
           == torch.autograd.DeviceType.CPU]
    callers: dict[str, int] = {}
    for call in (e for e in events if e.name == "cudaMemsetAsync"):
        enclosing = [op for op in ops if op.time_range.start <= call.time_range.start
                     and call.time_range.end <= op.time_range.end]
        name = enclosing[-1].name if enclosing else "(no aten op)"
        callers[name] = callers.get(name, 0) + 1
    return callers


def eager_us(step, iters: int = 50) -> dict[str, float]:
    """Eager calls (no graph): host microseconds to issue one, and wall microseconds per call
    once the GPU has finished them all (run X: the eager baseline ran ~20 % slower without
    workspaces, though the GEMMs replayed from a graph got faster)."""
    import time

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {"eager_host_us_per_call": (issued - start) * 1e6 / iters,
            "eager_wall_us_per_call": (done - start) * 1e6 / iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gemm_memsets.json")
    parser.add_argument("--tokens", type=int, default=3584, help="packed rows (the step's M)")
    parser.add_argument("--blas", choices=["default", "cublas", "cublaslt", "mtl_torch",
                                           "mtl_cublaslt"], default="default",
                        help="mtl_*: mtl_dist's LinearGradInto with train.cublaslt_gemms off/on")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    if args.blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(args.blas)
    torch.manual_seed(0)
    weights = layer_weights("cuda")
    x = torch.randn(args.tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(args.tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    linear = mtl_linear(weights, args.blas == "mtl_cublaslt") if args.blas.startswith("mtl") \
        else F.linear
    step = lambda: forward_backward(x, weights, grad_out, linear)  # noqa: E731
    us = [time_us(step, args.iters) for _ in range(5)]
    eager = eager_us(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    row = {"tokens": args.tokens, "blas": args.blas,
           "blas_library": str(torch.backends.cuda.preferred_blas_library()),
           "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
           "us_per_layer_fwd_bwd": sorted(us)[len(us) // 2], "us_all": us,
           **eager, **memsets_in(prof.events()), "memset_callers_eager": memset_callers(x, weights,
                                                                               grad_out, linear),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
