"""Run under a 2-process launcher: `mtl-dist ARGS` in this process (cli.main), then no gloo
thread may be left, as after Trainer.close() of a training run (close_ends_gloo_threads.py).

argv: OUTPUT_DIR CACHE_DIR (unused) CLI_ARG... Exits non-zero (assertion) on a violation.
Why: `evaluate` of a ZeRO checkpoint read its partitions through DeepSpeed, imported with
the process group up: deepspeed.comm.torch's default arguments held the group, and its gloo
threads, to interpreter exit (where a gloo worker could abort the rank).
"""

import sys

from mtl_dist.cli import main
from tests._runs import gloo_threads

rc = main(sys.argv[3:])
assert rc == 0, f"mtl-dist {' '.join(sys.argv[3:])} returned {rc}"
assert not gloo_threads(), f"gloo threads left to interpreter exit: {gloo_threads()}"
print("cli done, no gloo thread")
