"""`train.gelu_epilogue`: each transformer layer's intermediate Linear + GELU as one cuBLASLt
GEMM whose epilogue adds the bias and applies the GELU (`mtl_dist/cublaslt.py`), instead of a
GEMM and a GELU kernel of its own.

Why: in run Y's H100 profile the GELU forward kernel took 0.52 ms of the 22.7 ms step (24
layers × ~22 µs: it reads the GEMM's (tokens × 4096) output and writes the activation). The
epilogue GEMM writes the activation and its input (kept for the backward) as it goes: one
layer's GEMM + GELU, 72 → 59 µs at 3,584 tokens (benchmarks/gelu_epilogue.py). The backward
stays torch's (cuBLASLt's backward epilogue, DGELU_BGRAD, runs as a separate unfused kernel on
the H100: 2× slower than the GEMM plus Inductor's fused GELU backward, same benchmark).

What changes: the activation becomes GELU's tanh approximation, the only one cuBLASLt has
(`gelu_pytorch_tanh` in transformers, which the encoder's config then names, so that exported
checkpoints load with the activation they were trained with). Exact for `gelu_new` and
`gelu_pytorch_tanh` models; within 4.8e-4 of the exact GELU otherwise (at inputs near ±2.7,
where one bf16 step of the activation is 0.016). On CPU, or where cuBLASLt cannot take the
operands (fp32, misaligned, widths not multiples of 8), the same maths runs as torch ops.
Same parameters and state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist import cublaslt
from mtl_dist.errors import ConfigError
from mtl_dist.lt_gemms import linear_grads
from mtl_dist.model import transformer_layers

GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_python", "gelu_fast",
                    "gelu_accurate")


@torch.library.custom_op("mtl_dist::gelu_linear", mutates_args=())
def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                workspace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x·wᵀ + b), x·wᵀ + b) for x (tokens × in), w (out × in), b (out): one GEMM
    on CUDA where cuBLASLt takes the operands (without a workspace if not `workspace`:
    train.cublaslt_gemms), torch ops otherwise."""
    _check_shapes(x, weight, bias)
    if cublaslt.supported(x, weight, bias):
        return cublaslt.gelu_linear(x, weight, bias,
                                    cublaslt.WORKSPACE_BYTES if workspace else 0)
    cublaslt.warn_fallback_once("train.gelu_epilogue", x, weight, bias)
    return _gelu_linear_torch(x, weight, bias)


def _gelu_linear_torch(x, weight, bias):
    pre = F.linear(x, weight, bias)
    return F.gelu(pre, approximate="tanh"), pre


def _check_shapes(x, weight, bias) -> None:
    torch._check(x.dim() == 2 and weight.dim() == 2 and bias.dim() == 1,
                 lambda: "gelu_linear: x (tokens, in), weight (out, in), bias (out)")
    torch._check(x.shape[1] == weight.shape[1] and bias.shape[0] == weight.shape[0],
                 lambda: f"gelu_linear: shapes {tuple(x.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)} do not fit")


@gelu_linear.register_fake
def _(x, weight, bias, workspace=True):
    _check_shapes(x, weight, bias)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])


class GeluLinear(torch.autograd.Function):
    """gelu_tanh(x·wᵀ + b) on rows x (tokens × in), all operands in one dtype; the weight
    gradient goes into `target` where given (LinearGradInto's way)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, cublaslt_gemms=False):
        h, pre = gelu_linear(x, weight, bias, not cublaslt_gemms)
        ctx.save_for_backward(x, weight, pre)
        ctx.target = target  # not saved: see LinearGradInto
        ctx.cublaslt_gemms = cublaslt_gemms  # train.cublaslt_gemms: the backward's GEMMs
        return h

    @staticmethod
    def backward(ctx, grad):
        x, weight, pre = ctx.saved_tensors
        dpre = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
        x_grad, weight_grad = linear_grads(dpre, x, weight, ctx.target, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[1], ctx.cublaslt_gemms)
        bias_grad = dpre.sum(0) if ctx.needs_input_grad[2] else None
        return x_grad, weight_grad, bias_grad, None, None


def gelu_of_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """gelu_tanh(linear(x)) for x (..., in), in autocast's dtype when autocast is on."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
        else linear.weight.dtype
    rows = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    target = getattr(linear, "weight_grad_target", None) if torch.is_grad_enabled() else None
    with torch.autocast(device, enabled=False):
        h = GeluLinear.apply(rows, linear.weight.to(dtype), linear.bias.to(dtype), target,
                             getattr(linear, "cublaslt_gemms", False))
    return h.view(*x.shape[:-1], h.shape[-1])


class GeluEpilogueIntermediate(nn.Module):
    """A BERT/RoBERTa intermediate block (`train.gelu_epilogue`): same `dense` Linear (so the
    same parameters and state dict), its GELU from the GEMM's epilogue."""

    def __init__(self, dense: nn.Linear):
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gelu_of_linear(hidden_states, self.dense)


def _intermediate_problem(layer: nn.Module, hidden_act) -> str | None:
    """Why `layer`'s intermediate block cannot take the epilogue, or None."""
    if hidden_act not in GELU_ACTIVATIONS:
        return f"hidden_act={hidden_act!r} is not a GELU"
    intermediate = getattr(layer, "intermediate", None)
    dense = getattr(intermediate, "dense", None)
    if not isinstance(dense, nn.Linear) or dense.bias is None:
        return f"{type(layer).__name__} has no intermediate.dense Linear with a bias"
    extra = set(dict(intermediate.named_children())) - {"dense", "intermediate_act_fn"}
    if extra:  # its forward might use them: replacing it would drop them
        return f"{type(intermediate).__name__} has modules besides dense: {sorted(extra)}"
    return None


def enable_gelu_epilogue(model) -> int:
    """`train.gelu_epilogue`: every transformer layer's intermediate block becomes a
    GeluEpilogueIntermediate; returns how many. Checks every layer before changing any.
    Before compile and CUDA graphs."""
    layers = transformer_layers(model, "train.gelu_epilogue")
    hidden_act = getattr(model.encoder.config, "hidden_act", None)
    for index, layer in enumerate(layers):
        problem = None if isinstance(getattr(layer, "intermediate", None),
                                     GeluEpilogueIntermediate) \
            else _intermediate_problem(layer, hidden_act)
        if problem:
            raise ConfigError(f"config key 'train.gelu_epilogue': layer {index}: {problem}; "
                              "set train.gelu_epilogue=false")
    for layer in layers:
        if not isinstance(layer.intermediate, GeluEpilogueIntermediate):
            layer.intermediate = GeluEpilogueIntermediate(layer.intermediate.dense)
    # what the layers now compute, for the config written beside checkpoints and exports
    model.encoder.config.hidden_act = "gelu_pytorch_tanh"
    return len(layers)
