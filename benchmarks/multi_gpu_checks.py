"""On N GPUs with the shipped `launch/ddp.yaml`: does a stop + resume continue like an
uninterrupted run, under DDP and ZeRO-2? (The demo model; prints the largest loss gap.)

    python benchmarks/multi_gpu_checks.py --gpus 2 --out benchmarks/results/multi_gpu_checks.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests._runs import DEMO, FAST, train_losses  # noqa: E402


def train(gpus: int, out: Path, cache: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "ddp.yaml"), "--num_processes", str(gpus),
           "--main_process_port", "0", "--module", "mtl_dist.cli", "train", str(DEMO),
           f"train.output_dir={out}", f"data.cache_dir={cache}", *FAST, "train.max_steps=24",
           "train.mixed_precision=bf16", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{result.stderr[-3000:]}")


def check(gpus: int, root: Path, mode: list[str]) -> dict:
    straight, split = root / "straight", root / "split"
    train(gpus, straight, root / "cache", *mode)
    train(gpus, split, root / "cache", *mode, "train.stop_after_steps=11")
    train(gpus, split, root / "cache", *mode, "train.resume=auto")
    a, b = train_losses(straight), train_losses(split)
    assert [s for s, _ in a] == [s for s, _ in b]
    gaps = [abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)]
    return {"steps": len(a), "bit_exact_losses": a == b, "max_loss_gap": max(gaps),
            "first_differing_step": next((s for (s, x), (_, y) in zip(a, b, strict=True)
                                          if x != y), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/multi_gpu_checks.json")
    args = parser.parse_args()
    rows = {}
    for name, mode in (("ddp", []), ("zero2", ["train.zero_stage=2"])):
        rows[name] = check(args.gpus, Path(tempfile.mkdtemp(prefix=f"mg_{name}_")), mode)
        print(name, json.dumps(rows[name]), flush=True)
    import torch

    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                          "gpus": args.gpus, "command": " ".join(sys.argv),
                                          "resume_vs_straight": rows}, indent=1))


if __name__ == "__main__":
    main()
