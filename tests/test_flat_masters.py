"""`train.flat_masters`: the encoder's masters, gradients, moments and bf16 weights in flat
buffers, stepped by one AdamW kernel per group (CPU; the compiled GPU kernel: test_gpu.py)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from mtl_dist.config import load_config
from mtl_dist.errors import ConfigError
from mtl_dist.flat_adamw import FlatAdamW, adamw_update
from mtl_dist.master import MasterWeights
from tests._runs import (
    DEMO,
    NO_DROPOUT,
    assert_losses_close,
    assert_same_tensors,
    checkpoint_model,
    run_cli,
    train_losses,
)
from tests.test_bf16_weights import _trainer

SETTINGS = {"lr": 1e-2, "betas": (0.9, 0.98), "eps": 1e-6}


class _Tiny(nn.Module):
    """An encoder (decay and no-decay parameters) and one head, like MultiTaskModel."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
        self.heads = nn.ModuleDict({"0": nn.Linear(8, 3)})


def _groups(model: nn.Module) -> list[list[nn.Parameter]]:
    enc = list(model.encoder.named_parameters())
    return [[p for n, p in enc if n.endswith("weight") and p.dim() > 1],
            [p for n, p in enc if not (n.endswith("weight") and p.dim() > 1)]]


def _optimizers(fused: bool):
    """The same tiny model twice: plain masters + torch AdamW, flat masters + FlatAdamW."""
    built = []
    for flat in (False, True):
        torch.manual_seed(0)
        model = _Tiny()
        segments = _groups(model)
        masters = MasterWeights(model, segments if flat else ())
        groups = [{"params": [masters.master(p) for p in ps], "weight_decay": wd}
                  for ps, wd in zip(segments, (0.1, 0.0), strict=True)]
        groups.append({"params": [masters.master(p) for p in model.heads.parameters()],
                       "weight_decay": 0.1})
        opt = FlatAdamW(groups, masters, compiled=False, fused=fused, **SETTINGS) if flat \
            else torch.optim.AdamW(groups, fused=fused, **SETTINGS)
        built.append((model, masters, opt))
    return built


def _step(model, masters, opt, seed: int, head_idle: bool, divisor: float | None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        idle = head_idle and any(p is q for q in model.heads.parameters())
        p.grad = None if idle else torch.randn(p.shape, generator=gen).to(p.dtype)
    masters.take_grads()
    if divisor is not None:
        opt.grad_scale = torch.tensor(divisor)
    opt.step()
    if divisor is not None:
        del opt.grad_scale
    masters.copy_to_model(flat=False)
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [False, True])
def test_flat_step_equals_torch_adamw_with_idle_heads_and_clipping(fused):
    (m_a, w_a, opt_a), (m_b, w_b, opt_b) = _optimizers(fused)
    plan = [(False, None), (True, 3.0), (False, 2.0), (True, None), (False, None)]
    for seed, (head_idle, divisor) in enumerate(plan):
        for model, masters, opt in ((m_a, w_a, opt_a), (m_b, w_b, opt_b)):
            _step(model, masters, opt, seed, head_idle, divisor if fused else None)
    assert opt_b._host_step == {0: 5, 1: 5}  # both encoder groups went through the flat kernel
    for a, b in zip(w_a.masters, w_b.masters, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)
    # the head skipped its two idle steps in both (AdamW's step count per parameter)
    head = w_b.master(m_b.heads["0"].weight)
    assert float(opt_b.state[head]["step"]) == float(opt_a.state[w_a.master(m_a.heads["0"].weight)]["step"]) == 3
    # the flat kernel wrote the bf16 weights: the masters rounded, in the flat buffer
    for p, m in zip(w_b.params, w_b.masters, strict=True):
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    seg = w_b.segments[0]
    assert m_b.encoder[0].weight.data_ptr() == seg.weight.data_ptr()
    # the state dict is AdamW's: same keys, same values
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb["state"][k][key], sa["state"][k][key],
                                       rtol=2e-6, atol=1e-9)


def test_state_loaded_into_a_flat_optimizer_is_relinked_and_steps_on():
    (m_a, w_a, opt_a), (m_b, w_b, opt_b) = _optimizers(fused=False)
    for seed in range(3):
        _step(m_a, w_a, opt_a, seed, False, None)
    # the plain run's state (masters and AdamW state) into the flat one, then both step on
    w_b.load_state_dict(w_a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a file: not shared
    assert opt_b._flat_ready(0) and opt_b._flat_ready(1) and opt_b._host_step == {0: 3, 1: 3}
    for model, masters, opt in ((m_a, w_a, opt_a), (m_b, w_b, opt_b)):
        _step(model, masters, opt, 7, False, None)
    assert opt_b._host_step == {0: 4, 1: 4}
    for a, b in zip(w_a.masters, w_b.masters, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)


def test_loaded_state_with_unequal_step_counts_warns_and_steps_like_adamw():
    """A group whose parameters were stepped unequally (e.g. a checkpoint of another layout)
    cannot take the one-kernel step (one step count): said once, and still AdamW's maths."""
    (m_a, w_a, opt_a), (m_b, w_b, opt_b) = _optimizers(fused=False)
    for seed in range(3):
        _step(m_a, w_a, opt_a, seed, False, None)
    opt_a.state[w_a.master(m_a.encoder[0].weight)]["step"] += 1  # one parameter a step ahead
    w_b.load_state_dict(w_a.state_dict())
    with pytest.warns(UserWarning, match=r"group 0 different step counts \(\[3, 4\]\)"):
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b._host_step == {0: None, 1: 3} and not opt_b._flat_ready(0)
    for model, masters, opt in ((m_a, w_a, opt_a), (m_b, w_b, opt_b)):
        _step(model, masters, opt, 7, False, None)
    for a, b in zip(w_a.masters, w_b.masters, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)


def test_a_gradient_that_is_not_its_flat_view_falls_back_to_the_per_tensor_step():
    (m_a, w_a, opt_a), (m_b, w_b, opt_b) = _optimizers(fused=False)
    _step(m_a, w_a, opt_a, 0, False, None)
    _step(m_b, w_b, opt_b, 0, False, None)
    first = w_b.master(m_b.encoder[0].weight)
    for model, masters in ((m_a, w_a), (m_b, w_b)):
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        masters.take_grads()
    first.grad = first.grad.clone()  # no longer a view of the segment's flat gradient
    assert not opt_b._flat_ready(0) and opt_b._flat_ready(1)
    for masters, opt in ((w_a, opt_a), (w_b, opt_b)):
        opt.step()
        masters.copy_to_model(flat=False)
    assert opt_b._host_step == {0: 2, 1: 2}
    for a, b in zip(w_a.masters, w_b.masters, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)
    for p, m in zip(w_b.params, w_b.masters, strict=True):  # weights written either way
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    # zero_grad makes the replaced gradient its flat view again (zeroed): later steps do not
    # sum onto it, and go through the flat kernel again
    for seed in range(2, 5):
        _step(m_a, w_a, opt_a, seed, False, None)
        _step(m_b, w_b, opt_b, seed, False, None)
    assert opt_b._host_step == {0: 5, 1: 5}
    for a, b in zip(w_a.masters, w_b.masters, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)


def test_compiled_update_matches_the_eager_one_without_recompiling():
    """Inductor (C++ on a CPU) compiles the update once: lr and the bias corrections change
    every step and must stay kernel arguments, not constants baked into a new compilation
    (Python floats would be: this test failed that way first)."""
    from mtl_dist.flat_adamw import compiled_update

    gen = torch.Generator().manual_seed(0)
    n = 1000
    eager = [torch.randn(n, generator=gen) for _ in range(2)] + [torch.zeros(n), torch.zeros(n)]
    compiled = [t.clone() for t in eager]
    w_e, w_c = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    fn = compiled_update()
    for step in range(1, 4):
        lr, divisor = 1e-2 / step, torch.tensor(1.0 + step)
        scalars = torch.tensor([1 - lr * 0.1, lr / (1 - 0.9 ** step), (1 - 0.98 ** step) ** 0.5])
        args = (divisor, scalars, 0.9, 0.98, 1e-6)
        adamw_update(eager[0], eager[1], eager[2], eager[3], w_e, *args)
        with torch._dynamo.config.patch(error_on_recompile=step > 1):
            fn(compiled[0], compiled[1], compiled[2], compiled[3], w_c, *args)
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert torch.equal(w_c, compiled[0].to(torch.bfloat16))


def test_compiled_chunk_update_equals_the_whole_buffer_one_bit_for_bit_in_one_compile():
    """`train.overlap_optimizer` steps views of the flat buffers (several sizes and offsets)
    through the dynamic-shape compile: the same bits as the whole-buffer kernel, and one
    compilation for every chunk."""
    from mtl_dist.flat_adamw import compiled_chunk_update, compiled_update

    gen = torch.Generator().manual_seed(0)
    n, cuts = 1000, [0, 400, 656, 1000]
    whole = [torch.randn(n, generator=gen) for _ in range(2)] + [torch.zeros(n), torch.zeros(n)]
    chunked = [t.clone() for t in whole]
    w_whole, w_chunked = (torch.empty(n, dtype=torch.bfloat16) for _ in range(2))
    calls = 0
    for step in range(1, 4):
        lr, divisor = 1e-2 / step, torch.tensor(1.0 + step)
        scalars = torch.tensor([1 - lr * 0.1, lr / (1 - 0.9 ** step), (1 - 0.98 ** step) ** 0.5])
        args = (divisor, scalars, 0.9, 0.98, 1e-6)
        compiled_update()(*whole, w_whole, *args)
        for lo, hi in itertools.pairwise(cuts):
            with torch._dynamo.config.patch(error_on_recompile=calls > 0):
                compiled_chunk_update()(*(t[lo:hi] for t in chunked), w_chunked[lo:hi], *args)
            calls += 1
        for a, b in zip(whole, chunked, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(w_whole, w_chunked)


def test_trains_like_bf16_weights_and_updates_every_encoder_weight_in_place(tmp_path):
    common = ["train.bf16_weights=true", "train.max_steps=12", "train.lr=1e-3",
              "train.gradient_accumulation_steps=2", "train.fused_clipping=true",
              "train.max_grad_norm=0.5", *NO_DROPOUT]
    plain = _trainer(tmp_path, "plain", *common)
    plain.fit()
    flat = _trainer(tmp_path, "flat", *common, "train.flat_masters=true")
    inner = flat.optimizer.optimizer
    assert isinstance(inner, FlatAdamW) and set(inner._segments) == {0, 1}
    flat.fit()
    assert inner._host_step == {0: 12, 1: 12}  # every step through the flat kernel
    # fp32 rounding differs (torch's fused kernel vs the single-tensor form); where it flips
    # a bf16 weight's rounding the losses move by ~2e-4
    assert_losses_close(tmp_path / "plain", tmp_path / "flat", 1e-3, steps=12)
    # every parameter took as many AdamW steps as without the switch: idle heads skipped
    # theirs in both (the weights themselves differ by bf16 noise, up to ~lr where a
    # gradient is ~0, e.g. attention key biases)
    sa, sb = plain.optimizer.state_dict()["state"], inner.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert [float(sa[k]["step"]) for k in sa] == [float(sb[k]["step"]) for k in sb]
    assert min(float(sa[k]["step"]) for k in sa) < 12  # some head was idle in some step


def test_stop_and_resume_is_bit_exact_and_resumes_across_the_switch(tmp_path):
    common = ["train.bf16_weights=true", "train.max_steps=12",
              "train.gradient_accumulation_steps=2"]
    _trainer(tmp_path, "straight", *common, "train.flat_masters=true").fit()
    _trainer(tmp_path, "split", *common, "train.flat_masters=true",
             "train.stop_after_steps=5").fit()
    _trainer(tmp_path, "split", *common, "train.flat_masters=true", "train.resume=auto").fit()
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_losses(split) == train_losses(straight)
    assert_same_tensors(checkpoint_model(split, 12), checkpoint_model(straight, 12))
    # a checkpoint of a run without the switch resumes with it (AdamW's state dict)
    _trainer(tmp_path, "across", *common, "train.stop_after_steps=5").fit()
    resumed = _trainer(tmp_path, "across", *common, "train.flat_masters=true",
                       "train.resume=auto")
    resumed.fit()
    assert resumed.optimizer.optimizer._host_step == {0: 12, 1: 12}
    assert_losses_close(straight, tmp_path / "across", 1e-3)


@pytest.mark.slow  # two gloo ranks under accelerate launch
def test_two_ranks_under_ddp_train_like_per_tensor_masters(tmp_path):
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=6", "train.log_steps=1",
              "train.mixed_precision=bf16", "train.bf16_weights=true",
              "train.gradient_accumulation_steps=2", "train.lr=1e-3",
              "checkpoint.save_best=false", "train.eval_at_epoch_end=false", *NO_DROPOUT]
    for name, extra in {"plain": [], "flat": ["train.flat_masters=true"]}.items():
        run_cli(["train", str(DEMO), f"train.output_dir={tmp_path / name}", *common, *extra],
                procs=2)
    assert_losses_close(tmp_path / "plain", tmp_path / "flat", 1e-3, steps=6)


def test_flat_masters_needs_bf16_weights():
    with pytest.raises(ConfigError, match="train.flat_masters.*bf16_weights=false"):
        load_config(DEMO, ["train.mixed_precision=bf16", "train.flat_masters=true"])


def test_relink_makes_the_model_read_the_flat_weights_again_after_a_device_move():
    # accelerate's prepare moves the model to torch.device("cpu", 0): on CPU that copies
    # every parameter, and the flat step would write weights the model no longer reads.
    torch.manual_seed(0)
    model = _Tiny()
    masters = MasterWeights(model, _groups(model))
    weight = masters.segments[0].weight
    first = model.encoder[0].weight
    assert first.data_ptr() == weight.data_ptr()
    model.to(torch.device("cpu", 0))
    with torch.no_grad():
        first.add_(1.0)  # e.g. DDP's broadcast of rank 0's weights into the copies
    expected = first.detach().clone()
    assert first.data_ptr() != weight.data_ptr()
    masters.relink_model()
    assert first.data_ptr() == weight.data_ptr()
    assert torch.equal(first.detach(), expected)
    assert torch.equal(weight[: first.numel()].view_as(first), expected)


def _flat_pair():
    """The same tiny model twice, both with flat masters and FlatAdamW (heads: fused AdamW)."""
    return _optimizers(fused=True)[1], _optimizers(fused=True)[1]


def _bf16_grads(model: nn.Module, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in model.parameters()]


def _hand_over(model, masters, opt, grads, in_bf16: bool) -> None:
    """What the CUDA graphs do with one micro-step per group (in_bf16) or the eager path."""
    opt.zero_grad(set_to_none=True)
    views = masters.bf16_grad_views() if in_bf16 else {}
    for p, g in zip(model.parameters(), grads, strict=True):
        if id(p) in views:
            views[id(p)].copy_(g)
        else:
            p.grad = g.clone()
    masters.take_grads()
    masters.grads_in_bf16 = in_bf16


def test_bf16_gradients_read_by_the_flat_kernel_step_exactly_like_fp32_ones():
    from mtl_dist.trainer import clip_divisor

    (m_a, w_a, opt_a), (m_b, w_b, opt_b) = _flat_pair()
    for seed in range(4):
        grads = _bf16_grads(m_a, seed)
        _hand_over(m_a, w_a, opt_a, grads, in_bf16=False)
        _hand_over(m_b, w_b, opt_b, grads, in_bf16=True)
        assert w_b.grads_for_norm()[0].dtype == torch.bfloat16
        div_a = clip_divisor(w_a.grads_for_norm(), 0.5)
        div_b = clip_divisor(w_b.grads_for_norm(), 0.5)
        assert float(div_a) > 1.0  # clipping is active
        torch.testing.assert_close(div_b, div_a, rtol=1e-6, atol=0)
        for opt, div in ((opt_a, div_a), (opt_b, div_b)):
            opt.grad_scale = div
            opt.step()
            del opt.grad_scale
        w_a.copy_to_model(flat=False)
        w_b.copy_to_model(flat=False)
    assert opt_b._host_step == {0: 4, 1: 4}
    for a, b in zip(w_a.masters, w_b.masters, strict=True):
        assert torch.equal(a, b)  # a bf16 -> fp32 cast is exact
    for p, q in zip(m_a.parameters(), m_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_fallback_step_first_moves_bf16_gradients_into_the_fp32_views():
    (m_a, w_a, opt_a), (m_b, w_b, opt_b) = _flat_pair()
    grads = _bf16_grads(m_a, 0)
    _hand_over(m_a, w_a, opt_a, grads, in_bf16=False)
    _hand_over(m_b, w_b, opt_b, grads, in_bf16=True)
    first = w_b.master(m_b.encoder[0].weight)
    opt_b.state[first]["exp_avg"] = opt_b.state[first]["exp_avg"].clone()  # group 0 not flat
    assert not opt_b._flat_ready(0)
    opt_a.step()
    opt_b.step()
    assert not w_b.grads_in_bf16
    torch.testing.assert_close(w_b.segments[0].grad, w_a.segments[0].grad, rtol=0, atol=0)
    for a, b in zip(w_a.masters, w_b.masters, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)


def test_step_hooks_run_once_per_step_also_after_a_plain_adamw_was_built():
    """FlatAdamW steps its per-tensor groups through torch's AdamW.step, which torch wraps
    with the hook runner as soon as any AdamW exists: the hooks must still run once."""
    (m_a, w_a, opt_a), (m_b, w_b, opt_b) = _optimizers(fused=False)  # builds a plain AdamW
    assert getattr(torch.optim.AdamW.step, "hooked", False)
    calls = []
    opt_b.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt_b.register_step_post_hook(lambda *_: calls.append("post"))
    _step(m_b, w_b, opt_b, seed=0, head_idle=False, divisor=None)
    assert calls == ["pre", "post"]
    _step(m_a, w_a, opt_a, seed=0, head_idle=False, divisor=None)
    for a, b in zip(w_a.masters, w_b.masters, strict=True):  # the heads stepped as before
        torch.testing.assert_close(b, a, rtol=2e-6, atol=1e-7)
