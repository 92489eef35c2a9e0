"""`train.compile_heads`: each task's dropout + head + loss compiled as one graph — the same
logits, losses and gradients as eager, the same parameters and state dict (CPU; the GPU's
gain: benchmarks/throughput.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from mtl_dist.config import load_config
from mtl_dist.errors import ConfigError
from mtl_dist.model import HEADS, compile_heads, enable_packed_attention
from tests._models import tiny_model
from tests._runs import (
    DEMO,
    FAST,
    NO_DROPOUT,
    assert_losses_close,
    assert_same_tensors,
    checkpoint_model,
    run_cli,
    train_losses,
)
from tests.test_fused_qkv import loss_of


@pytest.fixture
def no_eager_fallback():
    """A compiled head that Dynamo would run eager (its recompile limit reached: one warning,
    nothing else) raises instead; Dynamo's config (and compile_heads' change to its limit) is
    restored after."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True,
                                    recompile_limit=torch._dynamo.config.recompile_limit):
        yield


@pytest.mark.parametrize("head", sorted(HEADS))
def test_compiled_heads_give_eager_losses_and_gradients(head, no_eager_fallback):
    """Three tasks of 3, 7 and 15 labels, padded and packed batches of other shapes: every
    training call compiled (Dynamo's recompile limit never reached: it would fall back to
    eager without a word), eager's losses and gradients; evaluation runs eager."""
    torch._dynamo.config.recompile_limit = 2  # low enough that compile_heads must raise it
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = tiny_model(head=head, num_labels=(3, 7, 15))
    enable_packed_attention(eager, 16)
    compiled = copy.deepcopy(eager)
    assert compile_heads(compiled) == 3
    assert torch._dynamo.config.recompile_limit == 5  # 3 label counts + 2
    # the compiled steps hold the copy's own head and dropout, not the original's
    assert compiled.head_steps["0"].head is compiled.heads["0"]
    assert compiled.head_steps["1"].dropout is compiled.dropout
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for task in (0, 1, 2):
        for packed in (False, True):
            want, got = loss_of(eager, packed, task), loss_of(compiled, packed, task)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            eager.zero_grad(), compiled.zero_grad()
            want.backward(), got.backward()
            grads = dict(compiled.named_parameters())
            for name, p in eager.named_parameters():
                if p.grad is None:  # the idle heads
                    assert grads[name].grad is None, name
                else:
                    torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4,
                                               atol=1e-6, msg=name)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3  # at least one per label count
    with torch.no_grad():  # evaluation and prediction: eager, the same logits
        ids = torch.randint(1, 50, (3, 9))
        mask = torch.ones_like(ids)
        for task in (0, 1, 2):
            want, got = eager(ids, mask, task)[1], compiled(ids, mask, task)[1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for evaluation
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["unimplemented"], dict(counters["unimplemented"])


def test_a_replaced_head_gets_a_compiled_step_of_its_own():
    model = tiny_model(num_labels=(3, 3))
    compile_heads(model)
    old = model.head_steps["1"]
    model.heads["1"] = copy.deepcopy(model.heads["0"])
    with torch.no_grad():
        model.heads["1"].classifier.bias.add_(1.0)
    loss = loss_of(model, False, task=1)
    step = model.head_steps["1"]
    assert step is not old and step.head is model.heads["1"]
    assert step._compiled_call_impl is not None
    loss.backward()
    assert model.heads["1"].classifier.bias.grad is not None


def test_compile_heads_is_refused_with_zero3(tmp_path):
    with pytest.raises(ConfigError, match="'train.compile_heads': expected false with "
                                          "train.zero_stage=3"):
        load_config(DEMO, [f"train.output_dir={tmp_path}", "train.zero_stage=3",
                           "train.compile_heads=true"])


def test_the_trainer_compiles_every_tasks_head(tmp_path):
    from mtl_dist.trainer import Trainer

    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/c",
                             "train.compile_heads=true"])
    trainer = Trainer(cfg)
    steps = trainer.module.head_steps
    assert len(steps) == len(cfg.tasks) >= 2
    assert all(step._compiled_call_impl is not None for step in steps.values())
    trainer.close()
    for overrides, for_training in (([], True), (["train.compile_heads=true"], False)):
        cfg = load_config(DEMO, [f"train.output_dir={tmp_path}/out2",
                                 f"data.cache_dir={tmp_path}/c", *overrides])
        trainer = Trainer(cfg, for_training=for_training)  # off; evaluation only: eager
        assert all(step._compiled_call_impl is None
                   for step in trainer.module.head_steps.values())
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
def test_stop_and_resume_with_compiled_heads_and_dropout_is_bit_exact(tmp_path,
                                                                   no_eager_fallback):
    """The compiled dropout draws its own random stream (Inductor's, seeded from the
    generator; other masks than eager dropout's, checked here): a resumed run must still draw
    the run's masks, step for step. No head falls back to eager on the way (training,
    evaluation at step 8, the resume)."""
    from mtl_dist.trainer import Trainer

    common = [f"data.cache_dir={tmp_path}/c", *FAST, "train.max_steps=8", "model.dropout=0.3"]
    eager = tmp_path / "eager"
    Trainer(load_config(DEMO, [f"train.output_dir={eager}", *common])).fit()
    common.append("train.compile_heads=true")
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
    assert train_losses(straight)[1:] != train_losses(eager)[1:]  # the compiled masks
