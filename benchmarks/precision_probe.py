"""Where would bf16 weights with fp32 master copies save time? GPU kernel time per step, probed.

Today's step (issue 8's workload, packed rows, compiled layers, CUDA graphs) keeps fp32
weights and runs the forward under autocast: every Linear weight is cast to bf16 in every
forward, every weight gradient comes out of its GEMM in bf16 and is cast to fp32, and the
residual stream and LayerNorms run in fp32. The alternative measured here: the model in bf16
(same GEMM inputs, since autocast casts to bf16 anyway), fp32 master weights in the optimizer
(same AdamW maths), gradients cast into the masters' fp32 gradients, masters copied back to
the bf16 weights after the step.

Measured with torch.profiler as summed GPU kernel time (not wall clock), per configuration,
on real packed batches of the three tasks (lengths from shared/data/lengths.json):
  step_autocast   forward+backward graph replay, fp32 weights, autocast bf16 (today)
  step_bf16       forward+backward graph replay, bf16 weights, no autocast
  opt_fp32        clip divisor + fused AdamW(grad_scale) on fp32 weights/gradients (today)
  opt_master      bf16 grads cast into fp32 master grads + clip divisor + fused AdamW on the
                  masters + masters copied into the bf16 weights

    python benchmarks/precision_probe.py --out benchmarks/results/precision_probe_h200.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the workload's model, lengths and FLOP count)

from mtl_dist.data import collate_packed  # noqa: E402
from mtl_dist.model import compile_encoder_layers, enable_packed_attention  # noqa: E402
from mtl_dist.trainer import clip_divisor  # noqa: E402


def packed_batches(per_task: int, pack_multiple: int) -> list[tuple[int, dict]]:
    """Real-length packed batches of 32, `per_task` per task (task id, model inputs)."""
    lengths = json.loads(tp.lengths_file().read_text())
    rng = random.Random(0)
    batches = []
    for task_id, (_, key, n_labels, _) in enumerate(tp.TASKS):
        for _ in range(per_task):
            lens = [max(3, min(int(x), tp.MAX_LEN)) for x in rng.sample(lengths[key], tp.BATCH)]
            samples = [{"input_ids": [rng.randrange(5, tp.VOCAB) for _ in range(n)],
                        "token_type_ids": None, "label": rng.randrange(n_labels), "index": i,
                        "task_id": task_id} for i, n in enumerate(lens)]
            batch = collate_packed(samples, 0, tp.MAX_LEN, pack_multiple)
            inputs = {k: v.cuda() for k, v in batch.items()
                      if k not in ("task_id", "index")}
            batches.append((task_id, inputs))
    return batches


def build(bf16_weights: bool):
    model = tp._model(mask_4d=False).cuda()
    enable_packed_attention(model, tp.MAX_LEN)
    compile_encoder_layers(model, "coordinate_descent")
    if bf16_weights:
        model.to(torch.bfloat16)
    return model


def kernel_ms(fn, iters: int) -> float:
    """Summed GPU kernel time per call of `fn` (profiled, after two unprofiled calls)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return tp.kernel_microseconds(prof.key_averages()) / 1000 / iters


def probe_step(bf16_weights: bool, batches, iters: int) -> tuple[float, object]:
    from mtl_dist.graphs import StepGraphs

    model = build(bf16_weights).train()
    graphs = StepGraphs(model, None if bf16_weights else torch.bfloat16)

    def one_pass():
        for task_id, inputs in batches:
            graphs.run(inputs, task_id, 1, first=True)

    return kernel_ms(one_pass, iters) / len(batches), model


def probe_optimizer(model, master: bool, iters: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if master:
        masters = [p.detach().float().requires_grad_() for p in params]
        for m in masters:
            m.grad = torch.zeros_like(m)
        opt = torch.optim.AdamW(masters, lr=2e-5, fused=True)

        def step():
            torch._foreach_copy_([m.grad for m in masters], [p.grad for p in params])
            opt.grad_scale = clip_divisor([m.grad for m in masters], 1.0)
            opt.step()
            torch._foreach_copy_([p.data for p in params], masters)
    else:
        opt = torch.optim.AdamW(params, lr=2e-5, fused=True)

        def step():
            opt.grad_scale = clip_divisor([p.grad for p in params], 1.0)
            opt.step()
    return kernel_ms(step, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/precision_probe.json")
    parser.add_argument("--per-task", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this probe needs a CUDA GPU"
    batches = packed_batches(args.per_task, 256)
    tokens = sum(int(b["cu_seqlens"][-1]) for _, b in batches) / len(batches)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(sys.argv), "mean_packed_tokens": tokens}
    for bf16 in (False, True):
        name = "bf16" if bf16 else "autocast"
        ms, model = probe_step(bf16, batches, args.iters)
        result[f"step_{name}_ms"] = ms
        result[f"opt_{'master' if bf16 else 'fp32'}_ms"] = probe_optimizer(model, bf16, args.iters)
        result[f"peak_gib_{name}"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(result), flush=True)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    today = result["step_autocast_ms"] + result["opt_fp32_ms"]
    master = result["step_bf16_ms"] + result["opt_master_ms"]
    result.update(total_today_ms=today, total_master_ms=master, ratio=today / master)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
