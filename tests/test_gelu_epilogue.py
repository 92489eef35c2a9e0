"""`train.gelu_epilogue`: the intermediate Linear + GELU as one GEMM whose epilogue applies the
GELU's tanh approximation (cuBLASLt on CUDA: test_gpu.py) — on CPU the same maths as torch ops:
the tanh GELU's outputs and gradients, the weight gradient written in place, the model's
parameters and state, and training within bf16 noise of the exact GELU."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from mtl_dist import cublaslt
from mtl_dist.config import load_config
from mtl_dist.errors import ConfigError
from mtl_dist.gelu_epilogue import (
    GeluEpilogueIntermediate,
    GeluLinear,
    enable_gelu_epilogue,
    gelu_linear,
    gelu_of_linear,
)
from mtl_dist.model import compile_encoder_layers, enable_packed_attention, transformer_layers
from tests._models import assert_same_gradients, tiny_model
from tests._runs import DEMO, FAST, run_cli, train_losses
from tests.test_fused_qkv import loss_of


def operands(dtype=torch.float64, tokens=37):
    torch.manual_seed(0)
    return (torch.randn(tokens, 16, dtype=dtype), torch.randn(64, 16, dtype=dtype) * 0.3,
            torch.randn(64, dtype=dtype))


def test_the_op_is_the_tanh_gelu_of_the_linear_and_keeps_its_input():
    x, weight, bias = operands()
    h, pre = gelu_linear(x, weight, bias)
    assert torch.equal(pre, F.linear(x, weight, bias))
    assert torch.equal(h, F.gelu(pre, approximate="tanh"))
    assert not cublaslt.supported(x, weight, bias)  # CPU: torch ops, no cuBLASLt


def test_the_op_refuses_operands_that_do_not_fit():
    x, weight, bias = operands()
    with pytest.raises(RuntimeError, match=r"x \(tokens, in\), weight \(out, in\)"):
        gelu_linear(x.view(1, 37, 16), weight, bias)
    with pytest.raises(RuntimeError, match=r"shapes \(37, 16\), \(64, 16\), \(63,\) do not fit"):
        gelu_linear(x, weight, bias[:63])


def test_only_the_gradients_asked_for_are_computed():
    x, weight, bias = operands()
    leaves = [x.clone(), weight.clone().requires_grad_(), bias.clone()]  # a frozen bias
    GeluLinear.apply(*leaves, None).sum().backward()
    assert leaves[1].grad is not None and leaves[0].grad is None and leaves[2].grad is None


def test_gradients_are_the_tanh_gelus():
    x, weight, bias = operands()
    ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
    reference = [t.clone().requires_grad_() for t in (x, weight, bias)]
    grad = torch.randn(37, 64, dtype=torch.float64)
    GeluLinear.apply(*ours, None).backward(grad)
    F.gelu(F.linear(*reference), approximate="tanh").backward(grad)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_the_weight_gradient_goes_into_its_target():
    """`train.direct_weight_grads`: the GEMM writes the weight gradient into the target and
    autograd gets none for the weight (LinearGradInto's contract)."""
    x, weight, bias = operands()
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    target = torch.full_like(weight, float("nan"))
    grad = torch.randn(37, 64, dtype=torch.float64)
    GeluLinear.apply(*leaves, target).backward(grad)
    assert leaves[1].grad is None
    reference = weight.clone().requires_grad_()
    F.gelu(F.linear(x, reference, bias), approximate="tanh").backward(grad)
    torch.testing.assert_close(target, reference.grad, rtol=1e-12, atol=1e-12)


def test_a_linear_with_a_weight_grad_target_has_its_gradient_written_there():
    """What the CUDA graphs set up with `train.direct_weight_grads` (WeightGradIntoLinear):
    the block reads the Linear's target and writes the weight gradient into it."""
    x, weight, bias = operands(torch.float32)
    linear = torch.nn.Linear(16, 64)
    linear.weight_grad_target = torch.full_like(linear.weight, float("nan"))
    gelu_of_linear(x, linear).sum().backward()
    assert linear.weight.grad is None and torch.isfinite(linear.weight_grad_target).all()
    reference = copy.deepcopy(linear)
    F.gelu(reference(x), approximate="tanh").sum().backward()
    torch.testing.assert_close(linear.weight_grad_target, reference.weight.grad)
    torch.testing.assert_close(linear.bias.grad, reference.bias.grad)


def test_autocast_runs_it_in_bf16_and_hands_fp32_parameters_fp32_gradients():
    x, weight, bias = operands(torch.float32)
    linear = torch.nn.Linear(16, 64)
    with torch.no_grad():
        linear.weight.copy_(weight), linear.bias.copy_(bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = gelu_of_linear(x.view(1, 37, 16), linear)
    assert h.dtype == torch.bfloat16 and h.shape == (1, 37, 64)
    expected = F.gelu(F.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()),
                      approximate="tanh")
    torch.testing.assert_close(h[0], expected, rtol=0, atol=0)
    h.float().sum().backward()
    assert linear.weight.grad.dtype == torch.float32 and linear.bias.grad.dtype == torch.float32
    assert linear.weight.grad.abs().sum() > 0


def tanh_gelu_copy(model):
    """`model` with its layers' activation set to transformers' tanh GELU, the plain way."""
    reference = copy.deepcopy(model)
    for layer in transformer_layers(reference, "test"):
        layer.intermediate.intermediate_act_fn = ACT2FN["gelu_pytorch_tanh"]
    return reference


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_model_computes_the_tanh_gelu_model_with_the_same_state(model_type):
    torch.manual_seed(0)
    exact = tiny_model(model_type, pad_token_id=0 if model_type == "bert" else 1)
    enable_packed_attention(exact, 16)
    with torch.no_grad():  # GELU inputs of order 1, where the approximation shows
        for layer in transformer_layers(exact, "test"):
            layer.intermediate.dense.weight.mul_(50)
    reference = tanh_gelu_copy(exact)
    ours = copy.deepcopy(exact)
    assert enable_gelu_epilogue(ours) == 2
    assert enable_gelu_epilogue(ours) == 2  # a second call changes nothing
    assert ours.encoder.config.hidden_act == "gelu_pytorch_tanh"  # what exports will load
    layers = transformer_layers(ours, "test")
    assert all(type(layer.intermediate) is GeluEpilogueIntermediate for layer in layers)
    assert ours.state_dict().keys() == exact.state_dict().keys()
    for packed in (False, True):
        loss_ref, loss_ours = loss_of(reference, packed), loss_of(ours, packed)
        torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-6, atol=1e-7)
        reference.zero_grad(), ours.zero_grad()
        loss_ref.backward(), loss_ours.backward()
        assert_same_gradients(ours, reference)
        # against the exact GELU: close (the approximation), not equal (the switch acts)
        loss_exact = loss_of(exact, packed)
        assert 0 < abs(loss_ours.item() - loss_exact.item()) < 1e-3 * abs(loss_exact.item())


def test_the_approximation_is_within_the_documented_bound():
    x = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    gap = (F.gelu(x) - F.gelu(x, approximate="tanh")).abs()
    assert gap.max() < 4.8e-4  # the README's and the module's bound
    where = x[gap.argmax()].abs()
    assert 2.6 < where < 2.8  # where one bf16 step of the activation (~2.7) is 2**-6


def test_a_model_with_the_switch_pickles_and_copies():
    model = tiny_model()
    enable_gelu_epilogue(model)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        layer = transformer_layers(clone, "test")[0]
        assert type(layer.intermediate) is GeluEpilogueIntermediate
        assert layer.intermediate.dense is not transformer_layers(model, "test")[0] \
            .intermediate.dense
        assert loss_of(clone, False).item() == loss_of(model, False).item()


def test_compiled_layers_take_it_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = tiny_model()
    enable_gelu_epilogue(eager)
    compiled = copy.deepcopy(eager)
    compile_encoder_layers(compiled)
    loss_eager, loss_compiled = loss_of(eager, False), loss_of(compiled, False)
    loss_eager.backward(), loss_compiled.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    assert_same_gradients(compiled, eager, rtol=1e-4, atol=1e-5)


def test_refuses_layers_it_would_change_and_leaves_the_model_as_it_was():
    model = tiny_model()
    model.encoder.config.hidden_act = "relu"
    with pytest.raises(ConfigError, match=r"'train.gelu_epilogue': layer 0: hidden_act='relu' "
                                          r"is not a GELU; set train.gelu_epilogue=false"):
        enable_gelu_epilogue(model)
    model = tiny_model()
    layers = transformer_layers(model, "test")
    layers[1].intermediate.extra = torch.nn.Dropout(0.1)
    with pytest.raises(ConfigError, match=r"layer 1: BertIntermediate has modules besides "
                                          r"dense: \['extra'\]"):
        enable_gelu_epilogue(model)
    assert all(type(layer.intermediate) is not GeluEpilogueIntermediate for layer in layers)
    model = tiny_model()
    transformer_layers(model, "test")[0].intermediate.dense.bias = None
    with pytest.raises(ConfigError, match="no intermediate.dense Linear with a bias"):
        enable_gelu_epilogue(model)


def test_zero3_is_refused_in_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.gelu_epilogue': expected false with "
                                          r"train.zero_stage=3"):
        load_config(DEMO, [f"train.output_dir={tmp_path}", "train.gelu_epilogue=true",
                           "train.zero_stage=3"])


def test_the_trainer_installs_it_and_trains_within_bf16_noise_of_the_exact_gelu(tmp_path):
    """The demo, 6 steps with dropout, switch off and on: the trainer's layers take the
    epilogue block, and the losses are the exact GELU's to far below bf16 rounding (2**-9)."""
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=6", "train.log_steps=1",
              "checkpoint.save_best=false", "train.eval_at_epoch_end=false", "train.lr=1e-3"]
    for value in ("false", "true"):
        run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/{value}", *common,
                 f"train.gelu_epilogue={value}"])
    exact, ours = train_losses(tmp_path / "false"), train_losses(tmp_path / "true")
    assert [s for s, _ in exact] == [s for s, _ in ours] == list(range(1, 7))
    gaps = [abs(a - b) / abs(a) for (_, a), (_, b) in zip(exact, ours, strict=True)]
    assert max(gaps) < 2e-4, gaps
    assert max(gaps) > 0  # the switch acted

    from mtl_dist.trainer import Trainer

    trainer = Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/t", *common, *FAST,
                                         "train.gelu_epilogue=true"]))
    layers = transformer_layers(trainer.module, "test")
    assert all(type(layer.intermediate) is GeluEpilogueIntermediate for layer in layers)
    trainer.close()
    # the config written beside the checkpoints (and copied by `ckpt export`) names the tanh GELU
    saved = json.loads((tmp_path / "true" / "encoder_config.json").read_text())
    assert saved["hidden_act"] == "gelu_pytorch_tanh"
    assert json.loads((tmp_path / "false" / "encoder_config.json").read_text())["hidden_act"] \
        == "gelu"
