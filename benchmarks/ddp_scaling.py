"""DDP scaling on one host: `mtl-dist bench` of the BERT-large workload on 1 and N GPUs.

Same per-device batch (32) everywhere, so N GPUs do N times the samples per step; scaling
efficiency = samples/s on N GPUs / (N x samples/s on 1 GPU). Launched with the shipped
`launch/ddp.yaml`, one launch per GPU count, in one machine lease.

    python benchmarks/ddp_scaling.py --gpus 1 2 --out benchmarks/results/ddp_scaling_h200x2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from throughput import ARCH, BATCH, MAX_LEN, TASKS, make_data  # noqa: E402


def write_config(root: Path) -> Path:
    tasks = "\n".join(f"  - {{name: {n}, pair: {str(pair).lower()}, train: {root / (n + '.tsv')}}}"
                      for n, _, _, pair in TASKS)
    arch = ", ".join(f"{k}: {v}" for k, v in ARCH.items())
    path = root / "bench.yaml"
    path.write_text(f"""model: {{tokenizer: {root / 'tokenizer'}, arch: {{{arch}}}}}
tasks:
{tasks}
data: {{max_length: {MAX_LEN}, pad_to_multiple_of: 64, cache_dir: {root / 'cache'}}}
sampler: {{group_by_length: true}}
train: {{per_device_batch_size: {BATCH}, mixed_precision: bf16, lr: 2.0e-5, max_grad_norm: 1.0}}
""")
    return path


def bench(config: Path, gpus: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "ddp.yaml"), "--num_processes", str(gpus),
           "--main_process_port", "0", "--module", "mtl_dist.cli", "bench", str(config),
           "--steps", str(steps), "--warmup", str(warmup), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stderr[-4000:]}")
    text = out.stdout
    return json.loads(text[text.rindex("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/ddp_scaling.json")
    parser.add_argument("--override", action="append", default=[],
                        help="run-config override for every launch, e.g. train.zero_stage=2")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mtl_ddp_"))
    make_data(root)
    config = write_config(root)
    rows = [{"gpus": n, **bench(config, n, args.steps, args.warmup, args.override)}
            for n in args.gpus]
    base = rows[0]["samples_per_s"] / rows[0]["gpus"]
    for row in rows:
        row["scaling_efficiency"] = row["samples_per_s"] / (row["gpus"] * base)
    import torch

    result = {"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
              "torch": torch.__version__, "per_device_batch": BATCH, "overrides": args.override,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for row in rows:
        print(f"{row['gpus']} GPU(s): {row['samples_per_s']:.1f} samples/s, "
              f"{row['tokens_per_s']:.0f} tokens/s, efficiency {row['scaling_efficiency']:.3f}")


if __name__ == "__main__":
    main()
