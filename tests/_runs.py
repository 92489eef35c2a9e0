"""Helpers for tests that run real training: CLI subprocesses, free ports, reading outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mtl_dist.zero import free_port  # noqa: F401 - the tests import it from here

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
CPU_LAUNCH = REPO / "launch" / "cpu_multi.yaml"

# Small, fast demo settings: every step logged, frequent eval and checkpoints.
FAST = ["train.log_steps=1", "train.eval_steps=8", "checkpoint.save_steps=8",
        "checkpoint.save_total_limit=10", "train.early_stopping_patience=null"]
# dropout off everywhere: runs that must give the same losses
NO_DROPOUT = ["model.dropout=0.0", "model.arch.hidden_dropout_prob=0.0",
              "model.arch.attention_probs_dropout_prob=0.0"]


# What a launch puts in the environment, and an in-process ZeRO run leaves until its trainer's
# close() (LOCAL_RANK): a child given them takes itself for a rank of a launch (MASTER_PORT once
# failed here with EADDRINUSE on a port this process's store held).
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def env() -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    return {**inherited, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}


def in_triton_interpreter(setup: str, call: str) -> object:
    """`call` (an expression; `setup` is run first, e.g. its imports) evaluated in a
    subprocess with Triton's CPU interpreter on (TRITON_INTERPRET is read when kernels are
    defined, so not in this process); what it returns, through JSON."""
    code = f"import json; {setup}; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cli(args: list[str], procs: int = 1, timeout: int = 300, check: bool = True,
            launcher: str = "accelerate") -> subprocess.CompletedProcess:
    """`mtl-dist ARGS` in a subprocess: plain python for 1 process, else a real launcher."""
    if procs == 1:
        cmd = [sys.executable, "-m", "mtl_dist.cli", *args]
    elif launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CPU_LAUNCH), "--num_processes", str(procs), "--main_process_port",
               str(free_port()), "--module", "mtl_dist.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(free_port()), "-m", "mtl_dist.cli", *args]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout,
                            cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def records(output_dir: Path, kind: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in records(output_dir, "train")]


def assert_losses_close(a_dir: Path, b_dir: Path, rel: float, steps: int | None = None) -> None:
    """Both runs logged the same steps (1..steps, where given) with losses within `rel`."""
    a, b = train_losses(a_dir), train_losses(b_dir)
    assert [s for s, _ in a] == [s for s, _ in b]
    if steps is not None:
        assert [s for s, _ in a] == list(range(1, steps + 1))
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= rel * max(1.0, abs(x)), (step, x, y)


def assert_switch_trains_alike(tmp_path: Path, key: str, steps: int = 6) -> None:
    """The demo trained `steps` steps with the boolean config `key` off and on: the same
    losses to 1e-5 (dropout on: the same random stream)."""
    common = [f"data.cache_dir={tmp_path}/c", f"train.max_steps={steps}", "train.log_steps=1",
              "checkpoint.save_best=false", "train.eval_at_epoch_end=false", "train.lr=1e-3"]
    for value in ("false", "true"):
        run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/{value}", *common,
                 f"{key}={value}"])
    assert_losses_close(tmp_path / "false", tmp_path / "true", rel=1e-5, steps=steps)


def checkpoint_model(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "checkpoints" / f"checkpoint-{step}" /
                         "model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def gloo_threads() -> list[str]:
    """This process's gloo threads by name (pt_gloo_runloop, gloo_tcp_loop), from /proc."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as handle:
                names.append(handle.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)
