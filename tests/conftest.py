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
    """Which tests `pytest -n N --dist loadgroup` (tests/run.sh) keeps on one worker, in
    collection order: every Slurm test (one cluster per machine at a time: they share
    /etc/slurm/slurm.conf and munge, and a second one would wait on the first's lock, then
    skip), every GPU test (one GPU; the tests were checked in this order, and a process's
    first compiled run can differ from later ones, see README's Resume), and the tests of a
    module that share a module-scoped fixture (set up once, not once per worker). The rest go
    to whichever worker is free. Marked as each item is collected, before any
    collection_modifyitems hook (pytest-xdist reads the marks in its own)."""
    if item.get_closest_marker("slurm"):
        item.add_marker(pytest.mark.xdist_group("slurm"))
    elif item.get_closest_marker("gpu"):
        item.add_marker(pytest.mark.xdist_group("gpu"))
    elif _uses_module_fixture(item):
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def _uses_module_fixture(item: pytest.Item) -> bool:
    """Whether a fixture the test uses (directly or through other fixtures) is module-scoped;
    the last definition of each name is the one in effect."""
    info = getattr(item, "_fixtureinfo", None)  # absent on non-Python items
    if info is None:
        return False
    return any(info.name2fixturedefs[name][-1].scope == "module"
               for name in info.names_closure if info.name2fixturedefs.get(name))


def pytest_configure(config: pytest.Config) -> None:
    """Refuse `--dist loadgroup` where its groups are known not to take: on pytest's main
    branch before 9.2.0, pytest-xdist 3.8's tag of a test's group no longer reached the
    scheduler (pytest-dev/pytest-xdist#1386; seen here with pytest 9.2.0 too), so the groups
    above would be dropped without a word. The dev extras pin pytest below 9.2. Checked on
    the controller: a worker's error is not shown."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version

    from packaging.version import Version

    xdist = version("pytest-xdist")
    if Version(pytest.__version__).release >= (9, 2) and Version(xdist) <= Version("3.8.0"):
        raise pytest.UsageError(f"pytest {pytest.__version__} with pytest-xdist {xdist} does "
                                "not group tests under --dist loadgroup "
                                "(pytest-dev/pytest-xdist#1386): install 'pytest<9.2' or run "
                                "with -n 0")
