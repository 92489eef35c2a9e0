"""What Inductor's tuning chose for each Triton kernel of a run, read from its cache directory.

Inductor writes each kernel's chosen launch config (block sizes, warps, whether coordinate
descent found it) to a `.best_config` file beside the kernel's source, whose `size_hints` say
at which size it was tuned. Run a benchmark with `TORCHINDUCTOR_CACHE_DIR=DIR`, then, with the
same torch (the file names hash torch's source key):

    python benchmarks/inductor_best_configs.py DIR [--grep gelu] > configs.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

KERNEL_NAME = re.compile(r"^def (triton_\w+)\(", re.M)
SIZE_HINTS = re.compile(r"size_hints=(\{[^}]*\})")


def best_config_path(kernel_file: Path, tag: str) -> Path:
    """Where Inductor's local autotune cache keeps the kernel's chosen config (as
    torch/_inductor/runtime/autotune_cache.py names it: the kernel file's name and the
    compile cache tag, hashed with torch's own source key)."""
    from torch._inductor.codecache import torch_key

    key = hashlib.sha256(f"{kernel_file.name}:{tag}".encode()).hexdigest()
    return kernel_file.parent / f"{hashlib.sha256(key.encode() + torch_key()).hexdigest()}.best_config"


def best_configs(cache_dir: Path, tags: tuple[str, ...]) -> list[dict]:
    """One row per Triton kernel file with a chosen config: kernel name, size hints (the size
    it was tuned at, rounded up to a power of two), cache tag, the config."""
    rows = []
    for source in sorted(cache_dir.rglob("*.py")):
        text = source.read_text(errors="replace")
        names = KERNEL_NAME.findall(text)
        if not names:
            continue
        for tag in tags:
            best = best_config_path(source, tag)
            if best.exists():
                config = json.loads(best.read_text())
                hints = SIZE_HINTS.search(text)
                rows.append({"kernel": names[0], "size_hints": hints.group(1) if hints else None,
                             "tag": tag, **{k: v for k, v in config.items()
                                            if k not in ("configs_hash", "triton_cache_hash")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--grep", default="", help="only kernels whose name contains this")
    parser.add_argument("--tags", default=",mtl_dist-pointwise-heuristic",
                        help="compile cache tags to look under (comma-separated; '' is the default)")
    args = parser.parse_args()
    for row in best_configs(args.cache_dir, tuple(args.tags.split(","))):
        if args.grep in row["kernel"]:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
