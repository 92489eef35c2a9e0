"""`mtl-dist report OUTPUT`: PNG plots and one self-contained HTML page from a run's metrics log.

Needs no service: reads OUTPUT/metrics.jsonl (and OUTPUT/best/ for the best checkpoint's
confusion matrices), writes OUTPUT/report/*.png and OUTPUT/report/index.html with the images
embedded as base64 data URIs (the page can be mailed or archived alone).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
    """A confusion matrix as written: a square list of lists of non-negative integers (that
    fit the int64 it is drawn from)."""
    return isinstance(matrix, list) and bool(matrix) and all(
        isinstance(row, list) and len(row) == len(matrix)
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in row)
        for row in matrix)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
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
        return yaml.safe_load(_read_text(path))
    except (OSError, yaml.YAMLError):
        return None


def _read_text(path: Path) -> str:
    """A text file the user may have edited: bytes that are not UTF-8 (a Latin-1 comment)
    become U+FFFD instead of failing the report."""
    return path.read_text(encoding="utf-8-sig", errors="replace")


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
    """A number a plot can take: an int past float's range (a hand edit) is not one."""
    if not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# ------------------------------------------------------------------------------------ plots


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if _finite(r.get(key)) and _finite(r["step"])]
    return [p[0] for p in points], [p[1] for p in points]


def _mark_best(ax: Any, best_step: int | None) -> None:
    if _finite(best_step) and best_step >= 0:
        ax.axvline(best_step, color="tab:red", linestyle="--", linewidth=1,
                   label=f"best (step {best_step})")


def _legend(ax: Any) -> None:
    """A legend where something is labelled: an empty one is a multi-line UserWarning."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize="small")


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
    _legend(ax)
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
    _legend(ax_score)
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
    _legend(ax_m)
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


class Plot(NamedTuple):
    caption: str
    path: Path
    png: bytes  # what was written: the page embeds these, whatever another report did since


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temp file of this process's own, then rename it into place: a reader
    never sees half a file, and concurrent reports don't rename each other's temp files (the
    last to finish wins). A failure is one line, and leaves no temp file behind."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DataError(f"report: cannot write {path}: {exc.strerror or exc}") from exc


def _save(caption: str, fig: Figure, path: Path) -> Plot:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    _write_atomically(path, buffer.getvalue())
    return Plot(caption, path, buffer.getvalue())


def _report_dir(report_dir: Path) -> None:
    """Create OUTPUT/report, or say in one line why it cannot hold the report."""
    if report_dir.exists() and not report_dir.is_dir():
        raise DataError(f"report: {report_dir} exists and is not a directory")
    if report_dir.is_symlink() and not report_dir.exists():  # mkdir would say "File exists"
        raise DataError(f"report: {report_dir} is a link to {os.readlink(report_dir)}, "
                        "which does not exist")
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"report: cannot create {report_dir}: {exc.strerror or exc}") from exc
    # before drawing anything (a read-only copy of a run)
    if not os.access(report_dir, os.W_OK | os.X_OK):
        raise DataError(f"report: cannot write in {report_dir} (no write permission)")


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (its temp files may be in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or no pid at all: keep the file)
    return True


def _remove_stale(report_dir: Path, keep: Iterable[Path]) -> None:
    """Plots of an earlier report this one has not rewritten (a task gone, a renamed file);
    only once the new ones are saved, and only files (a directory there is the user's)."""
    keep = set(keep)
    for stale in report_dir.glob("*.tmp"):  # a killed report's temp files (NAME.<pid>.tmp)
        pid = re.fullmatch(r".+\.(\d+)\.tmp", stale.name)
        if pid and stale.is_file() and not stale.is_symlink() and not _alive(int(pid[1])):
            with contextlib.suppress(OSError):
                stale.unlink()
    for stale in report_dir.glob("*.png"):
        if stale not in keep and stale.is_file() and not stale.is_symlink():
            try:
                stale.unlink()
            except FileNotFoundError:  # a concurrent report removed it first
                pass
            except OSError as exc:
                raise DataError(f"report: cannot remove {stale}: {exc.strerror or exc}") from exc


def render_plots(run: RunLog, report_dir: Path) -> list[Plot]:
    """Every PNG of the report, in page order."""
    _report_dir(report_dir)
    best_tasks = (run.best or {}).get("tasks") or {}
    stem = _file_stems([*run.tasks, *best_tasks])
    plots: list[Plot] = []
    if run.train:
        plots.append(_save("Training loss, overall and per task", train_loss_figure(run),
                           report_dir / "train_loss.png"))
        if any(_finite(r.get("lr")) for r in run.train):
            plots.append(_save("Learning rate", lr_figure(run), report_dir / "lr.png"))
    if run.evals:
        plots.append(_save("Dev score and loss (dashed line: best step)", eval_score_figure(run),
                           report_dir / "eval_score.png"))
        for task in run.tasks:
            if any(f"eval/{task}/accuracy" in r for r in run.evals):
                plots.append(_save(f"{task}: dev metrics over steps", eval_task_figure(run, task),
                                   report_dir / f"eval_{stem[task]}.png"))
    for task, m in best_tasks.items():
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
        plots.append(_save(f"{task}: confusion matrix of the best checkpoint", fig,
                           report_dir / f"confusion_{stem[task]}.png"))
    _remove_stale(report_dir, (p.path for p in plots))
    return plots


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _file_stems(tasks: Iterable[str]) -> dict[str, str]:
    """Task -> the part of its plot file names: the name itself where it is a safe file name
    shared with no other task, else the sanitised name plus a short hash of the raw one
    (`news:a` and `news_a` both sanitise to news_a: one task's plot showed under the other's
    caption). Compared case-blind: some file systems are."""
    tasks = list(dict.fromkeys(tasks))
    stems = {t: t if _safe(t) == t else _hashed(t) for t in tasks}
    taken = Counter(s.casefold() for s in stems.values())
    return {t: _hashed(t) if taken[s.casefold()] > 1 else s for t, s in stems.items()}


def _hashed(task: str) -> str:
    return f"{_safe(task)}-{hashlib.sha1(task.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


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


def _image_html(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    caption = html.escape(plot.caption)
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{caption}' "
            f"data-file='{html.escape(plot.path.name)}'><figcaption>{caption}"
            f"</figcaption></figure>")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f4f4f4;text-align:left}tr.total td,tr.total th{font-weight:bold}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:0.9em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:0.85em}"""


def render_html(run: RunLog, plots: Sequence[Plot]) -> str:
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
    parts.extend(_image_html(plot) for plot in plots)
    config = _config_text(run.output_dir / "config.yaml")
    if config is not None:
        parts.append(f"<details><summary>Resolved config</summary><pre>"
                     f"{html.escape(config)}</pre></details>")
    parts.append(f"<p><small>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
                 f"{html.escape(str(run.output_dir / METRICS_FILE))}.</small></p></body></html>")
    return "\n".join(parts)


def _config_text(path: Path) -> str | None:
    """The run's config.yaml for the page; None when there is none to read."""
    try:
        return _read_text(path) if path.is_file() else None
    except OSError:
        return None


def build_report(output_dir: str | Path) -> Path:
    """Render OUTPUT/report/*.png and OUTPUT/report/index.html; returns the HTML path."""
    run = load_run(output_dir)
    report_dir = Path(output_dir) / REPORT_DIR
    plots = render_plots(run, report_dir)
    page = report_dir / "index.html"
    _write_atomically(page, render_html(run, plots).encode("utf-8"))
    return page
