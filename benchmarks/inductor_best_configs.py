"""What Inductor's tuning chose for each Triton kernel of a run, read from its cache directory.

Inductor writes each kernel's chosen launch config (block sizes, warps, whether coordinate
descent found it) to a `.best_config` file beside the kernel's source, whose `size_hints` say
at which size it was tuned. Run a benchmark with `TORCHINDUCTOR_CACHE_DIR=DIR`, then:

    python benchmarks/inductor_best_configs.py DIR [--grep gelu] > configs.txt
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

KERNEL_NAME = re.compile(r"^def (triton_\w+)\(", re.M)
SIZE_HINTS = re.compile(r"size_hints=(\{[^}]*\})")


def best_configs(cache_dir: Path) -> list[dict]:
    """One row per `.best_config` file: the kernels defined beside it, their size hints,
    the chosen config."""
    rows = []
    for best in sorted(cache_dir.rglob("*.best_config")):
        config = json.loads(best.read_text())
        for source in sorted(best.parent.glob("*.py")):
            text = source.read_text()
            for name in KERNEL_NAME.findall(text):
                hints = SIZE_HINTS.search(text)
                rows.append({"kernel": name, "size_hints": hints.group(1) if hints else None,
                             **{k: v for k, v in config.items() if k != "configs_hash"}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--grep", default="", help="only kernels whose name contains this")
    args = parser.parse_args()
    for row in best_configs(args.cache_dir):
        if args.grep in row["kernel"]:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
