#!/usr/bin/env bash
# The whole test suite: unit, multi-process (gloo on CPU), end-to-end, Slurm (self-starting).
# GPU tests skip themselves where no CUDA GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
# no path given: pyproject's testpaths (tests/); `tests/run.sh tests/test_config.py` runs one file
exec python3 -m pytest -q -n 2 --dist loadgroup "$@"
