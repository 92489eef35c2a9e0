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

`mm` (`train.cublaslt_gemms`): a plain GEMM, optionally with the bias epilogue, on row-major
operands that are contiguous or transposes of contiguous tensors, run without a workspace.
Why: given one, cuBLAS zeroes 4 bytes of it before some GEMMs, and inside a CUDA graph each such
memset costs 3-5 us (run X: ~59 per step, ~0.3 ms); without one the heuristic offers
algorithms that need no memset. torch reads its workspace sizes once per process, so only
calls of our own can go without one while the rest of the process keeps its workspace.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import warnings

import torch

from mtl_dist.errors import MtlDistWarning

# cublasLt.h / cublas_api.h / library_types.h (CUDA 12 and 13)
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD, _DESC_AUX_DATA_TYPE = 11, 12, 22
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)  # A, B, C, D
EPILOGUE_DEFAULT, EPILOGUE_BIAS = 1, 4
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
_AUX_FLAG, _BIAS_FLAG, _BGRAD_FLAG = 128, 4, 16  # epilogues that read or write aux, read bias,
# or write the bias gradient (at the bias pointer)


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


def stored_shapes(m: int, n: int, k: int, transa: bool, transb: bool) -> list[tuple[int, int]]:
    """(rows, cols) of A, B and D as stored, column-major with leading dimension = rows, for
    D (m × n) = op(A)·op(B)."""
    return [(k, m) if transa else (m, k), (n, k) if transb else (k, n), (m, n)]


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

    def point(self, desc: ctypes.c_void_p, bias: torch.Tensor | None,
              aux: torch.Tensor | None) -> None:
        set_desc = self.lib.cublasLtMatmulDescSetAttribute
        if bias is not None:
            self._set(set_desc, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        if aux is not None:
            self._set(set_desc, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))

    def plan(self, key: tuple, bias: torch.Tensor | None, aux: torch.Tensor | None) -> tuple:
        """(matmul desc, A, B, D layouts, algorithm) for column-major D (m × n) = op(A)·op(B),
        the operands stored as `stored_shapes` says."""
        if key in self.plans:
            return self.plans[key]
        m, n, k, transa, transb, epilogue, dtype, workspace_bytes = key
        desc = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F),
                    "cublasLtMatmulDescCreate")
        set_desc = self.lib.cublasLtMatmulDescSetAttribute
        self._set(set_desc, desc, _DESC_TRANSA, ctypes.c_int32(_OP_T if transa else _OP_N))
        self._set(set_desc, desc, _DESC_TRANSB, ctypes.c_int32(_OP_T if transb else _OP_N))
        self._set(set_desc, desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if epilogue & _AUX_FLAG:
            self._set(set_desc, desc, _DESC_AUX_LD, ctypes.c_int64(m))
            self._set(set_desc, desc, _DESC_AUX_DATA_TYPE, ctypes.c_int32(dtype))
        self.point(desc, bias, aux)  # the heuristic reads the pointers' alignment
        a, b, d = (self._layout(dtype, rows, cols, rows)
                   for rows, cols in stored_shapes(m, n, k, transa, transb))
        pref = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)),
                    "cublasLtMatmulPreferenceCreate")
        set_pref = self.lib.cublasLtMatmulPreferenceSetAttribute
        self._set(set_pref, pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(workspace_bytes))
        for attribute in _PREF_MIN_ALIGNMENT:
            self._set(set_pref, pref, attribute, ctypes.c_uint32(ALIGNMENT))
        results, found = (_Heuristic * HEURISTICS)(), ctypes.c_int(0)
        status = self.lib.cublasLtMatmulAlgoGetHeuristic(
            self.handle, desc, a, b, d, d, pref, HEURISTICS, results, ctypes.byref(found))
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        self._check(status, "cublasLtMatmulAlgoGetHeuristic")
        if found.value < 1:
            raise CublasLtError(f"cuBLASLt has no algorithm for epilogue {epilogue} at "
                                f"m={m} n={n} k={k} with a {workspace_bytes}-byte workspace")
        self.candidates[key] = [results[i].algo for i in range(found.value)]
        self.plans[key] = (desc, a, b, d, self.candidates[key][0])
        return self.plans[key]

    def _workspace(self, stream: torch.cuda.Stream, workspace_bytes: int) -> int:
        """The pointer to this stream's workspace (allocated on first use), or 0 for none."""
        if workspace_bytes == 0:
            return 0
        if stream.cuda_stream not in self.workspaces:
            self.workspaces[stream.cuda_stream] = torch.empty(
                WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        return self.workspaces[stream.cuda_stream].data_ptr()

    def matmul(self, a: torch.Tensor, transa: bool, b: torch.Tensor, out: torch.Tensor,
               m: int, n: int, k: int, epilogue: int, bias: torch.Tensor | None = None,
               aux: torch.Tensor | None = None, transb: bool = False,
               workspace_bytes: int = WORKSPACE_BYTES) -> None:
        """out = op(a)·op(b) (+ the epilogue), column-major, as `plan` lays them out;
        `workspace_bytes` is WORKSPACE_BYTES or 0."""
        if workspace_bytes not in (0, WORKSPACE_BYTES):
            raise CublasLtError(f"workspace_bytes must be 0 or {WORKSPACE_BYTES}, got "
                                f"{workspace_bytes}")
        if (epilogue & (_BIAS_FLAG | _BGRAD_FLAG)) and bias is None \
                or (epilogue & _AUX_FLAG) and aux is None:
            raise CublasLtError(f"epilogue {epilogue} needs its bias and auxiliary tensors")
        for tensor in (a, b, out, bias, aux):
            if tensor is not None and tensor.data_ptr() % ALIGNMENT:
                raise CublasLtError(f"cuBLASLt operand not aligned to {ALIGNMENT} bytes")
        stream = torch.cuda.current_stream(self.device)
        with self.lock:  # the shared descriptor is re-pointed, then used
            workspace = self._workspace(stream, workspace_bytes)
            desc, la, lb, ld, algo = self.plan(
                (m, n, k, transa, transb, epilogue, _DATA_TYPE[out.dtype], workspace_bytes),
                bias, aux)
            self.point(desc, bias, aux)
            self._check(self.lib.cublasLtMatmul(
                self.handle, desc, ctypes.byref(self.alpha), a.data_ptr(), la, b.data_ptr(), lb,
                ctypes.byref(self.beta), out.data_ptr(), ld, out.data_ptr(), ld,
                ctypes.byref(algo), workspace, workspace_bytes, stream.cuda_stream),
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
    """Whether `gelu_linear` can take these operands: x, weight and bias contiguous, and x·wᵀ
    as `mm_supported` says (one CUDA device, bf16 or fp16 alike, 16-byte aligned, tokens
    present, both widths multiples of 8: 16-byte rows, which the auxiliary output's leading
    dimension needs too)."""
    return x.is_contiguous() and weight.is_contiguous() \
        and mm_supported(x, weight.t(), bias=bias)


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                workspace_bytes: int = WORKSPACE_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x·wᵀ + b), x·wᵀ + b) for x (tokens × in), w (out × in), b (out), from one GEMM
    (without a workspace if `workspace_bytes` is 0: train.cublaslt_gemms)."""
    pre = x.new_empty(x.shape[0], weight.shape[0])
    h = mm(x, weight.t(), bias=bias, epilogue=EPILOGUE_GELU_AUX_BIAS, aux=pre,
           workspace_bytes=workspace_bytes)
    return h, pre


def _row_major_operand(t: torch.Tensor) -> bool | None:
    """Whether a 2-D row-major operand is a transpose of a contiguous tensor (True), contiguous
    (False), or neither (None). cuBLAS reads it as column-major: contiguous (r × c) is (c × r)."""
    if t.is_contiguous():
        return False
    if t.t().is_contiguous():
        return True
    return None


def mm_supported(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> bool:
    """Whether `mm` can take these: 2-D a (M × K) and b (K × N), each contiguous or a transpose
    of a contiguous tensor, out (M × N) contiguous, bias (N) contiguous; one CUDA device, bf16
    or fp16 alike, 16-byte aligned, every stored row a multiple of 8 elements, no empty side."""
    tensors = [t for t in (a, b, out, bias) if t is not None]
    if not all(t.is_cuda and t.device == a.device and t.dtype in _DATA_TYPE
               and t.dtype == a.dtype and t.data_ptr() % ALIGNMENT == 0 for t in tensors):
        return False
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or min(*a.shape, b.shape[1]) == 0:
        return False
    if out is not None and (not out.is_contiguous() or out.shape != (a.shape[0], b.shape[1])):
        return False
    if bias is not None and (not bias.is_contiguous() or bias.shape != (b.shape[1],)):
        return False
    layouts = [_row_major_operand(a), _row_major_operand(b)]
    if None in layouts:
        return False
    stored_rows = [t.shape[0] if transposed else t.shape[1]
                   for t, transposed in ((a, layouts[0]), (b, layouts[1]))]
    return all(width % 8 == 0 for width in (*stored_rows, b.shape[1]))


def mm_problem(a_shape, a_transposed: bool, b_shape, b_transposed: bool) -> dict:
    """The column-major problem `mm` hands cuBLASLt for row-major C (M × N) = A (M × K)·B (K × N):
    Cᵀ = Bᵀ·Aᵀ, so cuBLAS's first operand is B and its second A; a row-major transpose of a
    contiguous tensor is a cuBLAS operand stored the other way round (`_row_major_operand`)."""
    (rows, inner), cols = a_shape, b_shape[1]
    return {"m": cols, "n": rows, "k": inner, "transa": b_transposed, "transb": a_transposed,
            "operands": ("b", "a")}


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
       bias: torch.Tensor | None = None, epilogue: int | None = None,
       aux: torch.Tensor | None = None, workspace_bytes: int = 0) -> torch.Tensor:
    """a·b (+ bias per output column) into `out` (new if None), by cuBLASLt, without a
    workspace unless asked; the operands as `mm_supported` says. `epilogue` defaults to the
    bias one with a bias, none without; an auxiliary output (`aux`, M × N) is written with the
    same layout as `out`."""
    if out is None:
        out = a.new_empty(a.shape[0], b.shape[1])
    if epilogue is None:
        epilogue = EPILOGUE_DEFAULT if bias is None else EPILOGUE_BIAS
    problem = mm_problem(a.shape, _row_major_operand(a), b.shape, _row_major_operand(b))
    first, second = ({"a": a, "b": b}[name] for name in problem["operands"])
    with torch.cuda.device(a.device):  # custom ops get no device guard
        _lt(a.device).matmul(first, problem["transa"], second, out, m=problem["m"],
                             n=problem["n"], k=problem["k"], transb=problem["transb"],
                             epilogue=epilogue, bias=bias, aux=aux,
                             workspace_bytes=workspace_bytes)
    return out


_warned: set[str] = set()


def warn_fallback_once(switch: str, *operands: torch.Tensor, reason: str | None = None) -> None:
    """On CUDA `switch` is there for its speed: say once per switch when cuBLASLt cannot take
    its operands (or failed on them: `reason`) and torch's ops run instead (on CPU that is the
    plan: no warning)."""
    if not operands[0].is_cuda or switch in _warned:
        return
    _warned.add(switch)
    shapes = ", ".join(f"{tuple(t.shape)} strides {t.stride()}" for t in operands)
    why = reason or ("it needs bf16 or fp16, 16-byte aligned, contiguous or transposed, "
                     "widths that are multiples of 8")
    warnings.warn(f"{switch}: cuBLASLt cannot take these operands ({operands[0].dtype}, "
                  f"{shapes}: {why}); torch's ops run instead, without the speed-up",
                  MtlDistWarning, stacklevel=4)
