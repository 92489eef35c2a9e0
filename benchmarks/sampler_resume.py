"""Cost of resuming the sampler deep in a 1M-sample epoch, and the memory of the plan.

For each plan variant and cursor (0, 10 %, 50 %, 99 % of the epoch) it times
`RankBatchSampler.load_state_dict` + the first batch, cold (a fresh plan object: the epoch's
arrays are built on that first batch, as after a restart) and warm (arrays already cached),
median of --repeats. Memory: nbytes of the cached epoch arrays and the tracemalloc peak while
building them. Usage: python benchmarks/sampler_resume.py [--out PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from mtl_dist.sampler import MultiTaskBatchPlan, RankBatchSampler

ROOT = Path(__file__).resolve().parent.parent
SIZES = [500_000, 300_000, 200_000]
GLOBAL_BATCH, WORLD, RANK, SEED = 256, 8, 7, 42
CURSORS = (0.0, 0.10, 0.50, 0.99)
VARIANTS = {
    "proportional": dict(strategy="proportional"),
    "proportional+group_by_length": dict(strategy="proportional", group_by_length=True),
    "temperature": dict(strategy="temperature", temperature=2.0),
}


def task_lengths(path: Path) -> list[np.ndarray]:
    """Per-sample token lengths drawn from the reference length mix (or synthetic if absent)."""
    rng = np.random.default_rng(0)
    if path.is_file():
        mix = list(json.loads(path.read_text()).values())
        return [rng.choice(np.asarray(mix[t]), size=n) for t, n in enumerate(SIZES)]
    return [rng.integers(4, 300, size=n) for n in SIZES]


def make_plan(variant: dict, lengths: list[np.ndarray]) -> MultiTaskBatchPlan:
    return MultiTaskBatchPlan(
        SIZES, global_batch_size=GLOBAL_BATCH, seed=SEED, lengths=lengths, **variant
    )


def offsets() -> list[int]:
    return [0, *np.cumsum(SIZES)[:-1].tolist()]


def resume_once(plan: MultiTaskBatchPlan, state: dict) -> tuple[float, float]:
    """(load_state_dict seconds, first-batch seconds) for a new sampler on `plan`."""
    sampler = RankBatchSampler(plan, offsets(), RANK, WORLD)
    t0 = time.perf_counter()
    sampler.load_state_dict(state)
    t1 = time.perf_counter()
    batch = next(iter(sampler))
    t2 = time.perf_counter()
    assert len(batch) == GLOBAL_BATCH // WORLD
    return t1 - t0, t2 - t1


def cursor_state(variant: dict, lengths: list[np.ndarray], step: int) -> dict:
    plan = make_plan(variant, lengths)
    sampler = RankBatchSampler(plan, offsets(), RANK, WORLD)
    sampler.advance(step)
    return sampler.state_dict()


def bench_variant(name: str, variant: dict, lengths: list[np.ndarray], repeats: int) -> dict:
    steps = make_plan(variant, lengths).num_steps(0)
    warm_plan = make_plan(variant, lengths)
    rows = []
    for frac in CURSORS:
        step = min(int(frac * steps), steps - 1)
        state = cursor_state(variant, lengths, step)
        cold = [resume_once(make_plan(variant, lengths), state) for _ in range(repeats)]
        warm = [resume_once(warm_plan, state) for _ in range(repeats)]
        rows.append(
            {
                "cursor_fraction": frac,
                "step": step,
                "cold_load_state_dict_s": statistics.median(c[0] for c in cold),
                "cold_first_batch_s": statistics.median(c[1] for c in cold),
                "cold_total_s": statistics.median(sum(c) for c in cold),
                "warm_total_s": statistics.median(sum(w) for w in warm),
            }
        )
    return {
        "variant": name,
        "params": variant,
        "steps_per_epoch": steps,
        "cursors": rows,
        **memory(variant, lengths),
        "full_epoch_iter_s": full_epoch_time(warm_plan),
    }


def memory(variant: dict, lengths: list[np.ndarray]) -> dict:
    plan = make_plan(variant, lengths)
    tracemalloc.start()
    plan.batch(0, 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"plan_cached_nbytes": plan.cached_nbytes, "build_tracemalloc_peak_bytes": peak}


def full_epoch_time(plan: MultiTaskBatchPlan) -> float:
    """Seconds for one rank to iterate its whole epoch (arrays cached; no data loaded)."""
    sampler = RankBatchSampler(plan, offsets(), RANK, WORLD)
    t0 = time.perf_counter()
    for _ in sampler:
        pass
    return time.perf_counter() - t0


def cpu_model() -> str:
    """The CPU's model name (Linux), else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampler_resume.json"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--lengths", type=Path, default=ROOT.parent / "shared" / "data" / "lengths.json"
    )
    args = parser.parse_args()
    lengths = task_lengths(args.lengths)
    results = [bench_variant(name, v, lengths, args.repeats) for name, v in VARIANTS.items()]
    report = {
        "benchmark": "sampler_resume",
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "setup": {
            "task_sizes": SIZES,
            "global_batch_size": GLOBAL_BATCH,
            "world_size": WORLD,
            "rank": RANK,
            "seed": SEED,
            "repeats": args.repeats,
            "lengths": "resampled from " + args.lengths.name
            if args.lengths.is_file()
            else "synthetic",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(
            f"{r['variant']}: {r['steps_per_epoch']} steps, plan {r['plan_cached_nbytes'] / 2**20:.1f} MiB "
            f"(build peak {r['build_tracemalloc_peak_bytes'] / 2**20:.1f} MiB), "
            f"full epoch iter {r['full_epoch_iter_s']:.3f} s"
        )
        for c in r["cursors"]:
            print(
                f"  cursor {c['cursor_fraction']:>4.0%} (step {c['step']:>4}): load {c['cold_load_state_dict_s'] * 1e6:.0f} us, "
                f"cold first batch {c['cold_first_batch_s'] * 1e3:.1f} ms, warm total {c['warm_total_s'] * 1e6:.0f} us"
            )


if __name__ == "__main__":
    main()
