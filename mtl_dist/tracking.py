"""Where metrics go: a JSONL log in the output dir, the console, and accelerate's trackers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite-or-not scalar entries of a record (what trackers can plot)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class MetricsLog:
    """Append-only JSONL of log and eval events, written by the main process only.

    On resume, records after the resumed step are dropped first, so the file reads as one
    continuous run (the same steps are logged again by the continuation).
    """

    def __init__(self, output_dir: str | Path, is_main: bool, accelerator=None):
        self.path = Path(output_dir) / METRICS_FILE
        self.is_main = is_main
        self.accelerator = accelerator

    def truncate_after(self, step: int) -> None:
        if not self.is_main or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(_scalars(values), step=step)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics log, in order."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_eval_line(step: int, per_task: dict[str, dict], score: float) -> str:
    """One console line per evaluation: every task's accuracy/macro-F1 and the run score."""
    parts = [f"{t}: acc={m['accuracy']:.4f} f1={m['macro_f1']:.4f}" for t, m in per_task.items()]
    score_text = "nan" if math.isnan(score) else f"{score:.4f}"
    return f"[eval step {step}] " + " | ".join(parts) + f" | score={score_text}"
