"""Run under a 2-process launcher: rank 1 joins an all_reduce late, so rank 0's gloo worker
still holds that collective's tensor (whose release needs the GIL) when the process group is
let go of; collectives.release_ddp_group must end the gloo threads without a hang.

argv: OUTPUT_DIR CACHE_DIR (unused). Exits non-zero on a violation; a hang ends in a traceback.
Why: freeing the DDP wrapper as such dropped the group's last reference in the reducer's C++
destructor, which holds the GIL, and joined a gloo worker that waited for it.
"""

import faulthandler
import time

import torch
import torch.distributed as dist

from mtl_dist.collectives import import_before_the_process_group, release_ddp_group
from tests._runs import gloo_threads

faulthandler.dump_traceback_later(120, exit=True)  # a hang: a traceback and exit 1
import_before_the_process_group()  # as make_accelerator does
dist.init_process_group("gloo")
rank = dist.get_rank()
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
tensor = torch.ones(4)
if rank == 1:
    time.sleep(2)  # the late rank: rank 0's worker waits in the all_reduce meanwhile
work = dist.all_reduce(tensor, async_op=True)
del tensor, work  # the worker holds the tensor's last reference
dist.destroy_process_group()
release_ddp_group(ddp)
assert not gloo_threads(), f"gloo threads left: {gloo_threads()}"
print("group released")
