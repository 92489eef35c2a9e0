"""Run under a 2-process launcher with ZeRO-3: EMA.applied() puts the EMA weights into the
partitions and the persistent (kept gathered) parameters, and restores both bit-exactly.

argv: OUTPUT_DIR CACHE_DIR [overrides...]. Exits non-zero (assertion) on any violation.
"""

import json
import sys
from pathlib import Path

import torch

from mtl_dist.config import load_config
from mtl_dist.trainer import Trainer, _model_inputs
from tests._runs import DEMO, FAST

out, cache, *extra = sys.argv[1:]
# Small parameters (biases, LayerNorms) persistent, i.e. kept gathered; the rest partitioned.
ds_json = Path(cache).parent / "ds_zero3.json"
ds_json.parent.mkdir(parents=True, exist_ok=True)
ds_json.write_text(json.dumps({"zero_optimization": {
    "stage": 3, "stage3_param_persistence_threshold": 1000}}))
cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *FAST,
                         "train.max_steps=2", "train.zero_stage=3", "train.ema_decay=0.5",
                         f"train.deepspeed_config={ds_json}",
                         "train.eval_steps=100", "checkpoint.save_best=false",
                         "checkpoint.save_steps=100", "checkpoint.save_at_epoch_end=false",
                         "train.eval_at_epoch_end=false", *extra])
trainer = Trainer(cfg)
trainer.dev_data = []  # no evaluation: the check below drives applied() itself
trainer.fit()
model, ema = trainer.module, trainer.ema
params = [p for _, p in model.named_parameters() if p.requires_grad]
persistent = [p for p in params if p.ds_persist]
assert persistent and len(persistent) < len(params), "expected persistent and partitioned params"


def state():
    return ([p.ds_tensor.clone() for p in params], [p.data.clone() for p in persistent])


def full_model() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in (trainer.engine._zero3_consolidated_16bit_state_dict()
                                      or {}).items()}


parts0, gathered0 = state()
weights0 = full_model()
with ema.for_checkpoint(model):  # the full fp32 shadow on rank 0 (collective)
    full_ema = ema.state_dict()["shadow"] if trainer.rank == 0 else None
with ema.applied(model):
    for p, s in zip(params, ema.shadow, strict=True):
        assert torch.equal(p.ds_tensor, s.to(p.ds_tensor.dtype))
    for p, s in zip(params, ema.shadow, strict=True):  # gathered copies show them too
        if not p.ds_persist:
            continue
        rank, pn = torch.distributed.get_rank(), p.partition_numel()
        mine = p.data.reshape(-1)[rank * pn:(rank + 1) * pn]
        assert torch.equal(mine, s[:mine.numel()].to(p.dtype))
    seen = full_model()
    model.eval()
    with torch.no_grad():  # a forward through the ZeRO-3 hooks works
        batch = trainer.collate([trainer.dataset[i] for i in range(4)])
        model(**_model_inputs(batch, trainer.accelerator.device, with_labels=False))
    model.train()
if trainer.rank == 0:
    assert any(not torch.equal(seen[n], weights0[n]) for n in full_ema)
    for n, v in full_ema.items():
        assert torch.equal(seen[n], v.to(seen[n].dtype)), n
parts1, gathered1 = state()
assert all(torch.equal(a, b) for a, b in zip(parts0, parts1, strict=True))
assert all(torch.equal(a, b) for a, b in zip(gathered0, gathered1, strict=True))
after = full_model()
assert all(torch.equal(weights0[n], after[n]) for n in weights0)
print(f"rank {trainer.rank}: EMA applied and restored bit-exactly")
trainer.close()  # as `mtl-dist train` ends: gloo torn down while both ranks live
