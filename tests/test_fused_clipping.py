"""`train.fused_clipping`: gradient clipping folded into the fused AdamW pass (its grad_scale)."""

from __future__ import annotations

import pytest
import torch

from mtl_dist.config import load_config
from mtl_dist.errors import ConfigError
from mtl_dist.trainer import clip_divisor
from tests._runs import DEMO, NO_DROPOUT, run_cli, train_losses


def _params(scale: float) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in
              [(64, 32), (32,), (7, 64)]]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("grad_scale", [10.0, 0.01])  # norm above / below max_norm
def test_fused_step_with_clip_divisor_equals_clip_then_step(grad_scale):
    clipped, folded = _params(grad_scale), _params(grad_scale)
    opt_a = torch.optim.AdamW(clipped, lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(folded, lr=1e-2, fused=True)
    for _ in range(3):
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        opt_a.step()
        opt_b.grad_scale = clip_divisor([p.grad for p in folded], 1.0)
        opt_b.step()
        del opt_b.grad_scale
    for a, b in zip(clipped, folded, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    unclipped = _params(grad_scale)
    opt_c = torch.optim.AdamW(unclipped, lr=1e-2, fused=True)
    opt_c.step()
    # the test can fail: without clipping, a large gradient moves the weights differently
    assert (grad_scale < 1) or not torch.allclose(unclipped[2], folded[2])


def test_clip_divisor_of_bf16_gradients_is_their_fp32_norm():
    # get_total_norm would round a bf16 gradient's norm to bf16 (~0.4 % off); flat masters
    # hand bf16 gradients to the clip divisor (MasterWeights.grads_in_bf16)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen).to(torch.bfloat16) * 3
             for shape in [(4096,), (300, 7), (5,)]]
    grads.append(torch.randn(64, generator=gen))  # a head's fp32 gradient beside them
    exact = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
    divisor = clip_divisor(grads, 1.0)
    assert divisor.dtype == torch.float32
    torch.testing.assert_close(divisor.double(), exact + 1e-6, rtol=1e-6, atol=0)
    assert float(clip_divisor(grads, 1e6)) == 1.0  # below max_norm: no clipping
    assert float(clip_divisor([], 1.0)) == 1.0


def test_fused_clipping_trains_like_separate_clipping(tmp_path):
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=6", "train.log_steps=1",
              "checkpoint.save_best=false", "train.eval_at_epoch_end=false",
              "train.lr=1e-3", *NO_DROPOUT]
    runs = {"plain": ["train.max_grad_norm=0.05"],
            "fused": ["train.max_grad_norm=0.05", "train.fused_clipping=true"],
            "unclipped": ["train.max_grad_norm=null"]}
    for name, extra in runs.items():
        run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/{name}", *common, *extra])
    plain, fused, unclipped = (train_losses(tmp_path / n) for n in runs)
    assert [s for s, _ in plain] == [s for s, _ in fused] == list(range(1, 7))
    for (step, x), (_, y) in zip(plain, fused, strict=True):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (step, x, y)
    # clipping was active: the unclipped run's losses part from the clipped ones
    assert max(abs(x - y) for (_, x), (_, y) in zip(plain, unclipped, strict=True)) > 1e-3


@pytest.mark.parametrize("override, named", [
    ("train.mixed_precision=fp16", "train.mixed_precision=fp16"),
    ("train.zero_stage=2", "train.zero_stage=2"),
    ("train.fused_optimizer=false", "train.fused_optimizer=false"),
])
def test_fused_clipping_refuses_settings_it_cannot_serve(override, named):
    with pytest.raises(ConfigError, match=f"train.fused_clipping.*{named}"):
        load_config(DEMO, ["train.fused_clipping=true", override])


@pytest.mark.parametrize("overrides, named", [
    (["train.triton_clip_norm=true"], "train.fused_clipping=false, train.flat_masters=false"),
    (["train.triton_clip_norm=true", "train.fused_clipping=true"],
     "train.fused_clipping=true, train.flat_masters=false"),
])
def test_triton_clip_norm_is_refused_without_fused_clipping_and_flat_masters(overrides, named):
    with pytest.raises(ConfigError, match=f"'train.triton_clip_norm': expected false with "
                                          f"{named} .it reads the flat buffers"):
        load_config(DEMO, overrides)


def triton_norm_errors() -> dict:
    """Relative errors of the Triton sum of squares against fp64 (run in the interpreter)."""
    from mtl_dist.triton_norm import TILES, sum_of_squares

    errors, gen = {}, torch.Generator().manual_seed(0)
    for size in (0, 1, 4097, 70_001):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for tiles in (TILES, (256, 4, 4), (64, 3, 1)):
                x = torch.randn(size, generator=gen).to(dtype)
                exact = x.double().square().sum().item()
                ours = sum_of_squares(x, tiles)
                assert ours.dtype == torch.float32 and ours.dim() == 0
                errors[f"{size} {dtype} {tiles}"] = abs(ours.item() - exact) / max(exact, 1e-30)
    x = torch.randn(5000, generator=gen).to(torch.bfloat16)
    x[4321] = float("inf")
    errors["an inf: an inf sum"] = 0.0 if sum_of_squares(x).item() == float("inf") else 1.0
    x[17] = float("nan")
    errors["a nan: a nan sum"] = 0.0 if sum_of_squares(x).isnan().item() else 1.0
    return errors


def test_triton_sum_of_squares_gives_the_fp64_sum_in_the_interpreter():
    pytest.importorskip("triton")
    from tests._runs import in_triton_interpreter

    errors = in_triton_interpreter("import tests.test_fused_clipping as t", "t.triton_norm_errors()")
    assert len(errors) == 4 * 3 * 3 + 2
    for key, error in errors.items():
        assert error < 1e-5, (key, error)


def test_triton_sum_of_squares_refuses_what_it_cannot_read():
    pytest.importorskip("triton")
    from mtl_dist.triton_norm import sum_of_squares, takes_triton

    with pytest.raises(ValueError, match="contiguous tensor of .* got a non-contiguous "
                                         "torch.float32"):
        sum_of_squares(torch.randn(8, 8).t())
    with pytest.raises(ValueError, match="got torch.int64"):
        sum_of_squares(torch.arange(10))
    with pytest.raises(ValueError, match=r"powers of two, all at least 1, got \(100, 4, 4\)"):
        sum_of_squares(torch.randn(10), (100, 4, 4))
    assert not takes_triton(torch.randn(10))  # a CPU tensor: the trainer keeps torch's norm


def test_clip_divisor_leaves_flat_cpu_tensors_to_torch():
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(0)
    flat = [torch.randn(5000, generator=gen).to(torch.bfloat16)]
    loose = [torch.randn(30, generator=gen), torch.randn(4, 4, generator=gen)]
    assert torch.equal(clip_divisor(loose, 1.0, flat=flat), clip_divisor(flat + loose, 1.0))
    assert float(clip_divisor([], 1.0, flat=[])) == 1.0


def test_triton_clip_norm_hands_the_flat_buffers_apart_and_trains_the_same(monkeypatch,
                                                                          tmp_path):
    pytest.importorskip("triton")
    import mtl_dist.trainer as trainer_module
    from tests.test_bf16_weights import _trainer

    seen = []

    def recording(grads, max_norm, flat=()):
        seen.append([g.numel() for g in flat])
        return clip_divisor(grads, max_norm, flat)

    monkeypatch.setattr(trainer_module, "clip_divisor", recording)
    segments = {}
    for switch in ("true", "false"):
        trainer = _trainer(tmp_path, switch, "train.max_steps=3", "train.log_steps=1",
                           "train.bf16_weights=true", "train.flat_masters=true",
                           "train.fused_clipping=true", "train.max_grad_norm=0.05",
                           f"train.triton_clip_norm={switch}", *NO_DROPOUT)
        try:
            trainer.fit()
        finally:
            trainer.close()
        segments[switch] = [seg.grad.numel() for seg in trainer.masters.segments]
    assert len(segments["true"]) == 2
    # with the switch the two flat buffers go to the kernel's path, without it none
    assert seen == [segments["true"]] * 3 + [[]] * 3
    # on CPU the flat buffers fall back to torch's norm: the same losses, bit for bit
    assert len(train_losses(tmp_path / "true")) == 3
    assert train_losses(tmp_path / "true") == train_losses(tmp_path / "false")
