"""The CLI against user mistakes: a checkpoint of another run, a split without a file or
without labels, an output path that is a file, a wrong `ckpt ls` path. Each is one line
(exit 2) and leaves earlier outputs as they were."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mtl_dist.cli import main
from mtl_dist.config import load_config
from mtl_dist.trainer import Trainer
from tests._runs import DEMO, FAST


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 8-step demo run (checkpoint-8 and best/) and the overrides that name it."""
    root = tmp_path_factory.mktemp("cli")
    overrides = [f"train.output_dir={root / 'out'}", f"data.cache_dir={root / 'cache'}", *FAST,
                 "train.max_steps=8"]
    Trainer(load_config(DEMO, overrides)).fit()
    return root, overrides


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_checkpoint_trained_with_other_labels_is_refused(run, capsys, tmp_path):
    root, overrides = run
    labels = json.loads((root / "out" / "labels.json").read_text())["nli"]
    reordered = f"tasks.0.labels=[{','.join(reversed(labels))}]"
    for checkpoint in (root / "out" / "best", root / "out" / "checkpoints" / "checkpoint-8"):
        code, _, err = cli(capsys, "evaluate", DEMO, *overrides, f"train.output_dir={tmp_path}",
                           reordered, "--checkpoint", checkpoint)
        assert code == 2
        assert f"tasks[0].labels: {list(reversed(labels))} differ from the labels frozen in " \
            f"checkpoint {checkpoint}: {labels}; use the labels it was trained with\n" in err


def test_the_same_tasks_in_another_order_are_refused_not_scored_with_swapped_heads(
        run, capsys, tmp_path):
    """The heads are stored by position: emotion and news listed the other way round would
    load (both would fit when their label counts agree) and score each with the other's head."""
    root, overrides = run
    swapped = ("tasks=[{name: nli, pair: true, train: 'demo:nli/train', dev: 'demo:nli/dev'}, "
               "{name: news, train: 'demo:news/train', dev: 'demo:news/dev'}, "
               "{name: emotion, train: 'demo:emotion/train', dev: 'demo:emotion/dev'}]")
    for output_dir in (root / "out", tmp_path):  # with its labels.json, and a fresh dir
        for checkpoint in (root / "out" / "best", root / "out" / "checkpoints" / "checkpoint-8"):
            code, _, err = cli(capsys, "evaluate", DEMO, *overrides,
                               f"train.output_dir={output_dir}", swapped, "--checkpoint",
                               checkpoint)
            assert code == 2, err
            assert err.strip() == (
                f"error: checkpoint {checkpoint}: its heads are for the tasks in the order "
                '["nli", "emotion", "news"], this run lists them as ["nli", "news", "emotion"]: '
                "list the tasks in the checkpoint's order")


def test_a_checkpoint_of_another_shape_is_one_line(run, capsys, tmp_path):
    root, overrides = run
    code, _, err = cli(capsys, "evaluate", DEMO, *overrides, f"train.output_dir={tmp_path}",
                       "model.arch.num_hidden_layers=3", "--checkpoint", root / "out" / "best")
    assert code == 2
    assert "does not fit the model: missing key 'encoder.encoder.layer.2." in err


def test_predict_keeps_each_splits_file_and_skips_tasks_without_one(run, capsys):
    root, overrides = run
    preds = root / "out" / "predictions"
    assert cli(capsys, "predict", DEMO, *overrides, "--checkpoint", root / "out" / "best")[0] == 0
    test_files = {p.name: p.read_bytes() for p in preds.iterdir()}
    assert sorted(test_files) == ["emotion.jsonl", "news.jsonl", "nli.jsonl"]
    code, out, _ = cli(capsys, "predict", DEMO, *overrides, "tasks.1.dev=null",
                       "--checkpoint", root / "out" / "best", "--split", "dev")
    assert code == 0 and "emotion: no dev file configured; skipped" in out
    assert sorted(p.name for p in preds.iterdir()) == \
        ["emotion.jsonl", "news.dev.jsonl", "news.jsonl", "nli.dev.jsonl", "nli.jsonl"]
    assert len((preds / "nli.dev.jsonl").read_text().splitlines()) == 200
    code, _, err = cli(capsys, "predict", DEMO, *overrides, *(f"tasks.{i}.test=null" for i in
                                                             range(3)),
                       "--checkpoint", root / "out" / "best")
    assert code == 2 and "predict --split test: no task has a test file" in err
    assert {p.name: p.read_bytes() for p in preds.iterdir() if ".dev." not in p.name} == \
        test_files


def test_predict_to_a_file_is_one_line(run, capsys, tmp_path):
    root, overrides = run
    (tmp_path / "file").write_text("mine")
    code, _, err = cli(capsys, "predict", DEMO, *overrides, "--checkpoint", root / "out" / "best",
                       "--output", tmp_path / "file")
    assert code == 2 and "exists and is not a directory" in err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("command", ["predict", "pseudo-label"])
@pytest.mark.parametrize("where", [".", "checkpoints", "best"])
def test_predictions_into_the_runs_own_folders_are_refused(run, capsys, command, where):
    """`predict --output OUTPUT` with a task named `metrics` replaced metrics.jsonl (`report`
    then failed on 400 lines); the run's folders are not a place for predictions."""
    root, overrides = run
    out = root / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, command, DEMO, *overrides, "--checkpoint", out / "best",
                       "--output", out / where)
    assert code == 2 and f"{command} --output {out / where}: is the run's output dir" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_evaluate_refuses_a_split_without_labels(run, capsys, tmp_path):
    root, overrides = run
    unlabelled = tmp_path / "emotion_test.jsonl"
    unlabelled.write_text("".join(json.dumps({"id": f"u{i}", "text": f"some text {i}"}) + "\n"
                                  for i in range(5)))
    no_tests = [f"tasks.{i}.test=null" for i in (0, 2)]
    code, _, err = cli(capsys, "evaluate", DEMO, *overrides, *no_tests,
                       f"tasks.1.test={unlabelled}", "--checkpoint", root / "out" / "best",
                       "--split", "test")
    assert code == 2 and "evaluate --split test: no task has a labelled test file" in err
    half = tmp_path / "half.jsonl"
    half.write_text(unlabelled.read_text() + json.dumps(
        {"id": "l", "text": "labelled", "label": json.loads(
            (root / "out" / "labels.json").read_text())["emotion"][0]}) + "\n")
    code, _, err = cli(capsys, "evaluate", DEMO, *overrides, *no_tests, f"tasks.1.test={half}",
                       "--checkpoint", root / "out" / "best", "--split", "test")
    assert code == 2 and "5 of 6 rows of task 'emotion' have no label" in err
    # one task labelled, one not, one without a file: scored, and the line says over which
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(half.read_text().splitlines()[-1] + "\n")
    code, out, err = cli(capsys, "evaluate", DEMO, *overrides, "tasks.0.test=null",
                         f"tasks.1.test={labelled}", f"tasks.2.test={unlabelled}",
                         "tasks.2.format=jsonl", "--checkpoint", root / "out" / "best",
                         "--split", "test")
    assert code == 0 and list(json.loads(out[out.index("{"):])["tasks"]) == ["emotion"]
    assert "evaluate --split test: nli, news: no labelled test file; the score covers " \
        "emotion only" in err


def test_ckpt_ls_of_a_wrong_path_fails_and_of_checkpoints_lists_its_run(run, capsys, tmp_path):
    root, _ = run
    code, _, err = cli(capsys, "ckpt", "ls", tmp_path / "typo")
    assert code == 2 and "is not a directory" in err
    code, out, _ = cli(capsys, "ckpt", "ls", root / "out" / "checkpoints")
    assert code == 0 and "checkpoint-8" in out and "[best]" in out
    for one in ("best", "checkpoints/checkpoint-8"):  # "no checkpoints under .../best" was said
        assert cli(capsys, "ckpt", "ls", root / "out" / one)[1] == out


def test_pseudo_label_never_writes_over_a_data_file_of_the_run(run, capsys, tmp_path):
    root, overrides = run
    own = tmp_path / "emotion.tsv"  # where the emotion pseudo-labels would go (TSV layout)
    own.write_text("e1\tsome text\tanger\n")
    code, _, err = cli(capsys, "pseudo-label", DEMO, *overrides, f"tasks.1.extra_train=[{own}]",
                       "--checkpoint", root / "out" / "best", "--output", tmp_path)
    assert code == 2 and f"{own} is tasks.1.train/extra_train; writing there would replace" in err
    assert own.read_text() == "e1\tsome text\tanger\n"


def test_pseudo_label_mistakes_are_one_line_and_an_empty_round_keeps_earlier_files(
        run, capsys, tmp_path):
    root, overrides = run
    best = root / "out" / "best"
    code, _, err = cli(capsys, "pseudo-label", DEMO, *overrides,
                       *(f"tasks.{i}.test=null" for i in range(3)), "--checkpoint", best)
    assert code == 2 and "pseudo-label: no task has a test file" in err
    (tmp_path / "file").write_text("mine")
    code, _, err = cli(capsys, "pseudo-label", DEMO, *overrides, "--checkpoint", best,
                       "--output", tmp_path / "file")
    assert code == 2 and "exists and is not a directory" in err
    out = tmp_path / "pl"
    assert cli(capsys, "pseudo-label", DEMO, *overrides, "--checkpoint", best, "--output", out,
               "--threshold", "1e-9")[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == [".mtl_dist_pseudo_labels", "emotion.tsv", "news.tsv", "nli.tsv"]
    # a second round into the same folder: refused before predicting (a run trained on the
    # first round's files could no longer resume), unless --overwrite
    code, _, err = cli(capsys, "pseudo-label", DEMO, *overrides, "--checkpoint", best,
                       "--output", out, "--threshold", "0.5")
    assert code == 2 and err == (
        f"error: pseudo-label: {out / 'nli.tsv'}, {out / 'emotion.tsv'}, {out / 'news.tsv'} "
        "hold(s) an earlier round's pseudo-labels, which a run may train on (replaced, that run "
        "could no longer resume): give --output a new folder, or --overwrite\n"), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    code, printed, _ = cli(capsys, "pseudo-label", DEMO, *overrides, "--checkpoint", best,
                           "--output", out, "--threshold", "1.0", "--overwrite")
    assert code == 0 and f"(no file written; the earlier {out / 'nli.tsv'} is left as it was)" \
        in printed
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


@pytest.mark.parametrize(("extra", "message"), [
    ([], r"already holds a run \(checkpoint-8, best/\): resume it with train.resume=auto"),
    # named by the override (or file line) that set it, as a config error is
    (["train.resume=/nonexistent/checkpoint-3"],
     r"^error: override 'train.resume=/nonexistent/checkpoint-3': train.resume: checkpoint "
     r"/nonexistent/checkpoint-3: no such directory$"),
    (["train.resume=auto", "model.arch.model_type=robertaa"],
     r"'model.arch.model_type': 'robertaa' is not a model type transformers knows"),
    (["train.resume=auto", "train.device=cuda"], r"train.device: 'cuda' requested but no CUDA GPU is visible"),
    # the model's own refusal, found by building it on the meta device (no memory, no weights)
    (["train.resume=auto", "model.arch.model_type=mpnet"],
     r"'model.arch.model_type': 'mpnet' pads with token id 1, the tokenizer with 0"),
])
def test_check_refuses_what_the_runs_start_would(run, capsys, extra, message):
    """`check` (what launch/train.sh runs before launching) said "config OK" for these, and
    then every rank failed on its own, with the launcher's traceback after."""
    import torch

    if "train.device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    _root, overrides = run
    before = {p: p.stat().st_mtime_ns for p in (_root / "out").rglob("*")}
    code, _out, err = cli(capsys, "check", DEMO, *overrides, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert {p: p.stat().st_mtime_ns for p in (_root / "out").rglob("*")} == before


@pytest.mark.parametrize("where", ["checkpoints", "."])
def test_a_folder_of_checkpoints_given_as_one_names_which_to_give(run, capsys, where):
    """`--checkpoint OUTPUT/checkpoints` was called an incomplete checkpoint."""
    root, overrides = run
    code, _, err = cli(capsys, "evaluate", DEMO, *overrides, "--checkpoint", root / "out" / where)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a folder of checkpoints, not one: name one, e.g. " \
        f"{root / 'out' / 'checkpoints' / 'checkpoint-8'} (the newest), or " \
        f"{root / 'out' / 'best'}" in err


def test_an_unknown_option_is_named_alone(capsys):
    """One bad option made argparse call the valid overrides after it unrecognized too."""
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(DEMO), "--bogus", "train.lr=1e-3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "mtl-dist: error: unrecognized arguments: --bogus"


def test_check_refuses_an_output_dir_a_run_is_using(run, capsys):
    """launch/train.sh runs `check` first: a run going on in OUTPUT is one line before any
    launch, not a refusal on every rank after the model build."""
    from mtl_dist.checkpoint import CheckpointManager

    root, overrides = run
    holder = CheckpointManager(root / "out", save_total_limit=None, recover_best=False)
    holder.hold_output_dir()
    try:
        code, _, err = cli(capsys, "check", DEMO, *overrides, "train.resume=auto")
    finally:
        holder.let_go_of_output_dir()
    assert code == 2 and "is in use by another run (it holds the directory's lock)" in err
    assert cli(capsys, "check", DEMO, *overrides, "train.resume=auto")[0] == 0


def test_an_error_found_after_loading_names_the_keys_line_or_override(capsys, tmp_path):
    """Errors found once the config had loaded (an output dir that is a file, a DeepSpeed
    JSON at odds with the run, cuda asked for on CPU) named the key but not where it was set,
    unlike every load-time error."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "ds.json").write_text('{"gradient_accumulation_steps": 4}')
    text = DEMO.read_text().replace("output_dir: runs/demo", f"output_dir: {tmp_path / 'afile'}")
    text = text.replace("train:\n", f"train:\n  deepspeed_config: {tmp_path / 'ds.json'}\n", 1)
    config = tmp_path / "run.yaml"
    config.write_text(text)
    line_of = {key: 1 + next(i for i, row in enumerate(text.splitlines())
                             if row.strip().startswith(f"{key}:"))
               for key in ("output_dir", "deepspeed_config")}
    code, _, err = cli(capsys, "check", config)
    assert code == 2 and err.strip() == (
        f"error: {config}:{line_of['output_dir']}: config key 'train.output_dir': "
        f"{tmp_path / 'afile'} exists and is not a directory")
    out = f"train.output_dir={tmp_path / 'out'}"
    code, _, err = cli(capsys, "check", config, out, "train.zero_stage=2")
    assert code == 2 and err.strip() == (
        f"error: {config}:{line_of['deepspeed_config']}: train.deepspeed_config: "
        "'gradient_accumulation_steps' is 4 but the run config implies 1; set it to \"auto\"")
    code, _, err = cli(capsys, "check", config, out, "train.zero_stage=2",
                       f"train.deepspeed_config={tmp_path / 'ds.json'}")
    assert code == 2 and err.strip().startswith(
        f"error: override 'train.deepspeed_config={tmp_path / 'ds.json'}': "
        "train.deepspeed_config: 'gradient_accumulation_steps' is 4")
    # a load-time error keeps its one place
    code, _, err = cli(capsys, "check", config, "train.lr=abc")
    assert code == 2 and err.strip() == \
        "error: override 'train.lr=abc': config key 'train.lr': expected float, got 'abc'"


def test_where_set_names_only_config_keys_and_the_launcher(tmp_path, monkeypatch):
    """A message led by a file name ('bad.yaml: ...') was taken for a key; tasks named by name
    pointed nowhere; a DeepSpeed JSON given to `accelerate launch` was blamed on the YAML."""
    from mtl_dist import zero
    from mtl_dist.config import where_set
    from mtl_dist.errors import ConfigError

    config = tmp_path / "run.yaml"
    text = DEMO.read_text()
    config.write_text(text)
    cfg = load_config(config, [f"train.output_dir={tmp_path / 'o'}"])
    tasks_line = 1 + text.splitlines().index("tasks:")
    nli_line = 1 + next(i for i, row in enumerate(text.splitlines()) if "name: nli" in row)
    assert where_set(ConfigError("bad.yaml: x"), cfg) == "bad.yaml: x"
    assert where_set(ConfigError("tasks.nli.format: x"), cfg) == f"{config}:{nli_line}: tasks.nli.format: x"
    assert where_set(ConfigError("tasks.nope.format: x"), cfg) == f"{config}:{tasks_line}: tasks.nope.format: x"
    assert where_set(ConfigError("model.pretrained (/m): model type 'gpt2': x"), cfg).startswith(
        f"{config}:")
    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_accumulation_steps": 4}')
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    zero.adopt_accelerate_launch(cfg)
    with pytest.raises(ConfigError) as error:
        zero.build_ds_config(cfg, world_size=2)
    assert where_set(error.value, cfg).startswith(
        f"accelerate launch --deepspeed_config_file {ds}: train.deepspeed_config: "
        "'gradient_accumulation_steps' is 4")


def test_a_mapping_override_is_named_only_for_the_keys_it_sets(capsys, tmp_path):
    """`train={seed: 1}` merges one key in: an output dir from the file was blamed on it."""
    (tmp_path / "afile").write_text("")
    text = DEMO.read_text().replace("output_dir: runs/demo", f"output_dir: {tmp_path / 'afile'}")
    config = tmp_path / "run.yaml"
    config.write_text(text)
    line = 1 + next(i for i, row in enumerate(text.splitlines()) if "output_dir:" in row)
    code, _, err = cli(capsys, "check", config, "train={seed: 1}")
    assert code == 2 and err.startswith(f"error: {config}:{line}: config key 'train.output_dir'")
    code, _, err = cli(capsys, "check", config, "train.lr=1e-4",
                       f"train={{output_dir: {tmp_path / 'afile'}}}")
    assert code == 2 and err.startswith(
        f"error: override 'train={{output_dir: {tmp_path / 'afile'}}}': config key 'train.output_dir'")
    code, _, err = cli(capsys, "check", config, "train={lr: abc}")
    assert code == 2 and err.strip() == \
        "error: override 'train={lr: abc}': config key 'train.lr': expected float, got 'abc'"


def test_predict_never_writes_over_a_data_file_or_under_a_file(run, capsys, tmp_path):
    """`predict --split dev --output <data dir>` replaced `<task>.dev.jsonl` with predictions
    (the next resume then failed on it); an --output below a file was a traceback after all
    the predicting."""
    root, overrides = run
    dev = tmp_path / "emotion.dev.jsonl"  # a common layout: <task>.<split>.jsonl
    dev.write_text('{"id": 1, "text": "some text", "label": "anger"}\n')
    code, _, err = cli(capsys, "predict", DEMO, *overrides, f"tasks.1.dev={dev}", "--split", "dev",
                       "--checkpoint", root / "out" / "best", "--output", tmp_path)
    assert code == 2 and f"{dev} is tasks.1.dev; writing there would replace it" in err, err
    assert dev.read_text() == '{"id": 1, "text": "some text", "label": "anger"}\n'
    (tmp_path / "afile").write_text("")
    for command in ("predict", "pseudo-label"):
        code, _, err = cli(capsys, command, DEMO, *overrides, "--checkpoint", root / "out" / "best",
                           "--output", tmp_path / "afile" / "sub")
        assert code == 2 and err.strip() == f"error: {command} --output {tmp_path / 'afile' / 'sub'}" \
            f": cannot be created: {tmp_path / 'afile'} is a file"
    for args in (["ckpt", "export", root / "out" / "best"], ["ckpt", "convert", root / "out" / "best"],
                 ["demo", "--output"]):
        code, _, err = cli(capsys, *args, tmp_path / "afile" / "sub")
        assert code == 2 and err.strip().endswith(
            f"{tmp_path / 'afile' / 'sub'}: cannot be created: {tmp_path / 'afile'} is a file"), err
    # a folder that cannot be written in (/proc/1: not even by root): refused before any work,
    # as `train` itself would fail at its first write (`check` passed it)
    unwritable = Path("/proc/1")
    if unwritable.is_dir() and not os.access(unwritable, os.W_OK):
        for args in (["predict", DEMO, *overrides, "--checkpoint", root / "out" / "best", "--output"],
                     ["ckpt", "export", root / "out" / "best"], ["demo", "--output"]):
            code, _, err = cli(capsys, *args, unwritable / "sub")
            assert code == 2 and err.strip().endswith(
                f"{unwritable / 'sub'}: cannot be created: {unwritable} is not writable "
                "(permissions or a read-only mount)"), err
        code, _, err = cli(capsys, "check", DEMO, *overrides, f"train.output_dir={unwritable}")
        assert code == 2 and err.strip().endswith(
            f"config key 'train.output_dir': {unwritable} is not writable (permissions or a "
            "read-only mount)"), err


def test_predictions_go_beside_the_checkpoints_run_not_the_configs(run, capsys, tmp_path):
    """`predict CONFIG --checkpoint runB/best` wrote into the config's run (another one),
    replacing its predictions; a refusal suggested predictions/ for pseudo-labels."""
    import shutil

    root, overrides = run
    other = tmp_path / "other"
    shutil.copytree(root / "out", other)
    before = {p: p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()}
    code, out, _ = cli(capsys, "predict", DEMO, *overrides, "--checkpoint", other / "best")
    assert code == 0 and f"to {other / 'predictions' / 'nli.jsonl'}" in out
    assert {p: p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()} == before
    code, _, err = cli(capsys, "pseudo-label", DEMO, *overrides, "--checkpoint", other / "best",
                       "--output", other / "best")
    assert code == 2 and f"e.g. {other / 'pseudo_labels'} (the default)" in err, err
    code, out, _ = cli(capsys, "pseudo-label", DEMO, *overrides, "--checkpoint", other / "best",
                       "--threshold", "0.1")
    assert code == 0 and f"-> {other / 'pseudo_labels'}" in out, out


def test_check_refuses_best_as_the_checkpoint_to_resume(run, capsys, tmp_path):
    """`check` said "config OK" for `train.resume=OUTPUT/best`; every rank then refused it."""
    root, overrides = run
    code, _, err = cli(capsys, "check", DEMO, *overrides, f"train.output_dir={tmp_path / 'new'}",
                       f"train.resume={root / 'out' / 'best'}")
    assert code == 2 and err.strip() == (  # named by the override that set it
        f"error: override 'train.resume={root / 'out' / 'best'}': checkpoint "
        f"{root / 'out' / 'best'}: is a 'best' checkpoint, not a training checkpoint")


@pytest.mark.parametrize(("extra", "message"), [
    (["train.lr=2e-3"], "manifest key 'optimizer_settings.lr' differs: checkpoint has 0.001, "
                        "this run has 0.002"),
    (["data.max_length=32"], "manifest key 'max_length' differs: checkpoint has 64, this run has 32"),
    (["train.gradient_accumulation_steps=2"], "manifest key 'gradient_accumulation_steps' differs"),
    (["train.metric_for_best=loss"], "manifest key 'metric_for_best' differs"),
    (["model.head=cls"], "manifest key 'model_shape.head' differs: checkpoint has \"attention\", "
                         "this run has \"cls\" (the checkpoint's weights are of another model"),
    # the model's size: `check` builds it on the meta device, so all of its shape is compared
    (["model.arch.hidden_size=32", "model.arch.intermediate_size=64"],
     "manifest key 'model_shape.hidden_size' differs: checkpoint has 64, this run has 32"),
])
def test_check_refuses_settings_the_resume_would_refuse(run, capsys, extra, message):
    """`check` said "config OK" to a resume with a changed lr (or max_length, accumulation,
    ...); launch/train.sh then printed the refusal once per rank and the launcher's traceback."""
    root, overrides = run
    before = {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*")}
    code, _, err = cli(capsys, "check", DEMO, *overrides, "train.resume=auto", *extra)
    ckpt = root / "out" / "checkpoints" / "checkpoint-8"
    assert code == 2 and err.startswith(f"error: checkpoint {ckpt}: {message}"), err
    assert {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*")} == before
    assert cli(capsys, "check", DEMO, *overrides, "train.resume=auto")[0] == 0


def test_our_warnings_print_as_one_line(tmp_path):
    """mtl_dist's warnings came out in Python's format: the file:line of our code, the
    category, then a line of our source code. A user gets `warning: ...`, like an error."""
    import subprocess
    import sys

    from tests._runs import REPO, env

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "train/loss": 1.0}\n'
                                           '{"kind": "tra')  # a write cut short by a kill
    done = subprocess.run([sys.executable, "-m", "mtl_dist.cli", "report", str(run_dir)],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if "metrics.jsonl:2" in line]
    assert ours == [f"warning: {run_dir}/metrics.jsonl:2: skipping an unreadable line "
                    "(a write cut short?)"], done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_a_resume_with_another_head_kind_names_the_head(run, capsys):
    """A model.head change was refused as 'model_shape.num_parameters' differs (or, for two
    heads of one size, not before the state dict failed to load)."""
    root, overrides = run
    code, _, err = cli(capsys, "train", DEMO, *overrides, "train.resume=auto", "train.max_steps=9",
                       "model.head=cls")
    ckpt = root / "out" / "checkpoints" / "checkpoint-8"
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: checkpoint {ckpt}: manifest key 'model_shape.head' differs: checkpoint has "
        '"attention", this run has "cls" (the checkpoint\'s weights are of another model: '
        "resume with its model settings (model.*), or start a new run)"), err


def test_check_refuses_an_output_dir_holding_the_config_file_or_a_cache_dir_file(tmp_path,
                                                                                 capsys):
    """`train.output_dir: .` beside a hand-written config.yaml: the run replaced it with its
    resolved config. A run's own saved config.yaml (given back to resume) is fine. A
    data.cache_dir that is a file ran on with a warning per task and split, uncached."""
    config = tmp_path / "config.yaml"
    config.write_text(DEMO.read_text())
    code, _, err = cli(capsys, "check", config, f"train.output_dir={tmp_path}")
    assert code == 2 and err.strip() == (
        f"error: override 'train.output_dir={tmp_path}': config key 'train.output_dir': "
        f"{tmp_path} holds the config file itself ({config}), which the run's resolved "
        "config.yaml would replace: pick another train.output_dir (or rename the config)")
    assert config.read_text() == DEMO.read_text()
    # ...also a hand-written config.yaml that is not the one given (an unused output dir)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("# mine\n")
    code, _, err = cli(capsys, "check", config, f"train.output_dir={other}")
    assert code == 2 and err.strip() == (
        f"error: override 'train.output_dir={other}': config key 'train.output_dir': {other} "
        f"holds a config.yaml that no run saved ({other / 'config.yaml'}), which the run's "
        "resolved config.yaml would replace: pick another train.output_dir (or move that file)")
    assert (other / "config.yaml").read_text() == "# mine\n"
    from mtl_dist.config import saved_config_yaml

    config.write_text(saved_config_yaml(load_config(DEMO, [f"train.output_dir={tmp_path}"])))
    assert cli(capsys, "check", config)[0] == 0  # a run's own config.yaml
    # ...also one saved before the header (or with it edited away), beside the run's files
    config.write_text(config.read_text().split("\n", 2)[2])
    (tmp_path / "metrics.jsonl").write_text("")
    assert cli(capsys, "check", config)[0] == 0, capsys.readouterr().err
    code, _, err = cli(capsys, "check", DEMO, f"train.output_dir={tmp_path / 'o'}",
                       f"data.cache_dir={config}")
    assert code == 2 and err.strip() == (
        f"error: override 'data.cache_dir={config}': config key 'data.cache_dir': {config} "
        "exists and is not a directory")

    # ...also the default one (from $MTL_DIST_CACHE_DIR), or one below a file
    import os

    for env_dir, why in ((config, "exists and is not a directory"),
                         (config / "sub", f"cannot be created: {config} is a file")):
        os.environ["MTL_DIST_CACHE_DIR"] = str(env_dir)
        try:
            code, _, err = cli(capsys, "check", DEMO, f"train.output_dir={tmp_path / 'o'}",
                               "data.cache_dir=null")
        finally:
            del os.environ["MTL_DIST_CACHE_DIR"]
        assert code == 2 and err.strip() == (
            "error: data.cache_dir (null: the default, from $MTL_DIST_CACHE_DIR, "
            f"$XDG_CACHE_HOME or ~/.cache): {env_dir} {why}"), err


def test_a_target_file_that_cannot_be_written_is_refused_before_predicting(run, capsys, tmp_path):
    """`--output DIR` with DIR/emotion.jsonl a directory: an IsADirectoryError traceback after
    all the predicting, other tasks' files already replaced and a *.tmp file left."""
    root, overrides = run
    for command, name, other in (("predict", "emotion.jsonl", "nli.jsonl"),
                                 ("pseudo-label", "emotion.tsv", "nli.tsv")):
        out = tmp_path / command
        (out / name).mkdir(parents=True)
        (out / other).write_text("mine")
        code, _, err = cli(capsys, command, DEMO, *overrides, "--checkpoint",
                           root / "out" / "best", "--output", out)
        assert code == 2 and err.strip() == (
            f"error: {command} --output {out}: {out / name} is a directory: pick another --output")
        assert sorted(p.name for p in out.iterdir()) == sorted([name, other])
        assert (out / other).read_text() == "mine"


def test_a_failed_write_is_one_line_replaces_no_earlier_file_and_leaves_no_tmp(tmp_path):
    from mtl_dist.config import TaskConfig
    from mtl_dist.errors import MtlDistError
    from mtl_dist.outputs import confident_rows, write_predictions, write_pseudo_labels
    from tests._runs import REPO

    (tmp_path / "b.jsonl").mkdir()
    (tmp_path / "a.jsonl").write_text("mine")
    with pytest.raises(MtlDistError) as info:
        list(write_predictions(tmp_path, {"a": [{"id": 1}], "b": [{"id": 2}]}))
    assert str(info.value) == f"{tmp_path / 'b.jsonl'} is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]
    assert (tmp_path / "a.jsonl").read_text() == "mine"
    # pseudo-labels likewise across tasks: task a's earlier round is kept when b's fails
    tasks = [TaskConfig(name=name, pair=True, test=str(REPO / "tests" / "data" / "nli_test.tsv"))
             for name in "ab"]
    (tmp_path / "a.tsv").write_text("earlier round")
    (tmp_path / "b.tsv").mkdir()
    rows = [{"id": line.split("\t")[0], "label": "0", "probs": [1.0]}
            for line in open(tasks[0].test, encoding="utf-8").read().splitlines()]
    texts = [(task, confident_rows(task, rows, 0.5)[0]) for task in tasks]
    with pytest.raises(MtlDistError) as info:
        write_pseudo_labels(tmp_path, texts)
    assert str(info.value) == f"{tmp_path / 'b.tsv'} is a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.tsv", "b.jsonl", "b.tsv"]
    assert (tmp_path / "a.tsv").read_text() == "earlier round"


def test_an_output_dir_that_cannot_be_written_is_refused_before_predicting(run, tmp_path,
                                                                           cpu_env):
    """The same for a read-only --output (root writes anywhere: run without DAC override)."""
    import os
    import subprocess
    import sys

    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] \
        if os.geteuid() == 0 else []
    if drop and subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv cannot drop root's DAC override here")
    root, overrides = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "nli.jsonl").write_text("mine")
    out.chmod(0o555)
    try:
        done = subprocess.run(
            [*drop, sys.executable, "-c", "import sys; from mtl_dist.cli import main; "
             "sys.exit(main(sys.argv[1:]))", "predict", str(DEMO), *overrides, "--checkpoint",
             str(root / "out" / "best"), "--output", str(out)],
            capture_output=True, text=True, env=cpu_env, timeout=300)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
            f"error: predict --output {out}: is not writable (permissions or a read-only "
            "mount)"), done.stderr
        done = subprocess.run(
            [*drop, sys.executable, "-c", "import sys; from mtl_dist.outputs import "
             "write_predictions; list(write_predictions(sys.argv[1], {'x': [{'id': 1}]}))",
             str(out)], capture_output=True, text=True, env=cpu_env, timeout=120)
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
            f"mtl_dist.errors.MtlDistError: {out / 'x.jsonl'}: cannot write: Permission denied")
    finally:
        out.chmod(0o755)
    assert sorted(p.name for p in out.iterdir()) == ["nli.jsonl"]
    assert (out / "nli.jsonl").read_text() == "mine"


def test_no_command_writes_into_a_folder_a_runs_saves_manage(run, capsys, tmp_path, monkeypatch):
    """A fuzzing review: `train`/`check`/`demo` with the output dir at a run's best/ (its
    next save swapped best/ away, or damaged it), `predict --output` at another run's output
    dir (a task named `metrics` replaced its log) or inside a committed checkpoint: all
    accepted. Now one line each, before any work, nothing written."""
    import shutil

    root, overrides = run
    best, ckpt8 = root / "out" / "best", root / "out" / "checkpoints" / "checkpoint-8"
    before = {p: p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()}
    for target, where in ((best, f"is {best}"), (best / "sub", f"is inside {best}"),
                          (ckpt8, f"is {ckpt8}")):
        code, _, err = cli(capsys, "check", DEMO, *overrides, f"train.output_dir={target}")
        assert code == 2 and err.strip().endswith(
            f"config key 'train.output_dir': {target} {where}, which the run's saves, rotation "
            "and resumes manage: pick a folder outside it"), err
    code, _, err = cli(capsys, "demo", "--output", best)
    assert code == 2 and err.strip() == (f"error: demo: --output {best} is {best}, which "
                                         "the run's saves, rotation and resumes manage: pick a "
                                         "folder outside it")
    assert cli(capsys, "demo", "--output", "")[2].strip() == \
        "error: demo: --output is empty; give a directory"
    other = tmp_path / "other"
    shutil.copytree(root / "out", other)
    for target, why in ((other, "is a run's output dir"),
                        (other / "checkpoints" / "checkpoint-8",
                         f"is {other / 'checkpoints' / 'checkpoint-8'}")):
        code, _, err = cli(capsys, "predict", DEMO, *overrides, "--checkpoint", best,
                           "--output", target)
        assert code == 2 and f"error: predict --output {target}: {why}" in err, err
    assert {p: p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()} == before
    # a project folder with a hand-written config.yaml (or a label list) is no run: runs under
    # its checkpoints/ or best/, and predictions into it, are fine
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.yaml").write_text(DEMO.read_text())
    (project / "labels.json").write_text('{"nli": ["a"]}')
    for target in (project / "checkpoints" / "exp1", project / "best" / "run1"):
        code, _, err = cli(capsys, "check", DEMO, *overrides, f"train.output_dir={target}")
        assert code == 0, err
    code, _, err = cli(capsys, "predict", DEMO, *overrides, "--checkpoint", best, "--output",
                       project)
    assert code == 0 and (project / "nli.jsonl").is_file(), err
    # `ckpt ls .` inside checkpoints/ ("no checkpoints under ."), and an empty path
    monkeypatch.chdir(root / "out" / "checkpoints")
    code, out, _ = cli(capsys, "ckpt", "ls", ".")
    assert code == 0 and "checkpoint-8" in out and "best" in out, out
    assert cli(capsys, "ckpt", "ls", "")[2].strip() == \
        "error: ckpt ls: give a run's output dir (got an empty path)"
    empty = tmp_path / "empty"  # exit 2, as the README says (it printed a line and exited 0)
    empty.mkdir()
    assert cli(capsys, "ckpt", "ls", empty)[::2] == (
        2, f"error: ckpt ls: no checkpoints under {empty}\n")


def test_a_checkpoint_a_resume_set_aside_exports_and_predicts_into_its_run(run, capsys, tmp_path):
    """Checkpoints in OUTPUT/abandoned/<branch>/: export looked for the run's files two levels
    up (and failed), predict wrote into the config's run, `ckpt ls` listed nothing."""
    import shutil

    root, overrides = run
    other = tmp_path / "other"
    shutil.copytree(root / "out", other)
    aside = other / "abandoned" / "after-checkpoint-4-abcd" / "checkpoint-8"
    aside.parent.mkdir(parents=True)
    (other / "checkpoints" / "checkpoint-8").rename(aside)
    code, out, err = cli(capsys, "ckpt", "export", aside, tmp_path / "hf")
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file(), err
    code, out, _ = cli(capsys, "predict", DEMO, *overrides, "--checkpoint", aside)
    assert code == 0 and f"to {other / 'predictions' / 'nli.jsonl'}" in out, out
    for listed in (other, aside.parent):
        code, out, _ = cli(capsys, "ckpt", "ls", listed)
        assert code == 0 and f"{aside} " in out and "(set aside by a resume)" in out, out


def test_an_output_that_cannot_be_written_is_named_before_predicting(run, capsys, tmp_path):
    """A directory at a file's .tmp name was named as the file, after all the predicting; an
    --output that is a dangling link was 'File exists', after all the predicting."""
    root, overrides = run
    (tmp_path / "p2" / "nli.jsonl.tmp").mkdir(parents=True)
    code, _, err = cli(capsys, "predict", DEMO, *overrides, "--checkpoint", root / "out" / "best",
                       "--output", tmp_path / "p2")
    assert code == 2 and err.strip() == (
        f"error: predict --output {tmp_path / 'p2'}: {tmp_path / 'p2' / 'nli.jsonl'} cannot be "
        f"written: its temporary file {tmp_path / 'p2' / 'nli.jsonl.tmp'} is a directory: pick "
        "another --output"), err
    (tmp_path / "p4").symlink_to(tmp_path / "gone")
    code, _, err = cli(capsys, "predict", DEMO, *overrides, "--checkpoint", root / "out" / "best",
                       "--output", tmp_path / "p4")
    assert code == 2 and err.strip() == (
        f"error: predict --output {tmp_path / 'p4'}: is a symbolic link that leads nowhere "
        f"({tmp_path / 'gone'})"), err


@pytest.mark.parametrize("peak", ["0", "-1", "nan", "inf"])
def test_bench_refuses_a_peak_that_is_no_positive_number(capsys, peak):
    code, _, err = cli(capsys, "bench", DEMO, "--peak-tflops", peak)
    assert code == 2 and err.strip() == (
        "error: bench: --peak-tflops must be a finite number > 0 (the GPU's dense bf16 peak), "
        f"got {float(peak)}")


def test_check_refuses_a_damaged_newest_checkpoint_for_resume_auto(run, capsys, tmp_path):
    """`check` (launch/train.sh's pre-check) said "config OK"; every rank then refused the cut
    file after its set-up, under the launcher's traceback."""
    import shutil

    root, overrides = run
    other = tmp_path / "other"
    shutil.copytree(root / "out", other)
    optimizer = other / "checkpoints" / "checkpoint-8" / "optimizer.pt"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as f:
        f.truncate(size - 10)
    code, _, err = cli(capsys, "check", DEMO, *overrides, f"train.output_dir={other}",
                       "train.resume=auto")
    assert code == 2 and err.strip() == (
        f"error: checkpoint {optimizer.parent}: file 'optimizer.pt' has {size - 10} bytes, "
        f"manifest.json says {size} (truncated or changed)"), err


_OWN_TASKS = """\
model:
  tokenizer: "demo:"
  arch: {hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64,
         max_position_embeddings: 128}
tasks:
  - name: a
    train: a.csv
    text_field: sentense
  - name: b
    train: b.jsonl
    dev: dev.csv
    text_field: sentence
    labels: [x, y]
"""


@pytest.mark.parametrize("overrides, expected", [
    ([], "a.csv:1: missing column 'sentense' in the header (columns: id, sentence, label); "
         "tasks.a.text_field set at {cfg}:8"),
    (["tasks.a.text_field=sentence", "tasks.b.text_field=text"],
     "b.jsonl:1: missing JSON field 'text'; tasks.b.text_field set by override "
     "'tasks.b.text_field=text'"),
    (["tasks.a.text_field=sentence"],
     "b.jsonl:1: label 'a' is not one of the task's labels (x, y); tasks.b.labels set at {cfg}:13"),
    (["tasks.a.text_field=sentence", "tasks.b.labels=[a,b]"],
     "dev.csv:2: label 'c' is not one of the task's labels (a, b); tasks.b.labels set by "
     "override 'tasks.b.labels=[a,b]'"),
    # labels read from the train file: no key of the config's to name
    (["tasks.a.text_field=sentence", "tasks.b.labels=null"],
     "dev.csv:2: label 'c' is not one of the task's labels (a, b)\n"),
])
def test_a_data_file_at_odds_with_the_config_names_where_the_config_set_the_key(
        capsys, tmp_path, monkeypatch, overrides, expected):
    """A data error located in its file (file:line) that turns on a config key (a task's
    labels, its column names, `pair`) also names where the config set that key."""
    monkeypatch.chdir(tmp_path)
    Path("a.csv").write_text("id,sentence,label\n1,hello there,a\n2,bye now,b\n")
    Path("b.jsonl").write_text('{"id": 1, "sentence": "hi", "label": "a"}\n'
                               '{"id": 2, "sentence": "yo", "label": "b"}\n')
    Path("dev.csv").write_text("id,sentence,label\n1,hello,c\n")
    Path("run.yaml").write_text(_OWN_TASKS)
    code, _, err = cli(capsys, "check", "run.yaml", *overrides)
    assert code == 2
    assert expected.format(cfg="run.yaml") in err and err.count("\n") == 1, err


@pytest.mark.parametrize("where, expected", [
    ("override", "tasks.news.pair set by override 'tasks.news.pair=true'"),
    ("file", "tasks.news.pair set at {cfg}:"),
])
def test_a_demo_set_of_the_other_kind_names_where_pair_was_set(capsys, tmp_path, where,
                                                               expected):
    cfg = tmp_path / "demo.yaml"
    text = Path(DEMO).read_text()
    if where == "file":
        text = text.replace("{name: news, ", "{name: news, pair: true, ")
    cfg.write_text(text)
    extra = ["tasks.news.pair=true"] if where == "override" else []
    code, _, err = cli(capsys, "check", cfg, f"train.output_dir={tmp_path / 'out'}", *extra)
    assert code == 2
    assert "demo:news/train: a single-sentence data set, but tasks.news.pair is true; " in err
    assert expected.format(cfg=cfg) in err, err


def test_a_checkpoint_trained_on_pairs_is_refused_for_single_texts(run, capsys, tmp_path):
    """evaluate/predict with `pair` flipped: the head would score inputs it never saw (nli
    read as single texts scored near chance, printed as the checkpoint's score). best/ says
    it in its config.yaml, a periodic checkpoint in its manifest."""
    root, overrides = run
    label = json.loads((root / "out" / "labels.json").read_text())["nli"][0]
    own = tmp_path / "nli.jsonl"  # a file of one's own: the demo's data sets know their kind
    own.write_text(json.dumps({"id": 1, "text": "a cat", "text_b": "an animal",
                               "label": label}) + "\n")
    flipped = ["tasks.nli.pair=false", f"tasks.nli.dev={own}", f"tasks.nli.test={own}"]
    for checkpoint in (root / "out" / "best", root / "out" / "checkpoints" / "checkpoint-8"):
        for command in (["evaluate"], ["predict", "--output", tmp_path / "p"]):
            code, _, err = cli(capsys, *command, DEMO, *overrides, *flipped,
                               "--checkpoint", checkpoint)
            assert code == 2
            assert err == (f"error: override 'tasks.nli.pair=false': checkpoint {checkpoint}: "
                           "task 'nli' was trained on sentence pairs (tasks.nli.pair true), this "
                           "run reads single texts: set tasks.nli.pair=true\n"), err
    assert not (tmp_path / "p").exists()


def test_a_copied_runs_config_does_not_train_the_original(run, capsys, tmp_path):
    """`cp -a OUTPUT copy; mtl-dist train copy/config.yaml train.resume=auto` resumed and
    extended the original run (its absolute output_dir), best/ replaced: refused in one line
    naming both ways out, before anything changes; each way out then works."""
    import shutil

    root, _ = run
    out, copy = root / "out", tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    code, _, err = cli(capsys, "train", copy / "config.yaml", "train.resume=auto",
                       "train.max_steps=10")
    assert code == 2
    assert f"config key 'train.output_dir': {copy / 'config.yaml'} is the saved config of the " \
        f"run in {out}, but lies in {copy} (a copy of that run?): it would train {out}; to " \
        f"train the copy, add train.output_dir={copy}; to train that run, give " \
        f"{out / 'config.yaml'} (or add train.output_dir={out})" in err and err.count("\n") == 1
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    # not copies: best/'s own config.yaml (the run it names), a template folder holding the
    # saved config alone
    template = tmp_path / "template" / "config.yaml"
    template.parent.mkdir()
    shutil.copy(out / "config.yaml", template)
    for config, extra in ((copy / "config.yaml", [f"train.output_dir={copy}"]),
                          (out / "config.yaml", []), (out / "best" / "config.yaml", []),
                          (template, [])):
        code, said, err = cli(capsys, "check", config, "train.resume=auto", *extra)
        assert code == 0 and "config OK" in said, err


def test_ckpt_verify_reads_every_byte_where_ls_checks_sizes(run, capsys, tmp_path):
    """A file changed in place at its size: `ckpt ls` lists the checkpoint complete (sizes
    only), the resume refuses it (sha256); `ckpt verify` finds it first, exit 2."""
    import shutil

    root, _ = run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    # a damaged best/ a run set aside (abandoned/damaged-best-*) is listed, not counted:
    # a `ckpt verify OUTPUT && requeue` guard was blocked by it for good
    aside = out / "abandoned" / "damaged-best-abcd"
    shutil.copytree(out / "best", aside)
    os.truncate(aside / "model.safetensors", 100)
    code, said, _ = cli(capsys, "ckpt", "verify", out)
    assert code == 0 and said.endswith(
        "ckpt verify: 2 committed checkpoint(s), every file as its manifest says\n"), said
    assert f"{aside}" in said and "DAMAGED" in said
    code, _, err = cli(capsys, "ckpt", "verify", aside)  # named: counted
    assert code == 2 and err.endswith("1 of 1 committed checkpoint(s) damaged "
                                      "(damaged-best-abcd)\n"), err
    shutil.rmtree(aside.parent)
    state = out / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    text = state.read_text()
    state.write_text(text.replace('"global_step": 8', '"global_step": 9'))
    assert len(state.read_text()) == len(text) and state.read_text() != text
    code, said, _ = cli(capsys, "ckpt", "ls", out)
    assert code == 0 and "DAMAGED" not in said
    code, said, err = cli(capsys, "ckpt", "verify", out)
    assert code == 2
    assert f"(checkpoint {state.parent}: file 'trainer_state.json' is corrupt (sha256 " \
        "differs from manifest.json))" in said
    assert err == "error: ckpt verify: 1 of 2 committed checkpoint(s) damaged (checkpoint-8)\n"
    code, said, _ = cli(capsys, "ckpt", "verify", out / "best")  # the one named alone
    assert code == 0 and said.count("\n") == 2 and "1 committed checkpoint(s)" in said
    code, _, err = cli(capsys, "ckpt", "verify", state.parent)
    assert code == 2 and err.endswith("1 of 1 committed checkpoint(s) damaged (checkpoint-8)\n")


def test_inference_takes_the_checkpoints_labels_not_those_of_the_configs_output_dir(
        run, capsys, tmp_path):
    """evaluate/predict --checkpoint of one run, with a config whose train.output_dir holds
    another run (other labels frozen there): the heads' labels are the checkpoint's. It was
    refused against the other run's labels.json, with training advice."""
    root, overrides = run
    labels = json.loads((root / "out" / "labels.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "labels.json").write_text(json.dumps({**labels, "nli": labels["nli"][::-1]}))
    best = root / "out" / "best"
    results = []
    for output_dir in (root / "out", other):
        code, said, err = cli(capsys, "evaluate", DEMO, *overrides,
                              f"train.output_dir={output_dir}", "--checkpoint", best)
        assert code == 0, err
        results.append(json.loads(said))
    assert results[0] == results[1]
    stated = f"tasks.0.labels=[{','.join(labels['nli'])}]"  # as the checkpoint has them
    code, _, err = cli(capsys, "predict", DEMO, *overrides, f"train.output_dir={other}", stated,
                       "--checkpoint", best, "--output", tmp_path / "p")
    assert code == 0, err
    assert len((tmp_path / "p" / "nli.jsonl").read_text().splitlines()) > 0


def _shuffled_tokenizer(run_dir: Path, to: Path) -> Path:
    """The run's tokenizer with two ids swapped: the same vocabulary size, other ids."""
    import shutil

    shutil.copytree(run_dir / "tokenizer", to)
    spec = json.loads((to / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (to / "tokenizer.json").write_text(json.dumps(spec))
    return to


def test_a_checkpoint_trained_with_another_tokenizer_is_refused(run, capsys, tmp_path):
    """A tokenizer of the same vocabulary size loaded without a word: evaluate scored every
    id as another token's, a resume trained on them (and replaced OUTPUT/tokenizer/)."""
    import shutil

    root, overrides = run
    other = _shuffled_tokenizer(root / "out", tmp_path / "tok2")
    for checkpoint in (root / "out" / "best", root / "out" / "checkpoints" / "checkpoint-8"):
        code, _, err = cli(capsys, "evaluate", DEMO, *overrides, f"model.tokenizer={other}",
                           "--checkpoint", checkpoint)
        assert code == 2
        assert re.fullmatch(
            rf"error: override 'model.tokenizer={re.escape(str(other))}': checkpoint "
            rf"{re.escape(str(checkpoint))}: trained with another tokenizer \(vocabulary, special "
            r"tokens or the ids of a probe text differ: [0-9a-f]{12}\.\.\., this run's "
            r"[0-9a-f]{12}\.\.\.\): its embeddings learned other ids; give model.tokenizer the "
            r"tokenizer it was trained with \(.*/tokenizer holds a copy\)\n", err), err
    copy = tmp_path / "copy"
    shutil.copytree(root / "out", copy)
    tokenizer_files = sorted((copy / "tokenizer").iterdir())
    before = [p.read_bytes() for p in tokenizer_files]
    code, _, err = cli(capsys, "train", DEMO, *overrides, f"train.output_dir={copy}",
                       f"model.tokenizer={other}", "train.resume=auto", "train.max_steps=10")
    assert code == 2
    assert "manifest key 'tokenizer' differs" in err and "learned another tokenizer's ids" in err
    assert [p.read_bytes() for p in tokenizer_files] == before


def test_a_checkpoints_folder_that_cannot_be_written_is_refused_at_the_start(
        run, capsys, tmp_path, monkeypatch):
    """OUTPUT writable but OUTPUT/checkpoints/ not: the run trained up to its first save and
    died there (a requeue loop repeats it); `check` passed. Refused before any work now."""
    import shutil

    root, overrides = run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    saves = out / "checkpoints"
    real_access = os.access  # as root every folder is writable: read-only is simulated
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode)
                        and Path(p) != saves)
    for command in ("check", "train"):
        code, _, err = cli(capsys, command, DEMO, *overrides, f"train.output_dir={out}",
                           "train.resume=auto", "train.max_steps=12")
        assert code == 2
        assert err.endswith(f"config key 'train.output_dir': its checkpoints folder {saves} is "
                            "not writable (permissions or a read-only mount)\n"), err
    monkeypatch.undo()
    shutil.rmtree(saves)
    saves.write_text("")
    code, _, err = cli(capsys, "check", DEMO, *overrides, f"train.output_dir={out}")
    assert code == 2 and err.endswith(f"its checkpoints folder {saves} exists and is not a "
                                      "directory\n"), err


def test_ckpt_output_into_a_closed_pipe_ends_without_a_traceback(run):
    """`mtl-dist ckpt inspect PATH | head`: a BrokenPipeError traceback (or "Exception
    ignored ... BrokenPipeError" at exit) after the reader left."""
    import subprocess
    import sys

    root, _ = run
    for args in (["ckpt", "ls", root / "out"],
                 ["ckpt", "inspect", root / "out" / "checkpoints" / "checkpoint-8"]):
        proc = subprocess.Popen([sys.executable, "-m", "mtl_dist.cli", *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before anything is written
        err = proc.stderr.read().decode()
        assert proc.wait() == 141 and err == "", err


def test_a_warning_while_a_progress_bar_is_up_starts_on_its_own_line():
    """In a log file, a warning (or the preemption note) printed after a bar's text was glued
    to it: `grep '^warning'` on a Slurm log missed it."""
    import io

    from tqdm import tqdm

    from mtl_dist.cli import _format_warning
    from mtl_dist.errors import MtlDistWarning

    assert _format_warning("x", MtlDistWarning, "f.py", 1) == "warning: x\n"
    bar = tqdm(total=3, file=io.StringIO())
    try:
        assert _format_warning("x", MtlDistWarning, "f.py", 1) == "\nwarning: x\n"
    finally:
        bar.close()
    assert _format_warning("x", MtlDistWarning, "f.py", 1) == "warning: x\n"
    assert "f.py:1" in _format_warning("y", UserWarning, "f.py", 1)  # others' keep their form


def test_a_checkpoint_with_another_head_kind_names_both(run, capsys):
    """model.head=cls against an attention-head checkpoint: 'unexpected key
    heads.0.score.weight'; now both kinds, from best/'s config or the manifest."""
    root, overrides = run
    for checkpoint in (root / "out" / "best", root / "out" / "checkpoints" / "checkpoint-8"):
        code, _, err = cli(capsys, "evaluate", DEMO, *overrides, "model.head=cls",
                           "--checkpoint", checkpoint)
        assert code == 2
        assert err == (f"error: override 'model.head=cls': checkpoint {checkpoint}: its task "
                       "heads are model.head=attention, this run builds model.head=cls: set "
                       "model.head=attention\n"), err


def test_predict_reads_no_label_so_an_unseen_class_is_no_bad_row(run, capsys, tmp_path):
    """A new file to predict whose label column holds a class the run never saw: predict
    (which never uses labels) refused it as a bad row; evaluate, which scores them, still
    does."""
    root, overrides = run
    new = tmp_path / "emotion_new.jsonl"
    new.write_text('{"id": 1, "text": "so happy today", "label": "awe"}\n'
                   '{"id": 2, "text": "what a bad day", "label": "anger"}\n')
    code, said, err = cli(capsys, "predict", DEMO, *overrides, f"tasks.1.test={new}",
                          "--checkpoint", root / "out" / "best", "--output", tmp_path / "p")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "p" / "emotion.jsonl").read_text()
            .splitlines()]
    assert [r["id"] for r in rows] == ["1", "2"]
    code, _, err = cli(capsys, "evaluate", DEMO, *overrides, f"tasks.1.test={new}", "--split",
                       "test", "--checkpoint", root / "out" / "best")
    assert code == 2 and f"{new}:1: label 'awe' is not one of the task's labels" in err, err
