"""Where a profiled step's GPU time goes, by kernel group, from `throughput.py --profile`'s trace.

    python benchmarks/profile_groups.py benchmarks/results/throughput_h200_direct_grads_m3_trace.json.gz

Prints a markdown table (ms and kernels per step) and the GPU gaps longer than `--gap-us`.
The groups are named by kernel-name patterns (GROUPS, first match wins); steps are the
trace's `ProfilerStep#` spans on the CPU side (throughput.py profiles 10). Then the GPU's busy
time (kernel intervals merged: below the table's sum where streams ran at once) and how much
of the flat AdamW kernels' time ran beside another stream's kernels (`train.overlap_optimizer`
puts them on a stream of their own).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import statistics
from collections import Counter

GEMMS, ATTENTION, ADAMW = ("GEMMs (cuBLAS `nvjet`)", "FlashAttention varlen, forward + backward",
                           "flat AdamW")
INDUCTOR = "Inductor's fused elementwise, norms, reductions"
GROUPS = [
    ("q/k/v gradient copies", r"clone_select_backward"),
    (GEMMS, r"^nvjet|gemm"),
    (ATTENTION, r"flash"),
    (ADAMW, r"lerp"),
    ("clip-norm reductions", r"NormTwoOps"),
    (INDUCTOR, r"^triton"),
    ("memcpy / memset", r"^Memcpy|^Memset"),
    ("other aten", r""),
]


def gpu_events(trace: dict) -> list[dict]:
    return sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"
                   and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])


def group_of(name: str) -> str:
    return next(label for label, pattern in GROUPS if re.search(pattern, name))


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, end) intervals merged into sorted disjoint ones."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def covered(interval: tuple[float, float], disjoint: list[tuple[float, float]]) -> float:
    """How much of `interval` the sorted disjoint intervals cover."""
    start, end = interval
    total, i = 0.0, max(0, bisect.bisect_right(disjoint, (start, float("inf"))) - 1)
    while i < len(disjoint) and disjoint[i][0] < end:
        total += max(0.0, min(end, disjoint[i][1]) - max(start, disjoint[i][0]))
        i += 1
    return total


def stream_of(event: dict):
    return event.get("args", {}).get("stream", event.get("tid"))


def concurrency(events: list[dict], label: str) -> tuple[float, float, int]:
    """The kernels of group `label`: their time, the part of it during which a kernel of
    another stream ran, and how many streams they ran on."""
    mine = [e for e in events if group_of(e["name"]) == label]
    streams = {stream_of(e) for e in mine}
    others = merged([(e["ts"], e["ts"] + e["dur"]) for e in events
                     if stream_of(e) not in streams])
    beside = sum(covered((e["ts"], e["ts"] + e["dur"]), others) for e in mine)
    return sum(e["dur"] for e in mine), beside, len(streams)


def forward_windows(events: list[dict]) -> list[Counter]:
    """Where flat AdamW ran alone (no overlap): each stretch from the end of a step's last
    AdamW kernel to the first attention-backward kernel after it, i.e. the next forward (and
    its loss), with the time of its kernels by group."""
    windows, last = [], None  # `last`: index of the latest AdamW kernel not yet followed up
    for j, e in enumerate(events):
        if group_of(e["name"]) == ADAMW:
            last = j
        elif "flash_bwd" in e["name"] and last is not None:
            start = events[last]["ts"] + events[last]["dur"]
            window = Counter({"window": e["ts"] - start})
            for k in events[last + 1:j]:
                window[group_of(k["name"])] += k["dur"]
            busy = merged([(k["ts"], k["ts"] + k["dur"]) for k in events[last + 1:j]])
            window["idle"] = window["window"] - sum(b - a for a, b in busy)
            windows.append(window)
            last = None
    return windows


# The embeddings' LayerNorm runs eagerly (aten's backward kernel); the layers' are compiled.
# After the embedding tables' backward the optimizer's side starts: the gradients' hand-over,
# the clip norm or AdamW itself.
OPTIMIZER_SIDE = re.compile(r"multi_tensor_apply|NormTwoOps|lerp")


def embedding_backward_windows(events: list[dict]) -> list[tuple[float, int]]:
    """Each stretch from the end of the embeddings' LayerNorm backward to the next
    optimizer-side kernel, i.e. the embedding tables' backward: (µs, kernels in it)."""
    windows = []
    for i, e in enumerate(events):
        if "GammaBetaBackward" not in e["name"]:
            continue
        end = next((j for j in range(i + 1, len(events))
                    if OPTIMIZER_SIDE.search(events[j]["name"])), None)
        if end is not None:
            windows.append((events[end]["ts"] - e["ts"] - e["dur"], end - i - 1))
    return windows


def memsets_before_gemms(events: list[dict]) -> tuple[int, float, float]:
    """Memsets right before a GEMM (cuBLAS zeroing part of its workspace): how many, the
    mean µs from the end of the kernel before each to the GEMM's start, and the median gap
    between two kernels in a row (no memset between them) for comparison."""
    costs, gaps = [], []
    for before, e, after in zip(events, events[1:], events[2:], strict=False):
        if e["name"].startswith("Memset") and group_of(after["name"]) == GEMMS:
            costs.append(after["ts"] - before["ts"] - before["dur"])
        elif e.get("cat") == "kernel" and after.get("cat") == "kernel":
            gaps.append(after["ts"] - e["ts"] - e["dur"])
    return len(costs), statistics.fmean(costs) if costs else 0.0, \
        statistics.median(gaps) if gaps else 0.0


def sm_resources(trace: dict) -> tuple[int, int | None]:
    """(registers per SM, SMs) of the traced GPU; 65,536 registers (sm_80/sm_90) and an
    unknown SM count where the trace does not say."""
    props = (trace.get("deviceProperties") or [{}])[0]
    return props.get("regsPerMultiprocessor", 65536), props.get("numSms")


def register_bound_share(events: list[dict], label: str, sm_registers: int) -> float | None:
    """The share of group `label`'s time in kernels each of whose blocks takes at least 90 %
    of an SM's registers: beside those, no other stream's block fits on that SM."""
    mine = [e for e in events if group_of(e["name"]) == label
            and "registers per thread" in e.get("args", {})]
    if not mine:
        return None
    full = sum(e["dur"] for e in mine
               if e["args"]["registers per thread"] * _count(e, "block") >= 0.9 * sm_registers)
    return full / sum(e["dur"] for e in mine)


def fewer_blocks_than_sms_share(events: list[dict], label: str, sms: int) -> float | None:
    """The share of group `label`'s time in kernels launched on fewer blocks than SMs."""
    mine = [e for e in events if group_of(e["name"]) == label and "grid" in e.get("args", {})]
    if not mine:
        return None
    return sum(e["dur"] for e in mine if _count(e, "grid") < sms) / sum(e["dur"] for e in mine)


def _count(event: dict, key: str) -> int:
    """Threads of a block (`block`) or blocks of a launch (`grid`)."""
    x, y, z = (list(event["args"].get(key, [1])) + [1, 1])[:3]
    return x * y * z


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
    busy = sum(b - a for a, b in merged([(e["ts"], e["ts"] + e["dur"]) for e in events]))
    print(f"GPU busy (kernel intervals merged): {busy / steps / 1000:.2f} ms per step")
    adamw, beside, streams = concurrency(events, ADAMW)
    # Only where AdamW ran alone: beside the forward (train.overlap_optimizer) its last
    # kernel falls inside the forward, and the "window" would be a piece of it.
    windows = forward_windows(events) if adamw and not beside else []
    if windows:  # medians: a window with a graph capture or a log read in it is no forward
        mid = {label: statistics.median(w[label] for w in windows) / 1000
               for label in ("window", "idle", GEMMS, ATTENTION, INDUCTOR)}
        print(f"forward after flat AdamW (to the first attention-backward kernel), median of "
              f"{len(windows)}: {mid['window']:.2f} ms, of which GEMMs {mid[GEMMS]:.2f}, "
              f"attention {mid[ATTENTION]:.2f}, Inductor's kernels {mid[INDUCTOR]:.2f}, "
              f"no kernel running {mid['idle']:.2f} ms")
    registers, sms = sm_resources(trace)
    share = register_bound_share(events, GEMMS, registers)
    if share is not None:
        print(f"GEMMs: {100 * share:.0f} % of their time in kernels whose every block takes "
              f"≥ 90 % of an SM's {registers} registers (no other stream's block fits beside)")
    share = fewer_blocks_than_sms_share(events, GEMMS, sms) if sms else None
    if share is not None:
        print(f"GEMMs: {100 * share:.0f} % of their time in launches of fewer blocks than the "
              f"GPU's {sms} SMs (the rest of the SMs free for another stream)")
    if adamw:
        print(f"flat AdamW: {adamw / steps / 1000:.2f} ms per step on {streams} stream(s), "
              f"{beside / steps / 1000:.2f} ms of it beside another stream's kernels")
    embedding = embedding_backward_windows(events)
    if embedding:
        spans = sorted(us for us, _ in embedding)
        print(f"embedding tables' backward (after the embeddings' LayerNorm backward, to the "
              f"gradients' hand-over, clip norm or AdamW), {len(spans)} windows: median "
              f"{statistics.median(spans):.0f} µs ({spans[0]:.0f}–{spans[-1]:.0f}), "
              f"{statistics.median(n for _, n in embedding):.0f} kernels")
    memsets, cost, gap = memsets_before_gemms(events)
    if memsets:
        print(f"memsets right before a GEMM: {memsets / steps:.1f} per step, {cost:.1f} µs each "
              f"from the kernel before to the GEMM (two kernels in a row: {gap:.2f} µs apart)")


if __name__ == "__main__":
    main()
