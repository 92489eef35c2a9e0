"""Files made from predictions: one JSONL per task, and pseudo-labelled train files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path


def write_predictions(out_dir: str | Path, records: Mapping[str, list[dict]]) -> Iterator[tuple[Path, int]]:
    """`<out_dir>/<task>.jsonl`, one {"id", "label", "probs"} line per row; atomic per file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in records.items():
        path = out_dir / f"{task}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        yield path, len(rows)
