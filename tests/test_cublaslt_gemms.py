"""`train.cublaslt_gemms`: the Linears that `train.direct_weight_grads` routes run their GEMMs by
cuBLASLt without a workspace (CUDA: test_gpu.py). On CPU: the row-major → column-major problem
handed to cuBLASLt (checked by running it as cuBLAS would read memory), the ops' torch paths,
the switch reaching every routed Linear, compiled layers calling the ops, and the config check."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mtl_dist import cublaslt
from mtl_dist.config import load_config
from mtl_dist.errors import ConfigError
from mtl_dist.gelu_epilogue import GeluLinear, enable_gelu_epilogue
from mtl_dist.graphs import WeightGradIntoLinear, write_weight_grads_into
from mtl_dist.lt_gemms import linear_grads, lt_linear, lt_mm, lt_weight_grad_into
from mtl_dist.model import LinearGradInto, compile_encoder_layers, transformer_layers
from tests._models import tiny_model
from tests._runs import DEMO
from tests.test_fused_qkv import loss_of


def column_major(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (rows × cols) column-major matrix with leading dimension `rows`, read from memory."""
    return storage.flatten()[: rows * cols].view(cols, rows).t()


def cublas_reads(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What cuBLAS computes from `mm`'s problem: each operand's memory read column-major as
    `stored_shapes` lays it out, op() applied, D written column-major, read back row-major."""
    a_t, b_t = cublaslt._row_major_operand(a), cublaslt._row_major_operand(b)
    p = cublaslt.mm_problem(a.shape, a_t, b.shape, b_t)
    shapes = cublaslt.stored_shapes(p["m"], p["n"], p["k"], p["transa"], p["transb"])
    tensors = {"a": (a, a_t), "b": (b, b_t)}
    memory = [t.t().contiguous() if transposed else t.contiguous()  # as the bytes lie
              for t, transposed in (tensors[name] for name in p["operands"])]
    first, second = (column_major(m, *shape) for m, shape in zip(memory, shapes[:2],
                                                                     strict=True))
    first = first.t() if p["transa"] else first
    second = second.t() if p["transb"] else second
    d = first @ second  # (m × n), column-major in memory: its transpose's rows
    assert d.shape == shapes[2]
    return d.t().contiguous().flatten().view(a.shape[0], b.shape[1])


@pytest.mark.parametrize("a_transposed,b_transposed", list(itertools.product([False, True], repeat=2)))
def test_the_column_major_problem_computes_the_row_major_product(a_transposed, b_transposed):
    torch.manual_seed(0)
    m, k, n = 5, 7, 3
    a = torch.randn(k, m).t() if a_transposed else torch.randn(m, k)
    b = torch.randn(n, k).t() if b_transposed else torch.randn(k, n)
    assert cublaslt._row_major_operand(a) is a_transposed
    assert cublaslt._row_major_operand(b) is b_transposed
    torch.testing.assert_close(cublas_reads(a, b), a @ b)


def test_only_contiguous_or_transposed_cuda_operands_are_taken():
    x = torch.randn(16, 8)
    assert cublaslt._row_major_operand(x[:, ::2]) is None
    assert not cublaslt.mm_supported(x, torch.randn(8, 16))  # CPU: torch's ops
    assert not cublaslt.mm_supported(x.bfloat16(), torch.randn(8, 16).bfloat16())


def operands(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.randn(37, 16, dtype=dtype), torch.randn(24, 16, dtype=dtype), \
        torch.randn(24, dtype=dtype)


def test_the_ops_compute_a_linear_and_its_gradients_on_cpu():
    x, weight, bias = operands()
    grad = torch.randn(37, 24, dtype=torch.float64)
    torch.testing.assert_close(lt_linear(x, weight, bias), x @ weight.t() + bias)
    torch.testing.assert_close(lt_linear(x, weight, None), x @ weight.t())
    torch.testing.assert_close(lt_mm(grad, weight), grad @ weight)
    out = torch.full_like(weight, float("nan"))
    lt_weight_grad_into(grad, x, out)
    torch.testing.assert_close(out, grad.t() @ x)
    for lt in (False, True):
        target = torch.zeros_like(weight)
        got = linear_grads(grad, x, weight, target, True, True, lt)
        torch.testing.assert_close(target, grad.t() @ x)
        assert got[1] is None  # written into the target instead
        torch.testing.assert_close(got[0], grad @ weight)
        got = linear_grads(grad, x, weight, None, False, True, lt)
        assert got[0] is None
        torch.testing.assert_close(got[1], grad.t() @ x)


@pytest.mark.parametrize("function", ["linear", "gelu"])
def test_linear_grad_into_gives_the_same_with_the_switch(function):
    x, weight, bias = operands()
    grad = torch.randn(37, 24, dtype=torch.float64)
    results = []
    for lt in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        target = torch.zeros_like(weight)
        apply = LinearGradInto.apply if function == "linear" else GeluLinear.apply
        apply(*leaves, target, lt).backward(grad)
        assert leaves[1].grad is None  # the weight's went into the target
        results.append([leaves[0].grad, leaves[2].grad, target])
    for off, on in zip(*results, strict=True):
        torch.testing.assert_close(on, off)


def routed_model(cublaslt_gemms: bool, gelu: bool = False):
    """tiny_model whose layers' Linears write their weight gradients into targets, as
    StepGraphs makes them with train.direct_weight_grads; returns (model, targets)."""
    torch.manual_seed(0)
    model = tiny_model()
    if gelu:
        enable_gelu_epilogue(model)
    layers = transformer_layers(model, "test")
    linears = [m for m in layers.modules() if type(m) is nn.Linear]
    targets = {id(m.weight): torch.zeros_like(m.weight) for m in linears}
    write_weight_grads_into(layers, targets, cublaslt_gemms)
    return model, targets


def test_the_switch_reaches_every_routed_linear_and_a_new_target_resets_it():
    model, targets = routed_model(True, gelu=True)
    routed = [m for m in transformer_layers(model, "test").modules()
              if isinstance(m, WeightGradIntoLinear)]
    assert len(routed) == len(targets) and all(m.cublaslt_gemms for m in routed)
    write_weight_grads_into(transformer_layers(model, "test"), targets, False)
    assert not any(m.cublaslt_gemms for m in routed)
    assert "cublaslt_gemms" not in model.state_dict()


def test_compiled_layers_call_the_ops_and_train_the_same():
    """Every GEMM of the compiled layers' forward and backward is one of the switch's ops (no
    torch GEMM left), no graph break, and the loss and gradients are those without it."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    results = []
    for lt in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model, targets = routed_model(lt, gelu=True)
        compile_encoder_layers(model)
        loss, code = run_and_get_code(lambda m=model: loss_of(m, False).backward() or 0)
        code = "\n".join(code)
        assert not counters["graph_break"], dict(counters["graph_break"])
        if lt:
            for op in ("lt_linear", "lt_mm", "lt_weight_grad_into"):
                assert f"mtl_dist.{op}" in code, op
            assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
        results.append(([t.clone() for t in targets.values()], {n: p.grad for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    (targets_off, grads_off), (targets_on, grads_on) = results
    assert len(targets_on) == len(targets_off) > 0
    for on, off in zip(targets_on, targets_off, strict=True):
        assert off.abs().sum() > 0  # written
        torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-5)


def test_the_switch_needs_direct_weight_grads(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'train.cublaslt_gemms': expected false "
                                          r"with train.direct_weight_grads=false"):
        load_config(DEMO, [f"train.output_dir={tmp_path}", "train.cublaslt_gemms=true"])


def test_an_op_falls_back_to_torch_when_cublaslt_fails(monkeypatch):
    """E.g. no algorithm without a workspace: the op gives torch's result instead of failing
    the step."""
    from mtl_dist import lt_gemms

    def fails(*args, **kwargs):
        raise cublaslt.CublasLtError("cuBLASLt has no algorithm")

    monkeypatch.setattr(cublaslt, "mm_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(cublaslt, "mm", fails)
    x, weight, bias = operands()
    torch.testing.assert_close(lt_gemms.lt_linear(x, weight, bias), x @ weight.t() + bias)
    torch.testing.assert_close(lt_gemms.lt_mm(x, weight.t()), x @ weight.t())
