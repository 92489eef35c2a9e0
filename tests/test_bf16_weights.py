"""`train.bf16_weights`: the model in bf16, fp32 master weights in the optimizer (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mtl_dist.config import load_config
from mtl_dist.errors import CheckpointError, ConfigError
from mtl_dist.trainer import Trainer
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


def _trainer(tmp_path, name, *extra, for_training: bool = True) -> Trainer:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for cls in (AcceleratorState, GradientState, PartialState):  # autocast on, then off
        cls._reset_state()
    return Trainer(load_config(DEMO, [f"train.output_dir={tmp_path / name}",
                                      f"data.cache_dir={tmp_path}/c", *FAST,
                                      "train.mixed_precision=bf16", *extra]),
                   for_training=for_training)


def test_trains_like_bf16_autocast_within_bf16_noise(tmp_path):
    common = ["train.max_steps=12", "train.gradient_accumulation_steps=2", "train.lr=1e-3",
              *NO_DROPOUT]
    _trainer(tmp_path, "autocast", *common).fit()
    trainer = _trainer(tmp_path, "bf16w", "train.bf16_weights=true", *common)
    trainer.fit()
    assert_losses_close(tmp_path / "autocast", tmp_path / "bf16w", 0.005, steps=12)
    # the switch did take effect: a bf16 model, fp32 masters in the optimizer
    assert {p.dtype for p in trainer.module.parameters()} == {torch.bfloat16}
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {p.dtype for p in opt_params} == {torch.float32}
    assert {id(p) for p in opt_params} == {id(m) for m in trainer.masters.masters}


def test_masters_keep_updates_too_small_for_bf16(tmp_path):
    """lr 1e-7: each AdamW update is far below a bf16 weight's resolution. The masters move,
    and the bf16 weights are always the masters rounded (a bf16-only optimizer would lose
    every one of these updates)."""
    trainer = _trainer(tmp_path, "tiny", "train.bf16_weights=true", "train.max_steps=4",
                       "train.lr=1e-7", "train.warmup_steps=0", "train.max_grad_norm=null",
                       "train.weight_decay=0.0")
    start = [m.detach().clone() for m in trainer.masters.masters]
    trainer.fit()
    moved = max(float((m.detach() - s).abs().max()) for m, s in zip(trainer.masters.masters, start,
                                                         strict=True))
    assert 0 < moved < 1e-5
    for p, m in zip(trainer.masters.params, trainer.masters.masters, strict=True):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))


def test_stop_and_resume_is_bit_exact_and_saves_fp32_masters(tmp_path):
    common = ["train.bf16_weights=true", "train.max_steps=16",
              "train.gradient_accumulation_steps=2"]
    _trainer(tmp_path, "straight", *common).fit()
    first = _trainer(tmp_path, "split", *common, "train.stop_after_steps=7").fit()
    assert first["global_step"] == 7
    _trainer(tmp_path, "split", *common, "train.resume=auto").fit()
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_losses(split) == train_losses(straight)
    assert_same_tensors(checkpoint_model(split, 16), checkpoint_model(straight, 16))
    masters = torch.load(split / "checkpoints" / "checkpoint-16" / "master_weights.pt",
                         weights_only=True)
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert {t.dtype for t in checkpoint_model(split, 16).values() if t.is_floating_point()} \
        == {torch.bfloat16}
    # best/ is exported from the masters: fp32, and the bf16 weights are them rounded
    best = load_file(str(split / "best" / "model.safetensors"))
    assert all(best[n].dtype == torch.float32 for n in masters)
    # evaluating best/ in a fresh bf16 model gives the score the run recorded for it
    evaluator = _trainer(tmp_path, "split", *common, for_training=False)
    evaluator.load_weights(split / "best")
    recorded = json.loads((split / "best" / "metrics.json").read_text())["score"]
    assert evaluator.evaluate()["score"] == pytest.approx(recorded, abs=1e-12)


def test_ema_tracks_the_masters_and_best_exports_its_fp32_shadow(tmp_path):
    trainer = _trainer(tmp_path, "ema", "train.bf16_weights=true", "train.max_steps=8",
                       "train.ema_decay=0.5")
    # it starts from the fp32 masters, not from their bf16 rounding (the model's weights)
    name, master = next(iter(trainer.masters.named_parameters()))
    assert torch.equal(trainer.ema.shadow[0], master.detach())
    assert not torch.equal(master.detach(), master.detach().to(torch.bfloat16).float())
    trainer.fit()
    shadow = dict(zip(trainer.ema.names, trainer.ema.shadow, strict=True))
    assert shadow.keys() == dict(trainer.masters.named_parameters()).keys()
    assert not torch.equal(shadow[name], master.detach())  # decay 0.5: it trails the masters
    assert trainer.early.best_step == 8  # the only evaluation: best/ holds step 8's shadow
    best = load_file(str(tmp_path / "ema" / "best" / "model.safetensors"))
    for n, t in shadow.items():
        assert best[n].dtype == torch.float32 and torch.equal(best[n], t.cpu()), n


@pytest.mark.slow  # two gloo ranks under accelerate launch
def test_two_ranks_under_ddp_train_like_autocast(tmp_path):
    """gloo DDP, 2 ranks, 2 micro-steps per group: the bf16 gradients are all-reduced (and
    summed over the group) in bf16, then moved into the masters: bf16 noise, no more."""
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=8", "train.log_steps=1",
              "train.mixed_precision=bf16", "train.gradient_accumulation_steps=2",
              "train.lr=1e-3", "checkpoint.save_best=false", "train.eval_at_epoch_end=false",
              *NO_DROPOUT]
    for name, extra in {"autocast": [], "bf16w": ["train.bf16_weights=true"]}.items():
        run_cli(["train", str(DEMO), f"train.output_dir={tmp_path / name}", *common, *extra],
                procs=2)
    assert_losses_close(tmp_path / "autocast", tmp_path / "bf16w", 0.005, steps=8)


def test_resume_across_the_switch_is_refused(tmp_path):
    _trainer(tmp_path, "run", "train.max_steps=8").fit()
    with pytest.raises(CheckpointError, match="bf16_weights.*checkpoint has false, this run "
                                              "has true"):
        _trainer(tmp_path, "run", "train.max_steps=16", "train.bf16_weights=true",
                 "train.resume=auto").fit()


@pytest.mark.parametrize("override, named", [
    ("train.mixed_precision=no", "train.mixed_precision=no"),
    ("train.mixed_precision=fp16", "train.mixed_precision=fp16"),
    ("train.zero_stage=2", "train.zero_stage=2"),
])
def test_bf16_weights_refuses_settings_it_cannot_serve(override, named):
    with pytest.raises(ConfigError, match=f"train.bf16_weights.*{named}"):
        load_config(DEMO, ["train.mixed_precision=bf16", "train.bf16_weights=true", override])
