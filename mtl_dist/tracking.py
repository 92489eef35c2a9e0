"""Where metrics go: a JSONL log in the output dir, the console, and accelerate's trackers.

`Tracking` is the trainer's one handle on all of them. wandb is imported only when it is in
`tracking.backends` (no import cost, no network otherwise).
"""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import secrets
import string
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mtl_dist.errors import MtlDistError, MtlDistWarning

METRICS_FILE = "metrics.jsonl"
STEP_METRIC = "global_step"  # wandb's x-axis: our optimizer step, not wandb's own counter
TENSORBOARD_DIR = "tensorboard"
WANDB_HOST = "api.wandb.ai"


def _first_line(exc: BaseException) -> str:
    """`Type: message`, its first line only (tracker libraries raise long messages)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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

    def truncate_after(self, step: int, redo_eval: bool = False,
                       keep_cut_in: Path | None = None, fork: int | None = None,
                       branch_log: Path | None = None) -> None:
        """Keep records up to `step` (a stopped invocation's summary at `step` stays: it says
        why the run stopped there); `redo_eval`: not an evaluation at `step`, which the run
        is about to log again (a pending one, done before a crash). `keep_cut_in`: a folder
        where the records cut go (a branch the resume leaves, whose checkpoints went there).
        A resume into an abandoned branch (`fork`, the step it left the run's line at, and
        `branch_log`, its kept records): the line is cut after `fork`, and the branch's
        records up to `step` take the place of what was cut."""
        if not self.is_main or not self.path.exists():
            return

        def kept_at(record: dict, cut_after: int) -> bool:
            at = record.get("step", 0)
            return at < cut_after or (at == cut_after and not (
                cut_after == step and redo_eval and record.get("kind") == "eval"))

        kept, cut = [], []
        for line, record in _parsed_lines(self.path):
            (kept if kept_at(record, step if fork is None else fork) else cut).append(line)
        if keep_cut_in is not None and cut:
            self._write_lines(keep_cut_in / self.path.name, cut)
        if fork is not None and branch_log is not None and branch_log.exists():
            kept += [line for line, record in _parsed_lines(branch_log)
                     if record.get("step", 0) > fork and kept_at(record, step)]
        self._write_lines(self.path, kept)

    def _write_lines(self, path: Path, lines: list[str]) -> None:
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in lines))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise MtlDistError(f"cannot rewrite {path}: {exc.strerror or exc}") from exc

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
        except OSError as exc:  # disk full: one line, not a traceback
            raise MtlDistError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(_scalars(values), step=step)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each readable line; a torn line (a write cut short by a full disk or
    a kill) is skipped with a warning instead of making the log unreadable for good."""
    out = []
    # utf-8-sig: an editor's "UTF-8 with BOM" save glued the BOM to line 1, whose record was
    # then skipped as torn (and dropped by the next resume's rewrite)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            warnings.warn(f"{path}:{number}: skipping an unreadable line (a write cut short?)",
                          MtlDistWarning,
                          stacklevel=3)
            continue
        if not (isinstance(record, dict) and isinstance(record.get("kind"), str)
                and isinstance(record.get("step"), int)):
            warnings.warn(f"{path}:{number}: skipping a line that is not a record (a JSON "
                          "object with 'kind' and an integer 'step')", MtlDistWarning, stacklevel=3)
            continue
        out.append((line, record))
    return out


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics log, in order."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [record for _line, record in _parsed_lines(path)]


def format_eval_line(step: int, per_task: dict[str, dict], score: float) -> str:
    """One console line per evaluation: every task's accuracy/macro-F1 and the run score."""
    parts = [f"{t}: acc={m['accuracy']:.4f} f1={m['macro_f1']:.4f}" for t, m in per_task.items()]
    score_text = "nan" if math.isnan(score) else f"{score:.4f}"
    return f"[eval step {step}] " + " | ".join(parts) + f" | score={score_text}"


def eval_values(result: Mapping[str, Any]) -> dict[str, float]:
    """The scalar names of one evaluation: eval/score, eval/loss, eval/<task>/<metric>."""
    values = {"eval/score": result["score"], "eval/loss": result["loss"]}
    for name, m in result["tasks"].items():
        for metric in ("accuracy", "macro_f1", "loss"):
            if metric in m:
                values[f"eval/{name}/{metric}"] = m[metric]
    return values


# ------------------------------------------------------------------------------ wandb set-up


def wandb_api_key_configured(environ: Mapping[str, str] | None = None,
                             home: str | Path | None = None) -> bool:
    """True when WANDB_API_KEY is set or a netrc file ($NETRC, ~/.netrc, ~/_netrc) holds an
    entry for the wandb host — what `wandb login` writes: WANDB_BASE_URL's host, else the
    installed wandb's default (api.forge.coreweave.com since wandb 0.31) or api.wandb.ai."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    if environ.get("WANDB_BASE_URL"):
        hosts = [urlparse(environ["WANDB_BASE_URL"]).hostname or WANDB_HOST]
    else:
        hosts = list(dict.fromkeys([_wandb_default_host(), WANDB_HOST]))
    home = Path(home) if home is not None else Path.home()
    candidates = [Path(environ["NETRC"])] if environ.get("NETRC") else \
        [home / ".netrc", home / "_netrc"]
    for path in candidates:
        try:
            # An explicit file skips netrc's permission check: wandb does not make one either.
            entries = netrc.netrc(str(path)) if path.is_file() else None
        except (OSError, netrc.NetrcParseError):
            continue
        for host in hosts if entries else ():
            auth = entries.authenticators(host)
            if auth and auth[2]:  # (login, account, password): the key is the password
                return True
    return False


def _wandb_default_host() -> str:
    """The host `wandb login` writes its key for when WANDB_BASE_URL is unset."""
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL
    except ImportError:  # older wandb: api.wandb.ai
        return WANDB_HOST
    return urlparse(DEFAULT_BASE_URL).hostname or WANDB_HOST


def new_run_id(length: int = 8) -> str:
    """A wandb-style run id (lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _offline_reason(environ: Mapping[str, str]) -> str | None:
    """Why wandb should run offline (None: leave the mode to wandb and WANDB_MODE)."""
    if environ.get("WANDB_MODE"):
        return None
    if wandb_api_key_configured(environ):
        return None
    return (f"no wandb API key configured (WANDB_API_KEY unset, no {_wandb_default_host()} "
            "entry in ~/.netrc)")


class Tracking:
    """One run's metrics sinks: the JSONL log (source of `mtl-dist report`), accelerate's
    trackers (wandb, TensorBoard). Only the main process writes anything.

    Steps are global optimizer steps. Records are written only between `start` and `finish`,
    so a standalone `evaluate`/`predict` leaves the run's log alone.
    """

    def __init__(self, cfg: Any, accelerator: Any, output_dir: str | Path):
        self.cfg = cfg
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.is_main = bool(accelerator.is_main_process)
        self.metrics = MetricsLog(self.output_dir, self.is_main)
        self.backends = list(cfg.tracking.backends)
        self.run_id: str | None = None
        self.sync_command: str | None = None  # set when wandb logs offline
        self._offline_reason: str | None = None
        self.active = False
        self.point_to_outputs = True  # `mtl-dist bench` runs in a directory it then deletes

    # ------------------------------------------------------------------ life cycle
    @property
    def run_name(self) -> str:
        return self.cfg.tracking.run_name or self.output_dir.resolve().name

    def truncate_after(self, step: int, redo_eval: bool = False,
                       keep_cut_in: Path | None = None, fork: int | None = None,
                       branch_log: Path | None = None) -> None:
        """On resume: drop JSONL records after the checkpoint's step (they are logged again),
        and its evaluation's when that is pending (`redo_eval`); a branch left by the resume
        keeps them in its abandoned/ folder (`keep_cut_in`); a resume into an abandoned
        branch takes that branch's records back (`fork`, `branch_log`)."""
        self.metrics.truncate_after(step, redo_eval, keep_cut_in, fork, branch_log)

    def start(self, run_id: str | None = None, resume_step: int = 0) -> str | None:
        """Start the trackers; returns the wandb run id to keep in the checkpoint (`run_id`
        continues that run). `resume_step` > 0: TensorBoard hides its events after that step."""
        self.active = True
        if not self.backends or not self.is_main:
            self.run_id = run_id
            return run_id
        new_id = (run_id or new_run_id()) if "wandb" in self.backends else run_id
        acc = self.accelerator
        acc.project_configuration.logging_dir = str(self.output_dir / TENSORBOARD_DIR)
        try:
            acc.init_trackers(self.cfg.tracking.project,
                              init_kwargs=self._init_kwargs(new_id, resume_step))
        except Exception as exc:  # noqa: BLE001 - whatever the tracker library raises
            # half-started trackers: their finish() at the run's end failed again, and its
            # AttributeError was the last line printed, not the cause
            acc.trackers.clear()
            hint = ("; without network, WANDB_MODE=offline logs offline for a later "
                    "`wandb sync`") if "wandb" in self.backends else ""
            raise MtlDistError(f"tracking.backends={list(self.backends)}: could not start: "
                               f"{_first_line(exc)}{hint}") from exc
        started = set()
        for tracker in acc.trackers:
            started.add(tracker.name)
            if tracker.name == "wandb":
                self._after_wandb_init(tracker.tracker)
            elif tracker.name == "tensorboard":
                self._after_tensorboard_init(tracker.writer)
        for name in self.backends:
            if name not in started:  # accelerate drops a tracker whose package is missing
                print(f"[mtl_dist] warning: tracking.backends has {name!r} but it is not "
                      f"installed here; not logging to it (pip install {name})", flush=True)
        self.run_id = new_id if "wandb" in started else run_id
        return self.run_id

    def _init_kwargs(self, run_id: str | None, resume_step: int) -> dict[str, dict]:
        kwargs: dict[str, dict] = {}
        if "tensorboard" in self.backends:
            # Events the killed job wrote after its last checkpoint vanish from TensorBoard;
            # a fresh run (resume_step 0) purges an earlier run's (overwrite_output_dir).
            kwargs["tensorboard"] = {"purge_step": resume_step + 1}
        if "wandb" in self.backends:
            kwargs["wandb"] = self._wandb_kwargs(run_id)
        return kwargs

    def _wandb_kwargs(self, run_id: str | None) -> dict[str, Any]:
        from mtl_dist.config import save_dict

        t = self.cfg.tracking
        kwargs: dict[str, Any] = {
            "id": run_id, "resume": "allow", "name": self.run_name,
            "group": t.group or self.run_name, "tags": list(t.tags) or None,
            "entity": t.entity, "config": save_dict(self.cfg)}
        if not os.environ.get("WANDB_DIR"):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(self.output_dir)
        self._offline_reason = _offline_reason(os.environ)
        if self._offline_reason:
            kwargs["mode"] = "offline"
        return kwargs

    def _after_wandb_init(self, run: Any) -> None:
        run.define_metric(STEP_METRIC)
        # Every metric is plotted against our step; wandb's own _step just counts calls, so a
        # resumed run never logs a "step must increase" warning.
        run.define_metric("*", step_metric=STEP_METRIC)
        if not run.offline:
            return
        sync_dir = Path(run.settings.sync_dir)
        # Every restart of this run writes its own offline-run-*-<id> dir; sync takes them in order.
        self.sync_command = f"wandb sync {sync_dir.parent}/offline-run-*-{run.id}"
        reason = self._offline_reason or "WANDB_MODE is offline"
        print(f"[mtl_dist] wandb logs offline ({reason}): run {run.id} in {sync_dir}\n"
              f"[mtl_dist] upload it later with: {self.sync_command}", flush=True)

    def _after_tensorboard_init(self, writer: Any) -> None:
        from mtl_dist.config import config_to_yaml

        text = "\n".join("    " + line for line in config_to_yaml(self.cfg).splitlines())
        writer.add_text("config", text, global_step=0)

    # --------------------------------------------------------------------- logging
    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """A JSONL record, and its scalars to every tracker at `step` (main process only)."""
        if not (self.active and self.is_main):
            return
        self.metrics.log(kind, step, values)
        self._to_trackers(step, _scalars(values))

    def _to_trackers(self, step: int, scalars: dict[str, float],
                     wandb_extra: Mapping[str, Any] | None = None) -> None:
        for tracker in list(self.accelerator.trackers):
            if tracker.name == "wandb":
                self._guarded(tracker, f"step {step}", lambda t=tracker: t.log(
                    {STEP_METRIC: step, **scalars, **(wandb_extra or {})}))
            else:
                self._guarded(tracker, f"step {step}",
                              lambda t=tracker: t.log(scalars, step=step))

    def _guarded(self, tracker: Any, when: str, call) -> bool:
        """Run one tracker call; a tracker that fails (its service died, its disk filled) is
        dropped with a warning instead of ending the training: it killed the run with no
        checkpoint at the stop. metrics.jsonl, written first, keeps every record."""
        try:
            call()
            return True
        except Exception as exc:  # noqa: BLE001 - whatever the tracker library raises
            self.accelerator.trackers.remove(tracker)
            warnings.warn(f"tracking: {tracker.name} failed at {when} ({_first_line(exc)}); "
                          f"not logging to it for the rest of this run ({self.metrics.path} "
                          "keeps every record)", MtlDistWarning, stacklevel=3)
            with contextlib.suppress(Exception):
                tracker.finish()
            return False

    def log_eval(self, step: int, result: Mapping[str, Any],
                 label_maps: Mapping[str, list[str]]) -> None:
        """An evaluation: scalars everywhere; per task a confusion matrix (JSONL, wandb's plot,
        a TensorBoard image)."""
        if not (self.active and self.is_main):
            return
        values = eval_values(result)
        matrices = {t: m["confusion_matrix"] for t, m in result["tasks"].items()
                    if "confusion_matrix" in m}
        self.metrics.log("eval", step, {**values, "confusion_matrices": matrices})
        names = {t.name: t for t in self.accelerator.trackers}
        extra = _wandb_confusion_plots(step, matrices, label_maps) if "wandb" in names else None
        self._to_trackers(step, _scalars(values), extra)
        if "tensorboard" in names and names["tensorboard"] in self.accelerator.trackers:
            board = names["tensorboard"]
            self._guarded(board, f"step {step}", lambda: _tensorboard_confusion_images(
                board.writer, step, matrices, label_maps))

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The summary record; best score/step into the wandb summary; trackers closed (so a
        later `accelerator.end_training()` only tears down the process group)."""
        if not (self.active and self.is_main):
            self.active = False
            return
        self.metrics.log("summary", summary.get("global_step", 0), dict(summary))
        for tracker in list(self.accelerator.trackers):
            if tracker.name == "wandb" and not self._guarded(
                    tracker, "the summary",
                    lambda t=tracker: t.tracker.summary.update(_wandb_summary(summary, self.cfg))):
                continue
            self._guarded(tracker, "its finish", tracker.finish)
        self.accelerator.trackers.clear()
        self.active = False
        if not self.point_to_outputs:
            return
        best = self.output_dir / "best"
        state = f" (DAMAGED: {summary['best_damage']})" if summary.get("best_damage") \
            else _kept_from_before(best, summary)
        if not best.exists() and summary.get("best_score") is not None:  # e.g. the best came
            # with a checkpoint of another run resumed here, or save_best was off
            state = (f" (this line's best, step {summary.get('best_step')}, was not saved as "
                     "best/ in this output dir)")
        print(f"[mtl_dist] best checkpoint: {best if best.exists() else '(none saved)'}"
              f"{state}; metrics log: {self.metrics.path}; "
              f"report: mtl-dist report {self.output_dir}", flush=True)
        if self.sync_command:
            print(f"[mtl_dist] upload the offline wandb run with: {self.sync_command}", flush=True)


def _kept_from_before(best: Path, summary: Mapping[str, Any]) -> str:
    """When best/ is not this run's best (a resume from an older checkpoint: best/ holds a
    better model of the line set aside), its own step and score, so the two are not paired."""
    try:
        info = json.loads((best / "best.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict) or info.get("step") is None:
        return ""
    # the same step is not enough: a resumed line's best can be at best/'s step, another model
    if info["step"] == summary.get("best_step") and info.get("score") == summary.get("best_score"):
        return ""
    holds = f"it holds step {info['step']}, {info.get('metric_for_best', 'score')} {info.get('score')}"
    score, line = info.get("score"), summary.get("best_score")
    greater = info.get("greater_is_better", True)
    if line is None or (isinstance(score, int | float) and (score > line if greater else score < line)):
        return f" ({holds}: better than this line's best, so kept)"
    # e.g. checkpoint.save_best off when this line's best was evaluated
    return f" ({holds}; this line's best, step {summary.get('best_step')}, was not saved as best/)"


def _wandb_summary(summary: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    out = {"best/score": summary.get("best_score"), "best/step": summary.get("best_step"),
           "best/metric": cfg.train.metric_for_best, "stop_reason": summary.get("stop_reason"),
           STEP_METRIC: summary.get("global_step")}
    return {k: v for k, v in out.items() if v is not None}


def _labels_for(task: str, size: int, label_maps: Mapping[str, list[str]]) -> list[str]:
    labels = list(label_maps.get(task, []))
    return labels if len(labels) == size else [str(i) for i in range(size)]


def _wandb_confusion_plots(step: int, matrices: Mapping[str, list[list[int]]],
                           label_maps: Mapping[str, list[str]]) -> dict[str, Any]:
    """wandb's own confusion-matrix chart per task (it wants label pairs: expand the counts)."""
    import wandb

    plots = {}
    for task, matrix in matrices.items():
        y_true, preds = [], []
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                y_true.extend([i] * int(count))
                preds.extend([j] * int(count))
        if not y_true:
            continue
        plots[f"eval/{task}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=_labels_for(task, len(matrix), label_maps),
            title=f"{task} confusion matrix (step {step})")
    return plots


def _tensorboard_confusion_images(writer: Any, step: int,
                                  matrices: Mapping[str, list[list[int]]],
                                  label_maps: Mapping[str, list[str]]) -> None:
    """A rendered heat map per task as a TensorBoard image (matplotlib Agg, no pyplot)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mtl_dist.report import confusion_figure

    for task, matrix in matrices.items():
        fig = confusion_figure(matrix, _labels_for(task, len(matrix), label_maps),
                               f"{task} (step {step})")
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        image = np.asarray(canvas.buffer_rgba())[..., :3]
        writer.add_image(f"eval/{task}/confusion_matrix", image, global_step=step,
                         dataformats="HWC")
