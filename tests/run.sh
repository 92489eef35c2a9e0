#!/usr/bin/env bash
# The whole test suite: unit, multi-process (gloo on CPU), end-to-end, Slurm (self-starting).
# GPU tests skip themselves where no CUDA GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
exec python3 -m pytest -q -n 2 --dist loadgroup tests "$@"
