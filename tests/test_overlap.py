"""`train.overlap_optimizer`: the flat AdamW step cut into per-layer chunks that the next
forward waits for one by one (CPU: deferred until then; the CUDA streams: test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl_dist.config import load_config
from mtl_dist.errors import ConfigError, MtlDistWarning
from mtl_dist.master import MasterWeights
from mtl_dist.overlap import OverlappedStep, chunk_spans, misaligned_spans
from tests._runs import (
    DEMO,
    assert_same_tensors,
    checkpoint_model,
    records,
    run_cli,
    train_losses,
)
from tests.test_bf16_weights import _trainer

FLAT = ["train.bf16_weights=true", "train.flat_masters=true", "train.warmup_ratio=0"]
NO_EMA = ["train.ema_decay=null"]  # EMA settles the step before each update: no overlap


class _Encoder(nn.Module):
    """Embeddings, three layers and a pooler, read in that order (`skip`: layers the forward
    leaves out, as a layer-drop model would)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.pool = nn.Linear(8, 8)
        self.skip: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for k, layer in enumerate(self.layer):
            if k not in self.skip:
                h = layer(h)
        return self.pool(h)


def _flat_encoder():
    torch.manual_seed(0)
    encoder = _Encoder()
    masters = MasterWeights(encoder, [list(encoder.parameters())])
    return encoder, {0: masters.segments[0]}


def test_chunks_cover_every_flat_element_once_in_the_order_the_forward_reads_them():
    encoder, segments = _flat_encoder()
    chunks = chunk_spans(encoder.layer, segments)
    sizes = [sum(p.numel() for p in m.parameters()) for m in (encoder.embed, *encoder.layer)]
    # chunk 0: the embeddings (start of the buffer) and the pooler (its end), then one per layer
    assert chunks[0] == [(0, slice(0, sizes[0])), (0, slice(sum(sizes), sum(sizes) + 72))]
    start = sizes[0]
    for k in range(3):
        assert chunks[k + 1] == [(0, slice(start, start + sizes[k + 1]))]
        start += sizes[k + 1]
    covered = sorted((s.start, s.stop) for spans in chunks for _, s in spans)
    assert [b for _, b in covered[:-1]] == [a for a, _ in covered[1:]]  # no gap, no overlap
    assert covered[0][0] == 0 and covered[-1][1] == segments[0].master.numel()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_each_chunk_runs_just_before_the_module_that_reads_it(compiled):
    encoder, segments = _flat_encoder()
    if compiled:  # the wait goes in front of the compiled call, not into it
        for layer in encoder.layer:
            layer.compile(backend="eager")
    overlap = OverlappedStep(encoder, encoder.layer, segments, torch.device("cpu"))
    done, seen = [], []

    def launch():
        done.append("launch")
        return lambda i, span: done.append(span.start)

    overlap.run(launch)
    assert done == ["launch"]  # deferred: nothing updated yet
    for name, module in [("embed", encoder.embed), *((f"layer{k}", m)
                                                      for k, m in enumerate(encoder.layer))]:
        module.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, len(done))))
    encoder(torch.randn(2, 4, dtype=torch.bfloat16))
    starts = [s.start for spans in overlap.chunks for _, s in spans]
    assert done == ["launch", *starts]  # every chunk once, in order
    # chunk 0 (two spans) before the embeddings, chunk k + 1 right before layer k
    assert seen == [("embed", 3), ("layer0", 4), ("layer1", 5), ("layer2", 6)]
    encoder(torch.randn(2, 4, dtype=torch.bfloat16))
    assert len(done) == 6  # nothing pending: a second forward runs nothing again
    overlap.run(launch)
    overlap.settle()
    assert done[6:] == ["launch", *starts]


def test_a_step_still_pending_runs_before_the_next_one():
    encoder, segments = _flat_encoder()
    overlap = OverlappedStep(encoder, encoder.layer, segments, torch.device("cpu"))
    done = []
    for step in (1, 2):
        overlap.run(lambda step=step: lambda i, span: done.append((step, span.start)))
    overlap.settle()
    assert [s for s, _ in done] == [1] * 5 + [2] * 5


def test_a_chunk_whose_layer_the_forward_skipped_runs_when_the_forward_ends():
    """Before the backward and the next step read the gradients it reads (CPU)."""
    encoder, segments = _flat_encoder()
    overlap = OverlappedStep(encoder, encoder.layer, segments, torch.device("cpu"))
    done = []
    overlap.run(lambda: lambda i, span: done.append(span.start))
    encoder.skip = {1}
    encoder.layer[2].register_forward_pre_hook(lambda m, a: done.append("layer2"))
    encoder(torch.randn(2, 4, dtype=torch.bfloat16))
    starts = [s.start for spans in overlap.chunks for _, s in spans]
    # chunks 0, 1 and 3 as the forward reached them, chunk 2 (layer 1's) at its end
    assert done == [*starts[:3], starts[4], "layer2", starts[3]]


def test_misaligned_spans_are_counted():
    encoder, segments = _flat_encoder()  # sizes 40, 72, 72, 72, 72: all multiples of 8
    assert misaligned_spans(chunk_spans(encoder.layer, segments)) == 0
    torch.manual_seed(0)
    odd = nn.Module()
    odd.layer = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])  # 12 each
    masters = MasterWeights(odd, [list(odd.parameters())])
    chunks = chunk_spans(odd.layer, {0: masters.segments[0]})
    assert [s.start for spans in chunks for _, s in spans] == [0, 12]
    assert misaligned_spans(chunks) == 1


def test_on_cpu_a_warning_says_nothing_overlaps(tmp_path):
    with pytest.warns(MtlDistWarning, match=r"train.overlap_optimizer: nothing overlaps \(no "
                      r"CUDA streams on CPU.*same results as without it"):
        _trainer(tmp_path, "run", *FLAT, *NO_EMA, "train.overlap_optimizer=true")


def test_needs_flat_masters():
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.mixed_precision=bf16", "train.bf16_weights=true",
                           "train.overlap_optimizer=true"])
    assert str(err.value).count("\n") == 0
    assert "train.overlap_optimizer" in str(err.value) and "flat_masters=false" in str(err.value)


def _one_step(trainer):
    """One micro-step and optimizer step through the trainer's own code; the batch."""
    trainer.batch_sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    trainer.group_tasks.add(batch["task_id"])
    trainer._forward_backward(batch, 1, True, True)
    trainer._optimizer_step()
    return batch


def test_in_training_the_next_forward_updates_each_layer_just_before_it_runs(tmp_path):
    trainer = _trainer(tmp_path, "run", *FLAT, *NO_EMA, "train.overlap_optimizer=true",
                       "train.gradient_accumulation_steps=1")
    masters = trainer.masters
    layers = trainer.module.encoder.encoder.layer
    before = [seg.master.clone() for seg in masters.segments]
    batch = _one_step(trainer)
    # stepped on the host (AdamW's step counts), not yet in the buffers
    assert trainer.optimizer.optimizer._host_step == {0: 1, 1: 1}
    assert all(torch.equal(a, seg.master) for a, seg in zip(before, masters.segments, strict=True))

    def layer_masters(k):
        return [masters.master(p) for p in layers[k].parameters()]

    old = [[m.clone() for m in layer_masters(k)] for k in range(len(layers))]

    def same(k):
        return [torch.equal(m, o) for m, o in zip(layer_masters(k), old[k], strict=True)]

    seen = []
    for k, layer in enumerate(layers):  # after the overlap's own wait
        layer.register_forward_pre_hook(lambda mod, a, k=k: seen.append(
            (not all(same(k)), k + 1 == len(layers) or all(same(k + 1)))))
    trainer._forward_backward(batch, 1, True, True)
    # each layer's masters were updated when it ran (the attention key bias, whose gradient
    # is 0, stays as it was), the next layer's not yet
    assert seen == [(True, True)] * len(layers)
    assert not any(torch.equal(a, seg.master) for a, seg in zip(before, masters.segments, strict=True))


def _fit(tmp_path, name, *extra):
    # checkpoints at 4 and 8 without an evaluation before them (its forward would apply the
    # pending chunks itself), evaluations at 6 and 12
    trainer = _trainer(tmp_path, name, *FLAT, "train.max_steps=12", "train.eval_steps=6",
                       "checkpoint.save_steps=4",
                       "train.gradient_accumulation_steps=2", "train.fused_clipping=true",
                       "train.max_grad_norm=0.5", *extra)
    trainer.fit()
    return trainer


def _evals(output_dir):
    return [{k: v for k, v in r.items() if not k.endswith("_s") and "time" not in k}
            for r in records(output_dir, "eval")]


def test_training_with_the_switch_is_bit_exact_evaluations_checkpoints_and_resume(tmp_path):
    """Dropout on, two micro-steps per step, clipping, evaluations at 6 and 12, checkpoints
    at 4, 8 and 12: every loss, evaluation and saved tensor as without the switch."""
    plain = _fit(tmp_path, "plain", *NO_EMA)
    over = _fit(tmp_path, "overlap", *NO_EMA, "train.overlap_optimizer=true")
    assert over.optimizer.optimizer._host_step == {0: 12, 1: 12}
    assert train_losses(tmp_path / "overlap") == train_losses(tmp_path / "plain")
    assert len(_evals(tmp_path / "plain")) == 2
    assert _evals(tmp_path / "overlap") == _evals(tmp_path / "plain")
    for step in (4, 8, 12):
        assert_same_tensors(checkpoint_model(tmp_path / "overlap", step),
                            checkpoint_model(tmp_path / "plain", step))
    assert_same_tensors(dict(over.masters.named_parameters()),
                        dict(plain.masters.named_parameters()))
    a, b = over.optimizer.state_dict()["state"], plain.optimizer.state_dict()["state"]
    for key in a:
        assert_same_tensors(a[key], b[key])
    # stopped at 5, resumed with the switch: as the straight run
    _fit(tmp_path, "split", *NO_EMA, "train.overlap_optimizer=true", "train.stop_after_steps=5")
    _fit(tmp_path, "split", *NO_EMA, "train.overlap_optimizer=true", "train.resume=auto")
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "plain")
    assert_same_tensors(checkpoint_model(tmp_path / "split", 12),
                        checkpoint_model(tmp_path / "plain", 12))


def test_with_ema_the_step_settles_before_each_update_and_trains_bit_exact(tmp_path):
    common = ["train.max_steps=6", "train.ema_decay=0.9"]
    _fit(tmp_path, "plain", *common)
    _fit(tmp_path, "overlap", *common, "train.overlap_optimizer=true")
    assert train_losses(tmp_path / "overlap") == train_losses(tmp_path / "plain")
    assert _evals(tmp_path / "overlap") == _evals(tmp_path / "plain")
    assert_same_tensors(checkpoint_model(tmp_path / "overlap", 6),
                        checkpoint_model(tmp_path / "plain", 6))


@pytest.mark.slow  # two gloo ranks under accelerate launch
def test_two_ranks_under_ddp_train_bit_exact(tmp_path):
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=6", "train.log_steps=1",
              "train.mixed_precision=bf16", *FLAT, *NO_EMA,
              "train.gradient_accumulation_steps=2", "checkpoint.save_best=false",
              "train.eval_at_epoch_end=false"]
    for name, extra in {"plain": [], "overlap": ["train.overlap_optimizer=true"]}.items():
        run_cli(["train", str(DEMO), f"train.output_dir={tmp_path / name}", *common, *extra],
                procs=2)
    assert len(train_losses(tmp_path / "plain")) == 6
    assert train_losses(tmp_path / "overlap") == train_losses(tmp_path / "plain")
    assert_same_tensors(checkpoint_model(tmp_path / "overlap", 6),
                        checkpoint_model(tmp_path / "plain", 6))


def test_an_encoder_without_a_layer_list_is_one_line_naming_the_switch(tmp_path):
    with pytest.raises(ConfigError) as err:
        _trainer(tmp_path, "run", *FLAT, "train.overlap_optimizer=true",
                 "model.arch.model_type=distilbert")
    assert str(err.value).count("\n") == 0
    assert "'train.overlap_optimizer'" in str(err.value) and "DistilBertModel" in str(err.value)
