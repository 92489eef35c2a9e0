"""Where a profiled step's GPU time goes, by kernel group, from `throughput.py --profile`'s trace.

    python benchmarks/profile_groups.py benchmarks/results/throughput_h200_direct_grads_m3_trace.json.gz

Prints a markdown table (ms and kernels per step) and the GPU gaps longer than `--gap-us`.
The groups are named by kernel-name patterns (GROUPS, first match wins); steps are the
trace's `ProfilerStep#` spans on the CPU side (throughput.py profiles 10).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter

GROUPS = [
    ("q/k/v gradient copies", r"clone_select_backward"),
    ("GEMMs (cuBLAS `nvjet`)", r"^nvjet|gemm"),
    ("FlashAttention varlen, forward + backward", r"flash"),
    ("flat AdamW", r"lerp"),
    ("clip-norm reductions", r"NormTwoOps"),
    ("Inductor's fused elementwise, norms, reductions", r"^triton"),
    ("memcpy / memset", r"^Memcpy|^Memset"),
    ("other aten", r""),
]


def gpu_events(trace: dict) -> list[dict]:
    return sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"
                   and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])


def group_of(name: str) -> str:
    return next(label for label, pattern in GROUPS if re.search(pattern, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--gap-us", type=float, default=20.0)
    args = parser.parse_args()
    with gzip.open(args.trace) if args.trace.endswith(".gz") else open(args.trace) as f:
        trace = json.load(f)
    steps = len({e["name"] for e in trace["traceEvents"]
                 if e.get("ph") == "X" and e["name"].startswith("ProfilerStep#")})
    events = gpu_events(trace)
    time_us, count = Counter(), Counter()
    for e in events:
        group = group_of(e["name"])
        time_us[group] += e["dur"]
        count[group] += 1
    print(f"{steps} steps, {sum(time_us.values()) / steps / 1000:.2f} ms of GPU kernels and "
          f"{len(events) / steps:.0f} kernels per step\n")
    print("| kernels | ms per step | kernels per step |\n|---|---:|---:|")
    for label, us in time_us.most_common():
        print(f"| {label} | {us / steps / 1000:.2f} | {count[label] / steps:g} |")
    gaps, end = [], events[0]["ts"] + events[0]["dur"]
    for e in events[1:]:
        if e["ts"] - end > args.gap_us:
            gaps.append((e["ts"] - end, end - events[0]["ts"]))
        end = max(end, e["ts"] + e["dur"])
    print(f"\nGPU gaps over {args.gap_us:.0f} µs: {len(gaps)}, {sum(g for g, _ in gaps) / 1000:.2f} ms "
          f"in all; the last one starts {max((t for _, t in gaps), default=0) / 1000:.2f} ms "
          f"into a {(end - events[0]['ts']) / 1000:.1f} ms trace")


if __name__ == "__main__":
    main()
