"""Cost of a checkpoint on CPU, single process: save, load, sizes, and where the save time goes.

Two models: a tiny one (the demo architecture: BERT 4x256, 3 heads) and a BERT-base-size one
(transformers `BertConfig()` defaults, random init), each with AdamW state after one step plus
a linear schedule (`--models bert_large`: the reference workload's 24 x 1024 shape, for GPUs). For each: `CheckpointManager.save` (all of it blocks the caller on one
process), `load` (checksum verification + restoring every object), the parts of a save measured
separately (model -> safetensors, optimizer -> torch.save, sha256 of all files), and file sizes.
Medians of --repeats; the files are in the page cache when loaded (a warm restart).
Usage: python benchmarks/checkpoint_cost.py [--out PATH] [--repeats N] [--dir DIR] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from mtl_dist import checkpoint as ck
from mtl_dist.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "tiny_demo_arch": dict(
        vocab_size=2000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
    ),
    "bert_base": {},  # BertConfig() defaults: 30522 x 768, 12 layers, 110M parameters
    "bert_large": dict(  # the reference workload's shape: 24 x 1024, Chinese vocab, ~325M
        vocab_size=21128,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
    ),
}
NUM_LABELS = (3, 7, 15)


class Model(nn.Module):
    """A BERT encoder with one linear head per task (the shape of the project's model)."""

    def __init__(self, **arch) -> None:
        from transformers import BertConfig, BertModel

        super().__init__()
        self.encoder = BertModel(BertConfig(**arch), add_pooling_layer=False)
        hidden = self.encoder.config.hidden_size
        self.heads = nn.ModuleDict({str(i): nn.Linear(hidden, n) for i, n in enumerate(NUM_LABELS)})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.heads["0"](self.encoder(input_ids=ids).last_hidden_state[:, 0])


def build(arch: dict, device: str) -> dict:
    """Model + AdamW (state after one step) + scheduler, as the trainer hands them over."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = Model(**arch).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    sched = get_linear_schedule_with_warmup(opt, 10, 1000)
    ids = torch.randint(0, model.encoder.config.vocab_size, (2, 32), device=device)
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    sched.step()
    return {"model": model, "optimizer": opt, "scheduler": sched}


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Median and all wall times of `fn()`."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def measure(name: str, arch: dict, workdir: Path, repeats: int, device: str) -> dict:
    """All numbers for one model."""
    objs = build(arch, device)
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    mgr = CheckpointManager(out, save_total_limit=1)
    manifest = {"global_batch_size": 32, "tasks": ["nli", "emotion", "news"]}
    trainer_state = {"global_step": 1, "sampler": {"epoch": 0, "step": 1}}
    step = iter(range(1, 10**6))
    save_s, save_all = timed(
        lambda: mgr.save(next(step), objs, trainer_state, manifest=manifest), repeats
    )
    path = mgr.latest()
    files = ck.read_manifest(path)["files"]
    fresh = build(arch, device)
    load_s, load_all = timed(lambda: mgr.load(path, fresh, expected_manifest=manifest), repeats)
    verify_s, _ = timed(lambda: ck._verify_files(path, ck.read_manifest(path), files), repeats)
    scratch = out / "parts"
    scratch.mkdir()
    model_s, _ = timed(
        lambda: ck._save_safetensors(objs["model"].state_dict(), scratch / "m.safetensors", "m"),
        repeats,
    )
    optim_s, _ = timed(
        lambda: ck._torch_save(objs["optimizer"].state_dict(), scratch / "o.pt"), repeats
    )
    sha_s, _ = timed(lambda: ck._digests(path, list(files), fsync=False), repeats)
    total = sum(v["size"] for v in files.values())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "model": name,
        "arch": arch or "BertConfig() defaults",
        "parameters": sum(p.numel() for p in objs["model"].parameters()),
        "checkpoint_bytes": total,
        "checkpoint_mib": round(total / 2**20, 2),
        "file_bytes": {k: v["size"] for k, v in sorted(files.items())},
        "save_s": save_s,
        "save_s_all": save_all,
        "load_s": load_s,
        "load_s_all": load_all,
        "save_parts_s": {
            "model_to_safetensors_with_fsync": model_s,
            "optimizer_torch_save_with_fsync": optim_s,
            "sha256_all_files_threads": sha_s,
        },
        "load_parts_s": {"verify_sha256_all_files_threads": verify_s},
        "save_mib_per_s": round(total / 2**20 / save_s, 1),
        "load_mib_per_s": round(total / 2**20 / load_s, 1),
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "processor": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main() -> None:
    load_before = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/checkpoint_cost_cpu.json"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument("--device", default="cpu", help="where the model and optimizer live")
    parser.add_argument(
        "--models", nargs="*", default=["tiny_demo_arch", "bert_base"], choices=list(MODELS)
    )
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    results = []
    for name in args.models:
        results.append(measure(name, MODELS[name], workdir, args.repeats, args.device))
        r = results[-1]
        print(
            f"{name}: {r['parameters'] / 1e6:.1f}M params, {r['checkpoint_mib']} MiB, "
            f"save {r['save_s']:.3f}s, load {r['load_s']:.3f}s",
            flush=True,
        )
    report = {
        "benchmark": "checkpoint_cost",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "setup": {
            "device": args.device,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "repeats": args.repeats,
            "workdir_fs": str(workdir),
            "process_count": 1,
            "note": "files are in the page cache when loaded; every save fsyncs",
        },
        "results": results,
    }
    write_report(report, args.out, workdir, keep_workdir=args.dir is not None)


def write_report(report: dict, out: Path, workdir: Path, *, keep_workdir: bool) -> None:
    """Write the results JSON; remove the scratch directory unless the user chose it."""
    if not keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
