"""Task data: file readers (TSV/CSV/JSONL/demo), tokenization with an on-disk cache,
the multi-task dataset and the dynamic-padding collate function.

Knows nothing of ranks or checkpoints: every rank calls the same functions and gets the
same arrays (cache files are written atomically, so concurrent ranks are safe).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtl_dist.demo_data import (
    PAIR_TASKS,
    demo_fingerprint,
    demo_rows,
    demo_tokenizer,
    is_demo_path,
    parse_demo_path,
)
from mtl_dist.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from mtl_dist.config import ModelConfig, RunConfig, TaskConfig

__all__ = [
    "Example",
    "MultiTaskDataset",
    "TokenizedTask",
    "build_label_maps",
    "check_label_maps",
    "collate",
    "default_cache_dir",
    "demo_examples",
    "demo_tokenizer",
    "detect_format",
    "empty_task",
    "file_fingerprint",
    "infer_labels",
    "load_task_data",
    "load_tokenizer",
    "read_examples",
    "resolve_pad_multiple",
    "tokenize_task",
    "tokenizer_fingerprint",
    "tokenizer_identity",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
CACHE_VERSION = 1
_MAX_LOGGED_SKIPS = 5


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One raw sample; `line` is its 1-based line in the source file (for error messages)."""

    id: str
    text_a: str
    text_b: str | None
    label: str | None
    line: int


class _Rows:
    """Collects a file's rows, applies the checks every format shares, and handles bad rows."""

    def __init__(self, path: str, on_bad_row: str, labels: Sequence[str] | None,
                 quiet: bool = False, task: Any = None) -> None:
        if on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_row: expected 'error' or 'skip', got {on_bad_row!r}")
        self.path = path
        self.skip = on_bad_row == "skip"
        self.labels = None if labels is None else set(labels)
        self.label_list = labels
        self.task_name = _field(task, "name", None)
        # the key a label outside the list turns on, when the config lists them (not inferred)
        self.labels_key = "labels" if _field(task, "labels", None) else None
        self.examples: list[Example] = []
        self.skipped = 0
        self.quiet = quiet  # a pre-pass (label inference): the reading that counts says it
        self._first_line_of: dict[str, int] = {}

    def bad(self, line: int, problem: str, field: str | None = None) -> None:
        """Raise DataError for a bad row, or count (and log the first few) in skip mode.
        `field`: the task's config field the problem turns on ('labels', 'text_field')."""
        msg = f"{self.path}:{line}: {problem}"
        if not self.skip:
            raise DataError(msg, self.key_of(field))
        self.skipped += 1
        if self.skipped <= _MAX_LOGGED_SKIPS and not self.quiet:
            log.warning("skipping bad row: %s", msg)

    def key_of(self, field: str | None) -> str | None:
        """'tasks.<name>.<field>', for the CLI to say where the config set it."""
        return None if field is None or self.task_name is None \
            else f"tasks.{self.task_name}.{field}"

    def add(self, line: int, id_: str, text_a: str, text_b: str | None, label: str | None,
            names: tuple[str, str]) -> None:
        """Check one parsed row (empty text, unknown label, duplicate id) and keep it if good."""
        problem = self._problem(id_, text_a, text_b, label, names)
        if problem:
            self.bad(line, problem, self.labels_key if problem.startswith("label ") else None)
            return
        self._first_line_of[id_] = line
        self.examples.append(Example(id_, text_a, text_b, label, line))

    def _problem(self, id_: str, text_a: str, text_b: str | None, label: str | None,
                 names: tuple[str, str]) -> str | None:
        if not id_.strip():
            return "empty id"
        if not text_a.strip():
            return f"empty text in {names[0]}"
        if text_b is not None and not text_b.strip():
            return f"empty text in {names[1]}"
        if label is not None and self.labels is not None and label not in self.labels:
            return f"label {label!r} is not one of the task's labels ({_short_list(self.label_list)})"
        if id_ in self._first_line_of:
            return f"duplicate id {id_!r} (first at line {self._first_line_of[id_]})"
        return None

    def finish(self) -> tuple[list[Example], int]:
        """Return (examples, skipped); a file with no usable row is an error even in skip mode."""
        if self.skipped and not self.quiet:
            shown = f"; the first {_MAX_LOGGED_SKIPS} shown" if self.skipped > _MAX_LOGGED_SKIPS \
                else ""
            log.warning("%s: skipped %d bad row(s) in all (data.on_bad_row=skip%s)", self.path,
                        self.skipped, shown)
        if not self.examples and self.skipped:
            raise DataError(f"{self.path}: no usable rows ({self.skipped} bad rows skipped)")
        if not self.examples:
            raise DataError(f"{self.path}: no data rows")
        return self.examples, self.skipped


def _short_list(items: Sequence[str] | None, limit: int = 20) -> str:
    items = list(items or [])
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _field(task: Any, name: str, default: Any) -> Any:
    return getattr(task, name, default)


# ----------------------------------------------------------------------------- reading


def detect_format(path: str | Path, task: Any, first_line: str = "") -> str:
    """Resolve `task.format` ('auto' by suffix). A `.csv` whose first line has tabs and no
    header naming the text field is read as Tianchi TSV (the competition files are named .csv)."""
    fmt = _field(task, "format", "auto")
    if fmt != "auto":
        if fmt not in ("tsv", "csv", "jsonl"):
            raise ConfigError(f"tasks.{task.name}.format: expected auto, tsv, csv or jsonl, got {fmt!r}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".tsv", ".txt"):
        return "tsv"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        try:
            header = next(csv.reader([first_line]), [])
        except csv.Error:  # not a CSV header (e.g. a bare CR): the reader says why, by line
            header = []
        looks_tsv = "\t" in first_line and _field(task, "text_field", "text") not in header
        return "tsv" if looks_tsv else "csv"
    raise DataError(
        f"{path}: cannot tell the format from the suffix {suffix!r}; "
        f"set tasks.{task.name}.format to tsv, csv or jsonl"
    )


def _read_bytes(path: str) -> bytes:
    try:
        if not (Path(path).is_file() or Path(path).is_dir()):  # a FIFO would block the read
            Path(path).stat()  # not there: the errors below
            raise DataError(f"{path}: a FIFO, socket or device, expected a data file")
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _decode_lines(data: bytes, rows: _Rows) -> list[tuple[int, str]]:
    """Split on b'\\n', strip CR and a leading BOM, decode each line strictly (bad lines are
    bad rows); trailing blank lines are dropped, inner ones kept for multi-line CSV fields."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # UTF-16 (Excel's "Unicode text"): a whole file, not bad rows; with on_bad_row=skip the
    # lines that happened to decode were trained on, NULs and all
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or data.count(b"\x00") * 4 > len(data):
        raise DataError(f"{rows.path}: UTF-16 text or a binary file (NUL bytes: "
                        f"{data.count(0)} of {len(data)}), expected UTF-8: save it as UTF-8")
    out: list[tuple[int, str]] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            rows.bad(lineno, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
            continue
        if "\x00" in text:  # valid UTF-8, but no text holds it: a binary or UTF-16 file's line
            rows.bad(lineno, f"a NUL byte at character {text.index(chr(0)) + 1} of the line")
            continue
        out.append((lineno, text))
    while out and not out[-1][1].strip():
        out.pop()
    return out


def _read_tsv(lines: list[tuple[int, str]], task: Any, require_label: bool, rows: _Rows) -> None:
    """Tianchi layout, no header: id, text[, text_b][, label] separated by tabs."""
    pair = bool(_field(task, "pair", False))
    names = ["id", "text_a", "text_b", "label"] if pair else ["id", "text", "label"]
    full = len(names)
    col_names = ("column 2", "column 3")
    for lineno, text in lines:
        if not text.strip():
            continue
        parts = text.split("\t")
        if len(parts) == full:
            label: str | None = parts[-1].strip()
        elif len(parts) == full - 1 and not require_label:
            label = None
        else:
            want = f"{full}" if require_label else f"{full - 1} or {full}"
            rows.bad(lineno, f"expected {want} tab-separated columns ({', '.join(names)}), "
                             f"got {len(parts)}{_bare_cr_hint(text)}")
            continue
        if label == "":
            if require_label:
                rows.bad(lineno, f"empty label in column {full}")
                continue
            label = None
        rows.add(lineno, parts[0].strip(), parts[1], parts[2] if pair else None, label, col_names)


def _has_tsv_header(lines: list[tuple[int, str]], task: Any, path: str | Path) -> bool:
    """A TSV whose first line names the text column and another of the task's fields (GLUE
    style) has a header; the Tianchi layout has none."""
    number, first = next(((n, text) for n, text in lines if text.strip()), (0, ""))
    columns = {c.strip() for c in first.split("\t")}
    fields = _fields(task)
    if fields["text"] not in columns:
        named = [fields[r] for r in ("id", "label") if fields[r] and fields[r] in columns]
        # a GLUE-style header whose text column has another name; a test file's has no label
        # column, but a first column named as the id field is no Tianchi row's id either
        if len(named) == 2 or (fields["id"] and first.split("\t")[0].strip() == fields["id"]):
            raise DataError(f"{path}:{number}: reads as a header naming {' and '.join(named)} but "
                            f"not the text column {fields['text']!r} (columns: "
                            f"{', '.join(c.strip() for c in first.split(chr(9)))}): set the "
                            "task's text_field (and text_b_field) to the header's names")
        return False
    # a text field named in the config (SST-2's test.tsv: `index<TAB>sentence`) is enough;
    # the default name 'text' needs another field beside it (a Tianchi row may read 'text')
    return fields["text"] != "text" or any(
        fields[role] in columns for role in ("id", "text_b", "label") if fields[role])


def _read_headed_tsv(lines: list[tuple[int, str]], task: Any, require_label: bool,
                     rows: _Rows) -> None:
    """Tab-separated with a header row naming the columns: as CSV, but no quoting (GLUE's
    files keep quotes as text) and one row per line."""
    _read_csv(lines, task, require_label, rows, dialect="tsv")


def _read_csv(lines: list[tuple[int, str]], task: Any, require_label: bool, rows: _Rows,
              dialect: str = "csv") -> None:
    """CSV with a header row naming the columns (task.*_field); quoted fields may span lines."""
    fields = _fields(task)
    csv.field_size_limit(2**31 - 1)
    consumed: list[int] = []

    def feed() -> Iterator[str]:
        for lineno, text in lines:
            consumed.append(lineno)
            yield text + "\n"

    # an unclosed quote: an error, not the file's rest
    reader = (csv.reader(feed(), strict=True) if dialect == "csv" else
              csv.reader(feed(), delimiter="\t", quoting=csv.QUOTE_NONE, strict=True))
    separated = "comma-separated" if dialect == "csv" else "tab-separated"
    header: list[str] = []
    try:
        while not header:
            header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{rows.path}:{consumed[-1]}: bad CSV header ({_csv_problem(e)})") from None
    header_line = consumed[-1]
    index = _csv_columns(header, fields, require_label, rows, header_line)
    _note_an_unread_second_text(task, [h.strip() for h in header], f"{rows.path}:{header_line}",
                                "column")
    names = (f"field {fields['text']!r}", f"field {fields['text_b']!r}")
    while True:
        start = len(consumed)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if start < len(consumed) and reader.line_num and "end of data" in str(e):
                # the rest of the file is inside the quote: nothing after it can be read
                raise DataError(f"{rows.path}:{consumed[start]}: a quoted field in the row "
                                "starting on this line is never closed (it runs to the end of "
                                "the file)") from None
            rows.bad(consumed[-1], f"bad CSV ({_csv_problem(e)})")
            continue
        lineno = consumed[start] if start < len(consumed) else consumed[-1]
        if not row:
            continue
        if len(row) != len(header):
            rows.bad(lineno, f"expected {len(header)} {separated} columns (as in the header), got {len(row)}")
            continue
        _add_named(rows, lineno, {k: row[i] for k, i in index.items()}, task, require_label, names)


CR_ONLY_HINT = "CR-only line endings? save the file with LF or CRLF line endings"


def _bare_cr_hint(line: str) -> str:
    """Lines are split on LF only: CR-only (old Mac) line endings leave one long line."""
    return f" (it holds a bare carriage return (\\r): {CR_ONLY_HINT})" if "\r" in line else ""


def _csv_problem(e: csv.Error) -> str:
    """csv's message, but a bare CR said plainly: lines are split on LF only, so the CR of
    CR-only (old Mac) line endings stays inside the line, where csv calls it a new-line."""
    if str(e).startswith("new-line character seen in unquoted field"):
        return f"a bare carriage return (\\r) in an unquoted field: {CR_ONLY_HINT}"
    return str(e)


def _fields(task: Any) -> dict[str, str | None]:
    """Column / JSON field names of a task; text_b only for pair tasks; id may be empty (= line)."""
    return {
        "id": _field(task, "id_field", "id") or None,
        "text": _field(task, "text_field", "text"),
        "text_b": _field(task, "text_b_field", "text_b") if _field(task, "pair", False) else None,
        "label": _field(task, "label_field", "label"),
    }


_UNREAD_SAID: set[tuple[str, str]] = set()


def _note_an_unread_second_text(task: Any, names: Iterable[str], where: str, kind: str) -> None:
    """A column (field) named as the task's second text while the task is no pair task: a
    forgotten `pair: true` trained on the first text alone, silently (the demo's data sets
    refuse it: their kind is known). A warning: leaving that text out may be meant."""
    if _field(task, "pair", False):
        return
    name = _field(task, "text_b_field", "text_b")
    if name in names and name not in _fields(task).values() and (where, name) not in _UNREAD_SAID:
        _UNREAD_SAID.add((where, name))  # once: a run reads a file more than once
        log.warning("%s: a %s %r (the task's text_b_field) is not read: tasks.%s.pair is false; "
                    "set it true to train on sentence pairs", where, kind, name, task.name)


def _csv_columns(header: list[str], fields: Mapping[str, str | None], require_label: bool,
                 rows: _Rows, line: int) -> dict[str, int]:
    header = [h.strip() for h in header]
    index: dict[str, int] = {}
    for role, name in fields.items():
        if name is None:
            continue
        if name in header:
            index[role] = header.index(name)
        elif role != "label" or require_label:
            raise DataError(f"{rows.path}:{line}: missing column {name!r} in the header "
                            f"(columns: {', '.join(header)})"
                            + _NO_IDS_HINT * (role == "id" and fields["text"] in header),
                            rows.key_of(f"{role}_field"))
    return index


def _add_named(rows: _Rows, lineno: int, values: Mapping[str, Any], task: Any,
               require_label: bool, names: tuple[str, str]) -> None:
    """Shared tail of the CSV and JSONL readers: id default, label presence, then `rows.add`."""
    id_ = values.get("id")
    label = values.get("label")
    label = None if label is None else str(label).strip()
    if not label:
        if require_label:
            rows.bad(lineno, f"empty label in field {_fields(task)['label']!r}")
            return
        label = None
    rows.add(lineno, str(lineno) if id_ is None else str(id_).strip(), values["text"],
             values.get("text_b"), label, names)


def _read_jsonl(lines: list[tuple[int, str]], task: Any, require_label: bool, rows: _Rows) -> None:
    """One JSON object per line with named fields (task.*_field)."""
    fields = _fields(task)
    names = (f"field {fields['text']!r}", f"field {fields['text_b']!r}")
    first = True
    for lineno, text in lines:
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.bad(lineno, f"bad JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:  # e.g. a line of 200k '['
            rows.bad(lineno, "bad JSON (nested too deeply)")
            continue
        except ValueError as e:  # an integer over sys.get_int_max_str_digits() digits
            rows.bad(lineno, f"bad JSON ({str(e).split(';')[0]})")
            continue
        if not isinstance(obj, dict):
            rows.bad(lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        if first:  # (a field of the first object: not looked for in every row)
            _note_an_unread_second_text(task, obj, f"{rows.path}:{lineno}", "field")
            first = False
        values, problem, field = _json_values(obj, fields, require_label)
        if problem:
            rows.bad(lineno, problem, field)
            continue
        _add_named(rows, lineno, values, task, require_label, names)


# Said after a missing id column/field: rows without ids are numbered by line only on request.
_NO_IDS_HINT = "; without ids, set the task's id_field to \"\" to number the rows by line"
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _json_values(obj: Mapping[str, Any], fields: Mapping[str, str | None],
                 require_label: bool) -> tuple[dict[str, Any], str | None, str | None]:
    """(values by role, the problem or None, the task's config field a missing field is
    named by, e.g. 'text_field')."""
    values: dict[str, Any] = {}
    for role, name in fields.items():
        if name is None:
            continue
        if name not in obj or obj[name] is None:
            if role == "label" and not require_label:
                continue
            what = f"JSON field {name!r} is null" if name in obj else f"missing JSON field {name!r}"
            # (the hint only where the rest reads well: not for a header of other names)
            hint = _NO_IDS_HINT * (role == "id" and fields["text"] in obj)
            return values, what + hint, f"{role}_field"
        value = obj[name]
        if role in ("text", "text_b") and not isinstance(value, str):
            return values, f"JSON field {name!r} must be a string, got {type(value).__name__}", None
        if role in ("id", "label") and (isinstance(value, bool) or not isinstance(value, str | int)):
            return values, (f"JSON field {name!r} must be a string or an integer, got "
                            f"{type(value).__name__}"), None
        # "\ud800" decodes to a lone surrogate, which cannot be encoded (cache key, tokenizer)
        bad = _SURROGATE.search(value) if isinstance(value, str) else None
        if bad:
            return values, (f"JSON field {name!r} holds an unpaired surrogate "
                            f"{ascii(bad.group())[1:-1]} at character {bad.start() + 1}, "
                            "which is not valid Unicode text"), None
        values[role] = value
    return values, None, None


def _read_demo(path: str, task: Any, rows: _Rows) -> None:
    try:
        name, split = parse_demo_path(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    is_pair = name in PAIR_TASKS
    if is_pair != bool(_field(task, "pair", False)):
        raise DataError(
            f"{path}: a {'sentence-pair' if is_pair else 'single-sentence'} data set, "
            f"but tasks.{task.name}.pair is {str(not is_pair).lower()}", rows.key_of("pair"))
    for i, r in enumerate(demo_rows(name, split), start=1):
        rows.add(i, r.id, r.text_a, r.text_b, r.label, ("text_a", "text_b"))


def _read_source(path: str | Path, task: Any, *, require_label: bool, on_bad_row: str,
                 labels: Sequence[str] | None, quiet: bool = False
                 ) -> tuple[list[Example], int, str]:
    """Read one source once: (examples, skipped, fingerprint)."""
    path = str(path)
    rows = _Rows(path, on_bad_row, labels, quiet, task)
    if is_demo_path(path):
        _read_demo(path, task, rows)
        return *rows.finish(), demo_fingerprint(*parse_demo_path(path))
    data = _read_bytes(path)
    fingerprint = hashlib.sha256(data).hexdigest()
    lines = _decode_lines(data, rows)
    if not lines and not rows.skipped:
        raise DataError(f"{path}: file is empty")
    fmt = detect_format(path, task, lines[0][1] if lines else "")
    if fmt == "tsv" and _has_tsv_header(lines, task, path):
        fmt = "headed_tsv"
    reader = {"tsv": _read_tsv, "headed_tsv": _read_headed_tsv, "csv": _read_csv,
              "jsonl": _read_jsonl}[fmt]
    reader(lines, task, require_label, rows)
    return *rows.finish(), fingerprint


def read_examples(path: str | Path, task: TaskConfig, *, require_label: bool,
                  on_bad_row: str = "error", labels: Sequence[str] | None = None,
                  check_labels: bool = True) -> tuple[list[Example], int]:
    """Read a task file (or `demo:<task>/<split>`) into examples; returns (examples, skipped).

    `labels` (default: `task.labels`) is the frozen label list; rows with other labels are bad
    (`check_labels=False`: no label is checked, as predict reads a file). Bad rows raise a
    one-line DataError naming `path:line`, or are skipped and counted."""
    labels = labels if labels is not None else _field(task, "labels", None)
    labels = labels if check_labels else None
    examples, skipped, _ = _read_source(path, task, require_label=require_label,
                                        on_bad_row=on_bad_row, labels=labels)
    return examples, skipped


def demo_examples(task: str, split: str) -> list[Example]:
    """The built-in demo split as examples (deterministic; see `mtl_dist.demo_data`)."""
    return [Example(r.id, r.text_a, r.text_b, r.label, i)
            for i, r in enumerate(demo_rows(task, split), start=1)]


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes, or of the generated content for `demo:` paths."""
    if is_demo_path(str(path)):
        return demo_fingerprint(*parse_demo_path(str(path)))
    return hashlib.sha256(_read_bytes(str(path))).hexdigest()


def infer_labels(examples: Sequence[Example]) -> list[str]:
    """Sorted unique labels (numerically when every label is an integer, so '2' < '10')."""
    labels = {e.label for e in examples if e.label is not None}
    if labels and all(re.fullmatch(r"-?\d+", lab) for lab in labels):
        # ties ('1', '01', full-width '１') broken by the text: a set's order differs between
        # processes, and every rank must build the same label map
        # (Decimal: int() refuses more than 4,300 digits)
        return sorted(labels, key=lambda lab: (Decimal(lab), lab))
    return sorted(labels)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """`model.tokenizer` (or `model.pretrained`): 'demo:' for the built-in, else a local dir or
    tokenizer.json loaded offline; must be a fast tokenizer with a pad token."""
    key = "model.tokenizer" if getattr(model_cfg, "tokenizer", None) else "model.pretrained"
    src = getattr(model_cfg, "tokenizer", None) or getattr(model_cfg, "pretrained", None)
    if not src:
        raise ConfigError("model.tokenizer: no tokenizer given; set model.tokenizer "
                          "(a local directory, a tokenizer.json, or 'demo:') or model.pretrained")
    if is_demo_path(src):
        return demo_tokenizer()
    path = Path(src).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: not found: {path}")
    tok = _load_local_tokenizer(path, key)
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{key}: {path} gives a slow tokenizer ({type(tok).__name__}); "
                          "a fast tokenizer (tokenizer.json) is required")
    if tok.pad_token_id is None:
        raise ConfigError(f"{key}: the tokenizer at {path} has no pad token")
    return tok


def _load_local_tokenizer(path: Path, key: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if path.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
            _set_bert_specials(tok)
            return tok
        if path.is_dir() and not any(_looks_like_tokenizer_file(f.name) for f in path.iterdir()):
            # transformers then blamed a missing sentencepiece/tiktoken install
            raise ConfigError(f"{key}: {path} holds no tokenizer files (no tokenizer.json, "
                              "tokenizer_config.json, vocab or sentencepiece model)")
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one config line
        detail = " ".join(str(e).split())
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {detail}") from None


def _looks_like_tokenizer_file(name: str) -> bool:
    """tokenizer.json/_config.json, vocab.txt/.json, merges.txt, spiece.model, spm.model,
    sentencepiece.bpe.model, *.tiktoken, ...: any file a transformers tokenizer may load."""
    name = name.lower()
    return any(part in name for part in ("token", "vocab", "merges", "spm", "spiece",
                                         "sentencepiece")) or name.endswith(".model")


def _set_bert_specials(tok: Any) -> None:
    """A bare tokenizer.json carries no special-token roles: set BERT's when the vocab has them."""
    vocab = tok.get_vocab()
    for role, token in (("pad_token", "[PAD]"), ("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                        ("sep_token", "[SEP]"), ("mask_token", "[MASK]")):
        if getattr(tok, role) is None and token in vocab:
            setattr(tok, role, token)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition (vocab, normalizer, templates), ignoring the
    truncation/padding state that tokenizer calls mutate."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    spec["truncation_side"] = getattr(tokenizer, "truncation_side", "right")
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# A text pair every tokenizer is asked to encode for `tokenizer_identity`: case, accents,
# punctuation, digits and CJK, so that normalizer, pre-tokenizer and template all act.
_PROBE = ("Probe: Äpfel, naïve CAFÉ -- 12,345 ids; 测试 tokens!", "a second text?")


def tokenizer_identity(tokenizer: Any) -> str:
    """sha256 of what a tokenizer does, not of how the `tokenizers` library serializes it
    (`tokenizer_fingerprint`, which a library upgrade changes for the same tokenizer): its
    vocabulary (token -> id), its special tokens with their ids, and the ids it gives a fixed
    text pair. What a checkpoint records to refuse another tokenizer with the same vocabulary
    size (other ids, other splitting)."""
    special = sorted((str(t), tokenizer.convert_tokens_to_ids(t))
                     for t in tokenizer.all_special_tokens)
    probe = tokenizer(*_PROBE, truncation=False, padding=False)["input_ids"]
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "special": special,
                       "probe": list(probe)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- tokenized tasks


@dataclass(eq=False)
class TokenizedTask:
    """One task's split, tokenized: per-sample int32 token arrays, int64 labels (-1 = none)."""

    name: str
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    lengths: np.ndarray
    labels: np.ndarray
    ids: list[str]
    fingerprint: str
    num_truncated: int = 0
    num_skipped: int = 0
    from_cache: bool = field(default=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)


def empty_task(name: str) -> TokenizedTask:
    """A task with no samples (a split the config leaves out)."""
    return TokenizedTask(name, [], None, np.zeros(0, np.int32), np.zeros(0, np.int64), [], "")


def default_cache_dir() -> Path:
    """$MTL_DIST_CACHE_DIR, else $XDG_CACHE_HOME/mtl_dist, else ~/.cache/mtl_dist."""
    if os.environ.get("MTL_DIST_CACHE_DIR"):
        return Path(os.environ["MTL_DIST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "mtl_dist"


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.id}\x1f{e.text_a}\x1f{e.text_b}\x1e".encode())
    return h.hexdigest()


def _cache_key(examples: Sequence[Example], tokenizer: Any, max_length: int,
               source_fingerprint: str, label_to_id: Mapping[str, int], pair: bool) -> str:
    parts = {
        "version": CACHE_VERSION,
        "source": source_fingerprint,
        "examples": _examples_digest(examples),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": int(max_length),
        "labels": sorted(label_to_id.items(), key=lambda kv: kv[1]),
        "pair": pair,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _labels_array(examples: Sequence[Example], label_to_id: Mapping[str, int]) -> np.ndarray:
    out = np.full(len(examples), -1, np.int64)
    for i, e in enumerate(examples):
        if e.label is None:
            continue
        if e.label not in label_to_id:
            raise DataError(f"example {e.id!r} (line {e.line}): label {e.label!r} is not in the "
                            f"label map ({_short_list(list(label_to_id))})")
        out[i] = label_to_id[e.label]
    return out


def _tokenize(examples: Sequence[Example], tokenizer: Any, max_length: int, pair: bool,
              batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray] | None, int]:
    """Batched fast tokenization; a sample counts as truncated when its encoding overflowed."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_task needs a fast tokenizer (PreTrainedTokenizerFast)")
    ids: list[np.ndarray] = []
    types: list[np.ndarray] | None = [] if pair else None
    truncated = 0
    for start in range(0, len(examples), max(1, batch_size)):
        chunk = examples[start:start + batch_size]
        enc = tokenizer([e.text_a for e in chunk], [e.text_b for e in chunk] if pair else None,
                        truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=pair)
        for e in enc.encodings:
            ids.append(np.asarray(e.ids, dtype=np.int32))
            if types is not None:
                types.append(np.asarray(e.type_ids, dtype=np.int8))
            truncated += bool(e.overflowing)
    return ids, types, truncated


def _cache_paths(cache_dir: Path, name: str, key: str) -> tuple[Path, Path]:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "task"
    stem = cache_dir / "tokenized" / f"{safe}-{key[:32]}"
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same directory and os.replace, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_cache(npz: Path, meta: Path, key: str, ids: list[np.ndarray],
                types: list[np.ndarray] | None, truncated: int) -> None:
    arrays = {
        "offsets": np.cumsum([0] + [len(a) for a in ids], dtype=np.int64),
        "input_ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
    }
    if types is not None:
        arrays["token_type_ids"] = np.concatenate(types) if types else np.zeros(0, np.int8)
    info = {"version": CACHE_VERSION, "key": key, "num_samples": len(ids),
            "num_truncated": truncated, "has_token_type_ids": types is not None}
    try:
        _atomic_write(npz, lambda f: np.savez(f, **arrays))
        _atomic_write(meta, lambda f: f.write(json.dumps(info, indent=1).encode()))
    except OSError as e:
        log.warning("could not write the tokenization cache %s: %s", npz, e)


def _load_cache(npz: Path, meta: Path, key: str,
                n: int) -> tuple[list[np.ndarray], list[np.ndarray] | None, int] | None:
    """Cached arrays, or None when absent / for another key / unreadable (then re-tokenized)."""
    if not (meta.exists() and npz.exists()):
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("key") != key or info.get("num_samples") != n:
            return None
        with np.load(npz, allow_pickle=False) as z:
            cuts = z["offsets"][1:-1]
            ids = np.split(z["input_ids"], cuts)
            types = np.split(z["token_type_ids"], cuts) if "token_type_ids" in z else None
        if len(ids) != n:
            return None
        return ids, types, int(info["num_truncated"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable tokenization cache %s: %s", npz, e)
        return None


def tokenize_task(examples: Sequence[Example], tokenizer: PreTrainedTokenizerFast, max_length: int,
                  cache_dir: str | Path | None, source_fingerprint: str,
                  label_to_id: Mapping[str, int], *, name: str = "",
                  batch_size: int = 1000) -> TokenizedTask:
    """Tokenize (pairs when examples carry text_b) with truncation to `max_length`.

    Cached under `cache_dir/tokenized/` keyed by source fingerprint, example content,
    tokenizer definition, max_length, label map and pair flag; `cache_dir=None` disables it."""
    if not examples:
        return replace(empty_task(name), fingerprint=source_fingerprint)
    pair = examples[0].text_b is not None
    labels = _labels_array(examples, label_to_id)
    key = _cache_key(examples, tokenizer, max_length, source_fingerprint, label_to_id, pair)
    paths = None if cache_dir is None else _cache_paths(Path(cache_dir), name, key)
    hit = None if paths is None else _load_cache(*paths, key, len(examples))
    from_cache = hit is not None
    if hit is None:
        hit = _tokenize(examples, tokenizer, max_length, pair, batch_size)
        if paths is not None:
            _save_cache(*paths, key, *hit)
    ids, types, truncated = hit
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int32, count=len(ids))
    return TokenizedTask(name, ids, types, lengths, labels, [e.id for e in examples],
                         source_fingerprint, num_truncated=truncated, from_cache=from_cache)


# ----------------------------------------------------------------------------- config level


def split_files(task: Any, split: str) -> list[str]:
    """The files of `split` ('train' | 'dev' | 'test') of a task config: train also lists
    its extra_train files; none when the split is not configured."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "train":
        first = _field(task, "train", None)
        return ([first] if first else []) + list(_field(task, "extra_train", None) or [])
    path = _field(task, split, None)
    return [path] if path else []


def _combine_fingerprints(fps: Sequence[str]) -> str:
    return fps[0] if len(fps) == 1 else hashlib.sha256("\n".join(fps).encode()).hexdigest()


def build_label_maps(cfg: RunConfig) -> dict[str, list[str]]:
    """Task name -> frozen label list: `tasks[i].labels` if given, else inferred from the
    train file(s) including extra_train."""
    on_bad_row = _field(cfg.data, "on_bad_row", "error")
    out: dict[str, list[str]] = {}
    for i, task in enumerate(cfg.tasks):
        given = _field(task, "labels", None)
        if given:
            dupes = sorted({x for x in given if list(given).count(x) > 1})
            if dupes:
                raise ConfigError(f"tasks[{i}].labels: duplicate label {dupes[0]!r}")
            out[task.name] = [str(x) for x in given]
            continue
        examples: list[Example] = []
        for path in split_files(task, "train"):
            ex, _, _ = _read_source(path, task, require_label=True, on_bad_row=on_bad_row,
                                    labels=None, quiet=True)
            examples.extend(ex)
        labels = infer_labels(examples)
        if not labels:
            raise DataError(f"tasks[{i}] ({task.name}): no train file to infer labels from; "
                            f"set tasks[{i}].train or tasks[{i}].labels")
        if len(labels) == 1:  # its head could only ever predict it, and score 1.0 each time
            raise DataError(f"tasks[{i}] ({task.name}): its train file(s) hold one label only "
                            f"({labels[0]!r}), a classifier needs 2 or more: another label "
                            f"column (tasks[{i}].label_field)? or list them in tasks[{i}].labels")
        out[task.name] = labels
    return out


def frozen_label_maps(cfg: RunConfig) -> dict[str, list[str]]:
    """The run's label lists: OUTPUT/labels.json when the output dir holds a run (checked
    against the config), else `build_label_maps` (a fresh or overwritten run)."""
    saved = Path(cfg.train.output_dir) / "labels.json"
    if saved.exists() and not cfg.train.overwrite_output_dir:
        maps = _read_label_maps(saved)
        check_label_maps(cfg, maps, str(saved))
        # in the config's order, which the heads are built (and labels.json rewritten) in;
        # a run that died before its first checkpoint may be rerun with the tasks reordered
        return {task.name: maps[task.name] for task in cfg.tasks}
    return build_label_maps(cfg)


def _read_label_maps(path: Path) -> dict[str, list[str]]:
    """OUTPUT/labels.json: {task: [label, ...]}; damaged (empty, cut, edited): one line."""
    try:
        maps = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: bad UTF-8 or JSON, or an integer over 4300 digits; RecursionError: deep nesting
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"{path}: cannot read the run's frozen labels: {exc}") from None
    if not (isinstance(maps, dict) and maps and all(
            isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)
            for labels in maps.values())):
        raise DataError(f"{path}: expected a JSON object of task name -> list of label "
                        f"strings (as the run wrote it), got {json.dumps(maps)[:120]}")
    return maps


_RUN_LABELS_ADVICE = ("a run's tasks cannot change (use a new train.output_dir)",
                      "a run's labels cannot change (use a new train.output_dir)")


def check_label_maps(cfg: RunConfig, saved: Mapping[str, Sequence[str]], where: str,
                     advice: tuple[str, str] = _RUN_LABELS_ADVICE) -> None:
    """A run's frozen label maps (`where`, e.g. OUTPUT/labels.json, or a checkpoint's) must
    cover every configured task, and labels the config states explicitly must equal them:
    else one ConfigError line, ending with `advice` (for a task, for its labels)."""
    for i, task in enumerate(cfg.tasks):
        if task.name not in saved:
            raise ConfigError(f"tasks[{i}].name: task {task.name!r} has no labels in {where} "
                              f"(it has: {', '.join(saved)}); {advice[0]}")
        given = _field(task, "labels", None)
        if given and [str(x) for x in given] != list(saved[task.name]):
            raise ConfigError(f"tasks[{i}].labels: {[str(x) for x in given]} differ from the "
                              f"labels frozen in {where}: {list(saved[task.name])}; {advice[1]}")


def check_split(cfg: RunConfig, split: str, label_maps: Mapping[str, Sequence[str]]) -> None:
    """Read (not tokenize) every task's `split` files, raising what `load_task_data` would:
    a training run checks its test files up front instead of failing at `predict` (which
    reads no label: a test file's labels are not checked)."""
    for task in cfg.tasks:
        for path in split_files(task, split):
            _read_source(path, task, require_label=split != "test",
                         on_bad_row=_field(cfg.data, "on_bad_row", "error"),
                         labels=None if split == "test" else list(label_maps[task.name]))


def load_task_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast, split: str,
                   label_maps: Mapping[str, Sequence[str]],
                   with_labels: bool = True) -> list[TokenizedTask]:
    """Read and tokenize `split` ('train' | 'dev' | 'test') of every task, in config order.

    Labels are required for train/dev and optional for test; a split without a file gives an
    empty task. `max_samples` is not applied here (the sampler caps per epoch).
    `with_labels=False` (predict): any label column is left unread, so a class the run never
    saw is no bad row, and the rows carry no label."""
    data = cfg.data
    cache = _field(data, "cache_dir", None)
    cache_dir = Path(cache).expanduser() if cache else default_cache_dir()
    out: list[TokenizedTask] = []
    for task in cfg.tasks:
        files = split_files(task, split)
        if not files:
            out.append(empty_task(task.name))
            continue
        labels = list(label_maps[task.name])
        examples: list[Example] = []
        skipped, fps = 0, []
        for path in files:
            ex, sk, fp = _read_source(path, task, require_label=with_labels and split != "test",
                                      on_bad_row=_field(data, "on_bad_row", "error"),
                                      labels=labels if with_labels else None)
            examples.extend(ex if with_labels else
                            [replace(e, label=None) for e in ex])
            skipped += sk
            fps.append(fp)
        tt = tokenize_task(examples, tokenizer, data.max_length, cache_dir, _combine_fingerprints(fps),
                           {lab: i for i, lab in enumerate(labels)}, name=task.name,
                           batch_size=_field(data, "tokenize_batch_size", 1000))
        tt.num_skipped = skipped
        if tt.num_truncated:  # counted by tokenize_task; said here, once per task and split
            log.warning("%s (%s): %d of %d samples were longer than data.max_length=%d tokens "
                        "and were truncated", task.name, split, tt.num_truncated, len(tt),
                        data.max_length)
        out.append(tt)
    return out


# ----------------------------------------------------------------------------- dataset / collate


class MultiTaskDataset(torch.utils.data.Dataset):
    """All tasks of a split behind one flat index: flat = offsets[task_id] + i."""

    def __init__(self, tasks: Sequence[TokenizedTask]) -> None:
        self.tasks = list(tasks)
        self.task_sizes = [len(t) for t in self.tasks]
        self.offsets = [int(x) for x in np.cumsum([0] + self.task_sizes[:-1])] if self.tasks else []
        self._total = sum(self.task_sizes)

    def __len__(self) -> int:
        return self._total

    def locate(self, flat: int) -> tuple[int, int]:
        """(task_id, index within the task) of a flat index."""
        flat = int(flat)
        if not 0 <= flat < self._total:
            raise IndexError(f"flat index {flat} out of range [0, {self._total})")
        task_id = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        return task_id, flat - self.offsets[task_id]

    def __getitem__(self, flat: int) -> dict[str, Any]:
        task_id, i = self.locate(flat)
        t = self.tasks[task_id]
        return {
            "task_id": task_id,
            "input_ids": t.input_ids[i],
            "token_type_ids": None if t.token_type_ids is None else t.token_type_ids[i],
            "label": int(t.labels[i]),
            "index": int(flat),
        }

    def lengths(self, task_id: int) -> np.ndarray:
        """Token lengths of one task's samples (for length grouping)."""
        return self.tasks[task_id].lengths


def resolve_pad_multiple(value: int | None, on_gpu: bool) -> int:
    """`data.pad_to_multiple_of`, with None meaning 64 on GPU (few distinct shapes) and 8 on CPU."""
    if value is not None:
        return int(value)
    return 64 if on_gpu else 8


def _single_task(samples: Sequence[Mapping[str, Any]]) -> int:
    if not samples:
        raise DataError("collate: empty batch")
    task_ids = {int(s["task_id"]) for s in samples}
    if len(task_ids) != 1:
        raise DataError(f"collate: a batch must come from one task, got task ids {sorted(task_ids)}")
    return task_ids.pop()


def _labels_and_ids(samples: Sequence[Mapping[str, Any]], task_id: int) -> dict[str, Any]:
    """What every training batch carries besides its tokens."""
    return {"labels": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
            "task_id": task_id,
            "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)}


def padded_width(lengths: np.ndarray, pad_to_multiple_of: int | None,
                 max_length: int | None) -> np.ndarray:
    """The width `collate` pads a batch to, for each row of `lengths` (samples' token counts
    along the last axis): the longest, rounded up to `pad_to_multiple_of`, not past
    `max_length` (unless a sample is longer)."""
    longest = np.asarray(lengths).max(axis=-1)
    if not (pad_to_multiple_of and pad_to_multiple_of > 1):
        return longest
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return np.minimum(width, np.maximum(max_length, longest)) if max_length else width


def packed_width(lengths: np.ndarray, pack_multiple: int) -> np.ndarray:
    """The row length `collate_packed` packs a batch into, for each row of `lengths`: all
    tokens plus at least one pad token, rounded up to `pack_multiple`."""
    total = np.asarray(lengths).sum(axis=-1)
    return (total + 1 + pack_multiple - 1) // pack_multiple * pack_multiple


def collate(samples: Sequence[Mapping[str, Any]], pad_token_id: int,
            pad_to_multiple_of: int | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Pad one single-task batch to its longest sample, rounded up to `pad_to_multiple_of`
    but never past `max_length` (so the longest bucket is max_length itself)."""
    task_id = _single_task(samples)
    width = int(padded_width(np.array([len(s["input_ids"]) for s in samples]),
                             pad_to_multiple_of, max_length))
    n = len(samples)
    input_ids = np.full((n, width), pad_token_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    for row, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[row, :k] = s["input_ids"]
        attention[row, :k] = 1
        if s.get("token_type_ids") is not None:
            types[row, :k] = s["token_type_ids"]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "token_type_ids": torch.from_numpy(types),
        **_labels_and_ids(samples, task_id),
    }


def packing_probe(vocab_size: int, pad_token_id: int, max_length: int,
                  pack_multiple: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A few random samples of different lengths, padded and packed (for
    model.verify_packed_attention): fixed seed, any token but the pad."""
    generator = np.random.default_rng(0)
    samples = []
    for index, length in enumerate(min(n, max_length) for n in (7, 3, 5)):
        ids = generator.integers(0, vocab_size - 1, size=length)
        samples.append({"input_ids": np.where(ids >= pad_token_id, ids + 1, ids),
                        "label": 0, "task_id": 0, "index": index})
    return (collate(samples, pad_token_id, max_length=max_length),
            collate_packed(samples, pad_token_id, max_length, pack_multiple))


def collate_packed(samples: Sequence[Mapping[str, Any]], pad_token_id: int, max_length: int,
                   pack_multiple: int) -> dict[str, Any]:
    """One single-task batch packed end to end into one row (`data.packing`): no padding
    between samples, attention kept within each sample by `cu_seqlens`.

    The row is rounded up to a multiple of `pack_multiple` (few shapes, for CUDA graphs and
    compiled kernels); the pad tail is a sequence of its own (at least one token), so
    `cu_seqlens` has batch + 2 entries. `unpack_index` (batch, max_length) gathers each
    sample's tokens back for the heads; its pad slots point anywhere and are masked by
    `attention_mask` exactly as in a padded batch."""
    task_id = _single_task(samples)
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    if lengths.max() > max_length:
        raise DataError(f"collate_packed: a sample has {lengths.max()} tokens, more than "
                        f"data.max_length={max_length}")
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    width = int(packed_width(lengths, pack_multiple))
    input_ids = np.full(width, pad_token_id, dtype=np.int64)
    types = np.zeros(width, dtype=np.int64)
    positions = np.arange(width, dtype=np.int64) - total  # the tail counts from 0
    n = len(samples)
    # Pad slots point at rows spread over the whole packed row, not all at one row: their
    # (exactly zero) gradients then meet few others in the backward's index_add.
    unpack = np.arange(n * max_length, dtype=np.int64).reshape(n, max_length) % width
    attention = np.zeros((n, max_length), dtype=np.int64)
    for row, s in enumerate(samples):
        a, k = int(starts[row]), int(lengths[row])
        input_ids[a:a + k] = s["input_ids"]
        if s.get("token_type_ids") is not None:
            types[a:a + k] = s["token_type_ids"]
        positions[a:a + k] = np.arange(k)
        unpack[row, :k] = np.arange(a, a + k)
        attention[row, :k] = 1
    cu_seqlens = np.concatenate([starts, [width]]).astype(np.int32)
    return {
        "input_ids": torch.from_numpy(input_ids)[None],
        "token_type_ids": torch.from_numpy(types)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "unpack_index": torch.from_numpy(unpack),
        "attention_mask": torch.from_numpy(attention),
        **_labels_and_ids(samples, task_id),
    }
