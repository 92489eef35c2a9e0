"""CPU checks of the CUDA-graph step's pieces that need no GPU (the rest: tests/test_gpu.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from mtl_dist.config import load_config
from mtl_dist.graphs import _weakly
from mtl_dist.trainer import Trainer
from tests._runs import DEMO, FAST


class _HookOwner:
    """Owns a parameter and hands its gradients to a method, as StepGraphs does."""

    def __init__(self):
        self.param = nn.Parameter(torch.zeros(8))
        self.calls = 0
        self.param.register_post_accumulate_grad_hook(_weakly(self.count))

    def count(self, p: nn.Parameter) -> None:
        self.calls += 1


def test_weak_gradient_hook_fires_while_its_owner_lives_and_lets_it_go():
    owner = _HookOwner()
    (owner.param * 2).sum().backward()
    (owner.param * 3).sum().backward()
    assert owner.calls == 2
    param, gone = owner.param, weakref.ref(owner)
    del owner
    gc.collect()  # a bound method as the hook keeps the owner: autograd hides that cycle
    assert gone() is None
    (param * 2).sum().backward()  # the orphaned hook is a no-op, not an error


def _demo_trainer(tmp_path, *overrides):
    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/c",
                             *FAST, "train.device=cpu", *overrides])
    return Trainer(cfg)


def _met_shapes(trainer, ranges):
    """(task, width, opens its group) -> first (epoch, step), from the real collated batches."""
    accum = trainer.cfg.train.gradient_accumulation_steps
    met = {}
    for epoch, start, stop in ranges:
        for step in range(start, stop):
            batch = trainer.loader.collate_fn(
                [trainer.dataset[i] for i in trainer.batch_sampler.flat_indices(epoch, step)])
            key = (batch["task_id"], batch["input_ids"].shape[-1], step % accum == 0)
            met.setdefault(key, (epoch, step))
    return met


@pytest.mark.parametrize("overrides", [
    ["train.gradient_accumulation_steps=2", "sampler.group_by_length=true"],
    ["data.pad_to_multiple_of=1"],
    ["data.pad_to_multiple_of=16", "data.max_length=20"],  # 32 clamped to max_length
    ["data.packing=true", "data.pack_multiple=32", "train.gradient_accumulation_steps=3"],
])
def test_predicted_shapes_are_those_the_collate_makes_over_the_rest_of_the_run(tmp_path,
                                                                                overrides):
    """train.precapture_graphs captures one graph per predicted (task, shape): the prediction
    (vectorised, from lengths) must name each shape the run meets, at its first step."""
    trainer = _demo_trainer(tmp_path, "train.max_steps=400", *overrides)
    per_epoch = trainer.plan.num_steps(0)
    accum = trainer.cfg.train.gradient_accumulation_steps
    assert 400 * accum > per_epoch  # the run crosses an epoch boundary
    trainer.batch_sampler.set_epoch(0)
    ranges = list(trainer._remaining_micro_steps())
    assert ranges[0][:2] == (0, 0) and len(ranges) >= 2
    assert sum(-(-(stop - start) // accum) for _, start, stop in ranges) == 400
    predicted = trainer._first_step_of_each_shape()
    met = _met_shapes(trainer, ranges)
    assert len(met) >= 3 and predicted == sorted(met.values())
    if "data.max_length=20" in overrides:  # the clamp of a rounded width to max_length
        assert any(width == 20 for _, width, _ in met)


def test_predicted_shapes_start_at_a_resumed_cursor_and_end_with_the_run(tmp_path):
    trainer = _demo_trainer(tmp_path, "train.num_epochs=2", "train.gradient_accumulation_steps=2")
    per_epoch = trainer.plan.num_steps(0)
    trainer.batch_sampler.set_epoch(1)
    trainer.batch_sampler.advance(6)  # as a resume 3 optimizer steps into epoch 1 leaves it
    trainer.state.epoch = 1
    trainer.state.global_step = -(-per_epoch // 2) + 3
    assert list(trainer._remaining_micro_steps()) == [(1, 6, per_epoch)]
    assert trainer._first_step_of_each_shape() == \
        sorted(_met_shapes(trainer, [(1, 6, per_epoch)]).values())


def test_prediction_at_start_up_names_every_shape_a_real_run_and_its_resume_meet(tmp_path,
                                                                                 monkeypatch):
    """End to end on CPU (no graphs there, so the trainer is watched instead): what
    `_first_step_of_each_shape` predicts when fit() starts is what `_forward_backward` then
    meets, first sighting by first sighting — with accumulation 3 (a shorter last group per
    epoch), across an epoch boundary, and again from a real checkpoint's cursor."""
    predicted, met = [], []
    forward_backward = Trainer._forward_backward

    def watched(self, batch, group, first_in_group, last_in_group):
        key = (batch["task_id"], batch["input_ids"].shape[-1], first_in_group)
        if key not in met[-1]:
            met[-1][key] = (self.batch_sampler.epoch, self.batch_sampler.position)
        return forward_backward(self, batch, group, first_in_group, last_in_group)

    def predict(self):
        predicted.append(self._first_step_of_each_shape())
        ranges.append(list(self._remaining_micro_steps()))
        met.append({})

    ranges = []

    monkeypatch.setattr(Trainer, "_forward_backward", watched)
    monkeypatch.setattr(Trainer, "_precapture_graphs", predict)
    common = ["train.max_steps=100", "train.gradient_accumulation_steps=3",
              "data.pad_to_multiple_of=16", "train.eval_steps=1000",
              "checkpoint.save_steps=1000", "model.arch.num_hidden_layers=1"]
    first = _demo_trainer(tmp_path, *common, "train.stop_after_steps=60")
    assert first.plan.num_steps(0) % 3 and 60 * 3 < first.plan.num_steps(0) < 100 * 3
    first.fit()
    _demo_trainer(tmp_path, *common, "train.resume=auto").fit()
    assert len(predicted) == 2 and all(len(p) >= 4 for p in predicted)
    assert predicted == [sorted(m.values()) for m in met]
    assert predicted[1][0] == (0, 180)  # the resumed cursor, not the epoch's start
    per_epoch = first.plan.num_steps(0)  # stop_after_steps bounds the first invocation's
    assert ranges == [[(0, 0, 180)], [(0, 180, per_epoch), (1, 0, 300 - 3 * -(-per_epoch // 3))]]


def _tiny_bert_model():
    from types import SimpleNamespace

    from mtl_dist.model import build_model
    arch = SimpleNamespace(model_type="bert", hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return build_model(SimpleNamespace(pretrained=None, arch=arch, head="attention",
                                       dropout=0.0), vocab_size=50, num_labels=[3, 7])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_linear_weight_grads_written_into_targets_are_autograds(compiled):
    """train.direct_weight_grads: each transformer-layer Linear's weight gradient lands in
    its target (overwritten at every backward, never summed), its `.grad` stays None, every
    other gradient and the loss are unchanged; also inside torch.compile'd layers."""
    from torch._dynamo.utils import counters

    from mtl_dist.graphs import WeightGradIntoLinear, write_weight_grads_into
    from mtl_dist.model import compile_encoder_layers, transformer_layers

    torch._dynamo.reset()
    counters.clear()
    model, ref = _tiny_bert_model(), _tiny_bert_model()
    if compiled:
        compile_encoder_layers(model), compile_encoder_layers(ref)
    linears = [m for m in transformer_layers(model, "test").modules() if type(m) is nn.Linear]
    # views of one flat buffer, as MasterWeights.bf16_grad_views gives them
    flat = torch.full((sum(m.weight.numel() for m in linears),), float("nan"))
    spans = torch.cumsum(torch.tensor([0] + [m.weight.numel() for m in linears]), 0).tolist()
    targets = {id(m.weight): flat[a:b].view_as(m.weight)
               for m, a, b in zip(linears, spans, spans[1:], strict=False)}
    direct = write_weight_grads_into(transformer_layers(model, "test"), targets)
    assert len(direct) == 6 * 2 and all(isinstance(m, WeightGradIntoLinear) for m in linears)
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(5, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 2, 1, 0])
    exact = dict(rtol=0, atol=0) if not compiled else dict(rtol=1e-5, atol=1e-6)
    for _ in range(2):  # the second backward overwrites the targets
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        loss_ref, _ = ref(ids, mask, task_id=1, labels=labels)
        loss, _ = model(ids, mask, task_id=1, labels=labels)
        loss_ref.backward(), loss.backward()
        torch.testing.assert_close(loss, loss_ref, **exact)
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(),
                                     strict=True):
            if id(p) in direct:
                assert p.grad is None, name
                torch.testing.assert_close(targets[id(p)], q.grad, **exact, msg=name)
            elif q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, **exact, msg=name)
    with torch.no_grad():  # evaluation: a plain Linear
        torch.testing.assert_close(model(ids, mask, task_id=0)[1], ref(ids, mask, task_id=0)[1],
                                   **exact)
    if compiled:  # the op stays inside the compiled layer: no graph break, one graph per model
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] >= 2
    # a second call points the swapped Linears at new targets
    again = {k: torch.zeros_like(v) for k, v in targets.items()}
    assert write_weight_grads_into(transformer_layers(model, "test"), again) == direct
    model.zero_grad(set_to_none=True)
    model(ids, mask, task_id=1, labels=labels)[0].backward()
    for p in model.parameters():
        if id(p) in direct:
            torch.testing.assert_close(again[id(p)], targets[id(p)], rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [
    ["train.bf16_weights=true", "train.mixed_precision=bf16", "train.cuda_graphs=true"],
    ["train.bf16_weights=true", "train.mixed_precision=bf16", "train.flat_masters=true"],
    ["train.bf16_weights=true", "train.mixed_precision=bf16", "train.flat_masters=true",
     "train.cuda_graphs=true", "train.gradient_accumulation_steps=2"],
], ids=["no_flat_masters", "no_graphs", "accumulation"])
def test_direct_weight_grads_needs_flat_masters_graphs_and_single_micro_steps(overrides):
    from mtl_dist.errors import ConfigError
    with pytest.raises(ConfigError, match=r"config key 'train.direct_weight_grads': expected "
                                          r"false with .* got true"):
        load_config(DEMO, [*overrides, "train.direct_weight_grads=true"])
    load_config(DEMO, overrides)
