"""The local report (PNG plots + one self-contained HTML page), predictions and pseudo-labels,
on a real short demo run."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mtl_dist import cli
from mtl_dist import data as mdata
from mtl_dist.config import TaskConfig, load_config
from mtl_dist.errors import DataError
from mtl_dist.outputs import confident_rows, format_rows, input_layout, write_pseudo_labels
from mtl_dist.report import build_report, load_run
from mtl_dist.trainer import Trainer
from tests._runs import DEMO, REPO, records

TASKS = ("nli", "emotion", "news")
RUN = ["train.max_steps=8", "train.eval_steps=4", "train.log_steps=2", "checkpoint.save_steps=4",
       "train.early_stopping_patience=null"]


def cli_main(argv: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(argv)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short demo run (no trackers), then `mtl-dist predict` on the test sets from best/."""
    root = tmp_path_factory.mktemp("report_run")
    out = root / "out"
    overrides = [f"train.output_dir={out}", f"data.cache_dir={root / 'cache'}", *RUN]
    with contextlib.redirect_stdout(io.StringIO()):
        Trainer(load_config(DEMO, overrides)).fit()
    code, _ = cli_main(["predict", str(DEMO), *overrides, "--checkpoint", str(out / "best")])
    assert code == 0
    predictions = {t: [json.loads(line) for line in (out / "predictions" / f"{t}.jsonl").open()]
                   for t in TASKS}
    return SimpleNamespace(root=root, out=out, overrides=overrides, predictions=predictions,
                           labels=json.loads((out / "labels.json").read_text()))


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_report_writes_decodable_plots_and_one_self_contained_page(run):
    code, stdout = cli_main(["report", str(run.out)])
    page = run.out / "report" / "index.html"
    assert code == 0 and str(page) in stdout
    expected = {"train_loss.png", "lr.png", "eval_score.png",
                *(f"eval_{t}.png" for t in TASKS), *(f"confusion_{t}.png" for t in TASKS)}
    pngs = {p.name: p for p in (run.out / "report").glob("*.png")}
    assert set(pngs) == expected
    text = page.read_text()
    for name, path in pngs.items():
        pixels = decoded(path)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 300, (name, pixels.shape)
        assert pixels.std() > 10, f"{name} is (nearly) blank"
        # Embedded, byte for byte: the page needs no other file.
        assert base64.b64encode(path.read_bytes()).decode() in text, name
    sources = re.findall(r"<img src='([^']*)'", text)
    assert len(sources) == len(expected) and all(s.startswith("data:image/png;base64,") for s in sources)
    best = json.loads((run.out / "best" / "best.json").read_text())
    assert f"Best checkpoint (step {best['step']})" in text
    metrics = json.loads((run.out / "best" / "metrics.json").read_text())
    for task in TASKS:
        assert f"<th>{task}</th><td>{metrics['tasks'][task]['accuracy']:.4f}</td>" in text


def test_confusion_matrices_come_from_best_or_else_from_the_log(run, tmp_path):
    best = json.loads((run.out / "best" / "metrics.json").read_text())
    assert load_run(run.out).best["tasks"]["news"]["confusion_matrix"] == \
        best["tasks"]["news"]["confusion_matrix"]
    # Without best/ (e.g. save_best off), the eval record at the best step supplies them.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("metrics.jsonl", "labels.json"):
        shutil.copy(run.out / name, bare / name)
    loaded = load_run(bare)
    summary = records(run.out, "summary")[-1]
    at_best = next(r for r in records(run.out, "eval") if r["step"] == summary["best_step"])
    assert loaded.best_step == summary["best_step"]
    assert {t: m["confusion_matrix"] for t, m in loaded.best["tasks"].items()} == \
        at_best["confusion_matrices"]
    assert (build_report(bare).parent / "confusion_news.png").exists()


@pytest.mark.parametrize(("name", "edit", "warned"), [
    ("matrices not a mapping", lambda ev: ev.update(confusion_matrices=[1, 2]),
     r"the confusion matrices of step \d+ \(not a mapping of tasks\)"),
    ("ragged matrix", lambda ev: ev["confusion_matrices"].update(nli=[[1, 2], [3]]),
     r"nli: the best checkpoint's confusion matrix \(not a square table of counts\)"),
    ("a count that is text", lambda ev: ev["confusion_matrices"]["news"][0].__setitem__(0, "x"), r"news: the best checkpoint's confusion matrix"),
])
def test_report_leaves_out_hand_edited_values_with_a_warning(run, tmp_path, name, edit, warned):
    """Well-formed JSON with an odd value (a hand edit) gave a numpy or AttributeError
    traceback; torn lines were already skipped with a warning."""
    bare = tmp_path / "bare"  # no best/: the matrices come from the log's eval records
    bare.mkdir()
    shutil.copy(run.out / "labels.json", bare / "labels.json")
    recs = [r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] != "summary"]
    best_step = max((r for r in recs if r["kind"] == "eval"), key=lambda r: r["eval/score"])["step"]
    recs = [r for r in recs if r["kind"] != "eval" or r["step"] <= best_step]  # best = last
    edit(next(r for r in reversed(recs) if r["kind"] == "eval"))  # the best one
    (bare / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.warns(UserWarning, match=f"report: {warned}"):
        page = build_report(bare)
    assert "Dev score and loss" in page.read_text()


def test_report_leaves_out_a_damaged_labels_json_or_best_metrics(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.out, copy, ignore=shutil.ignore_patterns("report", "checkpoints"))
    (copy / "labels.json").write_text(json.dumps({"nli": 3}))
    (copy / "best" / "metrics.json").write_text(json.dumps({"score": 1, "tasks": [1]}))
    with pytest.warns(UserWarning) as caught:
        build_report(copy)
    said = [str(w.message) for w in caught]
    assert f"report: {copy / 'labels.json'}: not a mapping of task names to label lists; " \
        "left out" in said
    assert f"report: {copy / 'best' / 'metrics.json'}: not the metrics of an evaluation " \
        "(score, loss, tasks); left out" in said


def test_report_on_a_dir_without_a_log_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "metrics.jsonl" in err and "\n" not in err


def test_report_of_a_file_or_with_a_file_in_the_way_is_one_line(run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["report", str(tmp_path / "afile")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    shutil.copytree(run.out, tmp_path / "out", ignore=shutil.ignore_patterns("report"))
    (tmp_path / "out" / "report").write_text("mine")
    assert cli.main(["report", str(tmp_path / "out")]) == 2
    assert "report exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "out" / "report").read_text() == "mine"


def test_report_reads_a_run_that_went_on_after_a_preemption_and_metric_loss(run, tmp_path):
    """A summary followed by later records (a preempted invocation, then a resume that was
    killed) does not describe the run; without best/, metric_for_best=loss picks the lowest
    eval loss."""
    bare = tmp_path / "bare"
    bare.mkdir()
    lines = (run.out / "metrics.jsonl").read_text().splitlines()
    preempted = json.dumps({"kind": "summary", "step": 4, "stop_reason": "preempted",
                            "best_step": 4, "best_score": 0.1, "global_step": 4})
    lines = [x for x in lines if json.loads(x)["kind"] != "summary"]
    cut = next(i for i, x in enumerate(lines) if json.loads(x)["step"] > 4)
    (bare / "metrics.jsonl").write_text("\n".join([*lines[:cut], preempted, *lines[cut:]]) + "\n")
    loaded = load_run(bare)
    assert loaded.summary is None
    evals = records(run.out, "eval")
    assert loaded.best_step == max(evals, key=lambda r: r["eval/score"])["step"]
    (bare / "config.yaml").write_text("train:\n  metric_for_best: loss\n")
    assert load_run(bare).best_step == min(evals, key=lambda r: r["eval/loss"])["step"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _bare(run, tmp_path: Path, recs: list[dict] | None = None) -> Path:
    """A copy of the run without best/ (the matrices come from the log), its log `recs`."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("labels.json", "config.yaml"):
        shutil.copy(run.out / name, bare / name)
    recs = _log(run.out) if recs is None else recs
    (bare / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return bare


def _one_line_error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: report: ") and "\n" not in err, err
    return err


@pytest.mark.skipif(not Path("/proc/1").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(("where", "said"), [
    ("unwritable", "cannot write in {report} (no write permission)"),  # even by root
    ("broken link", "{report} is a link to /proc/1/nope, which does not exist"),
    ("index.html", "cannot write {report}/index.html: Is a directory"),
    ("train_loss.png", "cannot write {report}/train_loss.png: Is a directory"),
])
def test_a_report_that_cannot_be_written_is_one_line(run, tmp_path, capsys, where, said):
    """Each was a traceback (PermissionError/FileNotFoundError, FileExistsError,
    IsADirectoryError), the last two leaving a stray .tmp file behind."""
    out = tmp_path / "out"
    shutil.copytree(run.out, out, ignore=shutil.ignore_patterns("report", "checkpoints"))
    report = out / "report"
    if where == "unwritable":
        report.symlink_to("/proc/1")
    elif where == "broken link":
        report.symlink_to("/proc/1/nope")
    else:
        (report / where).mkdir(parents=True)
    assert _one_line_error(["report", str(out)], capsys) == \
        f"error: report: {said.format(report=report)}"
    if where not in ("unwritable", "broken link"):
        assert not list(report.glob("*tmp")), "a temp file was left behind"


def test_directories_with_a_plot_or_temp_file_name_are_left_alone(run, tmp_path):
    """A directory named like a stale plot or like the page's temp file was an
    IsADirectoryError; stale plot files are removed, the directories are the user's."""
    out = tmp_path / "out"
    shutil.copytree(run.out, out, ignore=shutil.ignore_patterns("report", "checkpoints"))
    for name in ("old.png", "index.html.tmp", "train_loss.png.tmp"):
        (out / "report" / name).mkdir(parents=True)
    (out / "report" / "gone.png").write_bytes(b"an earlier report's plot")
    # a killed report's temp file (its pid gone) is removed; a live process's is kept
    dead = 2**22 + 12345  # above Linux's highest pid_max: no such process
    (out / "report" / f"train_loss.png.{dead}.tmp").write_bytes(b"cut")
    live = out / "report" / f"eval_nli.png.{os.getppid()}.tmp"
    live.write_bytes(b"in use")
    assert "Training loss" in build_report(out).read_text()
    assert live.is_file() and not (out / "report" / f"train_loss.png.{dead}.tmp").exists()
    left = {p.name for p in (out / "report").iterdir()}
    assert {"old.png", "index.html.tmp", "train_loss.png.tmp", "index.html"} <= left
    assert "gone.png" not in left and [n for n in left if n.endswith(".tmp") and
                                        not (out / "report" / n).is_dir()] == [live.name]


def test_concurrent_reports_of_one_run_all_succeed(run, tmp_path):
    """Two or more `mtl-dist report OUTPUT` at once shared one temp file name per file: one
    renamed the other's away, and the other died with FileNotFoundError (1 try in 3)."""
    import subprocess
    import sys

    from tests._runs import env

    out = tmp_path / "out"
    shutil.copytree(run.out, out, ignore=shutil.ignore_patterns("report", "checkpoints"))
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "mtl_dist.cli", "report", str(out)],
                                  cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert all(code == 0 for code, _ in results), [err[-500:] for _, err in results]
    page = (out / "report" / "index.html").read_text()
    assert page.endswith("</html>") and not list((out / "report").glob("*.tmp"))


def test_non_utf8_config_yaml_is_read_with_replacement(run, tmp_path):
    """A Latin-1 byte in config.yaml was a UnicodeDecodeError, when the page shows the
    config and (without best/) when metric_for_best is read from it."""
    bare = _bare(run, tmp_path, [r for r in _log(run.out) if r["kind"] != "summary"])
    (bare / "config.yaml").write_bytes(b"train:\n  metric_for_best: loss\n# caf\xe9\n")
    evals = records(run.out, "eval")
    assert load_run(bare).best_step == min(evals, key=lambda r: r["eval/loss"])["step"]
    assert "# caf\ufffd" in build_report(bare).read_text()
    with_best = tmp_path / "with_best"
    shutil.copytree(run.out, with_best, ignore=shutil.ignore_patterns("report", "checkpoints"))
    with (with_best / "config.yaml").open("ab") as f:
        f.write(b"# caf\xe9\n")
    assert "# caf\ufffd" in build_report(with_best).read_text()


def test_integers_past_float_range_are_left_out_of_the_plots(run, tmp_path):
    """A 400-digit score or step was an OverflowError (math.isfinite), a count past int64
    one from numpy; the report is drawn without them."""
    recs = [r for r in _log(run.out) if r["kind"] != "summary"]
    huge = 10 ** 400
    best = max((r for r in recs if r["kind"] == "eval"), key=lambda r: r["eval/score"])
    best["confusion_matrices"]["news"][0][0] = 10 ** 30
    recs += [{"kind": "eval", "step": recs[-1]["step"] + 1, "eval/score": huge},
             {"kind": "train", "step": huge, "train/loss": 1.0, "lr": 1e-5}]
    bare = _bare(run, tmp_path, recs)
    with pytest.warns(UserWarning, match="news: the best checkpoint's confusion matrix"):
        page = build_report(bare).read_text()
    assert "Dev score and loss" in page and str(huge) in page  # the table shows it as is


def test_tasks_whose_names_sanitise_alike_get_their_own_plots(run, tmp_path):
    """`news:a` and `news_a` both wrote eval_news_a.png (and confusion_news_a.png): the page
    showed one task's plot under the other's caption."""
    def renamed(record: dict) -> dict:
        text = json.dumps(record).replace('/news/', '/news:a/').replace('"news"', '"news:a"')
        return json.loads(text.replace('/emotion/', '/news_a/').replace('"emotion"', '"news_a"'))

    recs = [renamed(r) for r in _log(run.out)]
    bare = _bare(run, tmp_path, recs)
    labels = run.labels
    (bare / "labels.json").write_text(json.dumps(
        {"nli": labels["nli"], "news:a": labels["news"], "news_a": labels["emotion"]}))
    page = build_report(bare).read_text()
    shown = re.findall(r"data-file='([^']*)'><figcaption>([^<]*)</figcaption>", page)
    assert len({f for f, _ in shown}) == len(shown), "two captions, one file"
    file_of = {c: f for f, c in shown}
    for kind, caption in (("eval", "dev metrics over steps"),
                          ("confusion", "confusion matrix of the best checkpoint")):
        files = {task: file_of[f"{task}: {caption}"] for task in ("news:a", "news_a", "nli")}
        assert files["news_a"] == f"{kind}_news_a.png" and files["nli"] == f"{kind}_nli.png"
        assert re.fullmatch(rf"{kind}_news_a-[0-9a-f]{{8}}\.png", files["news:a"])
        # each caption's image is its own task's: the pixels of news:a are news's plot
        pngs = {task: (bare / "report" / f).read_bytes() for task, f in files.items()}
        assert len(set(pngs.values())) == 3
        assert base64.b64encode(pngs["news:a"]).decode() in page


def test_a_utf8_bom_before_the_first_record_is_accepted(run, tmp_path, recwarn):
    """An editor's "UTF-8 with BOM" save made line 1 unreadable: its record was skipped with
    a "write cut short?" warning."""
    bare = _bare(run, tmp_path)
    text = (bare / "metrics.jsonl").read_text(encoding="utf-8")
    (bare / "metrics.jsonl").write_text(text, encoding="utf-8-sig")
    loaded = load_run(bare)
    assert [r["step"] for r in loaded.train] == [r["step"] for r in records(run.out, "train")]
    assert not [w for w in recwarn if "metrics.jsonl" in str(w.message)]


@pytest.mark.parametrize("evaluation", [
    {"step": -3, "eval/score": 0.5, "eval/loss": 1.0},  # best step -3: no line to mark it
    {"step": 4, "eval/score": float("nan"), "eval/loss": float("nan")},  # no best step
])
def test_an_eval_figure_with_nothing_labelled_draws_no_legend(run, tmp_path, evaluation):
    """matplotlib's multi-line "No artists with labels found to put in legend" warning."""
    recs = [{"kind": "train", "step": 2, "train/loss": 1.0, "lr": 1e-5},
            {"kind": "eval", **evaluation}]
    bare = _bare(run, tmp_path, recs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "Dev score and loss" in build_report(bare).read_text()


def test_predict_writes_one_line_per_test_row_with_the_right_ids(run):
    for task in load_config(DEMO, run.overrides).tasks:
        examples, _ = mdata.read_examples(task.test, task, require_label=False)
        rows = run.predictions[task.name]
        assert [r["id"] for r in rows] == [e.id for e in examples]
        labels = run.labels[task.name]
        for row in rows:
            assert len(row["probs"]) == len(labels) and sum(row["probs"]) == pytest.approx(1, abs=1e-5)
            assert row["label"] == labels[int(np.argmax(row["probs"]))]


def test_pseudo_label_cli_round_trips_and_feeds_a_second_round(run):
    tops = {t: sorted(max(r["probs"]) for r in rows) for t, rows in run.predictions.items()}
    threshold = min(v[len(v) // 2] for v in tops.values())  # every task keeps at least half
    code, stdout = cli_main(["pseudo-label", str(DEMO), *run.overrides, "--checkpoint",
                             str(run.out / "best"), "--threshold", repr(threshold)])
    assert code == 0
    cfg = load_config(DEMO, run.overrides)
    kept_somewhere_less = False
    for task in cfg.tasks:
        test_rows = {e.id: e for e in mdata.read_examples(task.test, task, require_label=False)[0]}
        want = [r for r in run.predictions[task.name] if max(r["probs"]) >= threshold]
        path = run.out / "pseudo_labels" / f"{task.name}.tsv"  # demo data: Tianchi TSV layout
        assert f"{task.name}: kept {len(want)} of {len(test_rows)} test rows" in stdout
        back, skipped = mdata.read_examples(path, task, require_label=True,
                                            labels=run.labels[task.name])
        assert skipped == 0
        assert [(e.id, e.label) for e in back] == [(r["id"], r["label"]) for r in want]
        assert [(e.text_a, e.text_b) for e in back] == \
            [(test_rows[e.id].text_a, test_rows[e.id].text_b) for e in back]
        kept_somewhere_less |= len(want) < len(test_rows)
    assert kept_somewhere_less
    # The printed overrides make a second round train on them (extra_train).
    hint = stdout.split("train the next round on them with: ")[1].split()
    second = load_config(DEMO, [*run.overrides, *hint])
    tok = mdata.load_tokenizer(second.model)
    sizes = [len(t) for t in mdata.load_task_data(second, tok, "train", run.labels)]
    base = [len(t) for t in mdata.load_task_data(cfg, tok, "train", run.labels)]
    kept = [len(mdata.read_examples(run.out / "pseudo_labels" / f"{t}.tsv", task,
                                    require_label=True)[0]) for t, task in zip(TASKS, cfg.tasks, strict=True)]
    assert sizes == [b + k for b, k in zip(base, kept, strict=True)]
    # A next round (trained on the hint) labels the same test rows again: its hint puts its
    # own files in place of the earlier round's, so no test row is trained on twice.
    code, stdout = cli_main(["pseudo-label", str(DEMO), *run.overrides, *hint, "--checkpoint",
                             str(run.out / "best"), "--threshold", repr(threshold),
                             "--output", str(run.out / "round2")])
    assert code == 0
    third = stdout.split("train the next round on them with: ")[1].splitlines()[0].split()
    assert third == [f"tasks.{i}.extra_train=[{run.out / 'round2' / t}.tsv]"
                     for i, t in enumerate(TASKS)]
    earlier = ", ".join(str(run.out / "pseudo_labels" / f"{t}.tsv") for t in TASKS)
    assert f"(in place of the earlier round's {earlier})" in stdout


# ----------------------------------------------------------------- layouts, without a model


def _examples(pair: bool) -> list[mdata.Example]:
    texts = [("plain text", "second, with a comma"), ('quoted "word" and 中文', "tab\tinside"),
             ("multi\nline", 'more "quotes", commas')]
    return [mdata.Example(f"id-{i}", a, b if pair else None, ["x", "y"][i % 2], i + 1)
            for i, (a, b) in enumerate(texts)]


@pytest.mark.parametrize("fmt,pair,fields", [
    ("tsv", False, {}), ("tsv", True, {}),
    ("csv", True, {"id_field": "qid", "text_field": "sentence1", "text_b_field": "sentence2",
                   "label_field": "gold"}),
    ("jsonl", False, {"text_field": "content", "label_field": "y"}),
])
def test_every_layout_round_trips_through_the_reader(tmp_path, fmt, pair, fields):
    task = TaskConfig(name="t", pair=pair, **fields)
    examples = _examples(pair)
    path = tmp_path / f"t.{fmt}"
    path.write_text(format_rows(task, examples, fmt), encoding="utf-8")
    back, skipped = mdata.read_examples(path, task, require_label=True)
    assert skipped == 0
    got = [(e.id, e.text_a, e.text_b, e.label) for e in back]
    if fmt == "tsv":  # one line per row: tabs and line breaks become spaces
        examples = [mdata.Example(e.id, " ".join(e.text_a.replace("\t", " ").split("\n")),
                                  e.text_b and e.text_b.replace("\t", " "), e.label, e.line)
                    for e in examples]
    assert got == [(e.id, e.text_a, e.text_b, e.label) for e in examples]


def test_pseudo_labels_from_a_tianchi_test_file(tmp_path):
    """Real layout (tests/data, no label column), threshold, id check, nothing kept = no file
    written (and an earlier one kept)."""
    source = REPO / "tests" / "data" / "nli_test.tsv"
    task = TaskConfig(name="nli", pair=True, test=str(source))
    examples, _ = mdata.read_examples(source, task, require_label=False)
    preds = [{"id": e.id, "label": "012"[i % 3], "probs": [0.995, 0.004, 0.001] if i % 2 else
              [0.5, 0.3, 0.2]} for i, e in enumerate(examples)]
    assert input_layout(task, str(source)) == "tsv"
    text, kept, total = confident_rows(task, preds, 0.99)
    assert (kept, total) == (len(examples) // 2, len(examples))
    path = write_pseudo_labels(tmp_path, [(task, text)])["nli"]
    assert path.name == "nli.tsv"
    back, _ = mdata.read_examples(path, task, require_label=True)
    assert [(e.id, e.text_a, e.text_b, e.label) for e in back] == \
        [(e.id, e.text_a, e.text_b, p["label"]) for e, p in zip(examples, preds, strict=True)
         if max(p["probs"]) >= 0.99]
    earlier = path.read_bytes()
    assert confident_rows(task, preds, 0.999) == (None, 0, len(examples))
    assert path.read_bytes() == earlier  # the earlier round's file is the user's: not deleted
    preds[3]["id"] = "someone-else"
    with pytest.raises(DataError, match="out of step"):
        confident_rows(task, preds, 0.5)
