"""Run under a 2-process launcher: the host (gloo) group's collectives give up after the
timeout set by set_host_timeout, not torch's 30 minutes.

argv: OUTPUT_DIR CACHE_DIR. Rank 0 stays away from the collective (until rank 1 is done, or
120 s); rank 1 calls it and must fail with a timeout while rank 0 is still away. Prints
"timed out while rank 0 was away" on rank 1."""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mtl_dist.collectives import host_group, release_host_group, set_host_timeout

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
done = out / "rank1_done"
dist.init_process_group("gloo")
set_host_timeout(2)
group = host_group()  # a collective itself: both ranks make it
if dist.get_rank() == 0:
    deadline = time.monotonic() + 120
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os._exit(0)  # no collective: rank 1's must have ended on its own
try:
    dist.all_reduce(torch.ones(1), group=group)
    outcome = "returned"
except RuntimeError as exc:  # gloo's timeout ("Timed out waiting ... for recv")
    outcome = "timed out" if "timed out" in str(exc).lower() else f"failed: {exc}"
away = not done.exists()
done.write_text(outcome)
print(f"{outcome} while rank 0 was {'away' if away else 'back'}", flush=True)
release_host_group()
os._exit(0)
