"""Multi-GPU correctness of the demo under DDP, ZeRO-2 and ZeRO-3, with the shipped launch configs.

One invocation, one JSON (rewritten after every finished check, so a timeout still leaves
numbers). For each mode (`launch/ddp.yaml`, `launch/zero2.yaml`, `launch/zero3.yaml`; one
process: `launch/gpu_single.yaml` for DDP, the ZeRO file with `--num_processes 1` for ZeRO):

  a. one_vs_two     1 process with per-device batch 2B vs 2 processes with B: the same global
                    batch, so the sampler gives both the same samples at every step (plan =
                    f(seed, epoch, step, G)); dropout off, so the maths is the same. Global-batch
                    loss per step (mean of the ranks' losses, read on every rank), max abs/rel
                    gap over the first N steps against a stated tolerance.
     vs_ddp         the same 1- and 2-process runs of ZeRO-2/3 against DDP's (no extra launch).
  b. resume         2 processes: stop after S steps, resume from the periodic mid-epoch
                    checkpoint K < S (as after a crash), run to the end; every rank's per-step
                    losses vs an uninterrupted run: bit-exact flag, max gap, first differing step;
                    final fp32 weights compared too. Dropout on (CUDA RNG restore is exercised).
  c. ema            the demo's EMA (train.ema_decay) under DDP, ZeRO-2 and ZeRO-3: ema.pt in
                    the checkpoints, EMA shadow after the resume vs uninterrupted, and the final
                    EMA-evaluated dev record.
  d. idle_heads     at EVERY optimizer step of every launch: the heads of tasks not in the
                    step keep their fp32 weights (ZeRO: gathered with deepspeed.utils.
                    safe_get_full_fp32_param) and AdamW state (ZeRO: every rank's partitions)
                    exactly; the used head moves. (tests/dist_scripts/idle_heads.py checks one
                    step with accumulation 2 on CPU; this runs every step on the GPUs.)
  e. world_size     DDP and ZeRO-2: checkpoint K of the 2-process run resumed on 1 process, and
                    checkpoint K of the 1-process run resumed on 2 (ZeRO: `mtl-dist ckpt
                    convert` to DeepSpeed's universal format first); losses after the resume vs
                    the uninterrupted runs.
  f. task_agreement sampler.check_task_agreement on: calls counted on every rank of every launch.
  g. memory         torch.cuda.max_memory_allocated / max_memory_reserved per rank at the end
                    of training (CPU: peak RSS instead).

The checks read each rank through a thin wrapper around `mtl-dist train` (this file run with
`--worker` under `accelerate launch`): it wraps Trainer methods, the library is unchanged.

    python benchmarks/multi_gpu_checks.py --out benchmarks/results/multi_gpu_checks_h200x2_all.json
    python benchmarks/multi_gpu_checks.py --cpu    # dry run: 2 CPU processes (gloo), fp32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DEMO = REPO / "configs" / "demo.yaml"
# As tests/_runs.py's FAST: every step logged, evaluation and periodic checkpoints every 8.
FAST = ["train.log_steps=1", "train.eval_steps=8", "checkpoint.save_steps=8",
        "checkpoint.save_total_limit=10", "train.early_stopping_patience=null"]
NO_DROPOUT = ["model.dropout=0.0", "model.arch.hidden_dropout_prob=0.0",
              "model.arch.attention_probs_dropout_prob=0.0"]
MODES = ("ddp", "zero2", "zero3")
# Relative tolerance on the global-batch loss where bit-equality is not expected.
TOLERANCE = {
    "bf16": (2e-2, "bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); 1 vs 2 "
                   "processes run GEMMs of other shapes (batch 32 vs 16: other kernels and "
                   "reduction orders) and reduce gradients differently (one backward vs "
                   "NCCL all-reduce of two halves; ZeRO reduces bf16 gradients), so weights "
                   "differ by bf16 rounding after the first update and Adam amplifies it a "
                   "little each step: ~5 bf16 ulps of the loss"),
    "no": (1e-4, "fp32: different batch shapes and reduction order (one backward vs an "
                 "all-reduce of two halves) change the last bits (~1e-7 relative per op); "
                 "1e-4 allows their growth over the steps compared"),
}


# ===================================================================================== worker
def worker(argv: list[str]) -> int:
    """Run `mtl-dist train ARGS` in this rank, recording what the checks need into PROBE_DIR."""
    probe_dir, cli_args = Path(argv[0]), argv[1:]
    sys.path.insert(0, str(REPO))
    import resource

    import torch

    from mtl_dist import cli
    from mtl_dist import trainer as T

    rank = int(os.environ.get("RANK", "0"))
    rec: dict[str, Any] = {"rank": rank, "agreement_calls": 0, "micro_steps": 0,
                           "idle": {"steps_checked": 0, "idle_head_checks": 0, "violations": [],
                                    "used_head_checks": 0, "used_head_changed": 0}}
    losses: list[tuple[int, int, torch.Tensor]] = []

    original_check = T.check_task_agreement

    def check_task_agreement(task_id: int, step: int) -> None:
        rec["agreement_calls"] += 1
        original_check(task_id, step)

    T.check_task_agreement = check_task_agreement

    original_fb = T.Trainer._forward_backward

    def forward_backward(self, batch, *args):
        loss = original_fb(self, batch, *args)
        rec["micro_steps"] += 1
        losses.append((self.state.global_step + 1, int(batch["task_id"]),
                       loss.detach().float().reshape(())))
        return loss

    T.Trainer._forward_backward = forward_backward

    def head_state(self) -> dict[tuple, tuple[torch.Tensor, dict]]:
        """Heads' full fp32 weights by name, and their optimizer state.

        DDP/1 process: each head parameter's AdamW state. ZeRO: full fp32 weights gathered
        with deepspeed.utils.safe_get_full_fp32_param (a collective every rank makes in the
        same order), and, per rank, the fp32 partition + AdamW state of every head's param
        group (ZeRO-2: the group's flat partition; ZeRO-3: its sub-group partitions). Read
        locally: DeepSpeed's safe_get_full_optimizer_state would raise on some ranks only
        while a group has no state yet, and a collective on the others would then hang."""
        out: dict[tuple, tuple[torch.Tensor, dict]] = {}

        def tensors(state: dict) -> dict:
            return {k: v.detach().float().cpu().clone() for k, v in state.items()
                    if torch.is_tensor(v)}

        if self.engine is not None:
            from deepspeed.utils import safe_get_full_fp32_param
        for task in range(len(self.task_names)):
            for name, p in self.module.heads[str(task)].named_parameters():
                if self.engine is not None:
                    out[("param", task, name)] = (
                        safe_get_full_fp32_param(p).detach().float().cpu().clone(), {})
                else:
                    out[("param", task, name)] = (p.detach().float().cpu().clone(),
                                                  tensors(self.optimizer.state.get(p, {})))
        if self.engine is not None:
            ds, inner = self.optimizer, self.optimizer.optimizer
            groups = inner.param_groups
            sub_to_group = getattr(ds, "sub_group_to_group_id", None)
            if sub_to_group:  # ZeRO-3
                pairs = [(groups[g].get("head"), ds.fp32_partitioned_groups_flat[sub])
                         for sub, g in sub_to_group.items()]
            else:  # ZeRO-1/2
                pairs = [(g.get("head"), flat) for g in groups for flat in g["params"]]
            for i, (head, flat) in enumerate(pairs):
                if head is not None:
                    out[("partition", head, i)] = (flat.detach().float().cpu().clone(),
                                                   tensors(inner.state.get(flat, {})))
        return out

    original_step = T.Trainer._optimizer_step

    def optimizer_step(self):
        used = set(self.group_tasks)
        idle = set(range(len(self.task_names))) - used
        before = head_state(self)  # no try: a failure on one rank only would hang the others
        original_step(self)
        after = head_state(self)
        step = self.state.global_step + 1
        info = rec["idle"]
        info["steps_checked"] += 1
        for key, (w0, s0) in before.items():
            kind, task, name = key
            w1, s1 = after[key]
            if task in idle:
                info["idle_head_checks"] += 1
                changed = [] if torch.equal(w0, w1) else ["weight"]
                changed += [k for k in set(s0) | set(s1)
                            if k not in s0 or k not in s1 or not torch.equal(s0[k], s1[k])]
                if changed and len(info["violations"]) < 20:
                    info["violations"].append({"step": step, "task": task, "what": kind,
                                               "name": name, "changed": sorted(changed)})
            elif kind == "param":
                info["used_head_checks"] += 1
                info["used_head_changed"] += int(not torch.equal(w0, w1))

    T.Trainer._optimizer_step = optimizer_step

    original_fit = T.Trainer.fit

    def fit(self):
        error = None
        try:
            return original_fit(self)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            write_probe(self, error)

    def write_probe(self, error: str | None) -> None:
        cuda = self.accelerator.device.type == "cuda"
        rec.update({
            "error": error, "world_size": self.world_size, "device": str(self.accelerator.device),
            "distributed_type": str(self.accelerator.distributed_type),
            "zero_stage": self.cfg.train.zero_stage,
            "engine_zero_stage": (self.engine.zero_optimization_stage()
                                  if self.engine is not None else None),
            "deepspeed_config": self.cfg.train.deepspeed_config,
            "engine_bf16": (self.engine.bfloat16_enabled() if self.engine is not None else None),
            "mixed_precision": self.cfg.train.mixed_precision,
            "ema": self.ema is not None,
            "check_task_agreement": self.cfg.sampler.check_task_agreement,
            "global_step": self.state.global_step,
            "losses": [[s, t, v.item()] for s, t, v in losses],
            "memory": ({"max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                        "max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
                        "gpu": torch.cuda.get_device_name()} if cuda else
                       {"cpu_peak_rss_mib":
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
        })
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / f"rank{rank}.json").write_text(json.dumps(rec))

    T.Trainer.fit = fit
    return cli.main(cli_args)


# ============================================================================== orchestration
@dataclass
class Task:
    name: str
    fn: Any
    deps: tuple[str, ...] = ()
    result: Any = None
    error: str | None = None
    done: bool = False


@dataclass
class Ctx:
    args: argparse.Namespace
    root: Path
    out: Path
    t0: float
    deadline: float
    precision: str
    result: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)
    launches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    gpu_rr: int = 0

    def write(self) -> None:
        with self.lock:
            self.result["wall_s"] = round(time.time() - self.t0, 1)
            self.result["launches"] = self.launches
            self.result["runs"] = self.runs
            tmp = self.out.with_suffix(".tmp")
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.result, indent=1, default=str))
            os.replace(tmp, self.out)


def base_env(ctx: Ctx) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get(
               "PYTHONPATH")])])}
    # NVLink multicast stays off (shared GPUs); keep it so in every child environment.
    env.update({k: env.get(k, v) for k, v in (("NCCL_NVLS_ENABLE", "0"),
                                              ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                                              ("NVSHMEM_DISABLE_NVLS", "1"))})
    if ctx.args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", DS_ACCELERATOR="cpu",
                   OMP_NUM_THREADS="1")
    else:
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def launch_files(mode: str, procs: int) -> list[str]:
    """The shipped accelerate config (and DeepSpeed JSON) for a mode and process count."""
    if mode == "ddp":
        return ["--config_file", str(LAUNCH / ("gpu_single.yaml" if procs == 1 else "ddp.yaml"))]
    return ["--config_file", str(LAUNCH / f"{mode}.yaml"),
            "--deepspeed_config_file", str(LAUNCH / f"ds_{mode}.json")]


def run_process(ctx: Ctx, name: str, cmd: list[str], env: dict[str, str],
                launch: bool) -> dict:
    """Run one command (a new session, killed as a group on timeout); log to ROOT/logs."""
    remaining = ctx.deadline - time.time()
    if remaining < 5:
        raise RuntimeError("time budget used up before this run started")
    timeout = min(remaining, ctx.args.run_timeout)
    log = ctx.root / "logs" / f"{name.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with ctx.lock:
        ctx.launches += int(launch)
    start = time.time()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    row = {"rc": rc, "wall_s": round(time.time() - start, 1), "log": str(log),
           "cmd": " ".join(cmd)}
    with ctx.lock:
        ctx.runs[name] = row
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        row["log_tail"] = tail
        raise RuntimeError(f"{name}: exit {rc} after {row['wall_s']} s; log {log}:\n{tail}")
    return row


def train(ctx: Ctx, name: str, mode: str, procs: int, out: Path, *overrides: str) -> dict:
    a = ctx.args
    env = base_env(ctx)
    if not a.cpu:
        if procs == 1:  # independent 1-process runs go to the GPUs in turn
            with ctx.lock:
                env["CUDA_VISIBLE_DEVICES"] = str(ctx.gpu_rr % a.gpus)
                ctx.gpu_rr += 1
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(procs))
    # (CPU: the default 'no'. An override `train.mixed_precision=no` is read as YAML false.)
    precision = ["train.mixed_precision=bf16"] if ctx.precision == "bf16" else []
    probe = out / f"probe-{name.split('/')[-1]}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_files(mode, procs),
           "--num_processes", str(procs), "--main_process_port", "0",
           str(Path(__file__).resolve()), "--worker", str(probe),
           "train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={ctx.root / 'cache'}",
           *FAST, f"train.max_steps={a.steps}", "sampler.check_task_agreement=true", *precision,
           *overrides]
    row = run_process(ctx, name, cmd, env, launch=True)
    probes = read_probes(probe, procs)
    row["probe"] = {k: probes[0][k] for k in ("world_size", "device", "distributed_type",
                                               "zero_stage", "engine_zero_stage",
                                               "engine_bf16", "mixed_precision", "ema")}
    return {"out": out, "probes": probes, "row": row}


def read_probes(probe: Path, procs: int) -> list[dict]:
    probes = []
    for r in range(procs):
        path = probe / f"rank{r}.json"
        if not path.exists():
            raise RuntimeError(f"{path} missing: rank {r} did not finish")
        probes.append(json.loads(path.read_text()))
    return probes


def convert(ctx: Ctx, name: str, src: Path, dst: Path) -> Path:
    env = base_env(ctx)
    cmd = [sys.executable, "-m", "mtl_dist.cli", "ckpt", "convert", str(src), str(dst)]
    run_process(ctx, name, cmd, env, launch=False)
    return dst


# ================================================================================ comparisons
def step_losses(probes: list[dict], lo: int = 1, hi: int | None = None) -> dict:
    """{step: [loss of rank 0, rank 1, ...]} for steps lo..hi (accumulation 1: one per step)."""
    per: dict[int, list[float]] = {}
    for p in probes:
        for step, _task, loss in p["losses"]:
            if step >= lo and (hi is None or step <= hi):
                per.setdefault(step, []).append(loss)
    return per


def global_loss(per: dict) -> dict[int, float]:
    """Global-batch loss: ranks hold equal slices, so the mean of their means."""
    return {s: math.fsum(v) / len(v) for s, v in per.items()}


def gaps(a: dict[int, float], b: dict[int, float], steps: list[int]) -> dict:
    rows = [(s, abs(a[s] - b[s]), abs(a[s] - b[s]) / max(abs(b[s]), 1e-12)) for s in steps]
    if not rows:
        return {"steps": [], "max_abs": None, "max_rel": None}
    worst = max(rows, key=lambda r: r[2])
    return {"steps": [steps[0], steps[-1]], "max_abs": max(r[1] for r in rows),
            "max_rel": worst[2], "worst_step": worst[0],
            "first_differing_step": next((s for s, d, _ in rows if d != 0), None)}


def weight_diff(path_a: Path, path_b: Path) -> dict:
    """Whole fp32 weights of two checkpoints (ZeRO partitions consolidated by the library)."""
    import torch

    from mtl_dist.checkpoint import load_model_state

    # the trained weights: with EMA on, the shadow would hide how far the training differs
    a, b = load_model_state(path_a, with_ema=False), load_model_state(path_b, with_ema=False)
    if a.keys() != b.keys():
        return {"same_keys": False}
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"bit_exact": all(torch.equal(a[k], b[k]) for k in a), "max_abs": diff}


def eval_record(out: Path, step: int) -> dict | None:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") == "eval" and r.get("step") == step]
    if not rows:
        return None
    return {k: v for k, v in rows[-1].items() if k != "time"}


def logged_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if r.get("kind") == "train"]


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"checkpoint-{step}"


# ===================================================================================== checks
def check_one_vs_two(ctx: Ctx, mode: str, one: dict, two: dict) -> dict:
    tol, why = TOLERANCE[ctx.precision]
    n, steps = ctx.args.first_n, ctx.args.steps
    a, b = global_loss(step_losses(one["probes"])), global_loss(step_losses(two["probes"]))
    first = gaps(b, a, list(range(1, n + 1)))
    every = gaps(b, a, list(range(1, steps + 1)))
    return {"what": f"2 processes x batch {ctx.args.batch} vs 1 process x batch "
                    f"{2 * ctx.args.batch} (same global batch {2 * ctx.args.batch}, same "
                    "samples every step), dropout off; global-batch loss = mean of the ranks' "
                    "losses", "first_n": n, "first_n_gap": first, "all_steps_gap": every,
            "tolerance_rel": tol, "tolerance_why": why,
            "pass": first["max_rel"] is not None and first["max_rel"] <= tol,
            "final_weights_1_vs_2": weight_diff(ckpt(one["out"], steps), ckpt(two["out"], steps)),
            "losses_1proc": [a[s] for s in sorted(a)], "losses_2proc": [b[s] for s in sorted(b)]}


def check_vs_ddp(ctx: Ctx, mode: str, ddp_two: dict, two: dict, ddp_one: dict,
                 one: dict) -> dict:
    """ZeRO is an implementation of the same training: its losses should match DDP's."""
    tol, why = TOLERANCE[ctx.precision]
    n, steps = ctx.args.first_n, ctx.args.steps
    row = {"what": f"{mode} vs DDP, same config (dropout off), same number of processes; "
                   "global-batch loss per step"}
    for name, a, b in (("2_processes", two, ddp_two), ("1_process", one, ddp_one)):
        x, y = global_loss(step_losses(a["probes"])), global_loss(step_losses(b["probes"]))
        rel = {s: abs(x[s] - y[s]) / max(abs(y[s]), 1e-12) for s in range(1, steps + 1)}
        row[name] = {"first_n_gap": gaps(x, y, list(range(1, n + 1))),
                     "all_steps_gap": gaps(x, y, list(range(1, steps + 1))),
                     "first_step_over_tolerance": next((s for s in sorted(rel)
                                                        if rel[s] > tol), None)}
    row.update(tolerance_rel=tol, tolerance_why=why)
    row["pass"] = all(row[k]["all_steps_gap"]["max_rel"] <= tol
                      for k in ("2_processes", "1_process"))
    return row


def check_resume(ctx: Ctx, mode: str, straight: dict, stop: dict, resume: dict) -> dict:
    a = ctx.args
    k = a.resume_from
    ref = step_losses(straight["probes"])
    split = {**step_losses(stop["probes"], hi=k), **step_losses(resume["probes"], lo=k + 1)}
    assert sorted(split) == sorted(ref) == list(range(1, a.steps + 1)), (sorted(split),
                                                                          sorted(ref))
    bit_exact = all(split[s] == ref[s] for s in ref)
    first_diff = next((s for s in sorted(ref) if split[s] != ref[s]), None)
    g = gaps(global_loss(split), global_loss(ref), list(range(1, a.steps + 1)))
    same_first = all(split[s] == ref[s] for s in range(1, k + 2))
    row = {"what": f"2 processes, dropout on: stop after {a.stop_after} steps, resume from "
                   f"periodic checkpoint-{k} (mid-epoch), run to {a.steps}; every rank's loss "
                   "at every step vs an uninterrupted run",
           "resume_from_step": k, "bit_exact_all_ranks": bit_exact,
           "first_differing_step": first_diff, "max_abs_gap": g["max_abs"],
           "max_rel_gap": g["max_rel"],
           f"equal_through_step_{k + 1}": same_first,
           "logged_rank0_bit_exact": logged_losses(stop["out"]) == logged_losses(straight["out"]),
           "final_weights": weight_diff(ckpt(stop["out"], a.steps), ckpt(straight["out"],
                                                                         a.steps)),
           "expected": "bit-exact (ZeRO-3 too since 3c4b51f: idle heads' stale gradient "
                       "partitions no longer enter the clipping norm)"}
    row["pass"] = bit_exact
    return row


def check_ema(ctx: Ctx, mode: str, straight: dict, stop: dict) -> dict:
    import torch

    from mtl_dist.checkpoint import read_manifest

    a = ctx.args
    k, end = a.resume_from, a.steps
    files_k = read_manifest(ckpt(stop["out"], k))["files"]
    files_end = read_manifest(ckpt(stop["out"], end))["files"]
    shadow = [torch.load(ckpt(o, end) / "ema.pt", weights_only=True)["shadow"]
              for o in (stop["out"], straight["out"])]
    same = shadow[0].keys() == shadow[1].keys() and all(
        torch.equal(shadow[0][n], shadow[1][n]) for n in shadow[0])
    diff = max(float((shadow[0][n] - shadow[1][n]).abs().max()) for n in shadow[0])
    ev = [eval_record(o, end) for o in (stop["out"], straight["out"])]
    best = json.loads((stop["out"] / "best" / "best.json").read_text()) \
        if (stop["out"] / "best" / "best.json").exists() else None
    row = {"ema_decay": 0.99, "ema_on_every_rank": all(p["ema"] for p in straight["probes"]),
           f"ema_in_checkpoint_{k}": "ema.pt" in files_k,
           f"ema_in_checkpoint_{end}": "ema.pt" in files_end,
           "ema_shadow_after_resume_bit_exact": same, "ema_shadow_max_abs_gap": diff,
           "ema_eval_after_resume": {"score": ev[0] and ev[0].get("eval/score"),
                                     "uninterrupted_score": ev[1] and ev[1].get("eval/score"),
                                     "equal": ev[0] == ev[1]},
           "best_json": best}
    row["pass"] = bool(row[f"ema_in_checkpoint_{k}"] and row[f"ema_in_checkpoint_{end}"] and
                       same and ev[0] == ev[1] and ev[0] is not None)
    return row


def check_world_size(ctx: Ctx, resumed: dict, source: dict, target: dict, direction: str) -> dict:
    a = ctx.args
    k, n = a.resume_from, a.first_n
    tol, why = TOLERANCE[ctx.precision]
    got = global_loss(step_losses(resumed["probes"]))
    assert sorted(got) == list(range(k + 1, a.steps + 1)), sorted(got)
    src = global_loss(step_losses(source["probes"]))
    tgt = global_loss(step_losses(target["probes"]))
    first = list(range(k + 1, min(a.steps, k + n) + 1))
    every = list(range(k + 1, a.steps + 1))
    row = {"what": f"checkpoint-{k} of the {direction.split('_to_')[0]}-process run resumed on "
                   f"{direction.split('_to_')[1]} process(es), same global batch; dropout off",
           "vs_source_run_first_n": gaps(got, src, first),
           "vs_source_run_all": gaps(got, src, every),
           "vs_target_world_size_run_first_n": gaps(got, tgt, first),
           "first_loss_after_resume": {"resumed": got[k + 1], "source": src[k + 1],
                                       "target": tgt[k + 1]},
           "tolerance_rel": tol,
           "tolerance_why": "not bit-exact: after the resume the same weights meet other batch "
                            "shapes and another gradient reduction (see one_vs_two). " + why,
           "global_step_after": resumed["probes"][0]["global_step"]}
    row["pass"] = row["vs_source_run_first_n"]["max_rel"] <= tol
    return row


def summarize_runs(ctx: Ctx, mode: str, runs: dict[str, dict]) -> dict:
    """f, d, g: from every launch of the mode."""
    agree, idle, memory = {}, {}, {}
    for name, run in runs.items():
        probes = run["probes"]
        agree[name] = {"world_size": probes[0]["world_size"],
                       "enabled": all(p["check_task_agreement"] for p in probes),
                       "calls_per_rank": [p["agreement_calls"] for p in probes],
                       "micro_steps_per_rank": [p["micro_steps"] for p in probes]}
        idle[name] = {"steps_checked": probes[0]["idle"]["steps_checked"],
                      "idle_head_checks_per_rank": [p["idle"]["idle_head_checks"] for p in probes],
                      "violations": [v for p in probes for v in p["idle"]["violations"]],
                      "used_head_changed": f"{probes[0]['idle']['used_head_changed']}/"
                                           f"{probes[0]['idle']['used_head_checks']}"}
        memory[name] = [{"rank": p["rank"], **p["memory"]} for p in probes]
    multi = [v for v in agree.values() if v["world_size"] > 1]
    ok_agree = bool(multi) and all(v["enabled"] and v["calls_per_rank"] == v["micro_steps_per_rank"]
                                   and min(v["calls_per_rank"]) > 0 for v in multi)
    ok_idle = all(not v["violations"] and v["steps_checked"] > 0
                  for v in idle.values())
    return {
        "task_agreement_guard": {
            "what": "sampler.check_task_agreement=true: mtl_dist.sampler.check_task_agreement "
                    "all-gathers (task, step) before every micro-step and raises on a mismatch; "
                    "calls counted per rank", "runs": agree, "pass": ok_agree},
        "idle_heads": {
            "what": "before/after every optimizer step of every launch: heads of tasks not in "
                    "the step keep their fp32 weights and AdamW state bit for bit"
                    + (" (ZeRO: full fp32 weights per parameter via deepspeed.utils."
                       "safe_get_full_fp32_param, and on every rank the fp32 partition + "
                       "exp_avg/exp_avg_sq/step of each head's param groups)" if mode != "ddp"
                       else " (AdamW state per parameter)") + "; used head weights changed "
                    "x/y (step 1 has lr 0: warm-up)", "runs": idle, "pass": ok_idle},
        "memory": {"what": "torch.cuda.max_memory_allocated / max_memory_reserved per rank at "
                           "the end of training (MiB; demo model: 3.8 M parameters, so this is "
                           "activations/workspaces, not a BERT-large footprint)"
                   if not ctx.args.cpu else "CPU dry run: peak RSS per rank (MiB), no GPU",
                   "runs": memory},
    }


# ======================================================================================= main
def build_tasks(ctx: Ctx) -> list[Task]:
    a, root = ctx.args, ctx.root
    b = a.batch
    tasks: list[Task] = []

    def add(name, fn, *deps):
        tasks.append(Task(name, fn, tuple(deps)))

    # Priority = order: resume runs of every mode, then the 1-vs-2 runs, then world-size runs.
    for m in a.modes:
        d = root / m
        add(f"{m}/straight", lambda m=m, d=d: train(ctx, f"{m}/straight", m, 2, d / "straight",
                                                  f"train.per_device_batch_size={b}"))
        add(f"{m}/stop", lambda m=m, d=d: train(ctx, f"{m}/stop", m, 2, d / "split",
                                              f"train.per_device_batch_size={b}",
                                              f"train.stop_after_steps={a.stop_after}"))
    for m in a.modes:
        d = root / m
        add(f"{m}/two", lambda m=m, d=d: train(ctx, f"{m}/two", m, 2, d / "two",
                                             f"train.per_device_batch_size={b}", *NO_DROPOUT))
        add(f"{m}/one", lambda m=m, d=d: train(ctx, f"{m}/one", m, 1, d / "one",
                                             f"train.per_device_batch_size={2 * b}",
                                             *NO_DROPOUT))
    for m in a.modes:
        d = root / m
        add(f"{m}/resume", lambda m=m, d=d: train(
            ctx, f"{m}/resume", m, 2, d / "split", f"train.per_device_batch_size={b}",
            f"train.resume={ckpt(d / 'split', a.resume_from)}"), f"{m}/stop")
    k = a.resume_from
    sources = {}  # mode -> ((deps, checkpoint) for 2 -> 1, (deps, checkpoint) for 1 -> 2)
    for m in a.modes:
        if m == "zero3":
            continue
        d = root / m
        sources[m] = (((f"{m}/two",), ckpt(d / "two", k)), ((f"{m}/one",), ckpt(d / "one", k)))
        if m != "ddp":  # ZeRO partitions: DeepSpeed's universal checkpoint first
            for tag, run, (_, src) in (("2", "two", sources[m][0]), ("1", "one", sources[m][1])):
                add(f"{m}/convert_{tag}", lambda m=m, d=d, s=src, tag=tag: convert(
                    ctx, f"{m}/convert_{tag}", s, d / f"universal_{tag}"), f"{m}/{run}")
            sources[m] = (((f"{m}/convert_2",), d / "universal_2"),
                          ((f"{m}/convert_1",), d / "universal_1"))
    for m, ((deps_21, src_21), (deps_12, src_12)) in sources.items():
        d = root / m
        add(f"{m}/shrink", lambda m=m, d=d, s=src_21: train(
            ctx, f"{m}/shrink", m, 1, d / "shrink", f"train.per_device_batch_size={2 * b}",
            *NO_DROPOUT, f"train.resume={s}"), *deps_21)
        add(f"{m}/grow", lambda m=m, d=d, s=src_12: train(
            ctx, f"{m}/grow", m, 2, d / "grow", f"train.per_device_batch_size={b}",
            *NO_DROPOUT, f"train.resume={s}"), *deps_12)
    return tasks


def checks_for(ctx: Ctx, m: str) -> list[tuple[str, tuple[str, ...], Any]]:
    """(check name, runs it needs, function of those runs' results)."""
    out = [("resume", (f"{m}/straight", f"{m}/stop", f"{m}/resume"),
            lambda r: check_resume(ctx, m, *r)),
           ("one_vs_two", (f"{m}/one", f"{m}/two"), lambda r: check_one_vs_two(ctx, m, *r))]
    if m != "ddp" and "ddp" in ctx.args.modes:
        out.append(("vs_ddp", ("ddp/two", f"{m}/two", "ddp/one", f"{m}/one"),
                    lambda r: check_vs_ddp(ctx, m, *r)))
    out.append(("ema", (f"{m}/straight", f"{m}/stop", f"{m}/resume"),
                lambda r: check_ema(ctx, m, r[0], r[1])))
    if m != "zero3":
        out += [("world_size_2_to_1", (f"{m}/shrink", f"{m}/two", f"{m}/one"),
                 lambda r: check_world_size(ctx, *r, "2_to_1")),
                ("world_size_1_to_2", (f"{m}/grow", f"{m}/one", f"{m}/two"),
                 lambda r: check_world_size(ctx, *r, "1_to_2"))]
    return out


def run_all(ctx: Ctx) -> None:
    a = ctx.args
    tasks = build_tasks(ctx)
    by_name = {t.name: t for t in tasks}
    modes = ctx.result["modes"]
    pending_checks = {m: checks_for(ctx, m) for m in a.modes}
    train_runs = {m: [t for t in tasks if t.name.startswith(f"{m}/") and "convert" not in
                      t.name] for m in a.modes}

    def settle() -> None:
        for m in a.modes:
            left = []
            for name, needs, fn in pending_checks[m]:
                ts = [by_name[n] for n in needs]
                if any(t.done and t.error for t in ts):
                    bad = next(t for t in ts if t.error)
                    modes[m][name] = {"pass": False, "error": f"run {bad.name} failed: "
                                                              f"{bad.error[:1500]}"}
                elif all(t.done for t in ts):
                    try:
                        modes[m][name] = fn([t.result for t in ts])
                    except Exception:  # noqa: BLE001 - a broken check is reported, not fatal
                        modes[m][name] = {"pass": False, "error": traceback.format_exc()[-2000:]}
                    print(f"[check] {m} {name}: pass={modes[m][name].get('pass')}", flush=True)
                else:
                    left.append((name, needs, fn))
            pending_checks[m] = left
            runs = train_runs[m]
            if runs and all(t.done for t in runs) and "task_agreement_guard" not in modes[m]:
                ok = {t.name.split("/")[1]: t.result for t in runs if not t.error}
                if ok:
                    modes[m].update(summarize_runs(ctx, m, ok))
        ctx.write()

    running: dict[Future, Task] = {}
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        while True:
            for t in tasks:
                if t.done or t in running.values() or len(running) >= a.jobs:
                    continue
                deps = [by_name[d] for d in t.deps]
                if any(d.done and d.error for d in deps):
                    t.done, t.error = True, "skipped: " + ", ".join(
                        f"{d.name} failed" for d in deps if d.error)
                elif all(d.done for d in deps):
                    print(f"[start] {t.name} (+{time.time() - ctx.t0:.0f} s)", flush=True)
                    running[pool.submit(t.fn)] = t
            if not running:
                if all(t.done for t in tasks):
                    break
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = running.pop(fut)
                t.done = True
                try:
                    t.result = fut.result()
                    print(f"[done]  {t.name} (+{time.time() - ctx.t0:.0f} s)", flush=True)
                except Exception as exc:  # noqa: BLE001
                    t.error = str(exc)
                    print(f"[FAIL]  {t.name}: {str(exc)[:3000]}", flush=True)
            settle()
    settle()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="dry run: 2 CPU processes (gloo), fp32, same launch configs")
    parser.add_argument("--gpus", type=int, default=2,
                        help="GPUs on this host: 1-process runs go to them in turn")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16, help="per-device batch of 2-process runs")
    parser.add_argument("--resume-from", type=int, default=8,
                        help="periodic checkpoint to resume from (multiple of 8)")
    parser.add_argument("--stop-after", type=int, default=12)
    parser.add_argument("--first-n", type=int, default=8, help="steps compared to tolerance")
    parser.add_argument("--jobs", type=int, default=None,
                        help="launches at a time (default 6 on GPUs, 2 with --cpu)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="no run starts or outlives this (default 450 on GPUs, 3600 --cpu)")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds per launch (default 240 on GPUs, 900 --cpu)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    a = parser.parse_args(argv)
    if a.resume_from % 8 or not 0 < a.resume_from < a.stop_after < a.steps:
        parser.error("need 0 < --resume-from (a multiple of 8) < --stop-after < --steps")
    a.jobs = a.jobs or (2 if a.cpu else 6)
    a.budget_s = a.budget_s or (3600 if a.cpu else 450)
    a.run_timeout = a.run_timeout or (900 if a.cpu else 240)
    return a


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    a = parse_args()
    out = Path(a.out or ("benchmarks/results/multi_gpu_checks_cpu_dryrun.json" if a.cpu else
                         "benchmarks/results/multi_gpu_checks.json")).absolute()
    root = Path(a.workdir or tempfile.mkdtemp(prefix="mtl_mgc_")).absolute()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ctx = Ctx(args=a, root=root, out=out, t0=t0, deadline=t0 + a.budget_s,
              precision="no" if a.cpu else "bf16")
    import accelerate
    import torch
    import transformers

    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001
        ds_version = f"not importable: {exc}"
    machine = {"device": "cpu (gloo, 2 processes)" if a.cpu else
               f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
               "torch": torch.__version__, "deepspeed": ds_version,
               "accelerate": accelerate.__version__, "transformers": transformers.__version__,
               "cpus": os.cpu_count()}
    ctx.result = {
        "machine": machine, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workdir": str(root), "complete": False,
        "settings": {"config": "configs/demo.yaml + tests/_runs.py FAST + max_steps "
                               f"{a.steps}, check_task_agreement on",
                     "precision": "bf16" if not a.cpu else "fp32 (bf16 off on CPU)",
                     "per_device_batch_2proc": a.batch, "per_device_batch_1proc": 2 * a.batch,
                     "resume_from": a.resume_from, "stop_after": a.stop_after,
                     "first_n": a.first_n, "jobs": a.jobs, "budget_s": a.budget_s,
                     "launch_configs": {
                         "ddp": "launch/ddp.yaml (2 proc), launch/gpu_single.yaml (1 proc)",
                         "zero2": "launch/zero2.yaml + launch/ds_zero2.json",
                         "zero3": "launch/zero3.yaml + launch/ds_zero3.json"},
                     "zero_stage_from_launch": "no train.zero_stage override: under a "
                     "DeepSpeed launch config mtl_dist.zero.adopt_accelerate_launch takes the "
                     "JSON (ACCELERATE_DEEPSPEED_CONFIG_FILE) and sets train.zero_stage from "
                     "its zero_optimization.stage; each run's probe records the stage the "
                     "engine really used",
                     "cpu_env": "CUDA_VISIBLE_DEVICES= ACCELERATE_USE_CPU=true "
                                "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1" if a.cpu else None},
        "modes": {m: {} for m in a.modes},
    }
    ctx.write()
    print(f"workdir {root}; results -> {out}", flush=True)
    run_all(ctx)
    verdicts = {m: {k: v.get("pass") for k, v in rows.items() if isinstance(v, dict)}
                for m, rows in ctx.result["modes"].items()}
    expected = {"resume", "one_vs_two", "ema", "task_agreement_guard", "idle_heads", "memory"}
    ctx.result["verdicts"] = verdicts
    ctx.result["complete"] = all(
        (expected | ({"world_size_2_to_1", "world_size_1_to_2"} if m != "zero3" else set())
         | ({"vs_ddp"} if m != "ddp" and "ddp" in a.modes else set()))
        <= {k for k, v in rows.items() if "error" not in v}
        for m, rows in ctx.result["modes"].items())
    ctx.result["all_pass"] = all(p is not False for v in verdicts.values() for p in v.values())
    ctx.write()
    print(json.dumps({"verdicts": verdicts, "launches": ctx.launches,
                      "wall_s": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
