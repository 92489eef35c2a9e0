"""cuBLASLt GEMMs with epilogues, called through ctypes (`train.gelu_epilogue`).

Why by hand: torch calls cuBLASLt's GELU epilogue only without its auxiliary output
(`torch._addmm_activation`), so a training step, whose backward needs the GELU's input, cannot
use it. Transformer Engine uses the same epilogue; it is not installed here. cuBLASLt ships
with torch's CUDA build.

`gelu_linear`: pre = x·wᵀ + b and h = gelu(pre) from one GEMM (epilogue GELU_AUX_BIAS), where
torch runs a GEMM and a GELU kernel that reads and writes (tokens × intermediate) activations
again. cuBLASLt's GELU is the tanh approximation. Row-major torch tensors are column-major
transposes to cuBLAS, so each call computes Dᵀ = Bᵀ·Aᵀ with the operands swapped.
`matmul` takes any epilogue; benchmarks/gelu_epilogue.py measures the backward one too.
Descriptors and the chosen algorithm are cached per shape; the bias and auxiliary pointers are
set on each call, under a lock (ctypes releases the GIL inside the calls). A workspace per
stream, as torch keeps cuBLAS's. Nothing here synchronises the device, and after the first call
on a stream nothing allocates device memory, so the calls can be captured in CUDA graphs once
they have run outside (the trainer's warm-up before each capture does that).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

import torch

# cublasLt.h / cublas_api.h / library_types.h (CUDA 12 and 13)
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD, _DESC_AUX_DATA_TYPE = 11, 12, 22
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)  # A, B, C, D
EPILOGUE_GELU_AUX_BIAS = 32 | 128 | 4
EPILOGUE_DGELU_BGRAD = 64 | 128 | 16  # measured only (benchmarks/gelu_epilogue.py)
_COMPUTE_32F, _R_32F = 68, 0
_DATA_TYPE = {torch.bfloat16: 14, torch.float16: 2}
_OP_N, _OP_T = 0, 1
ALIGNMENT = 16  # bytes every operand must be aligned to (asked of the algorithm, checked here)
WORKSPACE_BYTES = 32 * 2**20
HEURISTICS = 8  # algorithms asked of the heuristic per shape


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


_P, _SIZE = ctypes.c_void_p, ctypes.c_size_t
_SIGNATURES = {  # cublasLt.h: every call takes its arguments at their C widths
    "cublasLtCreate": [_P],
    "cublasLtMatmulDescCreate": [_P, ctypes.c_int, ctypes.c_int],
    "cublasLtMatmulDescSetAttribute": [_P, ctypes.c_int, _P, _SIZE],
    "cublasLtMatrixLayoutCreate": [_P, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                   ctypes.c_int64],
    "cublasLtMatmulPreferenceCreate": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, ctypes.c_int, _P, _SIZE],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _P, _P],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _SIZE, _P],
}


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return lib


def _library() -> ctypes.CDLL:
    """The libcublasLt that torch loaded (same soname), else one from the nvidia wheels."""
    major = (torch.version.cuda or "").split(".")[0]
    names = [f"libcublasLt.so.{major}", "libcublasLt.so"]
    for name in names:
        try:
            return _declared(ctypes.CDLL(name))
        except OSError:
            pass
    import nvidia  # the pip wheels' namespace package, where torch's CUDA libraries live

    for root in nvidia.__path__:
        for path in sorted(glob.glob(os.path.join(root, "*", "lib", f"libcublasLt.so.{major}*"))):
            return _declared(ctypes.CDLL(path))
    raise CublasLtError(f"no libcublasLt for CUDA {torch.version.cuda} found (tried {names} "
                        "and the nvidia wheels)")


class _Lt:
    """One cuBLASLt handle and shape cache per device; a workspace per stream."""

    def __init__(self, device: torch.device):
        self.lib = _library()
        self.device = device
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspaces: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()
        self.plans: dict[tuple, tuple] = {}
        self.candidates: dict[tuple, list[_Algo]] = {}  # the heuristic's, best first
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, call: str) -> None:
        if status != 0:
            raise CublasLtError(f"{call} failed with cublasStatus_t {status}")

    def _set(self, setter, obj, attribute: int, value) -> None:
        self._check(setter(obj, attribute, ctypes.byref(value), ctypes.sizeof(value)),
                    setter.__name__)

    def _layout(self, dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols,
                                                        ld), "cublasLtMatrixLayoutCreate")
        return layout

    def point(self, desc: ctypes.c_void_p, bias: torch.Tensor, aux: torch.Tensor) -> None:
        set_desc = self.lib.cublasLtMatmulDescSetAttribute
        self._set(set_desc, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        self._set(set_desc, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))

    def plan(self, key: tuple, bias: torch.Tensor, aux: torch.Tensor) -> tuple:
        """(matmul desc, A, B, D layouts, algorithm) for column-major D (m × n) = op(A)·B with
        A stored (k × m) if transposed else (m × k), B (k × n), all contiguous."""
        if key in self.plans:
            return self.plans[key]
        m, n, k, transa, epilogue, dtype = key
        desc = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F),
                    "cublasLtMatmulDescCreate")
        set_desc = self.lib.cublasLtMatmulDescSetAttribute
        self._set(set_desc, desc, _DESC_TRANSA, ctypes.c_int32(_OP_T if transa else _OP_N))
        self._set(set_desc, desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
        self._set(set_desc, desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        self._set(set_desc, desc, _DESC_AUX_LD, ctypes.c_int64(m))
        self._set(set_desc, desc, _DESC_AUX_DATA_TYPE, ctypes.c_int32(dtype))
        self.point(desc, bias, aux)  # the heuristic reads the pointers' alignment
        a = self._layout(dtype, k, m, k) if transa else self._layout(dtype, m, k, m)
        b, d = self._layout(dtype, k, n, k), self._layout(dtype, m, n, m)
        pref = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)),
                    "cublasLtMatmulPreferenceCreate")
        set_pref = self.lib.cublasLtMatmulPreferenceSetAttribute
        self._set(set_pref, pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(WORKSPACE_BYTES))
        for attribute in _PREF_MIN_ALIGNMENT:
            self._set(set_pref, pref, attribute, ctypes.c_uint32(ALIGNMENT))
        results, found = (_Heuristic * HEURISTICS)(), ctypes.c_int(0)
        status = self.lib.cublasLtMatmulAlgoGetHeuristic(
            self.handle, desc, a, b, d, d, pref, HEURISTICS, results, ctypes.byref(found))
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        self._check(status, "cublasLtMatmulAlgoGetHeuristic")
        if found.value < 1:
            raise CublasLtError(f"cuBLASLt has no algorithm for epilogue {epilogue} at "
                                f"m={m} n={n} k={k}")
        self.candidates[key] = [results[i].algo for i in range(found.value)]
        self.plans[key] = (desc, a, b, d, self.candidates[key][0])
        return self.plans[key]

    def matmul(self, a: torch.Tensor, transa: bool, b: torch.Tensor, out: torch.Tensor,
               m: int, n: int, k: int, epilogue: int, bias: torch.Tensor,
               aux: torch.Tensor) -> None:
        for tensor in (a, b, out, bias, aux):
            if tensor.data_ptr() % ALIGNMENT:
                raise CublasLtError(f"cuBLASLt operand not aligned to {ALIGNMENT} bytes")
        stream = torch.cuda.current_stream(self.device)
        with self.lock:  # the shared descriptor is re-pointed, then used
            if stream.cuda_stream not in self.workspaces:
                self.workspaces[stream.cuda_stream] = torch.empty(
                    WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            workspace = self.workspaces[stream.cuda_stream]
            desc, la, lb, ld, algo = self.plan(
                (m, n, k, transa, epilogue, _DATA_TYPE[out.dtype]), bias, aux)
            self.point(desc, bias, aux)
            self._check(self.lib.cublasLtMatmul(
                self.handle, desc, ctypes.byref(self.alpha), a.data_ptr(), la, b.data_ptr(), lb,
                ctypes.byref(self.beta), out.data_ptr(), ld, out.data_ptr(), ld,
                ctypes.byref(algo), workspace.data_ptr(), WORKSPACE_BYTES, stream.cuda_stream),
                "cublasLtMatmul")


_instances: dict[int, _Lt] = {}
_lock = threading.Lock()


def _lt(device: torch.device) -> _Lt:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _instances:
            with torch.cuda.device(index):
                _instances[index] = _Lt(torch.device("cuda", index))
        return _instances[index]


def supported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether `gelu_linear` can take these operands: on one CUDA device, bf16 or fp16 alike,
    contiguous, 16-byte aligned, tokens present, both widths multiples of 8 (16-byte rows; the
    auxiliary output's leading dimension must be)."""
    tensors = (x, weight, bias)
    return all(t.is_cuda and t.device == x.device and t.dtype in _DATA_TYPE
               and t.dtype == x.dtype and t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0
               for t in tensors) \
        and x.shape[0] > 0 and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0


def gelu_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x·wᵀ + b), x·wᵀ + b) for x (tokens × in), w (out × in), b (out), from one GEMM."""
    tokens, width = x.shape[0], weight.shape[0]
    h = x.new_empty(tokens, width)
    pre = x.new_empty(tokens, width)
    with torch.cuda.device(x.device):  # custom ops get no device guard
        _lt(x.device).matmul(weight, True, x, h, m=width, n=tokens, k=x.shape[1],
                             epilogue=EPILOGUE_GELU_AUX_BIAS, bias=bias, aux=pre)
    return h, pre

