"""benchmarks/repeatability.py: the first differing step of two runs, and a real CPU check."""

from __future__ import annotations

import importlib.util

import pytest

from tests._runs import DEMO, NO_DROPOUT, REPO


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
    assert repeat.first_difference(a, [(1, 2.0), (2, 1.5000001), (3, 1.0)]) == \
        {"step": 2, "loss": 1.5, "other_step": 2, "other_loss": 1.5000001}
    assert repeat.first_difference(a, a[:2]) == {"step": None, "logged_steps": [3, 2],
                                                 "after_step": 2}


def test_the_demo_on_cpu_repeats_itself_bit_for_bit(repeat, tmp_path):
    out = tmp_path / "r.json"
    result = repeat.main([str(DEMO), "train.device=cpu", f"data.cache_dir={tmp_path}/c",
                          *NO_DROPOUT[:1], "--runs", "2", "--steps", "3", "--out", str(out)])
    assert result["repeatable"] and result["differences"] == [None]
    assert result["logged_steps"] == [3, 3]
    assert out.exists()


def test_a_run_that_fails_stops_with_one_line(repeat, tmp_path):
    with pytest.raises(SystemExit, match=r"^run run-1 failed \(\d+\): .*train\.no_such_key"):
        repeat.main([str(DEMO), "train.no_such_key=1", "--steps", "1"])
