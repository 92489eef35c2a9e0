"""Run under a 2-process launcher: ZeRO steps with gradient accumulation and heads that skip
micro-steps equal plain torch AdamW + clipping on the same (all ranks') batches.

argv: OUTPUT_DIR CACHE_DIR STAGE:OFFLOAD[:bf16]... (e.g. 3:1, ZeRO-3 with the optimizer on
CPU; with bf16, DeepSpeed's BF16_Optimizer, checked to step only), each
checked in turn in the one process (DeepSpeed's start-up dominates). One shared Linear, three heads; each step has
two micro-batches of one task each, in patterns where a head is first used at the second
micro-step after earlier steps used it, and where a head is used only at the first. Under
DeepSpeed's own accumulation counter with optimizer offload the latter lost its gradient;
ZeRO-3 partitions and ZeRO-1/2 offload accumulators added stale gradients to the former.
Prints "matches torch" once per rank and setting; exits non-zero (assertion) otherwise.
"""

import contextlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402  (after choosing its accelerator)

from mtl_dist import zero  # noqa: E402

out, _cache, *settings = sys.argv[1:]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ACCUMULATE, BATCH = 2, 4
PLAN = [(0, 1), (0, 1), (2, 1), (1, 1), (0, 2), (2, 0), (1, 0), (0, 1)]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(8, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, n) for n in (3, 5, 2))

    def forward(self, x, task):
        return self.heads[task](torch.tanh(self.encoder(x))).pow(2).mean()


def param_groups(model):
    """The trainer's layout: the encoder's group, then one group per head."""
    return [{"params": list(model.encoder.parameters()), "head": None}] + [
        {"params": list(h.parameters()), "head": i} for i, h in enumerate(model.heads)]


def ds_config(stage: int, offload: bool, precision: str) -> dict:
    path = Path(out) / f"ds_{stage}_{int(offload)}_{precision}.json"
    section = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    # bf16 with fp32 accumulation: DeepSpeed's BF16_Optimizer (no bit16_groups to clear)
    extra = {"data_types": {"grad_accum_dtype": "fp32"}} if precision == "bf16" else {}
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"zero_optimization": section, **extra}))
    dist.barrier()
    train = SimpleNamespace(deepspeed_config=str(path), per_device_batch_size=BATCH,
                            gradient_accumulation_steps=ACCUMULATE, max_grad_norm=1.0,
                            zero_stage=stage, mixed_precision=precision)
    return zero.build_ds_config(SimpleNamespace(train=train), world)


def check(stage: int, offload: bool, precision: str) -> None:
    torch.manual_seed(0)
    reference, model = Model(), Model()
    model.load_state_dict(reference.state_dict())
    reference_opt = torch.optim.AdamW(param_groups(reference), lr=1e-2)
    engine, ds_optimizer = zero.initialize(model, torch.optim.AdamW(param_groups(model), lr=1e-2),
                                           ds_config(stage, offload, precision), torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    for step, tasks in enumerate(PLAN, 1):
        # every rank's micro-batches, the same on every rank: rank r trains on batches[.][r]
        batches = [torch.randn(world, BATCH, 8, generator=generator) for _ in tasks]
        reference_opt.zero_grad(set_to_none=True)  # idle heads: no gradient, untouched
        for task, x in zip(tasks, batches, strict=True):
            (sum(reference(x[r], task) for r in range(world)) / (world * ACCUMULATE)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        reference_opt.step()
        for task, x in zip(tasks, batches, strict=True):
            loss = engine(x[rank].to(next(model.parameters()).dtype), task)
            engine.backward(loss / ACCUMULATE, scale_wrt_gas=False)
        zero.engine_step(engine, ds_optimizer, {0, 1, 2} - set(tasks))
        if precision == "bf16":  # steps (it crashed); bf16 weights are not torch's fp32 ones
            assert torch.isfinite(loss), (step, loss)
            continue
        gathered = deepspeed.zero.GatheredParameters(list(model.parameters())) \
            if stage == 3 else contextlib.nullcontext()
        with gathered:
            for (name, value), expected in zip(model.named_parameters(), reference.parameters(),
                                             strict=True):
                torch.testing.assert_close(
                    value.detach(), expected.detach(), rtol=1e-5, atol=1e-6,
                    msg=f"stage {stage} offload {offload} step {step} {name}")
    done = "steps" if precision == "bf16" else "matches torch"
    print(f"rank {rank}: stage {stage} offload {int(offload)} {precision} {done}", flush=True)


for setting in settings:
    stage_text, offload_text, *precision = setting.split(":")
    check(int(stage_text), offload_text == "1", precision[0] if precision else "no")
dist.destroy_process_group()  # as Trainer.close does: gloo torn down while both ranks live
# Six DeepSpeed engines in one process: freeing them at interpreter exit aborted a rank now
# and then ("terminate called without an active exception"), after every check had passed.
# A run (one engine) tears down cleanly; this script's result is what it printed above.
sys.stdout.flush()
os._exit(0)
