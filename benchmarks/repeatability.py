"""Does a config train the same bits twice? Runs `mtl-dist train` on it several times, each into a
fresh output dir, and compares every logged step's training loss with the first run's.

    python benchmarks/repeatability.py configs/demo.yaml train.device=cuda \
        train.mixed_precision=bf16 data.packing=true --runs 2 --steps 24 --out results/x.json

Prints, per run after the first, `repeatable` or the first step whose loss differs (both
values), and writes them as JSON. Run AD (H100) found FlashAttention 2's backward does not
repeat itself over packed rows; `train.attention_kernel=triton` does (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training record in a run's metrics log."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["train/loss"]) for r in records if r["kind"] == "train"]


def first_difference(first: list[tuple[int, float]],
                     other: list[tuple[int, float]]) -> dict | None:
    """The first logged step where the runs' losses (or the steps logged) differ; None if none."""
    for (step, loss), (other_step, other_loss) in zip(first, other):
        if (step, loss) != (other_step, other_loss):
            return {"step": step, "loss": loss, "other_step": other_step,
                    "other_loss": other_loss}
    if len(first) != len(other):
        shorter = min(len(first), len(other))
        return {"step": None, "logged_steps": [len(first), len(other)],
                "after_step": first[shorter - 1][0] if shorter else None}
    return None


def train(config: str, overrides: list[str], output_dir: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "mtl_dist.cli", "train", config, *overrides,
           f"train.output_dir={output_dir}", f"train.max_steps={steps}", "train.log_steps=1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run {output_dir.name} failed ({done.returncode}): "
                 f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", default=[])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error(f"--runs: expected at least 2 (runs to compare), got {args.runs}")
    root = Path(tempfile.mkdtemp(prefix="mtl_repeat_"))
    losses = []
    for i in range(args.runs):
        train(args.config, args.overrides, root / f"run-{i + 1}", args.steps)
        losses.append(train_losses(root / f"run-{i + 1}"))
    diffs = [first_difference(losses[0], other) for other in losses[1:]]
    for i, diff in enumerate(diffs, start=2):
        print(f"run {i} against run 1: " + ("repeatable" if diff is None else
                                            f"differs: {json.dumps(diff)}"))
    result = {"command": " ".join(sys.argv), "config": args.config,
              "overrides": args.overrides, "steps": args.steps,
              "logged_steps": [len(x) for x in losses],
              "repeatable": all(d is None for d in diffs), "differences": diffs}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
