"""Where the compiled layers' elementwise kernels lose time (one GPU, kernels alone).

Run S's profile (H100) put Inductor's fused elementwise kernels at 4.97 ms of a 22.9 ms step;
the GELU forward alone at 35 us per layer, the LayerNorm + dropout kernels at 17-18 us, more
than their bytes need at the H100's bandwidth. This times, on the workload's packed shape
(3,584 tokens: ~32 samples of the reference lengths, rounded to 64), each piece compiled by
Inductor against a copy of the same bytes, and dumps Inductor's code for them:

    python benchmarks/elementwise_probe.py --out benchmarks/results/elementwise_probe_h100.json

`--timing events` (run V0) times each call from Python (`triton.testing.do_bench`): a kernel
shorter than its call's host path is timed at the host's pace. `--timing graph` (the default
since) replays the calls from a CUDA graph, on rotating inputs that do not fit in the L2 cache.
`--launch` times the GELU forward (run S's trace: 2 bf16 per thread, ~1.6 TB/s) and the
LayerNorm(dropout + residual) kernel (one warp per token, 156 registers per thread) as the step
runs them (the token dimension dynamic, tuned at the first size seen) under several compile
settings, with the launch config each one got; `--launch-only` runs just those.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from attention_kernels import time_us  # this folder's, first on sys.path when run as a script
from torch._inductor.utils import run_and_get_code
from triton.testing import do_bench

TOKENS, HIDDEN, FFN = 3584, 1024, 4096


def timed(fn, *args) -> float:
    """Median microseconds of fn(*args) (warm, compiled before)."""
    fn(*args)
    return do_bench(lambda: fn(*args), warmup=50, rep=300, return_mode="median") * 1000


def graph_timed(fn, sets: list[tuple], calls: int = 50) -> float:
    """Microseconds per fn(*inputs), the inputs taken in turn from `sets`, replayed from one
    CUDA graph (attention_kernels.time_us): no host time in it."""
    return time_us(lambda: [fn(*inputs) for inputs in sets], calls) / len(sets)


def rotating(inputs: tuple, copies: int = 4) -> list[tuple]:
    """`copies` sets of the inputs (fresh storage each), so that replayed calls read from HBM
    as the step does, not from the last call's L2 lines."""
    return [inputs] + [tuple(t.clone() for t in inputs) for _ in range(copies - 1)]


def launches(fn, *inputs) -> list[dict]:
    """Each Triton kernel of one call: name, grid, block (from the profiler's trace)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*inputs)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return [{"name": e["name"], "grid": e["args"]["grid"], "block": e["args"]["block"],
             "registers": e["args"].get("registers per thread")}
            for e in events if e.get("cat") == "kernel" and e["name"].startswith("triton")]


def ln_dropout(x, residual, weight, bias, p: float):
    y = F.dropout(x, p, training=True) if p else x
    return F.layer_norm(y + residual, (HIDDEN,), weight, bias, 1e-12)


def gelu_backward(grad, h):
    return torch.ops.aten.gelu_backward(grad, h)


def philox_rounds(rounds: int | None):
    """Make Inductor's dropout draw with `rounds` Philox rounds (None: Triton's default, 10)."""
    from torch._inductor.codegen.triton import TritonOverrides
    original = TritonOverrides.__dict__["rand"].__func__ if not hasattr(
        TritonOverrides, "_probe_rand") else TritonOverrides._probe_rand
    TritonOverrides._probe_rand = original

    def rand(seed, offset):
        text = original(seed, offset)
        if rounds is None or not text.startswith("tl.rand("):
            return text
        return text[:-1] + f", {rounds})"
    TritonOverrides.rand = staticmethod(rand)


def cases():
    dev, bf16 = "cuda", torch.bfloat16
    h = torch.randn(TOKENS, FFN, device=dev, dtype=bf16)
    g = torch.randn(TOKENS, FFN, device=dev, dtype=bf16)
    x = torch.randn(TOKENS, HIDDEN, device=dev, dtype=bf16)
    r = torch.randn(TOKENS, HIDDEN, device=dev, dtype=bf16)
    w = torch.ones(HIDDEN, device=dev, dtype=bf16)
    b = torch.zeros(HIDDEN, device=dev, dtype=bf16)
    mb = 2 * TOKENS * FFN / 1e6  # one (tokens, ffn) bf16 tensor, MB
    small = 2 * TOKENS * HIDDEN / 1e6
    return [
        ("copy x2 (tokens, 4096): read + write", lambda t: t * 2, (h,), 2 * mb),
        ("gelu exact (erf)", F.gelu, (h,), 2 * mb),
        ("gelu tanh", lambda t: F.gelu(t, approximate="tanh"), (h,), 2 * mb),
        ("gelu backward exact", gelu_backward, (g, h), 3 * mb),
        ("copy x + r (tokens, 1024)", lambda a, c: a + c, (x, r), 3 * small),
        ("layernorm(x + r), no dropout", lambda *a: ln_dropout(*a, 0.0), (x, r, w, b), 3 * small),
        ("layernorm(dropout(x) + r), p=0.1", lambda *a: ln_dropout(*a, 0.1), (x, r, w, b),
         3 * small + TOKENS * HIDDEN / 1e6),
        ("dropout(x) alone, p=0.1", lambda t: F.dropout(t, 0.1, True), (x,), 2 * small),
        ("layernorm(dropout(x) + r), p=0.1, Philox 7 rounds", lambda *a: ln_dropout(*a, 0.1),
         (x, r, w, b), 3 * small + TOKENS * HIDDEN / 1e6, 7),
        ("dropout(x) alone, p=0.1, Philox 7 rounds", lambda t: F.dropout(t, 0.1, True), (x,),
         2 * small, 7),
        ("layernorm(dropout(x) + r), p=0.1, aten's dropout (fallback_random)",
         lambda *a: ln_dropout(*a, 0.1), (x, r, w, b), 3 * small + TOKENS * HIDDEN / 1e6, None,
         {"fallback_random": True}),
    ]


# The step's token dimension varies by task (2,048-6,848 tokens in S3's trace), so Dynamo compiles
# the layers dynamic; Inductor tunes each kernel at the size it first sees.
LAUNCH_TIMED_TOKENS = 3392
LAUNCH_SETTINGS = [  # (name, tokens first seen with the token dim dynamic (None: static), options)
    ("static, coordinate descent", None, {"coordinate_descent_tuning": True}),
    ("static, no tuning", None, {}),
    ("dynamic from 2048 tokens, coordinate descent", 2048, {"coordinate_descent_tuning": True}),
    ("dynamic from 2048 tokens, no tuning", 2048, {}),
    ("dynamic from 6848 tokens, coordinate descent", 6848, {"coordinate_descent_tuning": True}),
    ("dynamic from 2048 tokens, coordinate descent, all directions, radius 2", 2048,
     {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
      "coordinate_descent_search_radius": 2}),
]


def gelu_inputs(tokens: int) -> tuple:
    return (torch.randn(1, tokens, FFN, device="cuda", dtype=torch.bfloat16),)


def ln_inputs(tokens: int) -> tuple:
    x, r = (torch.randn(1, tokens, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in "xr")
    w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    return x, r, w, torch.zeros_like(w)


# (kernel family, function, inputs at a token count, inputs marked dynamic, MB moved per token)
LAUNCH_KERNELS = [
    ("gelu forward", F.gelu, gelu_inputs, 1, 2 * 2 * FFN / 1e6),
    # reads x and r, writes the output (no autograd here: no mask, mean or rstd saved)
    ("layernorm(dropout(x) + r), p=0.1", lambda *a: ln_dropout(*a, 0.1), ln_inputs, 2,
     3 * 2 * HIDDEN / 1e6),
]


def launch_rows() -> list[dict]:
    """Each LAUNCH_KERNELS entry compiled under each LAUNCH_SETTINGS entry, timed at
    LAUNCH_TIMED_TOKENS as the step runs it, with the launch config its kernel got."""
    rows = []
    for family, fn, make_inputs, dynamic_inputs, mb_per_token in LAUNCH_KERNELS:
        for name, first_seen, options in LAUNCH_SETTINGS:
            torch._dynamo.reset()
            compiled = torch.compile(fn, dynamic=None, options=options)
            if first_seen:
                first = make_inputs(first_seen)
                for t in first[:dynamic_inputs]:
                    torch._dynamo.mark_dynamic(t, 1)
                compiled(*first)
            sets = rotating(make_inputs(LAUNCH_TIMED_TOKENS))
            us = graph_timed(compiled, sets)
            kernel = launches(compiled, *sets[0])[-1]
            threads = kernel["grid"][0] * kernel["grid"][1] * kernel["grid"][2] * kernel["block"][0]
            rows.append({"kernel": family, "setting": name, "us": round(us, 2),
                         "TB_per_s": round(mb_per_token * LAUNCH_TIMED_TOKENS / us, 3),
                         "programs": kernel["grid"][0], "threads_per_program": kernel["block"][0],
                         "elements_per_program": LAUNCH_TIMED_TOKENS * sets[0][0].shape[-1]
                         / kernel["grid"][0],
                         "elements_per_thread": LAUNCH_TIMED_TOKENS * sets[0][0].shape[-1] / threads,
                         **kernel})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/elementwise_probe.json")
    parser.add_argument("--code-dir", default=os.environ.get("OUT", "/tmp") + "/probe_code")
    parser.add_argument("--timing", choices=("graph", "events"), default="graph")
    parser.add_argument("--launch", action="store_true",
                        help="also LAUNCH_KERNELS under LAUNCH_SETTINGS, timed as in the step")
    parser.add_argument("--launch-only", action="store_true", help="only --launch")
    args = parser.parse_args()
    torch._inductor.config.fx_graph_cache = False  # the rounds patch is not in its key
    code_dir = Path(args.code_dir)
    code_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, fn, inputs, megabytes, *extra) in enumerate([] if args.launch_only else cases()):
        torch._dynamo.reset()
        philox_rounds(extra[0] if extra else None)
        options = {"coordinate_descent_tuning": True, **(extra[1] if len(extra) > 1 else {})}
        compiled = torch.compile(fn, dynamic=False, options=options)
        _, code = run_and_get_code(compiled, *inputs)
        (code_dir / f"{i:02d}.py").write_text(f"# {name}\n" + "\n\n".join(code))
        if args.timing == "events":
            us = timed(compiled, *inputs)
        else:
            us = graph_timed(compiled, rotating(inputs))
        rows.append({"case": name, "us": round(us, 2), "MB": round(megabytes, 1),
                     "TB_per_s": round(megabytes / us, 3)})
        print(json.dumps(rows[-1]), flush=True)
    import torch._inductor.runtime.triton_helpers as helpers  # not imported by --launch-only
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "tokens": TOKENS, "timing": args.timing, "rows": rows,
              "launch": launch_rows() if args.launch or args.launch_only else None,
              "inductor_has_rand4x": hasattr(helpers, "rand4x")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
