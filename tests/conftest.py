"""Fixtures shared by the test files: the repository root and a clean env for CPU subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def cpu_env() -> dict[str, str]:
    """Environment for training subprocesses: one thread each, offline, outside any Slurm job
    (a test run inside a Slurm allocation must not requeue it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               PYTHONUNBUFFERED="1")
    return env


def pytest_itemcollected(item: pytest.Item) -> None:
    """Which tests `pytest -n N --dist loadgroup` (tests/run.sh) keeps on one worker: every
    Slurm test (each cluster uses the same network namespaces and bridge, so two may not run
    at once), and the tests of a module that share a module-scoped fixture (set up once,
    not once per worker). The rest go to whichever worker is free. Marked as each item is
    collected, before any collection_modifyitems hook (pytest-xdist reads them in its own)."""
    if item.get_closest_marker("slurm"):
        item.add_marker(pytest.mark.xdist_group("slurm"))
    elif _uses_module_fixture(item):
        item.add_marker(pytest.mark.xdist_group(item.path.stem))


def _uses_module_fixture(item: pytest.Item) -> bool:
    fixture_info = getattr(item, "_fixtureinfo", None)  # absent on non-Python items
    defs = fixture_info.name2fixturedefs.values() if fixture_info else ()
    return any(d.scope == "module" for chain in defs for d in chain)



def pytest_configure(config: pytest.Config) -> None:
    """Refuse `--dist loadgroup` where its groups are known not to take (pytest 9.2 ignores how
    pytest-xdist 3.8 tags a test with its group, pytest-dev/pytest-xdist#1386; the dev extras
    pin pytest below 9.2), rather than let two Slurm clusters start at once. On the
    controller only: a worker's error would not be shown."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version

    from packaging.version import Version

    if Version(pytest.__version__) >= Version("9.2") and \
            Version(version("pytest-xdist")) <= Version("3.8.0"):
        raise pytest.UsageError(f"pytest {pytest.__version__} with pytest-xdist "
                                f"{version('pytest-xdist')} does not group tests under --dist "
                                "loadgroup (pytest-dev/pytest-xdist#1386): install "
                                "'pytest<9.2' or run with -n 0")
