"""benchmarks/profile_groups.py on a small hand-made trace: groups, per-step means, gaps."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_groups.py"


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


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
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = subprocess.run([sys.executable, str(SCRIPT), str(trace)], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("2 steps, 1.55 ms of GPU kernels and 4 kernels per step")
    assert "| GEMMs (cuBLAS `nvjet`) | 1.00 | 1 |" in out
    assert "| Inductor's fused elementwise, norms, reductions | 0.25 | 0.5 |" in out
    assert "| q/k/v gradient copies | 0.15 | 0.5 |" in out
    assert "| FlashAttention varlen, forward + backward | 0.10 | 0.5 |" in out
    assert "| memcpy / memset | 0.00 | 0.5 |" in out
    assert "| other aten | 0.05 | 0.5 |" in out
    assert "GPU gaps over 20 µs: 1, 0.10 ms in all; the last one starts 2.00 ms into a 3.2 ms trace" in out
