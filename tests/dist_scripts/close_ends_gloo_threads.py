"""Run under a 2-process launcher on a copy of a finished run (24 steps, or a ZeRO run with
`train.zero_stage=N` among the overrides): resume it to step 32 or the overrides'
train.max_steps (`finished`), or with its newest checkpoint cut short (`refused`: both ranks
are refused at the resume, after the set-up, DDP or the DeepSpeed engine built). Either way
each rank's Trainer.close() leaves no gloo thread behind.

argv: OUTPUT_DIR CACHE_DIR MODE [OVERRIDE...]. Exits non-zero (assertion) on any violation.
Why: the process group outlived close() (held by the DDP wrapper, and by the default arguments
of torch.distributed.nn.functional and deepspeed.comm.torch, imported after it was up; under
ZeRO by DeepSpeed's engine, optimizer and parameters, and by the EMA's ZeRO-3 layout); at
interpreter exit a gloo worker freeing a finished all_gather's tensors needed the GIL and was
ended inside a destructor: a rank aborted now and then (SIGABRT, "terminate called without an
active exception") after its one-line refusal.
"""

import sys

import torch.distributed as dist

from mtl_dist.config import load_config
from mtl_dist.errors import CheckpointError
from mtl_dist.trainer import Trainer
from tests._runs import DEMO, FAST, gloo_threads

out, cache, mode, *overrides = sys.argv[1:]
cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *FAST,
                         "train.max_steps=32", "train.resume=auto", *overrides])
trainer = Trainer(cfg)
assert gloo_threads(), "no gloo thread to begin with: this check checks nothing"
try:
    trainer.fit()
except CheckpointError as exc:
    assert mode == "refused" and "truncated or changed" in str(exc), exc
else:
    assert mode == "finished", "a resume from a damaged checkpoint was not refused"
    assert trainer.state.global_step == cfg.train.max_steps, trainer.state.global_step
finally:
    trainer.close()
assert not dist.is_initialized(), "close() left the process group registered"
assert not gloo_threads(), f"gloo threads left to interpreter exit: {gloo_threads()}"
print(f"{mode} and torn down")
