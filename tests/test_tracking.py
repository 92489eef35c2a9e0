"""Tracking for real: wandb offline (no mocks), TensorBoard event files, the JSONL metrics log,
a resumed run continuing the same wandb run, and no wandb import when it is not a backend."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from mtl_dist.config import load_config
from mtl_dist.tracking import (
    Tracking,
    _offline_reason,
    eval_values,
    new_run_id,
    wandb_api_key_configured,
)
from mtl_dist.trainer import Trainer
from tests._runs import DEMO, REPO, env, records

TASKS = ("nli", "emotion", "news")
# Phase 1 logs steps 2, 4, 6 and checkpoints 4 and 6; checkpoint 6 is then deleted, as if the
# job died after logging step 6 but before that checkpoint committed. Phase 2 resumes from 4.
RUN = ["train.max_steps=8", "train.eval_steps=4", "train.log_steps=2", "checkpoint.save_steps=4",
       "checkpoint.save_total_limit=10", "train.early_stopping_patience=null"]


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file: a 7-byte W&B header, then LevelDB-log framing
    (32 KiB blocks; 7-byte chunk headers: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_segments(root: Path, run_id: str) -> list[list]:
    """Every offline-run dir of `run_id` (one per invocation), oldest first, as record lists."""
    dirs = sorted((root / "wandb").glob(f"offline-run-*-{run_id}"))
    return [read_wandb_records(d / f"run-{run_id}.wandb") for d in dirs]


def history(records_: list) -> list[dict[str, object]]:
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records_ if r.WhichOneof("record_type") == "history"]


def of_type(records_: list, kind: str) -> list:
    return [getattr(r, kind) for r in records_ if r.WhichOneof("record_type") == kind]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cache):
    """A demo run with wandb + TensorBoard, stopped and resumed; wandb left to choose its mode
    with no API key anywhere (HOME is empty), so the offline default is what is tested."""
    root = tmp_path_factory.mktemp("tracked")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL", "WANDB_RUN_ID",
                    "WANDB_RESUME", "WANDB_SERVICE"):  # a service of our own, so teardown waits
            mp.delenv(key, raising=False)
        for key, sub in (("HOME", "home"), ("WANDB_DIR", "wb"), ("WANDB_CONFIG_DIR", "wb_config"),
                         ("WANDB_CACHE_DIR", "wb_cache"), ("WANDB_DATA_DIR", "wb_data")):
            (root / sub).mkdir()
            mp.setenv(key, str(root / sub))
        mp.setenv("WANDB_SILENT", "true")
        base = [f"train.output_dir={out}", f"data.cache_dir={cache}", *RUN,
                "tracking.backends=[wandb,tensorboard]", "tracking.tags=[ci,demo]"]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            first = Trainer(load_config(DEMO, [*base, "train.stop_after_steps=6"])).fit()
            shutil.rmtree(out / "checkpoints" / "checkpoint-6")
            second = Trainer(load_config(DEMO, [*base, "train.resume=auto"])).fit()
        # wandb's service may still be writing the last run's file when finish() returns
        # (CI, 2026-12-07: read as a header alone, complete minutes later); teardown waits
        import wandb

        wandb.teardown()
    run_id = json.loads((out / "checkpoints" / "checkpoint-8" / "trainer_state.json")
                        .read_text())["tracker_run_id"]
    return SimpleNamespace(root=root, out=out, first=first, second=second, run_id=run_id,
                           stdout=stdout.getvalue(), wandb=wandb_segments(root / "wb", run_id))


def test_jsonl_log_reads_as_one_continuous_run(tracked):
    out = tracked.out
    assert tracked.first["stop_reason"] == "stop_after_steps"
    assert [r["step"] for r in records(out, "train")] == [2, 4, 6, 8]
    train = records(out, "train")[-1]
    assert {"train/loss", "lr", "samples_per_s", "epoch", "time"} <= set(train)
    assert any(k.startswith("train/loss/") for k in train)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    labels = json.loads((out / "labels.json").read_text())
    for record in evals:
        assert {"eval/score", "eval/loss"} <= set(record)
        for task in TASKS:
            assert {f"eval/{task}/{m}" for m in ("accuracy", "macro_f1", "loss")} <= set(record)
            matrix = record["confusion_matrices"][task]
            assert len(matrix) == len(labels[task]) and all(len(r) == len(matrix) for r in matrix)
            assert sum(map(sum, matrix)) == 200  # every dev row counted once
    summaries = records(out, "summary")
    assert [s["step"] for s in summaries] == [8]  # phase 1's summary (step 6) was truncated
    best = json.loads((out / "best" / "best.json").read_text())
    assert summaries[-1]["best_step"] == best["step"] in (4, 8)
    assert summaries[-1]["best_score"] == pytest.approx(best["score"])


def test_wandb_is_offline_without_an_api_key_and_says_how_to_sync(tracked):
    assert "no wandb API key configured" in tracked.stdout
    sync = f"wandb sync {tracked.root / 'wb' / 'wandb'}/offline-run-*-{tracked.run_id}"
    assert sync in tracked.stdout
    assert len(tracked.wandb) == 2  # one offline-run dir per invocation, both of this run


def test_resumed_run_continues_the_same_wandb_run(tracked):
    for ckpt in ("checkpoint-4", "checkpoint-8"):
        state = json.loads((tracked.out / "checkpoints" / ckpt / "trainer_state.json").read_text())
        assert state["tracker_run_id"] == tracked.run_id
    runs = [of_type(segment, "run")[0] for segment in tracked.wandb]
    assert [r.run_id for r in runs] == [tracked.run_id] * 2
    first, second = (sorted({h["global_step"] for h in history(s)}) for s in tracked.wandb)
    assert first == [2, 4, 6] and second == [6, 8]  # the continuation starts after step 4


def test_wandb_run_holds_metric_names_config_confusion_matrices_and_best(tracked):
    run = of_type(tracked.wandb[0], "run")[0]
    assert run.display_name == run.run_group == "out"  # run name = output dir; group = name
    assert list(run.tags) == ["ci", "demo"]
    assert run.project == "mtl_dist"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}  # the resolved config
    assert config["train"]["max_steps"] == 8 and [t["name"] for t in config["tasks"]] == list(TASKS)
    panels = [json.loads(i.value_json) for c in of_type(tracked.wandb[0], "config") for i in c.update]
    assert {p["panel_config"]["panelDefId"] for p in panels} == {"wandb/confusion_matrix/v1"}
    keys = set().union(*(h.keys() for s in tracked.wandb for h in history(s)))
    expected = {"global_step", "train/loss", "lr", "samples_per_s", "epoch", "eval/score",
                "eval/loss"} | {f"eval/{t}/{m}" for t in TASKS for m in ("accuracy", "macro_f1", "loss")}
    assert expected <= keys, expected - keys
    assert any(k.startswith("train/loss/") for k in keys)
    for task in TASKS:  # wandb's own confusion-matrix chart: a table logged per evaluation
        assert f"eval/{task}/confusion_matrix_table/_type" in keys
    tables = list((tracked.root / "wb" / "wandb").glob("offline-run-*/files/media/table/eval/*/*.json"))
    assert {p.parent.name for p in tables} == set(TASKS)
    summary = {}
    for s in of_type(tracked.wandb[1], "summary"):
        summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in s.update})
    final = records(tracked.out, "summary")[-1]
    assert summary["best/step"] == final["best_step"]
    assert summary["best/score"] == pytest.approx(final["best_score"])
    assert summary["stop_reason"] == "finished"


def test_tensorboard_has_the_jsonl_scalars_and_hides_the_dead_tail(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tracked.out / "tensorboard" / "mtl_dist"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per invocation
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    jsonl = records(tracked.out, "train") + records(tracked.out, "eval")
    names = {k for r in jsonl for k, v in r.items()
             if k not in ("step", "time") and isinstance(v, (int, float))}
    assert set(acc.Tags()["scalars"]) == names
    # Step 6 of the dead phase-1 tail was purged: each step once, phase 2's value wins.
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [2, 4, 6, 8]
    assert [v for _, v in loss] == pytest.approx([r["train/loss"] for r in records(tracked.out, "train")],
                                                 rel=1e-6)
    assert {f"eval/{t}/confusion_matrix" for t in TASKS} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Scalars("eval/score")] == [4, 8]


def test_no_wandb_import_when_wandb_is_not_a_backend(tmp_path, cache):
    script = textwrap.dedent(f"""
        import json, sys
        from mtl_dist.config import load_config
        from mtl_dist.trainer import Trainer
        cfg = load_config({str(DEMO)!r}, ["train.output_dir={tmp_path / 'out'}",
            "data.cache_dir={cache}", "train.max_steps=2", "train.eval_steps=2",
            "train.log_steps=1", "tracking.backends=[tensorboard]"])
        Trainer(cfg).fit()
        print(json.dumps({{"wandb": sorted(m for m in sys.modules if m.split(".")[0] == "wandb")}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"wandb": []}
    assert list((tmp_path / "out" / "tensorboard" / "mtl_dist").glob("events.out.tfevents.*"))
    assert not (tmp_path / "out" / "wandb").exists()


# ------------------------------------------------------------------------------- unit level


def test_api_key_detection_env_netrc_and_base_url(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert not wandb_api_key_configured({}, home=home)
    assert wandb_api_key_configured({"WANDB_API_KEY": "x" * 40}, home=home)
    (home / ".netrc").write_text("machine example.org\n  login user\n  password secret\n")
    assert not wandb_api_key_configured({}, home=home)
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_api_key_configured({}, home=home)
    assert not wandb_api_key_configured({"WANDB_BASE_URL": "https://wandb.corp.local"}, home=home)
    other = tmp_path / "netrc"
    other.write_text("machine wandb.corp.local login user password " + "k" * 40 + "\n")
    assert wandb_api_key_configured({"WANDB_BASE_URL": "https://wandb.corp.local",
                                     "NETRC": str(other)}, home=home)
    (home / ".netrc").write_text("machine api.wandb.ai login\n")  # broken: not a key
    assert not wandb_api_key_configured({}, home=home)


def test_a_key_for_the_installed_wandbs_default_host_counts(tmp_path, monkeypatch):
    """wandb 0.31's `wandb login` writes its key for api.forge.coreweave.com (its default
    base URL): a logged-in user was forced offline, told no key was configured."""
    pytest.importorskip("wandb")
    from urllib.parse import urlparse

    from wandb.sdk.lib.urls import DEFAULT_BASE_URL

    (tmp_path / ".netrc").write_text(f"machine {urlparse(DEFAULT_BASE_URL).hostname} login user "
                                     "password " + "k" * 40 + "\n")
    assert wandb_api_key_configured({}, home=tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    assert _offline_reason({}) is None  # not forced offline


def test_offline_only_when_no_key_and_no_explicit_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    assert "no wandb API key" in _offline_reason({})
    assert _offline_reason({"WANDB_MODE": "online"}) is None
    assert _offline_reason({"WANDB_API_KEY": "k" * 40}) is None
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 8 and i.isalnum() and i.islower() for i in ids)


def test_without_backends_start_keeps_the_id_and_records_only_while_started(tmp_path):
    from accelerate import Accelerator

    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}"])
    tracking = Tracking(cfg, Accelerator(cpu=True), tmp_path)
    tracking.log("train", 1, {"train/loss": 1.0})  # not started: e.g. a standalone evaluate
    assert not (tmp_path / "metrics.jsonl").exists()
    assert tracking.start("abc12345") == "abc12345" and tracking.start(None) is None
    result = {"score": 0.5, "loss": 1.0, "tasks": {"nli": {
        "accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0, "confusion_matrix": [[1, 1], [0, 2]]}}}
    tracking.log_eval(3, result, {"nli": ["a", "b"]})
    tracking.finish({"global_step": 3, "best_score": 0.5, "best_step": 3})
    tracking.log("train", 4, {"train/loss": 1.0})  # finished: ignored
    kinds = [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())]
    assert kinds == [("eval", 3), ("summary", 3)]
    assert eval_values(result) == {"eval/score": 0.5, "eval/loss": 1.0, "eval/nli/accuracy": 0.5,
                                   "eval/nli/macro_f1": 0.4, "eval/nli/loss": 1.0}


def test_a_line_that_is_not_a_record_is_skipped_with_a_warning(tmp_path):
    """A hand-edited metrics log (a record without its step, a bare value) warns and is read
    on: `report` and a resume's truncation must not stop on it."""
    from mtl_dist.tracking import read_metrics

    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "train", "loss": 2.0}\n3\n'
        '{"kind": "eval", "step": 1, "eval/score": 0.5}\n')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: skipping a line that is not a record"):
        records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("eval", 1)]


def test_a_tracker_failing_mid_run_is_dropped_and_training_goes_on(tmp_path, cache, monkeypatch):
    """wandb's service killed mid-run: its log() raised, and the run died with no checkpoint
    at the stop (the console showed only the tracker's own teardown failing). The failing
    tracker is dropped with one warning; training, checkpoints and metrics.jsonl go on."""
    from accelerate.tracking import TensorBoardTracker

    real_log, calls = TensorBoardTracker.log, []

    def dies_at_the_third_call(self, values, step=None, **kwargs):
        calls.append(step)
        if len(calls) >= 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_log(self, values, step=step, **kwargs)

    monkeypatch.setattr(TensorBoardTracker, "log", dies_at_the_third_call)
    out = tmp_path / "out"
    cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *RUN,
                             "tracking.backends=[tensorboard]"])
    trainer = Trainer(cfg)
    with pytest.warns(UserWarning, match=r"tracking: tensorboard failed at step \d+ "
                      r"\(ConnectionResetError: \[Errno 104\] Connection reset by peer\); not "
                      r"logging to it for the rest of this run \(.*metrics.jsonl keeps every "
                      r"record\)") as caught:
        summary = trainer.fit()
    trainer.close()
    assert summary["global_step"] == 8 and len(calls) == 3  # dropped: never called again
    assert len([w for w in caught if "tracking: tensorboard" in str(w.message)]) == 1
    assert (out / "checkpoints" / "checkpoint-8" / "COMMITTED").exists()
    assert [r["step"] for r in records(out, "train")] == [2, 4, 6, 8]


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, cache):
    """OUTPUT/tensorboard a file (or wandb without network): a chained traceback whose last
    line was accelerate's AttributeError ('no attribute writer') from the half-started
    tracker's finish, not the cause."""
    from mtl_dist.errors import MtlDistError

    out = tmp_path / "out"
    out.mkdir()
    (out / "tensorboard").write_text("not a directory")
    cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *RUN,
                             "tracking.backends=[tensorboard]"])
    trainer = Trainer(cfg)
    with pytest.raises(MtlDistError, match=r"^tracking.backends=\['tensorboard'\]: could not "
                       r"start: (NotADirectoryError|FileExistsError): ") as err:
        trainer.fit()
    assert "\n" not in str(err.value)
    trainer.close()  # what `mtl-dist train` does next: it raised AttributeError here
    assert not (out / "checkpoints").exists()


def test_a_metrics_log_saved_with_a_utf8_bom_keeps_its_first_record(tmp_path, recwarn):
    """An editor's "UTF-8 with BOM" save: line 1's record was skipped as a torn write, and a
    resume's rewrite of the log then dropped it for good."""
    from mtl_dist.tracking import read_metrics

    lines = [{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "train", "step": 2, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines),
                                            encoding="utf-8-sig")
    assert read_metrics(tmp_path) == lines and not recwarn.list
