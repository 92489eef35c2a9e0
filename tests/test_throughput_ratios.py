"""benchmarks/throughput.py's ratios: against the first baseline, and the range over two."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_baseline_gives_one_ratio(throughput):
    rows = [{"samples_per_s": 300.0}, {"samples_per_s": 1500.0}]
    throughput.add_speedups(rows, baselines=[rows[0]])
    assert [r["speedup_vs_baseline"] for r in rows] == [1.0, 5.0]
    assert all("speedup_range" not in r for r in rows)


def test_a_second_baseline_bounds_each_ratio(throughput):
    rows = [{"samples_per_s": 300.0}, {"samples_per_s": 1500.0}, {"samples_per_s": 250.0}]
    throughput.add_speedups(rows, baselines=[rows[0], rows[2]])
    assert rows[1]["speedup_vs_baseline"] == 5.0  # still against the first
    assert rows[1]["speedup_range"] == [5.0, 6.0]  # against the faster, then the slower
    assert rows[2]["speedup_range"] == [250 / 300, 1.0]


def test_an_unknown_benchmark_hook_is_refused_before_anything_runs(throughput, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown benchmark hook\(s\) \['bench.largest_frist=true'\]"):
        throughput.run_mtl(tmp_path, "typo", ["bench.largest_frist=true"], warmup=1, steps=1)


def test_the_results_file_states_how_flops_are_counted(throughput):
    # the results files before 2026-12-07 held the docstring's command line here instead
    note = throughput.flops_note()
    assert note.startswith("FLOPs (for MFU) are counted on REAL tokens only")
    assert "6 * P * L + 12 * layers * hidden * L^2" in note
