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
