"""`train.cublaslt_gemms`: the transformer layers' GEMMs that `train.direct_weight_grads` runs
(each Linear's forward with its bias, its input gradient and its weight gradient, written into
the flat buffer) go to cuBLASLt without a workspace (`mtl_dist/cublaslt.mm`) instead of torch's
cuBLAS calls.

Why: given a workspace, cuBLAS zeroes 4 bytes of it before some GEMMs; in the step's CUDA
graphs each such memset costs 3-5 us, ~59 per step on the H100 (run X). Run X removed them with
`CUBLAS_WORKSPACE_CONFIG=:0:0 CUBLASLT_WORKSPACE_SIZE=0` (+0.4 to +1.1 % end to end), but torch
reads those once per process, and every eager cuBLAS call of the process then took ~100 us
longer to issue. These calls go without a workspace; everything else keeps torch's.

What stays the same: the maths (fp32 accumulation, results in the operands' dtype), the
parameters, where gradients go. cuBLASLt may pick other kernels than cuBLAS: rounding differs
within bf16 noise. On CPU, or where cuBLASLt cannot take the operands (fp32, misaligned, widths
not multiples of 8, strided views), the same maths runs as torch ops, with a warning on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtl_dist import cublaslt

SWITCH = "train.cublaslt_gemms"


@torch.library.custom_op("mtl_dist::weight_grad_into", mutates_args=("out",))
def weight_grad_into(grad_output: torch.Tensor, inputs: torch.Tensor, out: torch.Tensor) -> None:
    """A Linear's weight gradient, gradᵀ · input over all rows, written into `out` by the GEMM
    itself (torch's). A custom op: torch.compile keeps it (and its write) inside the compiled
    backward."""
    torch.mm(grad_output.reshape(-1, grad_output.shape[-1]).t(),
             inputs.reshape(-1, inputs.shape[-1]), out=out)


def _cublaslt_else_torch(supported: bool, by_cublaslt, by_torch, operands):
    """`by_cublaslt()` where cuBLASLt takes the operands and finds an algorithm without a
    workspace, else `by_torch()` (on CUDA with a warning, once)."""
    reason = None
    if supported:
        try:
            return by_cublaslt()
        except cublaslt.CublasLtError as error:
            reason = str(error)
    cublaslt.warn_fallback_once(SWITCH, *operands, reason=reason)
    return by_torch()


@torch.library.custom_op("mtl_dist::lt_linear", mutates_args=())
def lt_linear(x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x·wᵀ + b for rows x (tokens × in), w (out × in), b (out) or None."""
    return _cublaslt_else_torch(cublaslt.mm_supported(x, weight.t(), bias=bias),
                                lambda: cublaslt.mm(x, weight.t(), bias=bias),
                                lambda: F.linear(x, weight, bias), (x, weight))


@lt_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("mtl_dist::lt_mm", mutates_args=())
def lt_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for a (M × K), b (K × N)."""
    return _cublaslt_else_torch(cublaslt.mm_supported(a, b), lambda: cublaslt.mm(a, b),
                                lambda: a @ b, (a, b))


@lt_mm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


@torch.library.custom_op("mtl_dist::lt_weight_grad_into", mutates_args=("out",))
def lt_weight_grad_into(grad_rows: torch.Tensor, input_rows: torch.Tensor,
                        out: torch.Tensor) -> None:
    """A Linear's weight gradient, grad_rowsᵀ·input_rows, written into `out` by the GEMM."""
    _cublaslt_else_torch(cublaslt.mm_supported(grad_rows.t(), input_rows, out=out),
                         lambda: cublaslt.mm(grad_rows.t(), input_rows, out=out),
                         lambda: torch.mm(grad_rows.t(), input_rows, out=out),
                         (grad_rows, input_rows))


def linear_grads(grad_rows: torch.Tensor, input_rows: torch.Tensor, weight: torch.Tensor,
                 target: torch.Tensor | None, input_grad: bool, weight_grad: bool,
                 cublaslt_gemms: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A Linear's (input gradient, weight gradient) from the output gradient's rows (tokens ×
    out) and the input's (tokens × in), each where asked. Given a `target`, the weight
    gradient is written there instead and None returned for it. By cuBLASLt without a
    workspace if `cublaslt_gemms`, else torch's GEMMs."""
    if target is not None:
        (lt_weight_grad_into if cublaslt_gemms else weight_grad_into)(
            grad_rows, input_rows, target)
        weight_grad = False
    matmul = lt_mm if cublaslt_gemms else torch.mm
    return (matmul(grad_rows, weight) if input_grad else None,
            matmul(grad_rows.t(), input_rows) if weight_grad else None)
