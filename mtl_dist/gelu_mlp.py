"""`train.gelu_epilogues`: each transformer layer's feed-forward block with its GELU done by
its GEMMs' epilogues (cuBLASLt, `mtl_dist/cublaslt.py`) instead of kernels of their own.

Why: in run Y's H100 profile the layers' GELU kernels took ~1.5 ms of the 22.7 ms step: the
forward reads the first GEMM's (tokens × 4096) output and writes the activation; the backward
reads the second GEMM's input gradient and the GELU's input, writes the GELU's input gradient,
and reads both again for the bias gradient. With the epilogues the first GEMM writes both its
output and the GELU (GELU_AUX_BIAS), and the second GEMM's input-gradient GEMM applies the
GELU's derivative and sums the bias gradient as it writes (DGELU_BGRAD).

What changes: the activation becomes GELU's tanh approximation, the only one cuBLASLt has
(`gelu_pytorch_tanh` in transformers; it differs from the exact GELU by under 5e-4, far below
a bf16 rounding of the activations). On CPU, or where cuBLASLt cannot take the operands (fp32,
misaligned), the same maths runs as torch ops. Same parameters and state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist import cublaslt
from mtl_dist.errors import ConfigError
from mtl_dist.model import transformer_layers, weight_grad_into

GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_python", "gelu_fast",
                    "gelu_accurate")


@torch.library.custom_op("mtl_dist::gelu_linear", mutates_args=())
def gelu_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x·wᵀ + b), x·wᵀ + b) for x (tokens × in): one GEMM on CUDA."""
    if cublaslt.supported(x, weight, bias):
        return cublaslt.gelu_linear(x, weight, bias)
    pre = F.linear(x, weight, bias)
    return F.gelu(pre, approximate="tanh"), pre


@gelu_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("mtl_dist::gelu_grad_linear", mutates_args=())
def gelu_grad_linear(grad: torch.Tensor, weight: torch.Tensor,
                     pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpre, its sum over tokens), dpre = gelu_tanh'(pre) ∘ (grad·w): one GEMM on CUDA."""
    if cublaslt.supported(grad, weight, pre):
        return cublaslt.gelu_grad_linear(grad, weight, pre)
    dpre = torch.ops.aten.gelu_backward(grad @ weight, pre, approximate="tanh")
    return dpre, dpre.sum(0)


@gelu_grad_linear.register_fake
def _(grad, weight, pre):
    return grad.new_empty(grad.shape[0], weight.shape[1]), grad.new_empty(weight.shape[1])


def _weight_grad(grad: torch.Tensor, inputs: torch.Tensor, target: torch.Tensor | None):
    """gradᵀ·inputs, or written into `target` (`train.direct_weight_grads`) and None."""
    if target is None:
        return grad.t() @ inputs
    weight_grad_into(grad, inputs, target)
    return None


class GeluMLP(torch.autograd.Function):
    """Linear(gelu_tanh(Linear(x))) on rows x (tokens × hidden), all operands in one dtype.
    The weight gradients go into the targets where given (LinearGradInto's way)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, target1, target2):
        h, pre = gelu_linear(x, w1, b1)
        ctx.save_for_backward(x, w1, w2, h, pre)
        ctx.targets = (target1, target2)  # not saved: see LinearGradInto
        return F.linear(h, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, h, pre = ctx.saved_tensors
        grad = grad.contiguous()
        dpre, b1_grad = gelu_grad_linear(grad, w2, pre)
        w2_grad = _weight_grad(grad, h, ctx.targets[1])
        w1_grad = _weight_grad(dpre, x, ctx.targets[0])
        return dpre @ w1, w1_grad, b1_grad, w2_grad, grad.sum(0), None, None


def gelu_mlp(x: torch.Tensor, first: nn.Linear, second: nn.Linear) -> torch.Tensor:
    """second(gelu_tanh(first(x))) for x (..., hidden), in autocast's dtype when it is on."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
        else first.weight.dtype
    rows = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    params = [t.to(dtype) for t in (first.weight, first.bias, second.weight, second.bias)]
    grad_on = torch.is_grad_enabled()
    targets = [getattr(m, "weight_grad_target", None) if grad_on else None
               for m in (first, second)]
    with torch.autocast(device, enabled=False):
        out = GeluMLP.apply(rows, *params, *targets)
    return out.view(*x.shape[:-1], out.shape[-1])


class GeluEpilogueLayer:
    """Mixin for a BERT/RoBERTa layer (`train.gelu_epilogues`): its feed-forward block as
    `gelu_mlp`, then the output's dropout, residual and LayerNorm as BertOutput does them."""

    def __reduce_ex__(self, protocol):
        """Pickled as its base class plus state (the class is made at run time)."""
        reduced = super().__reduce_ex__(protocol)
        return (_new_layer, (_base_of(type(self)),), *reduced[2:])

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        output = self.output
        hidden = gelu_mlp(attention_output, self.intermediate.dense, output.dense)
        return output.LayerNorm(output.dropout(hidden) + attention_output)


_LAYER_CLASSES: dict[type, type] = {}


def _base_of(cls: type) -> type:
    return next(c for c in cls.__mro__[1:]
                if c is not GeluEpilogueLayer and not issubclass(c, GeluEpilogueLayer))


def _layer_class(base: type) -> type:
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"GeluEpilogue{base.__name__}", (GeluEpilogueLayer, base), {})
    return _LAYER_CLASSES[base]


def _new_layer(base: type) -> GeluEpilogueLayer:
    cls = _layer_class(base)
    return cls.__new__(cls)


def _feed_forward_problem(layer: nn.Module, hidden_act) -> str | None:
    """Why `layer` cannot take the fused block, or None."""
    if hidden_act not in GELU_ACTIVATIONS:
        return f"hidden_act={hidden_act!r} is not a GELU"
    first = getattr(getattr(layer, "intermediate", None), "dense", None)
    output = getattr(layer, "output", None)
    second = getattr(output, "dense", None)
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
        return f"{type(layer).__name__} has no intermediate.dense and output.dense Linears"
    if first.bias is None or second.bias is None:
        return "its feed-forward Linears have no biases"
    if not (isinstance(getattr(output, "dropout", None), nn.Dropout)
            and isinstance(getattr(output, "LayerNorm", None), nn.LayerNorm)):
        return f"{type(output).__name__} has no dropout and LayerNorm"
    if not callable(getattr(layer, "feed_forward_chunk", None)):
        return f"{type(layer).__name__} has no feed_forward_chunk"
    return None


def enable_gelu_epilogues(model) -> int:
    """`train.gelu_epilogues`: every transformer layer's feed-forward block becomes
    `gelu_mlp` (GeluEpilogueLayer); returns how many. Checks every layer before changing any.
    Before compile and CUDA graphs."""
    layers = transformer_layers(model, "train.gelu_epilogues")
    hidden_act = getattr(model.encoder.config, "hidden_act", None)
    for index, layer in enumerate(layers):
        problem = None if isinstance(layer, GeluEpilogueLayer) \
            else _feed_forward_problem(layer, hidden_act)
        if problem:
            raise ConfigError(f"config key 'train.gelu_epilogues': layer {index}: {problem}; "
                              "set train.gelu_epilogues=false")
    for layer in layers:
        if not isinstance(layer, GeluEpilogueLayer):
            layer.__class__ = _layer_class(type(layer))
    return len(layers)
