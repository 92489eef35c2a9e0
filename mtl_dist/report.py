"""`mtl-dist report OUTPUT`: PNG plots and one self-contained HTML page from a run's metrics log.

Needs no service: reads OUTPUT/metrics.jsonl (and OUTPUT/best/ for the best checkpoint's
confusion matrices), writes OUTPUT/report/*.png and OUTPUT/report/index.html with the images
embedded as base64 data URIs (the page can be mailed or archived alone).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mtl_dist.errors import DataError, MtlDistWarning
from mtl_dist.tracking import METRICS_FILE, read_metrics

REPORT_DIR = "report"
DPI = 100
METRICS = ("accuracy", "macro_f1", "loss")


@dataclass
class RunLog:
    """A run's metrics log split by kind, plus what OUTPUT/ says about the best checkpoint."""

    output_dir: Path
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    summary: dict | None = None
    labels: dict[str, list[str]] = field(default_factory=dict)
    best_step: int | None = None
    best: dict | None = None  # {"score", "loss", "tasks": {task: {metric: value, ...}}}
    best_json: dict = field(default_factory=dict)  # best/best.json (step, score, ...); {} if none
    metric_for_best: str | None = None  # best.json's, else the run's config.yaml's

    @property
    def tasks(self) -> list[str]:
        names: dict[str, None] = {}
        for record in self.evals:
            names.update(dict.fromkeys(_tasks_of(record)))
        for record in self.train:
            names.update(dict.fromkeys(k.split("/", 2)[2] for k in record
                                       if k.startswith("train/loss/")))
        return list(names)


def _tasks_of(record: Mapping[str, Any]) -> list[str]:
    return [k.split("/")[1] for k in record if k.startswith("eval/") and k.count("/") == 2
            and k.endswith("/accuracy")]


def load_run(output_dir: str | Path) -> RunLog:
    """Read OUTPUT/metrics.jsonl, labels.json and best/; one-line DataError when there is no log."""
    out = Path(output_dir)
    if not out.is_dir():
        raise DataError(f"report: {out} is not a directory (give a run's output dir)")
    if (out / METRICS_FILE).exists() and not (out / METRICS_FILE).is_file():
        raise DataError(f"{out / METRICS_FILE}: not a file")
    records = read_metrics(out)
    if not records:
        raise DataError(f"{out / METRICS_FILE}: no metrics log (or it is empty); "
                        "train a run into this output directory first")
    run = RunLog(out, train=[r for r in records if r.get("kind") == "train"],
                 evals=[r for r in records if r.get("kind") == "eval"])
    # A summary followed by later records ended an earlier invocation (a preemption) of a
    # run that went on: it does not describe the run.
    last = records[-1]
    run.summary = last if last.get("kind") == "summary" else None
    run.labels = _label_lists(out / "labels.json") or _label_lists(out / "best" / "labels.json")
    info = _read_json(out / "best" / "best.json")
    run.best_json = info if isinstance(info, dict) else {}
    run.metric_for_best = _metric_for_best(run)
    run.best_step = _best_step(run)
    run.best = _best_metrics(run)
    return run


def _left_out(what: str) -> None:
    """A hand-edited or damaged value the report can do without: a warning, not a traceback."""
    warnings.warn(f"report: {what}; left out", MtlDistWarning, stacklevel=3)


def _label_lists(path: Path) -> dict[str, list[str]]:
    """labels.json's task -> label names ({} when absent); a damaged one is left out."""
    labels = _read_json(path)
    if labels is None:
        return {}
    if not (isinstance(labels, dict) and all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in labels.values())):
        _left_out(f"{path}: not a mapping of task names to label lists")
        return {}
    return labels


def _counts_table(matrix: Any) -> bool:
    """A confusion matrix as written: a square list of lists of non-negative integers."""
    return isinstance(matrix, list) and bool(matrix) and all(
        isinstance(row, list) and len(row) == len(matrix)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in row)
        for row in matrix)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _best_json_score(run: RunLog, otherwise: Any) -> Any:
    """best/best.json's score, else `otherwise`."""
    score = run.best_json.get("score")
    return score if _finite(score) else otherwise


def _best_step(run: RunLog) -> int | None:
    """best/best.json's step, else the summary's, else the eval with the highest score."""
    if isinstance(run.best_json.get("step"), int):
        return run.best_json["step"]
    if run.summary and isinstance(run.summary.get("best_step"), int) and run.summary["best_step"] >= 0:
        return run.summary["best_step"]
    by_loss = run.metric_for_best == "loss"
    key = "eval/loss" if by_loss else "eval/score"
    scored = [r for r in run.evals if _finite(r.get(key))]
    if not scored:
        return None
    pick = min if by_loss else max
    return pick(scored, key=lambda r: r[key])["step"]


def _metric_for_best(run: RunLog) -> str | None:
    """best.json's metric_for_best, else the run's config.yaml's (a run without best/)."""
    if run.best_json.get("metric_for_best"):
        return run.best_json["metric_for_best"]
    config = _read_yaml(run.output_dir / "config.yaml")
    return (config.get("train") or {}).get("metric_for_best") if isinstance(config, dict) else None


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _is_best_record(run: RunLog, record: Mapping[str, Any]) -> bool:
    """Whether an eval record is the evaluation best/ came from: its step, and its score (or
    loss) where best.json has one. After a resume from an older checkpoint, this line's eval
    at best/'s step is another model's, and was shown as best/'s."""
    if record.get("step") != run.best_step:
        return False
    saved = run.best_json.get("score")
    key = "eval/loss" if run.best_json.get("metric_for_best") == "loss" else "eval/score"
    return not _finite(saved) or not _finite(record.get(key)) or record[key] == saved


def _best_metrics(run: RunLog) -> dict | None:
    """The best checkpoint's metrics: best/metrics.json when it has confusion matrices, else
    the eval record at the best step (its matrices are in `confusion_matrices`)."""
    path = run.output_dir / "best" / "metrics.json"
    saved = _read_json(path)
    if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("tasks"), dict)
                                  and all(isinstance(m, dict) for m in saved["tasks"].values())):
        _left_out(f"{path}: not the metrics of an evaluation (score, loss, tasks)")
        saved = None
    if saved and saved["tasks"] and all("confusion_matrix" in m for m in saved["tasks"].values()):
        return saved
    record = next((r for r in reversed(run.evals) if _is_best_record(run, r)), None)
    if record is None:
        return saved if isinstance(saved, dict) else None
    matrices = record.get("confusion_matrices") or {}
    if not isinstance(matrices, dict):
        _left_out(f"the confusion matrices of step {record['step']} (not a mapping of tasks)")
        matrices = {}
    tasks = {t: {m: record[f"eval/{t}/{m}"] for m in METRICS if f"eval/{t}/{m}" in record}
             for t in _tasks_of(record)}
    for t, matrix in matrices.items():
        tasks.setdefault(t, {})["confusion_matrix"] = matrix
    return {"score": record.get("eval/score"), "loss": record.get("eval/loss"), "tasks": tasks}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ------------------------------------------------------------------------------------ plots


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _mark_best(ax: Any, best_step: int | None) -> None:
    if best_step is not None and best_step >= 0:
        ax.axvline(best_step, color="tab:red", linestyle="--", linewidth=1,
                   label=f"best (step {best_step})")


def train_loss_figure(run: RunLog) -> Figure:
    fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    steps, values = _series(run.train, "train/loss")
    ax.plot(steps, values, color="black", linewidth=2, label="all tasks")
    for task in run.tasks:
        s, v = _series(run.train, f"train/loss/{task}")
        if s:
            ax.plot(s, v, marker=".", linewidth=1, label=task)
    _mark_best(ax, run.best_step)
    ax.set(title="Training loss", xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def lr_figure(run: RunLog) -> Figure:
    fig = Figure(figsize=(8, 3.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(*_series(run.train, "lr"), color="tab:blue")
    ax.set(title="Learning rate (encoder)", xlabel="optimizer step", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return fig


def eval_score_figure(run: RunLog) -> Figure:
    fig = Figure(figsize=(8, 3.5), dpi=DPI, layout="constrained")
    ax_score, ax_loss = fig.subplots(1, 2)
    ax_score.plot(*_series(run.evals, "eval/score"), marker="o", color="tab:green")
    ax_score.set(title="Run score (dev)", xlabel="optimizer step", ylabel="score")
    ax_loss.plot(*_series(run.evals, "eval/loss"), marker="o", color="tab:orange")
    ax_loss.set(title="Dev loss (all tasks)", xlabel="optimizer step", ylabel="loss")
    for ax in (ax_score, ax_loss):
        _mark_best(ax, run.best_step)
        ax.grid(alpha=0.3)
    ax_score.legend(fontsize="small")
    return fig


def eval_task_figure(run: RunLog, task: str) -> Figure:
    """Accuracy and macro-F1 (left), dev loss (right) of one task over the steps."""
    fig = Figure(figsize=(8, 3.5), dpi=DPI, layout="constrained")
    ax_m, ax_loss = fig.subplots(1, 2)
    for metric in ("accuracy", "macro_f1"):
        ax_m.plot(*_series(run.evals, f"eval/{task}/{metric}"), marker="o", label=metric)
    ax_m.set(title=f"{task}: dev metrics", xlabel="optimizer step", ylim=(-0.02, 1.02))
    ax_loss.plot(*_series(run.evals, f"eval/{task}/loss"), marker="o", color="tab:orange")
    ax_loss.set(title=f"{task}: dev loss", xlabel="optimizer step", ylabel="loss")
    for ax in (ax_m, ax_loss):
        _mark_best(ax, run.best_step)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize="small")
    return fig


def confusion_figure(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> Figure:
    """Heat map of a confusion matrix (rows: true label, columns: predicted), coloured by row
    share so small classes stay visible, with the counts written in when they fit."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = counts.shape[0]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.5 * k + 2.5), 14.0)
    fig = Figure(figsize=(side, side), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true label's rows")
    ax.set_xticks(range(k), [str(x) for x in labels], rotation=45, ha="right",
                  fontsize="small")
    ax.set_yticks(range(k), [str(x) for x in labels], fontsize="small")
    ax.set(title=title, xlabel="predicted", ylabel="true")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize="x-small",
                        color="white" if share[i, j] > 0.5 else "black")
    return fig


def _save(fig: Figure, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    return path


def render_plots(run: RunLog, report_dir: Path) -> list[tuple[str, Path]]:
    """Every PNG of the report as (caption, path), in page order."""
    if report_dir.exists() and not report_dir.is_dir():
        raise DataError(f"report: {report_dir} exists and is not a directory")
    report_dir.mkdir(parents=True, exist_ok=True)
    for stale in report_dir.glob("*.png"):
        stale.unlink()
    plots: list[tuple[str, Path]] = []
    if run.train:
        plots.append(("Training loss, overall and per task",
                      _save(train_loss_figure(run), report_dir / "train_loss.png")))
        if any(_finite(r.get("lr")) for r in run.train):
            plots.append(("Learning rate", _save(lr_figure(run), report_dir / "lr.png")))
    if run.evals:
        plots.append(("Dev score and loss (dashed line: best step)",
                      _save(eval_score_figure(run), report_dir / "eval_score.png")))
        for task in run.tasks:
            if any(f"eval/{task}/accuracy" in r for r in run.evals):
                plots.append((f"{task}: dev metrics over steps",
                              _save(eval_task_figure(run, task),
                                    report_dir / f"eval_{_safe(task)}.png")))
    for task, m in ((run.best or {}).get("tasks") or {}).items():
        matrix = m.get("confusion_matrix")
        if not matrix:
            continue
        if not _counts_table(matrix):
            _left_out(f"{task}: the best checkpoint's confusion matrix (not a square table of "
                      "counts)")
            continue
        labels = run.labels.get(task) or []
        labels = labels if len(labels) == len(matrix) else [str(i) for i in range(len(matrix))]
        fig = confusion_figure(matrix, labels, f"{task}: best checkpoint (step {run.best_step})")
        plots.append((f"{task}: confusion matrix of the best checkpoint",
                      _save(fig, report_dir / f"confusion_{_safe(task)}.png")))
    return plots


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ------------------------------------------------------------------------------------- HTML


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.4f}"
    return "–" if value is None else html.escape(str(value))


def _metrics_table(title: str, metrics: Mapping[str, Any]) -> str:
    rows = [f"<tr><th>{html.escape(t)}</th>" + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in METRICS)
            + "</tr>" for t, m in (metrics.get("tasks") or {}).items()]
    rows.append(f"<tr class='total'><th>run score</th><td colspan='2'>{_fmt(metrics.get('score'))}"
                f"</td><td>{_fmt(metrics.get('loss'))}</td></tr>")
    return (f"<h2>{html.escape(title)}</h2><table><tr><th>task</th><th>accuracy</th>"
            f"<th>macro F1</th><th>loss</th></tr>{''.join(rows)}</table>")


def _eval_as_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"score": record.get("eval/score"), "loss": record.get("eval/loss"),
            "tasks": {t: {m: record.get(f"eval/{t}/{m}") for m in METRICS}
                      for t in _tasks_of(record)}}


def _summary_rows(run: RunLog) -> str:
    s = run.summary or {}
    last_step = max([r["step"] for r in run.train + run.evals] or [0])
    times = [r["time"] for r in run.train + run.evals if _finite(r.get("time"))]
    rows = [("output directory", str(run.output_dir.resolve())),
            ("optimizer steps", s.get("global_step", last_step)),
            ("stopped because", s.get("stop_reason", "(still running or killed)")),
            # best/'s own (best.json), as the best step is: after a resume from an older
            # checkpoint the summary's is that line's best, which best/ may have beaten
            # under metric_for_best=loss best/ was chosen by (and best.json holds) the loss
            ("best loss" if run.metric_for_best == "loss" else "best score",
             _best_json_score(run, s.get("best_score", (run.best or {}).get("score")))),
            ("best step", run.best_step),
            ("wall time (first to last record)",
             f"{(max(times) - min(times)) / 60:.1f} min" if len(times) > 1 else None)]
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)


def _image_html(caption: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}' "
            f"data-file='{html.escape(path.name)}'><figcaption>{html.escape(caption)}"
            f"</figcaption></figure>")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f4f4f4;text-align:left}tr.total td,tr.total th{font-weight:bold}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:0.9em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:0.85em}"""


def render_html(run: RunLog, plots: Sequence[tuple[str, Path]]) -> str:
    name = html.escape(run.output_dir.resolve().name)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mtl_dist report: {name}"
             f"</title><style>{STYLE}</style></head><body><h1>mtl_dist report: {name}</h1>",
             f"<table>{_summary_rows(run)}</table>"]
    if run.best:
        what = "Best checkpoint" if (run.output_dir / "best").is_dir() else "Best evaluation"
        parts.append(_metrics_table(f"{what} (step {run.best_step}), dev set", run.best))
    if run.evals and not _is_best_record(run, run.evals[-1]):
        last = run.evals[-1]
        parts.append(_metrics_table(f"Last evaluation (step {last['step']}), dev set",
                                    _eval_as_metrics(last)))
    parts.append("<h2>Plots</h2>")
    parts.extend(_image_html(caption, path) for caption, path in plots)
    config = run.output_dir / "config.yaml"
    if config.is_file():
        parts.append(f"<details><summary>Resolved config</summary><pre>"
                     f"{html.escape(config.read_text())}</pre></details>")
    parts.append(f"<p><small>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
                 f"{html.escape(str(run.output_dir / METRICS_FILE))}.</small></p></body></html>")
    return "\n".join(parts)


def build_report(output_dir: str | Path) -> Path:
    """Render OUTPUT/report/*.png and OUTPUT/report/index.html; returns the HTML path."""
    run = load_run(output_dir)
    report_dir = Path(output_dir) / REPORT_DIR
    plots = render_plots(run, report_dir)
    page = report_dir / "index.html"
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(render_html(run, plots), encoding="utf-8")
    os.replace(tmp, page)
    return page
