"""Does a config train the same bits twice? Runs `mtl-dist train` on it several times, each in
its own process and output dir, and compares every logged step's training loss with the first
run's.

    python benchmarks/repeatability.py configs/demo.yaml train.device=cuda \
        train.mixed_precision=bf16 data.packing=true --runs 2 --steps 24 --out results/x.json

Prints, per run after the first, `repeatable` or the first step whose loss differs (both
values), writes them as JSON with --out; exit status 0 if every run repeats the first, 1 if one
differs, 2 if a run failed (one line naming its stderr log). What it compares: the training
loss of every step (`train.log_steps=1`), so the last step's update shows in none of them.
What the runs share: the compile caches (Inductor's, Triton's: the first run may compile what
the later ones load) and the data cache (`data.cache_dir`, by default ~/.cache/mtl_dist). Run AD
(benchmarks/README.md) found a process's first compiled run differing from later runs in the
same process; separate processes avoid that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mtl_dist.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in a run's metrics log (none without one)."""
    return [(r["step"], r["train/loss"]) for r in read_metrics(output_dir)
            if r["kind"] == "train"]


def _same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))  # a NaN loss repeated is repeated


def first_difference(first: list[tuple[int, float]],
                     other: list[tuple[int, float]]) -> dict | None:
    """The first logged step where the runs' losses (or the steps logged) differ; None if none."""
    for (step, loss), (other_step, other_loss) in zip(first, other, strict=False):  # lengths: below
        if step != other_step or not _same(loss, other_loss):
            return {"step": step, "loss": loss, "other_step": other_step,
                    "other_loss": other_loss}
    if len(first) != len(other):
        shorter = min(len(first), len(other))
        return {"step": None, "logged_steps": [len(first), len(other)],
                "after_step": first[shorter - 1][0] if shorter else None}
    return None


class RunFailed(Exception):
    """A training run that did not give a loss log to compare (exit status 2)."""


def _error_line(stderr: str) -> str:
    """The line that says what went wrong: mtl-dist's last 'error:' line, else the last line
    (a traceback's exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def train(config: str, overrides: list[str], output_dir: Path,
          steps: int) -> list[tuple[int, float]]:
    """One `mtl-dist train` in its own process (its stderr kept beside its output dir): the
    run's logged (step, loss)."""
    cmd = [sys.executable, "-m", "mtl_dist.cli", "train", config, *overrides,
           f"train.output_dir={output_dir}", f"train.max_steps={steps}", "train.log_steps=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = output_dir.with_name(output_dir.name + ".stderr.log")
    log.write_text(done.stderr)
    if done.returncode != 0:
        raise RunFailed(f"run {output_dir.name} failed (exit {done.returncode}; {log}): "
                        f"{_error_line(done.stderr)}")
    losses = train_losses(output_dir)
    if not losses:
        raise RunFailed(f"run {output_dir.name} logged no training loss (its stderr: {log})")
    return losses


def _remove_runs(root: Path, runs: int, logs: bool, created: bool) -> None:
    """The runs' output dirs (checkpoints: model-sized), their logs if asked, and the
    working dir itself if this script made it and it is left empty."""
    for i in range(runs):
        shutil.rmtree(root / f"run-{i + 1}", ignore_errors=True)
        if logs:
            (root / f"run-{i + 1}.stderr.log").unlink(missing_ok=True)
    if created and not any(root.iterdir()):
        root.rmdir()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", default=[])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--workdir", default=None,
                        help="where the runs' output dirs go (default: a new temporary dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the runs' output dirs (default: removed at the end)")
    args = parser.parse_intermixed_args(argv)
    if args.runs < 2:
        parser.error(f"--runs: expected at least 2 (runs to compare), got {args.runs}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="mtl_repeat_"))
    created = args.workdir is None or not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    used = sorted(p.name for p in root.glob("run-*"))
    if used:  # an earlier invocation's runs: never train into or remove them
        raise RunFailed(f"--workdir {root}: holds {', '.join(used)} already; give an empty one")
    print(f"runs in {root}", flush=True)
    losses = []
    try:
        for i in range(args.runs):
            losses.append(train(args.config, args.overrides, root / f"run-{i + 1}", args.steps))
    finally:
        if not args.keep:  # a failed run's stderr log stays: its error names it
            _remove_runs(root, args.runs, logs=len(losses) == args.runs, created=created)
    diffs = [first_difference(losses[0], other) for other in losses[1:]]
    for i, diff in enumerate(diffs, start=2):
        print(f"run {i} against run 1: " + ("repeatable" if diff is None else
                                            f"differs: {json.dumps(diff)}"))
    command = shlex.join(["benchmarks/repeatability.py", *argv] if argv is not None
                         else sys.argv)
    result = {"command": command, "config": args.config, "overrides": args.overrides,
              "steps": args.steps, "logged_steps": [len(x) for x in losses],
              "repeatable": all(d is None for d in diffs), "differences": diffs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def cli(argv: list[str] | None = None) -> int:
    """The exit status: 0 every run repeats the first, 1 one differs, 2 a run failed."""
    try:
        return 0 if main(argv)["repeatable"] else 1
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
