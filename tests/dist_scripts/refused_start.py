"""Run under a 2-process launcher while another process holds OUTPUT: both ranks are refused
at the start, with one line each, and leave no process group behind.

argv: OUTPUT_DIR CACHE_DIR. Exits non-zero (assertion) on any violation.
Why: a refused start returned its error with the gloo groups still alive; freed at
interpreter exit, they aborted a rank now and then (SIGABRT, "terminate called without an
active exception") instead of its exit code 2.
"""

import sys

import torch.distributed as dist

from mtl_dist.config import load_config
from mtl_dist.errors import CheckpointError
from mtl_dist.trainer import Trainer
from tests._runs import DEMO, FAST

out, cache = sys.argv[1:]
cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *FAST,
                         "train.max_steps=2"])
try:
    Trainer(cfg)
except CheckpointError as exc:
    assert "is in use by another run" in str(exc), exc
    print(f"refused: {exc}")
else:
    raise AssertionError("a start on a held output dir was not refused")
assert not dist.is_initialized(), "the refused trainer left its process group alive"
print("refused and torn down")
