"""GPU-only checks (skipped without CUDA): the CUDA-graph step computes what the eager step does."""

from __future__ import annotations

import pytest
import torch

from mtl_dist.config import load_config
from mtl_dist.trainer import Trainer, _model_inputs
from tests._runs import (
    DEMO,
    FAST,
    NO_DROPOUT,
    assert_losses_close,
    assert_same_tensors,
    checkpoint_model,
    train_losses,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMPILED_PACKED = ["train.compile=true", "data.packing=true", "data.pack_multiple=64"]
# CUDA graphs over flat fp32 masters of bf16 weights, clipping folded into AdamW
GRAPHED_FLAT_MASTERS = ["train.bf16_weights=true", "train.cuda_graphs=true",
                        "train.fused_clipping=true", "train.flat_masters=true",
                        "train.gradient_accumulation_steps=1"]
# ... with the layers compiled over packed rows, q/k/v in one GEMM, weight gradients in place
ROUTED_COMPILED = [*GRAPHED_FLAT_MASTERS, "train.direct_weight_grads=true", "train.fused_qkv=true",
                   *COMPILED_PACKED]


def _reset_accelerate_state() -> None:
    """A new Trainer in this process needs accelerate's singletons fresh."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for cls in (AcceleratorState, GradientState, PartialState):
        cls._reset_state()


def _captured(call) -> tuple[torch.cuda.CUDAGraph, object]:
    """`call` warmed up on a side stream, off the capture (as graphs.py does), then captured in
    a CUDA graph: the graph and what the captured call returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


def run(tmp_path, name, *extra, fresh_dynamo=False):
    """Train the demo config on CUDA for 30 steps (or as `extra` says): its output folder, the
    trainer and the weights before training. `fresh_dynamo`: start from a reset Dynamo, as a
    new process would, for tests that compare compiled runs bit for bit (run AD, H100: a
    process's first compiled run and a later one parted at step 4, cause not verified)."""
    if fresh_dynamo:
        torch._dynamo.reset()
    _reset_accelerate_state()
    out = tmp_path / name
    cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={tmp_path}/c", *FAST,
                             "train.max_steps=30", "train.mixed_precision=bf16",
                             "train.device=cuda", "train.gradient_accumulation_steps=2",
                             "sampler.group_by_length=true", *NO_DROPOUT, *extra])
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    trainer.fit()
    return out, trainer, before


@pytest.mark.parametrize("extra", [[], ["train.fused_clipping=true"]])
def test_cuda_graph_step_matches_eager_losses(tmp_path, extra):
    eager, _, _ = run(tmp_path, "eager")
    graphed, trainer, _ = run(tmp_path, "graphs", "train.cuda_graphs=true", *extra)
    assert trainer.graphs is not None and len(trainer.graphs.graphs) >= 3
    assert_losses_close(eager, graphed, 0.02, steps=30)


def test_bf16_weights_cuda_graphs_match_eager_and_fill_the_masters(tmp_path):
    """train.bf16_weights: the graphs hand each bf16 gradient over into its fp32 master's
    .grad (a casting copy, or add mid-group); the model's own .grad stays None."""
    eager, _, _ = run(tmp_path, "eager_bw", "train.bf16_weights=true")
    graphed, trainer, _ = run(tmp_path, "graphs_bw", "train.bf16_weights=true",
                              "train.cuda_graphs=true")
    assert any(not key[1] for key in trainer.graphs.graphs)  # accumulating graphs were used
    masters = trainer.masters
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in masters.params)
    assert all(trainer.graphs._static[id(p)][0] is masters.master(p).grad
               for p in masters.params)
    assert_losses_close(eager, graphed, 0.02, steps=30)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_flat_masters_with_cuda_graphs_train_like_per_tensor_masters(tmp_path, accumulation):
    """train.flat_masters on CUDA: the compiled flat AdamW kernel steps every encoder group
    every step, compiled once per group (no recompiles), and the model reads its weights.
    With one micro-step per group it reads the bf16 gradients the graphs left flat."""
    from torch._dynamo.utils import counters

    from mtl_dist.flat_adamw import FlatAdamW

    common = ["train.bf16_weights=true", "train.cuda_graphs=true", "train.fused_clipping=true",
              f"train.gradient_accumulation_steps={accumulation}"]
    plain, _, _ = run(tmp_path, "plain_bw", *common)
    counters.clear()
    flat, trainer, _ = run(tmp_path, "flat_bw", *common, "train.flat_masters=true")
    inner = trainer.optimizer.optimizer
    assert isinstance(inner, FlatAdamW) and inner._host_step == {0: 30, 1: 30}
    assert trainer.graphs.grads_stay_bf16 == (accumulation == 1)
    assert trainer.masters.grads_in_bf16 == (accumulation == 1)
    # compiled (fresh in this process: grads of this dtype), once per group shape
    assert 1 <= counters["stats"]["unique_graphs"] <= len(inner._segments)
    for i, seg in inner._segments.items():
        start = 0
        for m in trainer.optimizer.param_groups[i]["params"]:
            assert m.data_ptr() == seg.master[start:].data_ptr()
            start += m.numel()
        assert torch.equal(seg.weight, seg.master.to(torch.bfloat16))
    for p in trainer.masters.params:
        assert torch.equal(p.detach(), trainer.masters.master(p).detach().to(torch.bfloat16))
    assert_losses_close(plain, flat, 0.02, steps=30)


@pytest.mark.parametrize("extra", [[], ["train.compile=true", "data.packing=true",
                                         "data.pack_multiple=64"]],
                         ids=["graphs", "compiled_packed"])
def test_direct_weight_grads_train_like_the_copied_ones(tmp_path, extra):
    """train.direct_weight_grads: the transformer layers' Linear weight gradients, written
    by their GEMMs into the flat bf16 buffer inside the graphs (and the compiled layers),
    train like the graphs' copy of them, and the copy holds only the other encoder
    gradients."""
    from mtl_dist.graphs import WeightGradIntoLinear

    common = [*GRAPHED_FLAT_MASTERS, *extra]
    copied, _, _ = run(tmp_path, "copied", *common)
    direct, trainer, _ = run(tmp_path, "direct", *common, "train.direct_weight_grads=true")
    linears = [m for m in trainer.module.modules() if isinstance(m, WeightGradIntoLinear)]
    assert len(linears) == 6 * trainer.module.encoder.config.num_hidden_layers
    assert len(trainer.graphs._handed_over) == \
        len(trainer.graphs.encoder_params) - len(linears)
    assert_losses_close(copied, direct, 0.02, steps=30)


def _graphs_trainer_and_batch(tmp_path, name, *extra):
    """A trainer with CUDA graphs over flat bf16 masters (dropout off), and its first batch's
    model inputs and task id."""
    _reset_accelerate_state()
    trainer = Trainer(load_config(DEMO, [
        f"train.output_dir={tmp_path / name}", f"data.cache_dir={tmp_path}/c", *FAST,
        "train.mixed_precision=bf16", "train.device=cuda", *NO_DROPOUT,
        "train.bf16_weights=true", "train.cuda_graphs=true", "train.flat_masters=true",
        *extra]))
    trainer.batch_sampler.set_epoch(0)
    inputs = _model_inputs(next(iter(trainer.loader)), trainer.accelerator.device)
    return trainer, inputs, inputs.pop("task_id")


@pytest.mark.parametrize("extra", [[], COMPILED_PACKED, [*COMPILED_PACKED, "train.fused_qkv=true"]],
                         ids=["graphs", "compiled_packed", "compiled_packed_fused_qkv"])
def test_direct_weight_grads_fill_the_flat_buffer_with_the_copied_gradients(tmp_path, extra):
    """One replay of the same batch from the same weights: the flat bf16 gradient buffer
    (NaN before it) holds, with train.direct_weight_grads, the gradients the graph's copy
    puts there — every element written, equal to bf16 noise (compiled: another graph)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    buffers = {}
    for name in ("copied", "direct"):
        trainer, inputs, task_id = _graphs_trainer_and_batch(
            tmp_path, name, f"train.direct_weight_grads={str(name == 'direct').lower()}",
            *extra)
        if name == "direct" and "train.fused_qkv=true" in extra:  # one GEMM writes q, k, v's
            assert all(layer.attention.self.qkv_weight_grad_target is not None
                       for layer in trainer.module.encoder.encoder.layer)
        for seg in trainer.masters.segments:
            seg.grad_bf16.fill_(float("nan"))
        trainer.graphs.run(inputs, task_id, group=1, first=True)
        torch.cuda.synchronize()
        buffers[name] = [seg.grad_bf16.float().clone() for seg in trainer.masters.segments]
        del trainer
    assert not counters["graph_break"], dict(counters["graph_break"])
    for copied, direct in zip(buffers["copied"], buffers["direct"], strict=True):
        assert torch.isfinite(copied).all() and torch.isfinite(direct).all()
        if extra:
            torch.testing.assert_close(direct, copied, rtol=2e-2, atol=1e-3)
        else:  # the same GEMMs on the same inputs
            torch.testing.assert_close(direct, copied, rtol=0, atol=0)


def test_fused_qkv_trains_like_three_linears_in_the_recommended_set(tmp_path):
    """train.fused_qkv on the GPU path it is for (graphs, compiled packed layers, flat masters,
    weight gradients written in place, FlashAttention taking q/k/v as strided views of the one
    GEMM's output): the losses of three Linears, to bf16 noise."""
    common = [*GRAPHED_FLAT_MASTERS, "train.direct_weight_grads=true", *COMPILED_PACKED]
    split, _, _ = run(tmp_path, "split", *common)
    fused, trainer, _ = run(tmp_path, "fused", *common, "train.fused_qkv=true")
    assert all(layer.attention.self.qkv_weight is not None
               for layer in trainer.module.encoder.encoder.layer)
    assert_losses_close(split, fused, 0.02, steps=30)


def test_cuda_graph_gradients_equal_eager_ones_in_fp32(tmp_path):
    """fp32, no dropout, 2 micro-steps per group: the graphs' gradient hand-over (copy on a
    group's first micro-step, add after; heads always add, zeroed after each step) gives the
    eager step's training to rounding, including heads first used in a second micro-step."""
    fp32 = ["train.mixed_precision=no", "train.max_steps=12"]
    eager, _, _ = run(tmp_path, "eager32", *fp32)
    graphed, trainer, _ = run(tmp_path, "graphs32", "train.cuda_graphs=true", *fp32)
    assert any(not key[1] for key in trainer.graphs.graphs)  # accumulating graphs were used
    assert_losses_close(eager, graphed, 1e-4, steps=12)


def test_idle_heads_stay_unchanged_with_cuda_graphs(tmp_path):
    _, trainer, before = run(tmp_path, "idle", "train.cuda_graphs=true", "train.max_steps=1",
                             "train.warmup_steps=0")
    used = {trainer.plan.task_of(0, s) for s in range(2)}
    after = dict(trainer.module.named_parameters())
    for task_id in range(3):
        names = [n for n in before if n.startswith(f"heads.{task_id}.")]
        changed = [n for n in names if not torch.equal(before[n], after[n])]
        assert bool(changed) == (task_id in used), (task_id, used, changed)


@pytest.mark.parametrize("mode", [["train.cuda_graphs=false"],
                                  ["train.cuda_graphs=true", "train.compile=true"]])
def test_packed_flash_attention_matches_padded_losses(tmp_path, mode):
    padded, _, _ = run(tmp_path, "padded", *mode)
    packed, trainer, _ = run(tmp_path, "packed", "data.packing=true", "data.pack_multiple=64",
                             *mode)
    batch = next(iter(trainer.loader))
    assert batch["input_ids"].shape[0] == 1 and "cu_seqlens" in batch
    assert_losses_close(padded, packed, 0.02, steps=30)


def test_capture_keeps_static_gradients_and_copies_none_of_them(tmp_path):
    """A (task, shape) first seen in the middle of an accumulation group is captured there:
    the capture's eager warm-up passes must leave the group's gradients as they are, and must
    not hold a copy of all of them meanwhile (1.3 GB on top of the peak for BERT-large)."""
    # wider layers: the gradients (~14 MB) must outweigh a 1-sample warm-up's activations
    wide = ["model.arch.hidden_size=256", "model.arch.intermediate_size=1024",
            "model.arch.num_hidden_layers=4", "model.arch.num_attention_heads=4"]
    _, trainer, _ = run(tmp_path, "capture", "train.cuda_graphs=true", "train.max_steps=1",
                        *wide)
    graphs = trainer.graphs
    grads = [p.grad for p in graphs.params]
    torch.manual_seed(1)
    for g in grads:
        g.copy_(torch.randn_like(g))
    before = [g.clone() for g in grads]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    inputs = _model_inputs(next(iter(trainer.loader)), torch.device("cuda"))
    task_id = inputs.pop("task_id")
    inputs = {k: v[:1, :8] if v.dim() == 2 else v[:1] for k, v in inputs.items()}  # new shape
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    graphs._capture(inputs, task_id, first=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))
    assert all(p.grad is g for p, g in zip(graphs.params, grads, strict=True))
    assert extra < grad_bytes, (extra, grad_bytes)


def test_a_finished_trainer_with_cuda_graphs_frees_its_model(tmp_path):
    """The graphs' gradient hooks live on the parameters, out of the garbage collector's
    sight: they must not keep the model (and its gradients) alive once the trainer is gone."""
    import gc
    import weakref

    _, trainer, _ = run(tmp_path, "freed", "train.cuda_graphs=true", "train.max_steps=2")
    model = weakref.ref(trainer.module)
    del trainer
    gc.collect()
    assert model() is None


DROPOUT = ["model.dropout=0.1", "model.arch.hidden_dropout_prob=0.1",
           "model.arch.attention_probs_dropout_prob=0.1"]


@pytest.mark.parametrize("extra", [["train.precapture_graphs=false"], [],
                                   ["train.bf16_weights=true", "train.flat_masters=true",
                                    "train.fused_clipping=true",
                                    "train.gradient_accumulation_steps=1"]])
def test_stop_and_resume_with_cuda_graphs_and_dropout_is_bit_exact(tmp_path, extra):
    """A resumed run captures its graphs again, at other steps than the run it resumes (on
    first sight) or all before its first step (precapture): their warm-up must leave the
    dropout stream as it is."""
    common = ["train.cuda_graphs=true", "train.max_steps=16", *DROPOUT, *extra]
    straight, _, _ = run(tmp_path, "straight", *common)
    split, first, _ = run(tmp_path, "split", *common, "train.stop_after_steps=7")
    assert first.state.global_step == 7
    run(tmp_path, "split", *common, "train.resume=auto")
    assert [s for s, _ in train_losses(split)] == list(range(1, 17))
    assert train_losses(split) == train_losses(straight)
    assert_same_tensors(checkpoint_model(split, 16), checkpoint_model(straight, 16))


@pytest.mark.parametrize("extra", [["data.pad_to_multiple_of=16"],
                                   ["data.packing=true", "data.pack_multiple=64"],
                                   ["data.packing=true", "data.pack_multiple=64",
                                    "train.compile=true", "train.bf16_weights=true",
                                    "train.flat_masters=true", "train.fused_clipping=true",
                                    "train.gradient_accumulation_steps=1"]])
def test_precaptured_graphs_are_those_the_run_meets_and_train_bit_exact(tmp_path, monkeypatch,
                                                                        extra):
    """train.precapture_graphs: the (task, shape) graphs predicted from the plan are exactly
    those a run captures on first sight, none is captured during training, and the losses
    and weights are bit-identical to capturing on first sight (dropout on; with compiled
    layers within bf16 noise, see the README)."""
    common = ["train.cuda_graphs=true", "train.max_steps=16", *DROPOUT, *extra]
    lazy, lazy_trainer, _ = run(tmp_path, "lazy", *common, "train.precapture_graphs=false")
    ahead_counts = []
    precapture = Trainer._precapture_graphs

    def counted(self):
        precapture(self)
        ahead_counts.append(len(self.graphs.graphs))

    monkeypatch.setattr(Trainer, "_precapture_graphs", counted)
    ahead, trainer, _ = run(tmp_path, "ahead", *common)
    assert ahead_counts == [len(trainer.graphs.graphs)] and ahead_counts[0] >= 3
    assert set(trainer.graphs.graphs) == set(lazy_trainer.graphs.graphs)
    if "train.compile=true" in extra:  # compiled kernels may depend on the order of shapes
        assert_losses_close(ahead, lazy, 0.02, steps=16)
        return
    assert train_losses(ahead) == train_losses(lazy)
    assert_same_tensors(checkpoint_model(ahead, 16), checkpoint_model(lazy, 16))


@pytest.mark.parametrize("extra", [[], ["train.precapture_graphs=false"],
                                   [*COMPILED_PACKED, "train.direct_weight_grads=true",
                                    "train.fused_qkv=true"]],
                         ids=["graphs", "captured_on_first_sight", "recommended"])
def test_overlap_optimizer_on_a_side_stream_trains_bit_exact(tmp_path, extra):
    """train.overlap_optimizer on CUDA: the chunks of the flat AdamW step run on a side
    stream and the graphs wait per layer (external events: captured before the first step,
    or mid-run with a step pending); every loss and saved tensor as without the switch
    (dropout on; compiled: the same kernels, the shapes come in the same order, each run
    compiling as in a fresh process)."""
    common = [*GRAPHED_FLAT_MASTERS, "train.ema_decay=null", "train.max_steps=24", *DROPOUT,
              *extra]
    # Run AD (H100): this failed at step 4 (1.8827499 against 1.8827522); without the switch,
    # run twice in one process, the runs parted there too (the first at 1.8827499 again), and
    # two later runs with it agreed. Most likely Dynamo's state left by the run before, not
    # the switch (not verified): so both runs start from a reset one.
    plain, _, _ = run(tmp_path, "plain", *common, fresh_dynamo=True)
    over, trainer, _ = run(tmp_path, "overlap", *common, "train.overlap_optimizer=true",
                           fresh_dynamo=True)
    assert trainer.overlap.side_stream is not None
    assert len(trainer.overlap.chunks) == trainer.module.encoder.config.num_hidden_layers + 1
    assert [s for s, _ in train_losses(over)] == list(range(1, 25))
    assert train_losses(over) == train_losses(plain)
    assert_same_tensors(checkpoint_model(over, 24), checkpoint_model(plain, 24))


def test_overlap_waits_inside_a_cuda_graph_for_a_slow_side_stream():
    """The forward's waits, captured into a CUDA graph before any step, hold each replay
    until the latest step's chunks are done: with the side stream held up ~0.1 s, a graph
    without the waits reads the old weights, the one with them the new ones."""
    import copy

    from mtl_dist.master import MasterWeights
    from mtl_dist.overlap import OverlappedStep
    from tests.test_overlap import _Encoder

    device = torch.device("cuda")
    torch.manual_seed(0)
    encoder = _Encoder().to(device)
    masters = MasterWeights(encoder, [list(encoder.parameters())])
    seg = masters.segments[0]
    x = torch.randn(64, 4, device=device, dtype=torch.bfloat16)

    @torch.no_grad()
    def captured():
        return _captured(lambda: encoder(x))

    with torch.no_grad():  # before the overlap's hooks (deepcopy cannot copy its stream)
        old = encoder(x).clone()
        updated = copy.deepcopy(encoder)
        for p in updated.parameters():
            p.add_(0.5)
        expected = updated(x)
    saved = seg.weight.clone()
    unwaited, stale_out = captured()  # before the overlap's hooks exist
    overlap = OverlappedStep(encoder, encoder.layer, {0: seg}, device)
    assert len(overlap.chunks) == 4
    waited, out = captured()

    def launch():
        torch.cuda._sleep(200_000_000)  # ~0.1 s on the side stream, before any chunk
        return lambda i, span: seg.weight[span].add_(0.5)

    overlap.run(launch)
    unwaited.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(stale_out, old)  # the race is real: the old weights
    overlap.settle()
    seg.weight.copy_(saved)
    overlap.run(launch)
    waited.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
    assert (out - old).abs().max() > 0.1


def _layer_code_and_grads(**switches: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """One BERT-large layer compiled with `switches` (compile_encoder_layers'), such as
    without Inductor's mix-order reduction: the
    generated code of its forward and backward on 6,144 tokens, and its gradients. (Inductor
    fuses the LayerNorm backward's reductions only from 5 * 2**20 elements and 4,096 rows on,
    when the sizes are static: 4,096 x 1,024 is below; run W4's first try used it.)"""
    from types import SimpleNamespace

    from torch._inductor.utils import run_and_get_code

    from mtl_dist.model import build_model, compile_encoder_layers

    torch._dynamo.reset()
    torch.manual_seed(0)
    arch = SimpleNamespace(model_type="bert", hidden_size=1024, num_hidden_layers=1,
                           num_attention_heads=16, intermediate_size=4096,
                           max_position_embeddings=512, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    model = build_model(SimpleNamespace(pretrained=None, arch=arch, head="cls", dropout=0.0),
                        vocab_size=100, num_labels=[3]).cuda().to(torch.bfloat16)
    compile_encoder_layers(model, "none", **switches)
    layer = model.encoder.encoder.layer[0]
    x = torch.randn(1, 6144, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # a fixed random projection of the output: gradients of order one in every parameter
    # (the output's squares summed would be degenerate: a LayerNorm at its initial weight 1 and
    # bias 0 puts out a fixed norm per token, so every gradient upstream of it is ~0 and only
    # rounding noise is compared; run X1)
    direction = torch.randn(1, 6144, 1024, device="cuda")

    def step():
        (layer(x)[0].float() * direction).sum().backward()

    _, code = run_and_get_code(step)
    grads = {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    # the key bias's true gradient is zero (a softmax ignores a shift shared by all keys):
    # what comes out is rounding noise, different in any two kernels
    del grads["attention.self.key.bias"]
    return "\n".join(code), grads


def _relative_differences(grads: dict[str, torch.Tensor],
                          reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each gradient's difference from the reference's, against the reference's own norm."""
    return {name: ((grads[name].float() - ref.float()).norm() / ref.float().norm()).item()
            for name, ref in reference.items()}


def test_mix_order_reduction_switch_changes_the_layer_norm_backward_kernels_not_the_gradients():
    code_on, grads_on = _layer_code_and_grads(mix_order_reduction=True)
    code_off, grads_off = _layer_code_and_grads(mix_order_reduction=False)
    assert "RSPLIT_SIZE" in code_on  # Inductor's mix-order kernel in the LayerNorm backward
    assert "RSPLIT_SIZE" not in code_off
    assert grads_on.keys() == grads_off.keys()
    # bf16 noise of sums taken in another order: small against each gradient's own norm
    relative = _relative_differences(grads_off, grads_on)
    print("relative gradient differences, mix-order off against on:", relative)
    assert all(grad.norm() > 0 for grad in grads_on.values())
    assert max(relative.values()) < 2e-2, relative


def test_pdl_switch_changes_the_launches_not_the_gradients():
    """`train.compile_pdl`: the layer's Triton kernels wait for the kernel before them inside
    (gdc_wait) and let the next one launch early; the maths is the same kernels' (reductions
    that Inductor autotunes may pick another block size in each compile: bf16 noise)."""
    code_on, grads_on = _layer_code_and_grads(pdl=True)
    code_off, grads_off = _layer_code_and_grads(pdl=False)
    assert "gdc_wait" in code_on and "gdc_launch_dependents" in code_on
    assert "'launch_pdl': True" in code_on  # launched with the PDL attribute, not only waiting
    assert "gdc_wait" not in code_off and "'launch_pdl': True" not in code_off
    assert grads_on.keys() == grads_off.keys()
    assert all(grad.norm() > 0 for grad in grads_on.values())
    relative = _relative_differences(grads_off, grads_on)
    print("relative gradient differences, PDL off against on:", relative)
    assert max(relative.values()) < 2e-2, relative


@pytest.mark.parametrize("rows, padding_idx", [(2, None), (512, None), (512, 1)])
def test_gemm_embedding_grads_replay_in_a_cuda_graph(rows, padding_idx):
    """`train.gemm_embedding_grads` on the workload's shapes: the one-hot GEMM is captured (no
    host sync), a replay reads new ids, and the sums are aten's to bf16 rounding."""
    import torch.nn.functional as F

    from mtl_dist.embedding_grads import embedding_weight_grad

    torch.manual_seed(0)
    ids = torch.randint(0, rows, (3392,), device="cuda")
    grad = torch.randn(3392, 1024, device="cuda", dtype=torch.bfloat16)
    graph, out = _captured(lambda: embedding_weight_grad(ids, grad, rows, padding_idx))
    ids.copy_(torch.randint(0, rows, (3392,), device="cuda"))
    grad.normal_()
    graph.replay()
    weight = torch.zeros(rows, 1024, device="cuda", requires_grad=True)
    F.embedding(ids, weight, padding_idx).backward(grad.float())  # exact sums, fp32
    expected = weight.grad
    relative = ((out.float() - expected).norm() / expected.norm()).item()
    assert relative < 1e-2, relative  # bf16: ~1e-3 (one rounding, or a few with split-K)
    if padding_idx is not None:
        assert out[padding_idx].abs().max() == 0


def test_gelu_epilogue_gemm_matches_fp32_maths_and_replays_in_a_cuda_graph():
    """`train.gelu_epilogue` on the workload's shapes: cuBLASLt's GELU_AUX_BIAS GEMM (the
    path taken: its plan is cached) for two layers of one shape (one descriptor, re-pointed at
    each layer's bias and output) is captured, a replay reads new inputs, and each layer's
    output, saved GELU input and gradients are fp32 tanh-GELU maths to bf16 rounding."""
    import torch.nn.functional as F

    from mtl_dist import cublaslt
    from mtl_dist.gelu_epilogue import GeluLinear, gelu_linear

    torch.manual_seed(0)
    x = torch.randn(3584, 1024, device="cuda").bfloat16()
    layers = [((torch.randn(4096, 1024, device="cuda") * 0.03).bfloat16(),
               (torch.randn(4096, device="cuda") + shift).bfloat16()) for shift in (0.0, 1.0)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gelu_linear(x, *layers[0])  # warm-up before the capture: the plan, the workspace
    torch.cuda.current_stream().wait_stream(side)
    plans = cublaslt._instances[torch.cuda.current_device()].plans
    assert (4096, 3584, 1024, True, False, cublaslt.EPILOGUE_GELU_AUX_BIAS, 14,
            cublaslt.WORKSPACE_BYTES) in plans
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        outputs = [gelu_linear(x, weight, bias) for weight, bias in layers]
    x.copy_(torch.randn_like(x, dtype=torch.float32))
    graph.replay()

    def relative(got, want):
        return ((got.float() - want).norm() / want.norm()).item()

    for (weight, bias), (h, pre) in zip(layers, outputs, strict=True):
        exact_pre = F.linear(x.float(), weight.float(), bias.float())
        assert relative(pre, exact_pre) < 1e-2
        assert relative(h, F.gelu(exact_pre, approximate="tanh")) < 1e-2
    weight, bias = layers[0]
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    fp32 = [t.float().detach().requires_grad_() for t in (x, weight, bias)]
    grad = torch.randn(3584, 4096, device="cuda")
    GeluLinear.apply(*leaves, None).backward(grad.bfloat16())
    F.gelu(F.linear(*fp32), approximate="tanh").backward(grad)
    for got, want in zip(leaves, fp32, strict=True):
        assert relative(got.grad, want.grad) < 1e-2


def test_gelu_epilogue_trains_like_exact_gelu_in_the_recommended_set(tmp_path, monkeypatch):
    """train.gelu_epilogue on the GPU path it is for (graphs, compiled packed layers, flat
    masters, weight gradients written in place): cuBLASLt's GEMM runs in every layer, and the
    losses are those of the exact GELU to bf16 noise."""
    from mtl_dist import cublaslt, gelu_epilogue
    from mtl_dist.gelu_epilogue import GeluEpilogueIntermediate

    common = ROUTED_COMPILED
    exact, _, _ = run(tmp_path, "exact", *common)
    calls = {"cublaslt": 0, "torch": 0}

    def counted(name, function):
        def call(*args):
            calls[name] += 1
            return function(*args)
        return call

    monkeypatch.setattr(cublaslt, "gelu_linear", counted("cublaslt", cublaslt.gelu_linear))
    monkeypatch.setattr(gelu_epilogue, "_gelu_linear_torch",
                        counted("torch", gelu_epilogue._gelu_linear_torch))
    epilogue, trainer, _ = run(tmp_path, "epilogue", *common, "train.gelu_epilogue=true")
    layers = trainer.module.encoder.encoder.layer
    assert all(isinstance(layer.intermediate, GeluEpilogueIntermediate) for layer in layers)
    assert all(layer.intermediate.dense.weight_grad_target is not None for layer in layers)
    # every layer of every forward took cuBLASLt's GEMM (captures, their warm-ups, evaluations)
    assert calls["torch"] == 0 and calls["cublaslt"] > 0, calls
    assert calls["cublaslt"] % len(layers) == 0, calls
    assert_losses_close(exact, epilogue, 0.02, steps=30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_triton_embedding_grads_of_the_vocabulary_replay_in_a_cuda_graph(padding_idx, dtype):
    """`train.triton_embedding_grads` on the workload's vocabulary: the sort and the kernel are
    captured (no host sync), a replay reads new ids, two replays give the same bits, the sums
    are aten's fp32 ones to the gradient dtype's rounding, the padding row and rows no token
    reached are exactly zero (the memory they reuse held NaN)."""
    import torch.nn.functional as F

    from mtl_dist.triton_embedding import embedding_grad_triton

    torch.manual_seed(0)
    rows, tokens = 21128, 3392

    def new_ids():
        ids = torch.randint(0, rows, (tokens,), device="cuda")
        ids[::32] = 101  # a row every sequence has, like [CLS]
        ids[5:400:7] = 0  # the padding row, if any
        return ids

    ids = new_ids()
    grad = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
    torch.full((rows, 1024), float("nan"), device="cuda", dtype=dtype)  # freed: dirty memory
    eager = embedding_grad_triton(ids, grad, rows, padding_idx)  # also compiles the kernel
    untouched = torch.ones(rows, dtype=torch.bool, device="cuda")
    untouched[ids] = False
    assert eager[untouched].abs().max() == 0
    graph, out = _captured(lambda: embedding_grad_triton(ids, grad, rows, padding_idx))
    ids.copy_(new_ids())
    grad.normal_()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.equal(out, first)
    weight = torch.zeros(rows, 1024, device="cuda", requires_grad=True)
    F.embedding(ids, weight, padding_idx).backward(grad.float())
    expected = weight.grad
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    relative = ((out.float() - expected).norm() / expected.norm()).item()
    assert relative < tolerance, relative
    hot = (out.float() - expected)[101].abs().max() / expected[101].abs().max()
    assert hot <= 2 * tolerance, hot
    if padding_idx is not None:
        assert out[padding_idx].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_embedding_grads_keep_non_finite_values_to_their_rows(dtype):
    """An inf, a -inf and a NaN on real tokens, one in a block that carries on a run from the
    block before (a row's 200 tokens span four 64-token blocks): inside a CUDA graph, the
    non-finite values land in exactly aten's rows, and every other row holds aten's sums."""
    import torch.nn.functional as F

    from mtl_dist.triton_embedding import embedding_grad_triton

    torch.manual_seed(0)
    rows, tokens = 21128, 3392
    ids = torch.randint(0, rows, (tokens,), device="cuda")
    ids[1000:1200] = 7  # sorted, row 7's run spans blocks; its later blocks carry it on
    ids[5:400:7] = 0  # the padding row
    grad = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
    grad[1150, 3] = float("inf")  # inside row 7's run, in a block that carries it on
    grad[2000, 10] = float("-inf")
    grad[2500, 700] = float("nan")
    grad[12, 5] = float("nan")  # on a padding token: reaches no row
    embedding_grad_triton(ids, grad, rows, 0)  # compiles the kernel
    graph, out = _captured(lambda: embedding_grad_triton(ids, grad, rows, 0))
    graph.replay()
    weight = torch.zeros(rows, 1024, device="cuda", requires_grad=True)
    F.embedding(ids, weight, 0).backward(grad.float())
    expected = weight.grad
    assert (~torch.isfinite(expected)).sum() == 3
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf() & (out > 0), expected.isinf() & (expected > 0))
    finite = torch.isfinite(expected)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    error = (out.float()[finite] - expected[finite]).norm() / expected[finite].norm()
    assert error < tolerance, error.item()


def test_triton_embedding_grads_train_like_atens_in_the_recommended_set(tmp_path, monkeypatch):
    """train.triton_embedding_grads inside the training step it is for (graphs, compiled packed
    layers, flat masters): the vocabulary takes the kernel (the demo's 395 rows are put above
    the one-hot GEMM's reach), and the losses are aten's backward's to bf16 noise."""
    from torch import nn

    from mtl_dist import embedding_grads, triton_embedding

    monkeypatch.setattr(embedding_grads, "MAX_GEMM_ROWS", 128)  # positions: 128 rows, GEMM
    calls = []
    kernel = triton_embedding.embedding_grad_triton
    monkeypatch.setattr(triton_embedding, "embedding_grad_triton",
                        lambda *args: calls.append(args[2]) or kernel(*args))
    common = [*GRAPHED_FLAT_MASTERS, "train.direct_weight_grads=true",
              "train.gemm_embedding_grads=true", *COMPILED_PACKED]
    aten, _, _ = run(tmp_path, "aten", *common)
    assert not calls
    triton, trainer, _ = run(tmp_path, "triton", *common, "train.triton_embedding_grads=true")
    tables = [m for m in trainer.module.encoder.modules() if isinstance(m, nn.Embedding)]
    assert tables and all(m.large_tables == "triton" for m in tables)
    vocabulary = trainer.module.encoder.get_input_embeddings().num_embeddings
    assert calls and set(calls) == {vocabulary}, set(calls)
    assert_losses_close(aten, triton, 0.02, steps=30)


def test_gelu_epilogue_says_once_when_cublaslt_cannot_take_the_operands(monkeypatch):
    """fp32 on CUDA: the torch path, the tanh GELU's maths, and one warning for the run."""
    import torch.nn.functional as F

    from mtl_dist import cublaslt, gelu_epilogue
    from mtl_dist.errors import MtlDistWarning

    monkeypatch.setattr(cublaslt, "_warned", set())
    x, weight, bias = (torch.randn(64, 32, device="cuda"), torch.randn(128, 32, device="cuda"),
                       torch.randn(128, device="cuda"))
    with pytest.warns(MtlDistWarning, match="cuBLASLt cannot take these operands"):
        h, pre = gelu_epilogue.gelu_linear(x, weight, bias)
    torch.testing.assert_close(h, F.gelu(F.linear(x, weight, bias), approximate="tanh"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MtlDistWarning)
        gelu_epilogue.gelu_linear(x, weight, bias)  # said once


def test_cublaslt_gemms_match_fp32_maths_and_replay_without_memsets():
    """`train.cublaslt_gemms` on one layer's four projections at the workload's 3,584 packed
    tokens: the forward, input and weight gradients are fp32 maths to bf16 rounding, every
    GEMM took cuBLASLt without a workspace (its plans are cached), and a CUDA graph of them
    replays without one memset (cuBLAS's workspace memsets are what the switch removes)."""
    from torch.profiler import ProfilerActivity, profile

    from mtl_dist import cublaslt
    from mtl_dist.model import LinearGradInto

    torch.manual_seed(0)
    tokens, shapes = 3584, [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]
    layers = [((torch.randn(out, inp, device="cuda") * inp ** -0.5).bfloat16(),
               torch.randn(out, device="cuda").bfloat16()) for out, inp in shapes]
    inputs = [torch.randn(tokens, inp, device="cuda").bfloat16().requires_grad_()
              for _, inp in shapes]
    grads = [torch.randn(tokens, out, device="cuda").bfloat16() for out, _ in shapes]
    targets = [torch.empty_like(weight) for weight, _ in layers]

    def step():
        for x, (weight, bias), target, grad in zip(inputs, layers, targets, grads, strict=True):
            x.grad = None
            LinearGradInto.apply(x, weight, bias, target, True).backward(grad)

    def relative(got, want):
        return ((got.float() - want).norm() / want.norm()).item()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up before the capture: the plans
    torch.cuda.current_stream().wait_stream(side)
    plans = cublaslt._instances[torch.cuda.current_device()].plans
    bias, plain = cublaslt.EPILOGUE_BIAS, cublaslt.EPILOGUE_DEFAULT
    for out, inp in shapes:  # (m, n, k, transa, transb, epilogue, bf16, workspace bytes)
        assert (out, tokens, inp, True, False, bias, 14, 0) in plans  # x·wᵀ + b
        assert (inp, tokens, out, False, False, plain, 14, 0) in plans  # grad·w
        assert (inp, out, tokens, False, True, plain, 14, 0) in plans  # gradᵀ·x
    for x, (weight, bias), target, grad in zip(inputs, layers, targets, grads, strict=True):
        x32, w32, g32 = x.detach().float(), weight.float(), grad.float()
        out = LinearGradInto.apply(x.detach(), weight, bias, target, True)
        assert relative(out, x32 @ w32.t() + bias.float()) < 1e-2
        assert relative(x.grad, g32 @ w32) < 1e-2
        assert relative(target, g32.t() @ x32) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names and not [n for n in names if n.startswith("Memset")], names


def test_cublaslt_gemms_train_like_torchs_gemms_in_the_recommended_set(tmp_path, monkeypatch):
    """train.cublaslt_gemms in the step it is for (graphs, compiled packed layers, flat
    masters, weight gradients written in place, fused q/k/v, the GELU epilogue): cuBLASLt takes
    every routed GEMM (no fallback), and the losses are torch's GEMMs' to bf16 noise."""
    from mtl_dist import cublaslt

    fallbacks, calls = [], []
    monkeypatch.setattr(cublaslt, "warn_fallback_once", lambda *args: fallbacks.append(args))
    mm = cublaslt.mm
    # the GELU epilogue's GEMM goes through cublaslt.mm with either switch: not counted
    monkeypatch.setattr(cublaslt, "mm", lambda *args, **kw: calls.append(kw.get("epilogue")
                                                                        is None) or mm(*args, **kw))
    common = [*ROUTED_COMPILED, "train.gelu_epilogue=true"]
    torch_gemms, _, _ = run(tmp_path, "torch", *common)
    assert not any(calls)
    lt_gemms, trainer, _ = run(tmp_path, "cublaslt", *common, "train.cublaslt_gemms=true")
    layers = trainer.module.encoder.encoder.layer
    # per layer and step: 3 forwards (q/k/v, output, FFN down), 3 + 1 input gradients (the
    # FFN up's GELU backward), 4 weight gradients
    assert sum(calls) >= 10 * len(layers), sum(calls)
    assert not fallbacks, fallbacks
    plans = cublaslt._instances[torch.cuda.current_device()].plans
    assert any(key[5] == cublaslt.EPILOGUE_GELU_AUX_BIAS and key[-1] == 0 for key in plans)
    assert_losses_close(torch_gemms, lt_gemms, 0.02, steps=30)


def test_gather_unpack_backward_matches_index_select_in_a_cuda_graph():
    """`train.gather_unpack_backward` at the workload's shape (32 samples × 300 slots, 3,584
    packed tokens, bf16): captured in a CUDA graph (no host sync) and replayed on another
    packing layout, its forward and backward equal index_select's when pad slots carry no
    gradient, as mtl_dist's heads'."""
    from mtl_dist.model import UnpackRows

    tokens, samples_, width = 3584, 32, 300

    def layout(seed):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(40, 180, (samples_,), generator=generator)
        lengths = (lengths * (tokens - 64) / lengths.sum()).long().clamp(1, width)
        starts = torch.cumsum(lengths, 0) - lengths
        slots = torch.arange(width)
        valid = slots[None, :] < lengths[:, None]
        index = torch.where(valid, starts[:, None] + slots[None, :],
                            torch.arange(samples_ * width).view(samples_, width) % tokens)
        return index.reshape(-1).cuda(), valid.reshape(-1).cuda()

    torch.manual_seed(0)
    index, valid = layout(0)
    rows = torch.randn(tokens, 1024, device="cuda").bfloat16().requires_grad_()
    grad = torch.randn(samples_ * width, 1024, device="cuda").bfloat16()
    outputs = []

    def step():
        rows.grad = None
        out = UnpackRows.apply(rows, index, valid)
        out.backward(grad.masked_fill(~valid[:, None], 0))
        outputs.append(out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    new_index, new_valid = layout(1)
    assert not torch.equal(new_valid, valid)
    index.copy_(new_index), valid.copy_(new_valid)
    rows.data.copy_(torch.randn_like(rows, dtype=torch.float32))
    grad.copy_(torch.randn_like(grad, dtype=torch.float32))
    graph.replay()
    torch.cuda.synchronize()
    got_out, got_grad = outputs[-1].clone(), rows.grad.clone()
    want_out = rows.index_select(0, index)
    (want_grad,) = torch.autograd.grad(want_out, rows, grad.masked_fill(~valid[:, None], 0))
    assert torch.equal(got_out, want_out.detach())
    assert torch.equal(got_grad, want_grad)


def test_direct_embedding_grads_fill_the_flat_buffer_like_the_copy(tmp_path, monkeypatch):
    """`train.direct_embedding_grads` in the recommended set's graphs (compiled packed layers,
    flat masters, Linear gradients written in place, the vocabulary by the Triton kernel):
    a replay of the captured graph fills the flat bf16 gradient buffer (NaN after the capture)
    as the graph's copy of the tables' gradients does, every element written; the tables are
    left out of that copy, autograd hands them no gradient, the vocabulary's kernel writes
    into its view; a table weight also read outside its forward is refused, named."""

    from mtl_dist import triton_embedding
    from mtl_dist.embedding_grads import GemmGradEmbedding

    kernel, into_views = triton_embedding.embedding_grad_triton, []
    monkeypatch.setattr(triton_embedding, "embedding_grad_triton",
                        lambda *args: into_views.append(len(args) == 5) or kernel(*args))
    buffers = {}
    for name in ("copied", "direct"):
        trainer, inputs, task_id = _graphs_trainer_and_batch(
            tmp_path, name, "train.direct_weight_grads=true", "train.gemm_embedding_grads=true",
            "train.triton_embedding_grads=true", *COMPILED_PACKED,
            f"train.direct_embedding_grads={str(name == 'direct').lower()}")
        tables = [m for m in trainer.module.encoder.modules()
                  if isinstance(m, GemmGradEmbedding)]
        assert len(tables) == 3
        handed = {id(p) for _, p in trainer.graphs._handed_over}
        if name == "direct":
            assert all(t.weight_grad_target is not None for t in tables)
            assert not handed & {id(t.weight) for t in tables}
        else:
            assert {id(t.weight) for t in tables} <= handed
        handed_grads = []
        for t in tables:
            # after StepGraphs' hook (which drops a warm-up's gradients, keeps a capture's)
            t.weight.register_post_accumulate_grad_hook(
                lambda p, seen=handed_grads: seen.append(p.grad is not None))
        into_views.clear()
        trainer.graphs.prepare(inputs, task_id, first=True)  # warm-ups and capture
        assert into_views and all(into_views) == (name == "direct"), into_views
        assert handed_grads and any(handed_grads) == (name == "copied"), handed_grads
        for seg in trainer.masters.segments:
            seg.grad_bf16.fill_(float("nan"))
        trainer.graphs.run(inputs, task_id, group=1, first=True)
        torch.cuda.synchronize()
        buffers[name] = [seg.grad_bf16.float().clone() for seg in trainer.masters.segments]
        if name == "direct":  # a weight read outside its table's forward is refused
            words = tables[0]
            monkeypatch.setattr(words, "forward", lambda ids, words=words: (
                GemmGradEmbedding.forward(words, ids) + words.weight[0] * 0))
            trainer.graphs.graphs.clear()
            with pytest.raises(RuntimeError, match=r"autograd gave encoder\.embeddings\."
                                                   r"word_embeddings\.weight a gradient"):
                trainer.graphs.prepare(inputs, task_id, first=True)
        del trainer
    for copied, direct in zip(buffers["copied"], buffers["direct"], strict=True):
        assert torch.isfinite(copied).all() and torch.isfinite(direct).all()
        torch.testing.assert_close(direct, copied, rtol=2e-2, atol=1e-3)


def test_compile_heads_trains_like_eager_heads_in_the_recommended_set(tmp_path):
    """train.compile_heads on the GPU path it is for (graphs, compiled packed layers, flat
    masters, gradients written in place): the heads' graphs are captured with the rest, and
    the losses are the eager heads' to bf16 noise; with dropout on, a stop and resume is bit
    exact (the compiled dropout's seeds come from the generator the graphs restore)."""
    common = ROUTED_COMPILED
    eager, _, _ = run(tmp_path, "eager", *common)
    compiled, trainer, _ = run(tmp_path, "compiled", *common, "train.compile_heads=true")
    assert all(step._compiled_call_impl is not None
               for step in trainer.module.head_steps.values())
    assert_losses_close(eager, compiled, 0.02, steps=30)
    with_dropout = [*common, "train.compile_heads=true", "train.max_steps=16", *DROPOUT]
    straight, _, _ = run(tmp_path, "straight", *with_dropout)
    split, _, _ = run(tmp_path, "split", *with_dropout, "train.stop_after_steps=7")
    run(tmp_path, "split", *with_dropout, "train.resume=auto")
    assert train_losses(split) == train_losses(straight)
    assert_same_tensors(checkpoint_model(split, 16), checkpoint_model(straight, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_clip_norm_gives_the_norm_of_torch(dtype):
    """`train.triton_clip_norm`: the Triton sum of squares of flat buffers (sizes off the
    tiles, one of BERT-large's flat segment's size) against fp64, and the clip divisor of flat
    buffers plus small tensors with it against the one without."""
    from mtl_dist.trainer import clip_divisor
    from mtl_dist.triton_norm import sum_of_squares, takes_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    for size in (1, 2**20 + 3, 324_000_000):
        x = torch.randn(size, generator=gen, device="cuda", dtype=dtype)
        exact = x.double().square().sum()
        assert abs(sum_of_squares(x).double() / exact - 1) < 1e-5, size
    flat = [torch.randn(2**22 + 5, generator=gen, device="cuda", dtype=dtype) * 1e-3,
            torch.randn(1000, generator=gen, device="cuda", dtype=dtype)]
    loose = [torch.randn(3, 7, generator=gen, device="cuda")]
    with_triton = clip_divisor(loose, 0.5, flat=flat)
    assert with_triton > 1  # clipping: the norm is above 0.5
    torch.testing.assert_close(with_triton, clip_divisor(flat + loose, 0.5), rtol=1e-6, atol=0)
    assert not takes_triton(torch.randn(64, 64, device="cuda").t())  # to torch's norm


def test_triton_clip_norm_reads_past_two_to_the_31():
    """More values than an int32 offset reaches (2**31 + 5 bf16, 4.3 GB): the program's
    offsets are int64."""
    from mtl_dist.triton_norm import sum_of_squares

    x = torch.ones(2**31 + 5, device="cuda", dtype=torch.bfloat16)
    x[-5:] = 2.0**14  # past 2**31: missed or read elsewhere, the sum is off by a third
    assert sum_of_squares(x).item() == 2**31 + 5 * 2**28  # (exact in fp32: 13 * 2**28)


def test_in_process_zero_runs_one_after_another_on_cuda(tmp_path, monkeypatch):
    """test_trainer's CPU test of Trainer.close() under ZeRO, on NCCL: ZeRO-2, closed, then
    ZeRO-3 in the same process; each resumes from its own checkpoint after a close too.
    (Skipped without DeepSpeed: the GPU machines carry it as wheels.)"""
    pytest.importorskip("deepspeed")
    import os

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for stage in (2, 3):
        common = [f"train.zero_stage={stage}", "train.eval_steps=null",
                  "checkpoint.save_steps=2", "checkpoint.save_best=false"]
        out, trainer, _ = run(tmp_path, f"zero{stage}", *common, "train.max_steps=2")
        assert trainer.state.global_step == 2 and os.environ.get("LOCAL_RANK") == "0"
        trainer.close()
        assert "LOCAL_RANK" not in os.environ
        _, resumed, _ = run(tmp_path, f"zero{stage}", *common, "train.max_steps=4",
                            "train.resume=auto")
        assert resumed.state.global_step == 4 and (out / "checkpoints" / "checkpoint-4").is_dir()
        resumed.close()
