"""Run under a 2-process launcher: one optimizer step leaves the heads of idle tasks untouched.

argv: OUTPUT_DIR CACHE_DIR [overrides...]. Exits non-zero (assertion) on any violation.
"""

import sys

import torch

from mtl_dist.config import load_config
from mtl_dist.trainer import Trainer  # noqa: E402  (after the test imports, like a user script)
from tests._runs import DEMO, FAST

out, cache, *extra = sys.argv[1:]
cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *FAST,
                         "train.max_steps=1", "train.gradient_accumulation_steps=2",
                         "train.ema_decay=null", "train.warmup_steps=0", *extra])
trainer = Trainer(cfg)
model = trainer.module


def snapshot() -> dict[str, torch.Tensor]:
    """Full parameter values (ZeRO-3 partitions gathered for the read)."""
    params = list(model.named_parameters())
    if cfg.train.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


before = snapshot()
used = {trainer.plan.task_of(0, s) for s in range(2)}
trainer.fit()
after = snapshot()
live = dict(model.named_parameters())
for task_id in range(len(trainer.task_names)):
    head = [n for n in before if n.startswith(f"heads.{task_id}.")]
    changed = [n for n in head if not torch.equal(before[n], after[n])]
    if task_id in used:
        assert changed, f"rank {trainer.rank}: used head {task_id} did not change"
    else:
        assert not changed, f"rank {trainer.rank}: idle head {task_id} changed: {changed}"
        if trainer.engine is None:  # under ZeRO the state lives in flat partitions
            assert all(trainer.optimizer.state.get(live[n]) in (None, {}) for n in head), \
                f"rank {trainer.rank}: idle head {task_id} has optimizer state"
print(f"rank {trainer.rank}: used heads {sorted(used)}, idle heads unchanged")
trainer.close()  # as `mtl-dist train` ends: gloo torn down while both ranks live
