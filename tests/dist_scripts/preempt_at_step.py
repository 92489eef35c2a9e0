"""Run under a 2-process launcher: rank RANK gets a real SIGNAL during STEP (a stop signal on
one rank, as Slurm's `scancel --signal=USR1` to one task would be); both ranks must stop
together at that step with a checkpoint. Prints each rank's summary, and whether it would ask
for a requeue, as one JSON line.

argv: OUTPUT_DIR CACHE_DIR STEP RANK SIGNAL [overrides...].
"""

import json
import os
import signal
import sys

from mtl_dist.config import load_config
from mtl_dist.trainer import Trainer
from tests._runs import DEMO, FAST

out, cache, step, victim, sig, *extra = sys.argv[1:]
cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *FAST,
                         "train.requeue_on_preempt=false", *extra])
trainer = Trainer(cfg)
optimizer_step = trainer._optimizer_step


def step_then_signal():
    optimizer_step()
    if trainer.rank == int(victim) and trainer.state.global_step == int(step) - 1:  # counted next
        os.kill(os.getpid(), getattr(signal, sig))


trainer._optimizer_step = step_then_signal
try:
    summary = trainer.fit()
finally:
    trainer.close()
# One write(2) of the whole line: under PYTHONUNBUFFERED, print() writes the text and its
# newline separately, and the two ranks' lines can interleave on the shared pipe; a single
# pipe write under PIPE_BUF is atomic.
line = json.dumps({"rank": trainer.rank, "stop_reason": summary["stop_reason"],
                   "global_step": summary["global_step"],
                   "requeue_wanted": trainer.preemption.requeue_wanted})
os.write(sys.stdout.fileno(), (line + "\n").encode())
