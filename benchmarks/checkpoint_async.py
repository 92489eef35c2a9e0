"""How long a periodic save blocks training: blocking saves vs `checkpoint.async_save`.

One process, the models of `checkpoint_cost.py` (tiny demo shape, BERT-base, BERT-large:
24 x 1024, vocab 21128) with AdamW state, on the CPU or a GPU. For each model and mode:

- sync:  `CheckpointManager.save` as the trainer calls it without async_save; training waits
  for all of it (write, fsync, sha256, commit, rotate);
- async: `save` returns after the snapshot (CPU: a copy in memory; CUDA: the D2H copies into
  pinned buffers are only queued, so `d2h_done_s` also reports when they have finished); the
  write + commit runs on a background thread while training goes on (`background_s`);
- zero (optional, `--zero-stage N`): DeepSpeed's engine saves its partitions itself, so
  async_save falls back to the blocking path: what a ZeRO run waits per save.

Each timed save starts with no save in flight (`wait()` first, timed apart as `wait_s`), so
`blocking_s` is the steady state of saves further apart than their background write. Between
saves `--steps` training steps run; their mean time while a background write is going on is
compared with steps without one (`step_s_during_background` vs `step_s_baseline`): the cost
of the background thread competing for CPU/GIL/memory bandwidth. The first save of each mode
is timed apart (`first_save_blocking_s`: pinned buffers are allocated then).
Usage:
  python benchmarks/checkpoint_async.py --models tiny_demo_arch bert_base
  python benchmarks/checkpoint_async.py --device cuda --models bert_large --zero-stage 2 \\
      --out benchmarks/results/checkpoint_async_h200.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_cost import MODELS, Model, machine, write_report  # noqa: E402

from mtl_dist import checkpoint as ck  # noqa: E402
from mtl_dist.checkpoint import CheckpointManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = {"global_batch_size": 32, "tasks": ["nli", "emotion", "news"]}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Run:
    """Model + AdamW + schedule (or a DeepSpeed engine) that can take training steps."""

    def __init__(self, arch: dict, device: str, zero_stage: int, batch: int, seq: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        torch.manual_seed(0)
        self.device = device
        self.model = Model(**arch).to(device)
        self.vocab = self.model.encoder.config.vocab_size
        self.batch, self.seq = batch, seq
        fused = device.startswith("cuda")
        opt = torch.optim.AdamW(self.model.parameters(), lr=2e-5, fused=fused or None)
        self.scheduler = get_linear_schedule_with_warmup(opt, 10, 10**6)
        self.engine = None
        if zero_stage:
            from mtl_dist import zero

            ds_config = {
                "train_micro_batch_size_per_gpu": batch,
                "gradient_accumulation_steps": 1,
                "train_batch_size": batch,
                "zero_optimization": {"stage": zero_stage},
                "bf16": {"enabled": False},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            }
            self.engine, opt = zero.initialize(self.model, opt, ds_config, torch.device(device))
        self.optimizer = opt
        self.step()  # AdamW state exists from here on

    def app_state(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def step(self) -> None:
        ids = torch.randint(0, self.vocab, (self.batch, self.seq), device=self.device)
        if self.engine is not None:
            loss = self.engine(ids).logsumexp(-1).mean()
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.model(ids).logsumexp(-1).mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def timed_steps(run: Run, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run.step()
        _sync(run.device)
        times.append(time.perf_counter() - t)
    return times


def measure(name: str, mode: str, args, workdir: Path) -> dict:
    """`args.saves` timed saves of one model in one mode (sync | async | zero)."""
    arch = MODELS[name]
    run = Run(arch, args.device, args.zero_stage if mode == "zero" else 0, args.batch, args.seq)
    out = workdir / f"{name}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    mgr = CheckpointManager(out, save_total_limit=2, async_save=mode != "sync")
    baseline = timed_steps(run, args.steps)
    step = 0

    def one_save() -> dict:
        nonlocal step
        step += 1
        t = time.perf_counter()
        mgr.wait()  # the previous save finished (steady state): not counted as blocking
        wait_s = time.perf_counter() - t
        _sync(run.device)
        t = time.perf_counter()
        mgr.save(step, run.app_state(), {"global_step": step}, manifest=MANIFEST, engine=run.engine)
        blocking = time.perf_counter() - t
        _sync(run.device)
        d2h = time.perf_counter() - t
        during = []  # steps that started while the background write was still going on
        pending = mgr._pending
        for _ in range(args.steps):
            writing = pending is not None and pending.thread.is_alive()
            took = timed_steps(run, 1)
            if writing:
                during += took
        return {
            "wait_s": wait_s,
            "blocking_s": blocking,
            "d2h_done_s": d2h,
            "steps_during_background": during,
        }

    first = one_save()
    saves = [one_save() for _ in range(args.saves)]
    mgr.wait()
    timings = {t["step"]: t for t in mgr.take_timings()}
    for i, s in enumerate(saves, start=2):
        s["background_s"] = timings[i]["background_s"]
    path = mgr.latest()
    files = ck.read_manifest(path)["files"]
    size = sum(v["size"] for v in files.values())
    during = [x for s in saves for x in s["steps_during_background"]]
    result = {
        "model": name,
        "mode": mode,
        "zero_stage": args.zero_stage if mode == "zero" else 0,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "checkpoint_bytes": size,
        "checkpoint_mib": round(size / 2**20, 1),
        "first_save_blocking_s": first["blocking_s"],
        "blocking_s": statistics.median(s["blocking_s"] for s in saves),
        "blocking_s_all": [s["blocking_s"] for s in saves],
        "background_s": statistics.median(s["background_s"] for s in saves),
        "background_s_all": [s["background_s"] for s in saves],
        "wait_s_all": [s["wait_s"] for s in saves],
        "step_s_baseline": statistics.median(baseline),
        "step_s_during_background": statistics.median(during) if during else None,
        "step_s_during_background_all": during,
        "steps_during_background": len(during),
        # What a save costs training in all: the blocked time plus the extra time of the steps
        # that ran next to the background write (they compete for cores, GIL, memory).
        "training_time_lost_per_save_s": statistics.median(s["blocking_s"] for s in saves)
        + max(0.0, sum(during) - len(during) * statistics.median(baseline)) / len(saves),
    }
    if args.device.startswith("cuda"):
        result["d2h_done_s"] = statistics.median(s["d2h_done_s"] for s in saves)
        result["host_pinned_mib"] = round(
            sum(b.numel() for b in mgr._snapshotter._buffers.values()) / 2**20, 1
        )
    shutil.rmtree(out, ignore_errors=True)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main() -> None:
    load_before = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/checkpoint_async_cpu.json"
    )
    parser.add_argument("--models", nargs="*", default=["tiny_demo_arch"], choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--saves", type=int, default=3, help="timed saves per model and mode")
    parser.add_argument("--steps", type=int, default=3, help="training steps after each save")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument(
        "--zero-stage",
        type=int,
        default=0,
        choices=(0, 1, 2, 3),
        help="also measure a DeepSpeed ZeRO engine's (blocking) save at this stage",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-async-bench-"))
    modes = ["sync", "async"] + (["zero"] if args.zero_stage else [])
    results = []
    for name in args.models:
        for mode in modes:
            r = measure(name, mode, args, workdir)
            results.append(r)
            print(
                f"{name} {mode}: {r['checkpoint_mib']} MiB, blocked {r['blocking_s']:.3f}s "
                f"(first {r['first_save_blocking_s']:.3f}s), background {r['background_s']:.3f}s, "
                f"step {r['step_s_baseline']:.3f}s -> {r['step_s_during_background']}, "
                f"training time lost per save {r['training_time_lost_per_save_s']:.3f}s",
                flush=True,
            )
    report = {
        "benchmark": "checkpoint_async",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "setup": {
            "device": args.device,
            "saves": args.saves,
            "steps_between_saves": args.steps,
            "batch": [args.batch, args.seq],
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "workdir_fs": str(workdir),
            "process_count": 1,
            "note": "blocking_s: save() on the caller's thread, with no save in flight before "
            "it; background_s: the writer thread (write + fsync + sha256 + commit + rotate); "
            "training_time_lost_per_save_s: blocking_s + the extra time of the training steps "
            "that overlapped the background write (vs step_s_baseline); every save fsyncs",
        },
        "results": results,
    }
    write_report(report, args.out, workdir, keep_workdir=args.dir is not None)


if __name__ == "__main__":
    main()
