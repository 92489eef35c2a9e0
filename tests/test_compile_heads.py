"""`train.compile_heads`: each task's dropout + head + loss compiled as one graph — the same
logits, losses and gradients as eager, the same parameters and state dict (CPU; the GPU's
gain: benchmarks/throughput.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from mtl_dist.config import load_config
from mtl_dist.model import HEADS, compile_heads, enable_packed_attention
from tests._models import tiny_model
from tests._runs import (
    DEMO,
    FAST,
    assert_losses_close,
    assert_same_tensors,
    checkpoint_model,
    run_cli,
    train_losses,
)
from tests.test_fused_qkv import loss_of
from tests.test_packing import NO_DROPOUT


@pytest.mark.parametrize("head", sorted(HEADS))
def test_compiled_heads_give_eager_losses_and_gradients(head):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = tiny_model(head=head)
    eager.heads["1"] = copy.deepcopy(eager.heads["0"])  # a second task: a second head
    eager.head_steps["1"] = type(eager.head_steps["0"])(eager.dropout, eager.heads["1"])
    enable_packed_attention(eager, 16)
    compiled = copy.deepcopy(eager)
    assert compile_heads(compiled) == 2
    # the compiled steps hold the copy's own head and dropout, not the original's
    assert compiled.head_steps["0"].head is compiled.heads["0"]
    assert compiled.head_steps["1"].dropout is compiled.dropout
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for packed in (False, True):
        want, got = loss_of(eager, packed), loss_of(compiled, packed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        eager.zero_grad(), compiled.zero_grad()
        want.backward(), got.backward()
        grads = dict(compiled.named_parameters())
        for name, p in eager.named_parameters():
            if p.grad is None:  # the idle head
                assert grads[name].grad is None, name
            else:
                torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6,
                                           msg=name)
    with torch.no_grad():  # evaluation, and prediction without labels
        ids = torch.randint(1, 50, (3, 9))
        mask = torch.ones_like(ids)
        for task in (0, 1):
            want, got = eager(ids, mask, task)[1], compiled(ids, mask, task)[1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the compiled function ran: Dynamo made frames for it
    assert counters["stats"]["unique_graphs"] > 0


def test_the_trainer_compiles_every_tasks_head(tmp_path):
    from mtl_dist.trainer import Trainer

    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/c",
                             "train.compile_heads=true"])
    trainer = Trainer(cfg)
    steps = trainer.module.head_steps
    assert len(steps) == len(cfg.tasks) >= 2
    assert all(step._compiled_call_impl is not None for step in steps.values())
    trainer.close()
    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}/out2", f"data.cache_dir={tmp_path}/c"])
    trainer = Trainer(cfg)
    assert all(step._compiled_call_impl is None for step in trainer.module.head_steps.values())
    trainer.close()


@pytest.mark.slow
def test_compiled_heads_train_like_eager_heads(tmp_path):
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=4", "train.log_steps=1",
              "checkpoint.save_best=false", "train.eval_at_epoch_end=false", *NO_DROPOUT]
    run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/eager", *common])
    run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/compiled",
             "train.compile_heads=true", *common], timeout=600)
    assert_losses_close(tmp_path / "eager", tmp_path / "compiled", 1e-5, steps=4)


@pytest.mark.slow
def test_stop_and_resume_with_compiled_heads_and_dropout_is_bit_exact(tmp_path):
    """The compiled dropout draws its own random stream (Inductor's, seeded from the
    generator): a resumed run must still draw the run's masks, step for step."""
    from mtl_dist.trainer import Trainer

    common = [f"data.cache_dir={tmp_path}/c", *FAST, "train.max_steps=8",
              "train.compile_heads=true", "model.dropout=0.3"]
    straight = tmp_path / "straight"
    Trainer(load_config(DEMO, [f"train.output_dir={straight}", *common])).fit()
    split = tmp_path / "split"
    first = Trainer(load_config(DEMO, [f"train.output_dir={split}", *common,
                                       "train.stop_after_steps=3"])).fit()
    assert first["global_step"] == 3
    Trainer(load_config(DEMO, [f"train.output_dir={split}", *common, "train.resume=auto"])).fit()
    assert len(train_losses(split)) == 8
    assert train_losses(split) == train_losses(straight)
    assert_same_tensors(checkpoint_model(split, 8), checkpoint_model(straight, 8))
