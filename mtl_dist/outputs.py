"""Files made from predictions: one JSONL per task, and pseudo-labelled train files."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from mtl_dist.errors import DataError, MtlDistError

EXTENSIONS = {"tsv": "tsv", "csv": "csv", "jsonl": "jsonl"}
# Left in a directory `write_pseudo_labels` wrote into: a later round's hint knows its files.
PSEUDO_LABEL_MARKER = ".mtl_dist_pseudo_labels"


def write_predictions(out_dir: str | Path, records: Mapping[str, list[dict]],
                      suffix: str = "") -> Iterator[tuple[Path, int]]:
    """`<out_dir>/<task><suffix>.jsonl`, one {"id", "label", "probs"} line per row; every
    file written before any earlier one is replaced."""
    out_dir = Path(out_dir)
    _make_dir(out_dir)
    paths = {task: out_dir / f"{task}{suffix}.jsonl" for task in records}
    _write_all({paths[task]: lambda f, rows=rows: f.writelines(
        json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for task, rows in records.items()})
    for task, rows in records.items():
        yield paths[task], len(rows)


def _write_all(files: Mapping[Path, Callable[[IO[str]], object]]) -> None:
    """Each file's .tmp written by its writer, then every file replaced: a failed write
    replaces no earlier file and leaves no .tmp."""
    try:
        for path, write in files.items():
            _write_tmp(path, write)
        for path in files:  # none replaced where one cannot be
            _check_writable(path)
        for path in files:
            _replace(path)
    finally:
        for path in files:
            _remove_tmp(_tmp_of(path))


def why_not_writable(path: Path) -> str | None:
    """Why an output file cannot be written at `path` (said after it), checked before any
    predicting: something there that is no file (a directory), or a folder that cannot be
    written; None when it can be."""
    if path.exists() and not path.is_file():
        return "is a directory" if path.is_dir() else "exists and is not a regular file"
    tmp = _tmp_of(path)  # written first, then renamed onto `path`
    if tmp.exists() and not tmp.is_file():
        return f"cannot be written: its temporary file {tmp} is a directory"
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot be written: no write permission in {folder}"
    return None


def _check_writable(path: Path) -> None:
    why = why_not_writable(path)
    if why is not None:
        raise MtlDistError(f"{path} {why}")


def _tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtlDistError(f"{folder}: cannot create the output directory: "
                           f"{exc.strerror or exc}") from None


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError inside (a folder that cannot be written, a full disk) as one line naming
    `path`."""
    try:
        yield
    except OSError as exc:
        raise MtlDistError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _write_tmp(path: Path, write: Callable[[IO[str]], object]) -> None:
    """`path`'s .tmp file, written by `write` (the caller removes it after a failure)."""
    with _writing(path), _tmp_of(path).open("w", encoding="utf-8") as f:
        write(f)


def _replace(path: Path) -> None:
    """Move `path`'s written .tmp file onto it."""
    with _writing(path):
        os.replace(_tmp_of(path), path)


def _remove_tmp(tmp: Path) -> None:
    if tmp.is_file():  # not a directory of the user's that has the name
        with contextlib.suppress(OSError):  # the error that stopped the write is the one
            tmp.unlink()


# ------------------------------------------------------------------------------ pseudo-labels


def input_layout(task: Any, source: str | None) -> str:
    """The layout ('tsv' | 'csv' | 'jsonl') the task's files are read in: `task.format`, or
    what the reader detects from `source` (a built-in `demo:` set counts as Tianchi TSV)."""
    from mtl_dist.data import detect_format, is_demo_path

    fmt = getattr(task, "format", "auto")
    if fmt != "auto" or source is None or is_demo_path(source):
        return "tsv" if fmt == "auto" else fmt
    with open(source, "rb") as f:
        first = f.readline().removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")
    return detect_format(source, task, first.rstrip("\r\n"))


def select_confident(examples: Sequence[Any], predictions: Sequence[Mapping[str, Any]],
                     threshold: float) -> list[Any]:
    """Examples whose top predicted probability is >= threshold, relabelled with the prediction.

    `predictions[i]` must be the prediction of `examples[i]` (same order, same id)."""
    from dataclasses import replace

    if len(examples) != len(predictions):
        raise DataError(f"pseudo-labels: {len(predictions)} predictions for {len(examples)} rows")
    kept = []
    for ex, pred in zip(examples, predictions, strict=True):
        if str(pred["id"]) != ex.id:
            raise DataError(f"pseudo-labels: prediction id {pred['id']!r} does not match row "
                            f"{ex.line} (id {ex.id!r}); predictions and test file are out of step")
        if max(pred["probs"]) >= threshold:
            kept.append(replace(ex, label=str(pred["label"])))
    return kept


def _one_line(text: str | None) -> str:
    """TSV cells cannot hold tabs or line breaks (the reader splits on them)."""
    return " ".join((text or "").replace("\t", " ").splitlines())


def format_rows(task: Any, examples: Sequence[Any], fmt: str) -> str:
    """Labelled examples as file content in the task's input layout (what `read_examples` reads):
    Tianchi TSV `id<TAB>text[<TAB>text_b]<TAB>label`, or CSV / JSONL with the task's field names."""
    pair = bool(getattr(task, "pair", False))
    if fmt == "tsv":
        cols = (lambda e: [e.id, e.text_a, e.text_b, e.label]) if pair else \
            (lambda e: [e.id, e.text_a, e.label])
        return "".join("\t".join(_one_line(c) for c in cols(e)) + "\n" for e in examples)
    names = {"id": task.id_field or None, "text_a": task.text_field,
             "text_b": task.text_b_field if pair else None, "label": task.label_field}
    names = {attr: name for attr, name in names.items() if name}
    if fmt == "jsonl":
        return "".join(json.dumps({n: getattr(e, a) for a, n in names.items()},
                                  ensure_ascii=False) + "\n" for e in examples)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(list(names.values()))
        writer.writerows([getattr(e, a) or "" for a in names] for e in examples)
        return buf.getvalue()
    raise DataError(f"tasks.{task.name}.format: expected tsv, csv or jsonl, got {fmt!r}")


def pseudo_label_path(out_dir: str | Path, task: Any) -> Path:
    """Where `write_pseudo_labels` puts a task's file: `<out_dir>/<task>.<ext of its layout>`."""
    return Path(out_dir) / f"{task.name}.{EXTENSIONS[input_layout(task, task.test)]}"


def is_pseudo_label_file(path: str | Path, task: Any) -> bool:
    """Whether `path` is an earlier `pseudo-label` round's file for `task` (same test rows)."""
    path = Path(path)
    return path.name == pseudo_label_path(path.parent, task).name and \
        (path.parent / PSEUDO_LABEL_MARKER).is_file()


def confident_rows(task: Any, predictions: Sequence[Mapping[str, Any]], threshold: float, *,
                   on_bad_row: str = "error") -> tuple[str | None, int, int]:
    """The task's test rows whose top probability reaches `threshold`, labelled with the
    prediction, as the text of a train file in the task's input layout (usable as
    `extra_train`); None when no row is kept (an empty train file is an error for the
    reader). Returns (text, rows kept, test rows).

    The test file is read again as the predictor read it, so rows pair up by position."""
    from mtl_dist.data import read_examples

    examples, _ = read_examples(task.test, task, require_label=False, on_bad_row=on_bad_row,
                                check_labels=False)  # as predict read it: its labels unread
    kept = select_confident(examples, predictions, threshold)
    text = format_rows(task, kept, fmt=input_layout(task, task.test)) if kept else None
    return text, len(kept), len(examples)


def write_pseudo_labels(out_dir: str | Path, texts: Sequence[tuple[Any, str]]) -> dict[str, Path]:
    """Each (task, `confident_rows` text) to `<out_dir>/<task>.<ext>` (each task's file
    returned by task name), all or none: a failed write replaces no earlier round's file."""
    paths = {task.name: pseudo_label_path(out_dir, task) for task, _ in texts}
    if not texts:
        return paths
    _make_dir(Path(out_dir))
    _write_all({paths[task.name]: lambda f, text=text: f.write(text) for task, text in texts})
    marker = Path(out_dir) / PSEUDO_LABEL_MARKER
    with _writing(marker):
        marker.touch()
    return paths
