"""benchmarks/repeatability.py: the first differing step of two runs, and real CPU runs."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

from tests._runs import DEMO, REPO


@pytest.fixture(scope="module")
def repeat():
    path = REPO / "benchmarks" / "repeatability.py"
    spec = importlib.util.spec_from_file_location("repeatability_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_difference_names_the_first_step_that_parts(repeat):
    a = [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert repeat.first_difference(a, list(a)) is None
    assert repeat.first_difference([], []) is None
    assert repeat.first_difference(a, [(1, 2.0), (2, 1.5000001), (3, 1.0)]) == \
        {"step": 2, "loss": 1.5, "other_step": 2, "other_loss": 1.5000001}
    assert repeat.first_difference(a, [(1, 2.0), (3, 1.5)])["step"] == 2  # another step logged
    assert repeat.first_difference(a, a[:2]) == {"step": None, "logged_steps": [3, 2],
                                                 "after_step": 2}
    nan = [(1, math.nan)]
    assert repeat.first_difference(nan, [(1, float("nan"))]) is None  # NaN again is the same
    assert repeat.first_difference(nan, [(1, 2.0)])["step"] == 1


@pytest.mark.slow
def test_the_demo_on_cpu_repeats_itself_bit_for_bit(repeat, tmp_path):
    out = tmp_path / "r.json"
    work = tmp_path / "work"
    result = repeat.main([str(DEMO), "train.device=cpu", f"data.cache_dir={tmp_path}/c",
                          "--runs", "2", "--steps", "2", "--out", str(out),
                          "--workdir", str(work)])
    assert result["repeatable"] and result["differences"] == [None]
    assert result["logged_steps"] == [2, 2]
    assert json.loads(out.read_text())["command"].startswith("benchmarks/repeatability.py ")
    assert not work.exists()  # made by the script, emptied of checkpoints and logs, removed


@pytest.mark.slow
def test_runs_that_part_are_reported_with_their_first_step(repeat, tmp_path, monkeypatch):
    """Two real runs whose second trains another seed: the script must say they differ."""
    train = repeat.train
    seeds = iter(["train.seed=1", "train.seed=2"])

    def another_seed_each(config, overrides, output_dir, steps):
        return train(config, [*overrides, next(seeds)], output_dir, steps)

    monkeypatch.setattr(repeat, "train", another_seed_each)
    out = tmp_path / "r.json"
    argv = [str(DEMO), "train.device=cpu", f"data.cache_dir={tmp_path}/c", "--runs", "2",
            "--steps", "1", "--keep", "--workdir", str(tmp_path / "w")]
    assert repeat.cli([*argv, "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert not result["repeatable"]
    assert result["differences"][0]["step"] == 1
    assert (tmp_path / "w" / "run-2" / "metrics.jsonl").exists()  # --keep
    assert repeat.cli(argv) == 2  # the workdir holds runs already: refused before training
    assert (tmp_path / "w" / "run-1" / "metrics.jsonl").exists()  # and they are left alone


def test_a_run_that_fails_stops_with_one_line_naming_its_log(repeat, tmp_path, capsys):
    assert repeat.cli([str(DEMO), "train.no_such_key=1", "--steps", "1",
                       "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.match(r"^error: run run-1 failed \(exit \d+; .*run-1\.stderr\.log\): "
                    r"error: override 'train\.no_such_key=1'", err), err
    assert (tmp_path / "run-1.stderr.log").exists()


def test_the_error_line_is_mtl_dists_or_the_traceback_end(repeat):
    assert repeat._error_line("warning: x\nerror: bad key\nshutdown note\n") == "error: bad key"
    assert repeat._error_line("Traceback ...\n  File x\nBackendCompilerFailed: boom\n") == \
        "BackendCompilerFailed: boom"
    assert repeat._error_line("") == "(no output)"
