"""One transformer layer's feed-forward block (1024 → 4096 → 1024, bf16), forward + backward
replayed from a CUDA graph: GELU in a kernel of its own (torch.compile, exact and tanh GELU)
against GELU in the first GEMM's cuBLASLt epilogue (`train.gelu_epilogue`,
mtl_dist/gelu_epilogue.py). Also checks its output and gradients against fp32 maths on the
same inputs, and (`--algorithms`) times each GEMM alone: torch's, the epilogue GEMM with each
algorithm cuBLASLt offers, and the backward epilogue (DGELU_BGRAD) in several forms.

    python benchmarks/gelu_epilogue.py --out benchmarks/results/gelu_epilogue_h100.json
    python benchmarks/gelu_epilogue.py --algorithms --tokens 3584
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtl_dist.gelu_epilogue import GeluLinear  # noqa: E402

HIDDEN, INTERMEDIATE = 1024, 4096


def plain_mlp(approximate: str):
    def mlp(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    return mlp


def epilogue_mlp(x, w1, b1, w2, b2):
    return F.linear(GeluLinear.apply(x, w1, b1, None), w2, b2)


def operands(tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    return [rand(tokens, HIDDEN), rand(INTERMEDIATE, HIDDEN, scale=0.03), rand(INTERMEDIATE),
            rand(HIDDEN, INTERMEDIATE, scale=0.03), rand(HIDDEN), rand(tokens, HIDDEN)]


def accuracy(tokens: int) -> dict:
    """Largest difference of the epilogue path's output and gradients from fp32 tanh-GELU
    maths, each over that tensor's largest magnitude; and bf16 plain maths' for scale."""
    *inputs, grad = operands(tokens, seed=1)
    exact = [t.float().requires_grad_() for t in inputs]
    reference = plain_mlp("tanh")(*exact)
    ref_grads = torch.autograd.grad(reference, exact, grad.float())
    out = {}
    for name, fn in (("epilogue", epilogue_mlp), ("bf16 torch ops", plain_mlp("tanh"))):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, grad)
        out[name] = {label: ((got.float() - want).abs().max() / want.abs().max()).item()
                     for label, got, want in zip(["out", "x", "w1", "b1", "w2", "b2"],
                                                 [y, *grads], [reference, *ref_grads], strict=True)}
    return out


def graphed(fn, tokens: int):
    """A CUDA graph of fn's forward + backward on fixed operands."""
    *inputs, grad = operands(tokens)
    leaves = [t.requires_grad_() for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            torch.autograd.grad(fn(*leaves), leaves, grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = torch.autograd.grad(fn(*leaves), leaves, grad)
    graph.keep = (leaves, grad, outputs)  # the graph reads and writes these addresses
    return graph


def time_us(graph, replays: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return statistics.median(times)


def _elapsed_us(fn, calls: int = 50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def algorithms(tokens: int) -> dict:
    """Each GEMM alone (eager, µs per call): torch's plain GEMM of the same shape, and the
    epilogue GEMM with each algorithm cuBLASLt's heuristic offers, in its order."""
    from mtl_dist import cublaslt

    x, w1, b1, w2, _, grad = operands(tokens)
    pre = torch.randn(tokens, INTERMEDIATE, device="cuda").to(torch.bfloat16)
    out = {"torch addmm x·w1ᵀ+b1": _elapsed_us(lambda: F.linear(x, w1, b1)),
           "torch mm grad·w2": _elapsed_us(lambda: grad @ w2)}
    lt = cublaslt._lt(x.device)
    dpre = torch.empty(tokens, INTERMEDIATE, device="cuda", dtype=torch.bfloat16)
    bias_grad = torch.empty(INTERMEDIATE, device="cuda", dtype=torch.bfloat16)

    def dgelu_bgrad(weight=w2, transa=False, epilogue=cublaslt.EPILOGUE_DGELU_BGRAD):
        """dpre = gelu'(pre) ∘ (grad·w2) and its sum over tokens, from one cuBLASLt call."""
        lt.matmul(weight, transa, grad, dpre, m=INTERMEDIATE, n=tokens, k=HIDDEN,
                  epilogue=epilogue, bias=bias_grad, aux=pre)

    for label, call, epilogue in (
            ("GELU_AUX_BIAS", lambda: cublaslt.gelu_linear(x, w1, b1),
             cublaslt.EPILOGUE_GELU_AUX_BIAS),
            ("DGELU_BGRAD", dgelu_bgrad, cublaslt.EPILOGUE_DGELU_BGRAD)):
        call()
        key = next(k for k in reversed(list(lt.plans)) if k[1] == tokens and k[5] == epilogue)
        times = []
        for algo in lt.candidates[key]:
            lt.plans[key] = (*lt.plans[key][:4], algo)
            times.append(round(_elapsed_us(call), 1))
        lt.plans[key] = (*lt.plans[key][:4], lt.candidates[key][0])
        out[label] = times
    # the backward epilogue in other forms: w2 transposed (op T), without the bias gradient
    w2t = w2.t().contiguous()
    dgelu = 64 | 128
    for label, weight, transa, epilogue in (
            ("DGELU_BGRAD, w2 transposed", w2t, True, cublaslt.EPILOGUE_DGELU_BGRAD),
            ("DGELU", w2, False, dgelu), ("DGELU, w2 transposed", w2t, True, dgelu)):
        def call(weight=weight, transa=transa, epilogue=epilogue):
            dgelu_bgrad(weight, transa, epilogue)
        try:
            out[label] = round(_elapsed_us(call), 1)
        except cublaslt.CublasLtError as exc:
            out[label] = str(exc)
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        out[label + " kernels"] = [e.name[:80] for e in prof.events()
                                   if e.device_type == torch.autograd.DeviceType.CUDA]
    return out


def kernel_table(graph, replays: int = 5) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time / replays
    return "\n".join(f"  {us:8.1f}  {name[:110]}" for name, us in
                     sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gelu_epilogue.json")
    parser.add_argument("--tokens", default="2624,3584,5120")
    parser.add_argument("--variants", default="0,1,2,3", help="indices, in this order")
    parser.add_argument("--algorithms", action="store_true",
                        help="only time each GEMM alone, each cuBLASLt algorithm offered")
    parser.add_argument("--kernels", action="store_true",
                        help="print each variant's kernels per replay (torch.profiler)")
    parser.add_argument("--replays", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    if args.algorithms:
        result = {int(t): algorithms(int(t)) for t in args.tokens.split(",")}
        print(json.dumps(result, indent=1))
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    variants = {"compiled, exact GELU (the recommended set)": torch.compile(plain_mlp("none")),
                "compiled, tanh GELU": torch.compile(plain_mlp("tanh")),
                "cuBLASLt GELU epilogue (train.gelu_epilogue)": epilogue_mlp,
                "the same, compiled (as in the trainer's compiled layers)":
                    torch.compile(epilogue_mlp)}
    variants = {name: fn for i, (name, fn) in enumerate(variants.items())
                if str(i) in args.variants.split(",")}
    accuracy_3584 = accuracy(3584)
    print(json.dumps(accuracy_3584, indent=1), flush=True)
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        graphs = {}
        for name, fn in variants.items():
            graphs[name] = graphed(fn, tokens)
            graphs[name].replay()
            torch.cuda.synchronize()  # a failing replay names its variant
            print(f"{tokens} tokens: {name}: captured and replayed", flush=True)
        # interleaved rounds: drift in the GPU's clock hits every variant alike
        times = {name: [] for name in graphs}
        for _ in range(3):
            for name, graph in graphs.items():
                times[name].append(time_us(graph, args.replays, args.repeats))
        if args.kernels:
            for name, graph in graphs.items():
                print(f"{tokens} tokens, {name}: kernels per replay (µs)")
                print(kernel_table(graph))
        base = statistics.median(times[next(iter(times))])
        for name, values in times.items():
            rows.append({"tokens": tokens, "variant": name, "us": statistics.median(values),
                         "ratio_to_first": statistics.median(values) / base})
            print(json.dumps(rows[-1]), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(sys.argv), "rows": rows, "accuracy_3584": accuracy_3584}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
