"""benchmarks/profile_groups.py on a small hand-made trace: groups, per-step means, gaps."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_groups.py"


def _kernel(name: str, ts: float, dur: float, stream: int = 7) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": stream,
            "args": {"stream": stream}}


def _run(tmp_path, events: list[dict]) -> str:
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return subprocess.run([sys.executable, str(SCRIPT), str(trace)], capture_output=True,
                          text=True, check=True).stdout


def test_kernel_time_is_grouped_per_step_and_gaps_are_found(tmp_path):
    events = [{"ph": "X", "cat": "cpu_op", "name": f"ProfilerStep#{i}", "ts": 0, "dur": 1}
              for i in (7, 8)]
    events += [_kernel("nvjet_sm90_tst_128x256", 0, 1000),
               _kernel("triton_poi_fused_gelu_1", 1000, 500),
               _kernel("triton_poi_fused__unsafe_view_clone_select_backward_9", 1500, 300),
               _kernel("void pytorch_flash::flash_fwd_kernel", 1800, 200),
               _kernel("nvjet_sm90_tst_64x128", 2100, 1000),  # after a 100 µs gap
               {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 3100, "dur": 4},
               _kernel("void at::native::index_kernel", 3104, 96)]
    out = _run(tmp_path, events)
    assert out.startswith("2 steps, 1.55 ms of GPU kernels and 4 kernels per step")
    assert "| GEMMs (cuBLAS `nvjet`) | 1.00 | 1 |" in out
    assert "| Inductor's fused elementwise, norms, reductions | 0.25 | 0.5 |" in out
    assert "| q/k/v gradient copies | 0.15 | 0.5 |" in out
    assert "| FlashAttention varlen, forward + backward | 0.10 | 0.5 |" in out
    assert "| memcpy / memset | 0.00 | 0.5 |" in out
    assert "| other aten | 0.05 | 0.5 |" in out
    assert "GPU gaps over 20 µs: 1, 0.10 ms in all; the last one starts 2.00 ms into a 3.2 ms trace" in out
    assert "GPU busy (kernel intervals merged): 1.55 ms per step" in out
    assert "flat AdamW" not in out  # none in this trace


def test_adamw_on_its_own_stream_is_measured_beside_the_other_streams_kernels(tmp_path):
    events = [{"ph": "X", "cat": "cpu_op", "name": "ProfilerStep#1", "ts": 0, "dur": 1}]
    events += [_kernel("nvjet_sm90_tst_128x256", 0, 1000),
               _kernel("triton_poi_fused_gelu_1", 1200, 300),
               # AdamW chunks on stream 20: 600 µs beside the GEMM, 100 beside the GELU
               _kernel("triton_poi_fused_add_lerp_mul_0", 400, 800, stream=20),
               _kernel("triton_poi_fused_add_lerp_mul_0", 1400, 200, stream=20),
               _kernel("void pytorch_flash::flash_bwd_dq_dk_dv_loop", 1600, 100)]
    out = _run(tmp_path, events)
    assert out.startswith("1 steps, 2.40 ms of GPU kernels")
    assert "GPU busy (kernel intervals merged): 1.70 ms per step" in out
    assert "forward after flat AdamW" not in out  # the last chunk fell inside the forward
    assert "flat AdamW: 1.00 ms per step on 1 stream(s), 0.70 ms of it beside another " \
           "stream's kernels" in out


def test_the_forward_after_a_serial_adamw_is_timed_by_group(tmp_path):
    events = [{"ph": "X", "cat": "cpu_op", "name": "ProfilerStep#1", "ts": 0, "dur": 1}]
    events += [_kernel("triton_poi_fused_add_lerp_mul_1", 0, 10),  # a step's two groups
               _kernel("void at::native::foreach_add", 10, 5),
               _kernel("triton_poi_fused_add_lerp_mul_0", 15, 2985),
               _kernel("nvjet_sm90_tst_128x256", 3000, 400),
               _kernel("void pytorch_flash::flash_fwd_kernel", 3400, 100),
               _kernel("triton_poi_fused_gelu_1", 3500, 200),
               _kernel("void pytorch_flash::flash_bwd_dq_dk_dv_loop", 3800, 100)]
    out = _run(tmp_path, events)
    assert "forward after flat AdamW (to the first attention-backward kernel), median of 1: " \
           "0.80 ms, of which GEMMs 0.40, attention 0.10, Inductor's kernels 0.20, no kernel " \
           "running 0.10 ms" in out


def test_gemms_that_fill_an_sms_registers_are_counted(tmp_path):
    def gemm(ts, dur, regs, threads, blocks):
        event = _kernel("nvjet_sm90_tst_128x256", ts, dur)
        event["args"].update({"registers per thread": regs, "block": [threads, 1, 1],
                              "grid": [2, blocks // 2, 1]})
        return event

    events = [{"ph": "X", "cat": "cpu_op", "name": "ProfilerStep#1", "ts": 0, "dur": 1},
              gemm(0, 300, 168, 384, 132),  # 64,512 registers: the SM's whole file
              gemm(300, 100, 64, 256, 112)]
    trace = {"traceEvents": events,
             "deviceProperties": [{"numSms": 132, "regsPerMultiprocessor": 65536}]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    out = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert "GEMMs: 75 % of their time in kernels whose every block takes ≥ 90 % of an SM's " \
           "65536 registers (no other stream's block fits beside)" in out
    assert "GEMMs: 25 % of their time in launches of fewer blocks than the GPU's 132 SMs" in out


def test_the_embedding_backward_and_the_memsets_before_gemms_are_timed(tmp_path):
    events = [{"ph": "X", "cat": "cpu_op", "name": "ProfilerStep#1", "ts": 0, "dur": 1}]
    events += [_kernel("nvjet_sm90_tst_128x256", 0, 100),
               {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 103, "dur": 1},
               _kernel("nvjet_sm90_tst_64x128", 107, 50),  # 7 µs after the GEMM before
               _kernel("void at::native::GammaBetaBackwardCUDAKernelTemplate<float>", 158, 10),
               _kernel("void at::native::embedding_backward_feature_kernel", 169, 140),
               _kernel("void at::native::vectorized_elementwise_kernel<FillFunctor>", 310, 5),
               _kernel("void at::native::multi_tensor_apply_kernel", 330, 20)]
    out = _run(tmp_path, events)
    assert "to the gradients' hand-over, clip norm or AdamW), 1 windows: median 162 µs " \
           "(162–162), 2 kernels" in out
    assert "memsets right before a GEMM: 1.0 per step, 7.0 µs each from the kernel before to " \
           "the GEMM (two kernels in a row: 1.00 µs apart)" in out
