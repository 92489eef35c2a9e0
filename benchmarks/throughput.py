"""GPU throughput: a `transformers.Trainer`-subclass baseline vs mtl_dist's own trainer, one run.

The reference workload: a BERT-large-shaped encoder (24 x 1024, 16 heads, FFN 4096, vocab
21128, random init), three tasks (3 / 7 / 15 labels, attention-pooling heads), per-task token
lengths from shared/data/lengths.json (cap 300), per-device batch 32, bf16, AdamW, clip 1.0.
Both sides read the same generated TSV files; every variant runs in this one process, one after
another, on the same GPU. Warm-up steps are excluded from the timed window.

    python benchmarks/throughput.py --out benchmarks/results/throughput_h100.json

FLOPs (for MFU) are counted on REAL tokens only (padding is waste, not work):
per sample of length L, 6 * P * L + 12 * layers * hidden * L^2, P = non-embedding encoder
parameters (6 P L: forward + backward of every matmul; 12 n d L^2: attention scores and
context, forward + backward). Peak: 989 TFLOP/s dense bf16 (H100 SXM; H200 the same).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCH = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, max_position_embeddings=512)
VOCAB = 21128
TASKS = [("ocnli", "ocnli_like", 3, True), ("ocemotion", "ocemotion_like", 7, False),
         ("tnews", "tnews_like", 15, False)]
BATCH, MAX_LEN, PEAK_TFLOPS = 32, 300, 989.0
RECORDED_ENV = ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", "TORCHINDUCTOR_CACHE_DIR")
PROFILE_WARMUP = 300


def lengths_file() -> Path:
    for candidate in (REPO / "benchmarks" / "data" / "lengths.json",
                      REPO.parent / "shared" / "data" / "lengths.json"):
        if candidate.exists():
            return candidate
    raise SystemExit("lengths.json not found (shared/data/lengths.json)")


def make_data(root: Path) -> tuple[Path, dict[str, list[int]]]:
    """TSV files whose rows tokenize to exactly the recorded lengths, and a 21128-word vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    lengths = json.loads(lengths_file().read_text())
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - 5)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids",
                                                      "attention_mask"])
    fast.save_pretrained(root / "tokenizer")
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(VOCAB - 5)}" for _ in range(n))  # noqa: E731
    real = {}
    for name, key, n_labels, pair in TASKS:
        rows, lens = [], []
        for i, length in enumerate(lengths[key]):
            length = max(min(int(length), MAX_LEN), 5 if pair else 3)
            label = rng.randrange(n_labels)
            if pair:
                a = (length - 3) // 2
                rows.append(f"{i}\t{words(a)}\t{words(length - 3 - a)}\t{label}")
            else:
                rows.append(f"{i}\t{words(length - 2)}\t{label}")
            lens.append(length)
        (root / f"{name}.tsv").write_text("\n".join(rows) + "\n")
        real[name] = lens
    return root, real


def encoder_params() -> int:
    d, f, n = ARCH["hidden_size"], ARCH["intermediate_size"], ARCH["num_hidden_layers"]
    return n * (4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d)


def flops(real_lengths: list[int]) -> float:
    p, n, d = encoder_params(), ARCH["num_hidden_layers"], ARCH["hidden_size"]
    return float(sum(6 * p * L + 12 * n * d * L * L for L in real_lengths))


def peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def reset_peak_memory() -> None:
    import gc

    gc.collect()  # the previous variant's trainer sits in reference cycles: free it first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def result_row(name, steps, seconds, real_lengths, peak_mem, extra=None) -> dict:
    samples = steps * BATCH
    return {"variant": name, "timed_steps": steps, "seconds": seconds,
            "samples_per_s": samples / seconds,
            "real_tokens_per_s": sum(real_lengths) / seconds,
            "mfu_real_tokens": flops(real_lengths) / seconds / (PEAK_TFLOPS * 1e12),
            "peak_memory_gib": peak_mem / 2**30, **(extra or {})}


# ----------------------------------------------------------------------------- baseline
def run_baseline(root: Path, warmup: int, steps: int, mean_len: float) -> dict:
    """The reference baseline: a Trainer subclass, task-homogeneous batches, padding to 300."""
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments


    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    features, task_of = [], []
    for task_id, (name, _, _, pair) in enumerate(TASKS):
        cols = [line.split("\t") for line in (root / f"{name}.tsv").read_text().splitlines()]
        enc = tok([c[1] for c in cols], [c[2] for c in cols] if pair else None,
                  padding="max_length", truncation=True, max_length=MAX_LEN)
        for i, c in enumerate(cols):
            features.append({"input_ids": enc["input_ids"][i],
                             "attention_mask": enc["attention_mask"][i],
                             "token_type_ids": enc["token_type_ids"][i],
                             "labels": int(c[-1]), "task_id": task_id})
            task_of.append(task_id)

    class TaskBatchSampler(torch.utils.data.Sampler):
        """One task per batch; global random.shuffle decides the order (as the baseline)."""

        def __iter__(self):
            batches = []
            for t in range(len(TASKS)):
                idx = [i for i, x in enumerate(task_of) if x == t]
                random.shuffle(idx)
                batches += [idx[i:i + BATCH] for i in range(0, len(idx) - BATCH + 1, BATCH)]
            random.shuffle(batches)
            return iter(batches)

        def __len__(self):
            return sum(task_of.count(t) // BATCH for t in range(len(TASKS)))

    def collate(rows):
        out = {k: torch.tensor([r[k] for r in rows]) for k in rows[0] if k != "task_id"}
        out["task_id"] = rows[0]["task_id"]
        return out

    class MultiTaskTrainer(Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(features, batch_sampler=TaskBatchSampler(),
                                               collate_fn=collate,
                                               pin_memory=torch.cuda.is_available())

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, logits = model(**inputs)
            return (loss, logits) if return_outputs else loss

    class Timer(TrainerCallback):
        t0 = t1 = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, warmup + steps):
                sync()
                setattr(self, "t0" if state.global_step == warmup else "t1", time.perf_counter())

    model = _model(mask_4d=False)
    timer = Timer()
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=BATCH,
                             bf16=True, learning_rate=2e-5, max_grad_norm=1.0,
                             max_steps=warmup + steps, logging_steps=50, report_to=[],
                             save_strategy="no", optim="adamw_torch_fused",
                             remove_unused_columns=False, dataloader_num_workers=2,
                             disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available())
    reset_peak_memory()
    MultiTaskTrainer(model=model, args=args, callbacks=[timer]).train()
    # The baseline's batches are not tracked one by one: its window counts the mean length.
    real_lengths = [mean_len] * (steps * BATCH)
    row = result_row("baseline: Trainer subclass, pad to 300", steps, timer.t1 - timer.t0,
                     real_lengths, peak_memory())
    del model
    return row


def _model(mask_4d: bool):
    from types import SimpleNamespace

    from mtl_dist.model import build_model

    arch = SimpleNamespace(model_type="bert", hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.1, **ARCH)
    cfg = SimpleNamespace(pretrained=None, arch=arch, head="attention", dropout=0.1)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, [t[2] for t in TASKS])
    model.mask_4d = mask_4d and model.mask_4d
    return model


# ----------------------------------------------------------------------------- mtl_dist
def run_mtl(root: Path, name: str, overrides: list[str], warmup: int, steps: int,
            profile_dir: Path | None = None, log_every: int | None = None) -> dict:
    """mtl_dist's trainer end to end: data pipeline, sampler, collate, model, step, logging."""

    out = root / f"run-{len(list(root.glob('run-*')))}"
    # "inductor.NAME=VALUE": an Inductor setting for this variant only (experiments), e.g.
    # inductor.max_autotune=true or inductor.triton.mix_order_reduction_split_size=64;
    # compiled code of earlier variants is dropped first.
    inductor = {o.split("=")[0][len("inductor."):]: _setting(o.split("=")[1])
                for o in overrides if o.startswith("inductor.")}
    overrides = [o for o in overrides if not o.startswith("inductor.")]
    # "bench.NAME=true": a benchmark-only hook (BENCH_HOOKS), an experiment, not a trainer switch
    hooks = {o for o in overrides if o.startswith("bench.")}
    if unknown := hooks - {f"bench.{h}=true" for h in BENCH_HOOKS}:
        raise SystemExit(f"{name}: unknown benchmark hook(s) {sorted(unknown)}; known: "
                         + ", ".join(f"bench.{h}=true" for h in BENCH_HOOKS))
    on = {h for h in BENCH_HOOKS if f"bench.{h}=true" in hooks}
    overrides = [o for o in overrides if not o.startswith("bench.")]
    torch._dynamo.reset()
    with torch._inductor.config.patch(inductor), _pointwise_heuristic("pointwise_heuristic" in on):
        row = _run_mtl(root, out, name, overrides, warmup, steps, profile_dir, inductor,
                       log_every or steps // 4, "largest_first" in on)
    if on:
        row["bench"] = ",".join(sorted(on))
    return row


# Benchmark-only hooks, each turned on by "bench.NAME=true" in a variant's overrides:
# largest_first precaptures the graphs widest shape first, so that Inductor compiles and tunes
# the layers at the largest sizes (it tunes each kernel at the first size it compiles it for);
# pointwise_heuristic leaves pointwise kernels out of coordinate descent (_pointwise_heuristic).
BENCH_HOOKS = ("largest_first", "pointwise_heuristic")


def _setting(value: str) -> bool | int:
    """An Inductor setting's value from an override: true/false or an integer."""
    if value in ("true", "false"):
        return value == "true"
    return int(value)


def _run_mtl(root, out, name, overrides, warmup, steps, profile_dir, inductor, log_every,
             largest_first=False) -> dict:
    from mtl_dist.config import load_config
    from mtl_dist.trainer import Trainer

    tasks = [{"name": n, "pair": pair, "train": str(root / f"{n}.tsv")}
             for n, _, _, pair in TASKS]
    cfg = load_config(None, [
        f"tasks={json.dumps(tasks)}", f"model.tokenizer={root / 'tokenizer'}",
        "model.arch={" + ", ".join(f"{k}: {v}" for k, v in ARCH.items()) + "}",
        f"data.max_length={MAX_LEN}", f"data.cache_dir={root / 'cache'}",
        f"train.output_dir={out}", f"train.per_device_batch_size={BATCH}",
        "train.mixed_precision=bf16", "train.lr=2e-5", "train.max_grad_norm=1.0",
        f"train.max_steps={warmup + steps}", f"train.log_steps={log_every}",
        "train.eval_at_epoch_end=false", "checkpoint.save_at_epoch_end=false",
        "checkpoint.save_best=false", "train.seed=0", *overrides])
    _reset_accelerate()
    trainer = Trainer(cfg)
    if largest_first:
        _precapture_largest_first(trainer)
    reset_peak_memory()
    if profile_dir is not None:
        return _profile(trainer, profile_dir)
    captures = _record_captures(trainer)
    optimizer_host = _record_optimizer_host_time(trainer)
    trainer.fit()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in recs if r["kind"] == "train"}
    after_warmup = [s for s in times if s >= warmup]
    if not after_warmup:  # e.g. stopped by SIGTERM while still compiling
        raise SystemExit(f"{name}: stopped at step {trainer.state.global_step}, before the "
                         f"timed window (warm-up {warmup} steps); no result")
    first = min(after_warmup)
    last = max(times)
    timed = last - first
    assert timed >= steps - log_every, (first, last)
    real = []
    per_epoch = trainer.plan.num_steps(0)  # equal-sized epochs here (no task caps)
    for step in range(first, last):
        task, idx = trainer.plan.batch(step // per_epoch, step % per_epoch)
        real.extend(int(trainer.train_data[task].lengths[i]) for i in idx)
    extra = {"overrides": overrides, **({"inductor": inductor} if inductor else {})}
    in_window = [s for step, s in optimizer_host if first < step <= last]
    if in_window:  # host-bound? (train.overlap_optimizer launches 50 chunk updates a step)
        extra["optimizer_step_host_ms_median"] = 1000 * statistics.median(in_window)
    if trainer.graphs is not None:
        extra["captured_graphs"] = len(trainer.graphs.graphs)
        # A (task, shape) first seen inside the window is captured there (one-time cost):
        # said, and a steady-state rate without it given beside the plain one.
        inside = [(t0, t1) for t0, t1 in captures if times[first] <= t0 < times[last]]
        capture_s = sum(t1 - t0 for t0, t1 in inside)
        extra.update(captures_in_window=len(inside), capture_seconds_in_window=capture_s,
                     capture_seconds_total=sum(t1 - t0 for t0, t1 in captures),
                     samples_per_s_without_captures=timed * BATCH / (
                         times[last] - times[first] - capture_s),
                     samples_per_s_capture_free_intervals=_capture_free_rate(times, first,
                                                                              captures))
    row = result_row(name, timed, times[last] - times[first], real,
                     peak_memory(), extra)
    del trainer
    return row


@contextlib.contextmanager
def _pointwise_heuristic(on: bool):
    """"bench.pointwise_heuristic=true": coordinate descent tunes reductions only; pointwise
    kernels keep Inductor's heuristic configs (8 elements per thread). Run W1's cache had
    coordinate descent give one layer's GELU forward 64, 1024, 2048 or 4096 elements per
    program from one compile to the next. Patches Inductor's runtime (an experiment); a cache
    tag of its own keeps its choices apart from coordinate descent's in Inductor's caches."""
    if not on:
        yield
        return
    from torch._inductor.runtime.hints import HeuristicType
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    tune = CachingAutotuner.coordinate_descent_tuning

    def reductions_only(self, launcher, *args, **kwargs):
        if self.heuristic_type == HeuristicType.POINTWISE:
            return launcher
        return tune(self, launcher, *args, **kwargs)

    CachingAutotuner.coordinate_descent_tuning = reductions_only
    try:
        with torch.compiler.config.patch(cache_key_tag="mtl_dist-pointwise-heuristic"):
            yield
    finally:
        CachingAutotuner.coordinate_descent_tuning = tune


def _precapture_largest_first(trainer) -> None:
    """Make the trainer precapture its (task, shape) graphs widest first."""
    firsts = trainer._first_step_of_each_shape

    def width(epoch_step: tuple[int, int]) -> int:
        epoch, step = epoch_step
        tasks, idx = trainer.plan.batches(epoch, step, step + 1)
        return int(trainer._batch_widths(tasks, trainer.batch_sampler.local(idx))[0])

    trainer._first_step_of_each_shape = lambda: sorted(firsts(), key=width, reverse=True)


def _capture_free_rate(times: dict[int, float], first: int,
                       captures: list[tuple[float, float]]) -> float | None:
    """samples/s over the logging intervals of the window in which no capture ran. Unlike
    `samples_per_s_without_captures` it does not credit a capture with the queued GPU work it
    waits for (the host runs steps ahead of the GPU), so it is not biased upwards."""
    steps = sorted(s for s in times if s >= first)
    clean = [(a, b) for a, b in zip(steps, steps[1:], strict=False)
             if not any(t0 < times[b] and t1 > times[a] for t0, t1 in captures)]
    seconds = sum(times[b] - times[a] for a, b in clean)
    return sum(b - a for a, b in clean) * BATCH / seconds if seconds else None


def _record_captures(trainer) -> list[tuple[float, float]]:
    """Wall-clock (start, end) of every CUDA-graph capture the trainer makes."""
    spans: list[tuple[float, float]] = []
    if trainer.graphs is None:
        return spans
    capture = trainer.graphs._capture

    def timed_capture(*args, **kwargs):
        start = time.time()
        try:
            return capture(*args, **kwargs)
        finally:
            sync()
            spans.append((start, time.time()))

    trainer.graphs._capture = timed_capture
    return spans


def _record_optimizer_host_time(trainer) -> list[tuple[int, float]]:
    """(step, host seconds) of every optimizer step: the time the host spends issuing it
    (it does not wait for the GPU), to tell a step bound by the host from one bound by the GPU."""
    spans: list[tuple[int, float]] = []
    step = trainer._optimizer_step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            spans.append((trainer.state.global_step + 1, time.perf_counter() - start))

    trainer._optimizer_step = timed_step
    return spans


def _reset_accelerate() -> None:
    """Each run builds its own Accelerator: forget the previous run's singleton state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for cls in (AcceleratorState, GradientState, PartialState):
        cls._reset_state()


def kernel_microseconds(averages) -> float:
    """GPU kernel time, as the table's "Self CUDA time total" counts it: CUDA events only, not
    user annotations (ProfilerStep*, Optimizer.step), which also carry a GPU span."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation)


def _profile(trainer, profile_dir: Path) -> dict:
    """torch.profiler over a few steps: where the step's time goes (top kernels, GPU busy %).

    The host is not synchronised inside the window (only at its two ends), so a step whose
    host work outlasts its GPU work shows up as GPU idle time, as in a timed run."""
    import gzip

    from torch.profiler import ProfilerActivity, profile, schedule

    # Long warm-up: every (task, shape) graph is captured (and compiled) before the window.
    warm, active = PROFILE_WARMUP, 10
    trainer.cfg.train.max_steps = trainer.total_steps = warm + active + 2
    sched = schedule(wait=warm - 5, warmup=5, active=active, repeat=1)
    marks = {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:
        orig = trainer._optimizer_step

        def stepping():
            orig()
            done = trainer.state.global_step + 1  # counted after this call returns
            if done in (warm, warm + active):
                sync()
                marks[done] = time.perf_counter()
            prof.step()

        trainer._optimizer_step = stepping
        trainer.fit()
    averages = prof.key_averages()
    tables = [f"== sorted by {key} ==\n" + averages.table(sort_by=key, row_limit=30)
              for key in ("self_cuda_time_total", "self_cpu_time_total", "cpu_time_total")]
    (profile_dir / "profile_top_kernels.txt").write_text("\n\n".join(tables))
    trace = profile_dir / "profile_trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        dst.write(src.read())
    trace.unlink()
    gpu_us = kernel_microseconds(averages)
    wall_ms = (marks[warm + active] - marks[warm]) * 1000 / active \
        if len(marks) == 2 else None
    gpu_ms = gpu_us / 1000 / active
    return {"gpu_kernel_ms_per_step": gpu_ms, "wall_ms_per_step_profiled": wall_ms,
            "gpu_busy_fraction": gpu_ms / wall_ms if wall_ms else None,
            "top_kernels_file": "profile_top_kernels.txt",
            "trace_file": "profile_trace.json.gz"}


def variant_list() -> list[tuple[str, list[str]]]:
    """(name, config overrides) of every mtl_dist variant; `--variants` picks by index."""
    return [
        ("mtl_dist eager, dynamic padding (x8)", ["data.pad_to_multiple_of=8"]),
        ("+ lengths bucketed to 64", ["data.pad_to_multiple_of=64"]),
        ("+ group_by_length", ["data.pad_to_multiple_of=64", "sampler.group_by_length=true"]),
        ("+ CUDA graphs of the micro-step", ["data.pad_to_multiple_of=64",
                                             "sampler.group_by_length=true",
                                             "train.cuda_graphs=true"]),
        ("+ torch.compile of the encoder layers", ["data.pad_to_multiple_of=64",
                                                   "sampler.group_by_length=true",
                                                   "train.cuda_graphs=true", "train.compile=true"]),
        ("+ lengths bucketed to 32", ["data.pad_to_multiple_of=32",
                                      "sampler.group_by_length=true",
                                      "train.cuda_graphs=true", "train.compile=true"]),
        ("packed rows (varlen flash), no grouping", ["data.packing=true",
                                                     "data.pack_multiple=256",
                                                     "train.cuda_graphs=true",
                                                     "train.compile=true"]),
        ("packed rows, rounded to 128", ["data.packing=true", "data.pack_multiple=128",
                                         "train.cuda_graphs=true", "train.compile=true"]),
        ("packed rows (256), graphs, compile + fused clipping",
         ["data.packing=true", "data.pack_multiple=256", "train.cuda_graphs=true",
          "train.compile=true", "train.fused_clipping=true"]),
        ("packed rows (256), graphs, compile max-autotune + fused clipping",
         ["data.packing=true", "data.pack_multiple=256", "train.cuda_graphs=true",
          "train.compile=true", "train.fused_clipping=true", "inductor.max_autotune=true",
          "inductor.coordinate_descent_tuning=true"]),
        ("packed rows (256), collate in 2 worker processes",
         ["data.packing=true", "data.pack_multiple=256", "train.cuda_graphs=true",
          "train.compile=true", "data.num_workers=2"]),
        ("packed rows (256), graphs, compile coordinate-descent + fused clipping",
         ["data.packing=true", "data.pack_multiple=256", "train.cuda_graphs=true",
          "train.compile=true", "train.fused_clipping=true",
          "train.compile_tuning=coordinate_descent"]),
        # GEMM autotuning only (no pointwise autotuning): a shorter compile than variant 9's
        ("packed rows (256), graphs, compile max-autotune GEMMs + coordinate descent",
         ["data.packing=true", "data.pack_multiple=256", "train.cuda_graphs=true",
          "train.compile=true", "train.fused_clipping=true",
          "train.compile_tuning=coordinate_descent", "inductor.max_autotune_gemm=true"]),
        ("packed rows (256), graphs, compile coordinate-descent + fused clipping, bf16 weights",
         ["data.packing=true", "data.pack_multiple=256", "train.cuda_graphs=true",
          "train.compile=true", "train.fused_clipping=true",
          "train.compile_tuning=coordinate_descent", "train.bf16_weights=true"]),
        ("... bf16 weights + flat masters (one-kernel AdamW)", RECOMMENDED),
        ("... the same, graphs captured on first sight (train.precapture_graphs=false)",
         [*RECOMMENDED, "train.precapture_graphs=false"]),
        ("... the same as 14, losses read with a host sync (train.async_log=false)",
         [*RECOMMENDED, "train.async_log=false"]),
        ("... the same as 14, packed rows rounded to 128 (data.pack_multiple=128)",
         _replaced(RECOMMENDED, "data.pack_multiple=128")),
        ("... the same as 14, packed rows rounded to 64 (data.pack_multiple=64)", RECOMMENDED_64),
        ("... the same as 18, Inductor max-autotune GEMM templates",
         [*RECOMMENDED_64, "inductor.max_autotune_gemm=true"]),
        ("... the same as 14, packed rows rounded to 32 (data.pack_multiple=32)",
         _replaced(RECOMMENDED, "data.pack_multiple=32")),
        ("... the same as 18, Linear weight gradients written in place (direct_weight_grads)",
         [*RECOMMENDED_64, "train.direct_weight_grads=true"]),
        ("... the same as 21, q/k/v projected by one GEMM (train.fused_qkv)", RECOMMENDED_QKV),
        ("... the same as 22, Inductor combo kernels (independent kernels launched as one)",
         [*RECOMMENDED_QKV, "inductor.combo_kernels=true"]),
        ("... the same as 22, Inductor aggressive fusion",
         [*RECOMMENDED_QKV, "inductor.aggressive_fusion=true"]),
        # LayerNorm backward: Inductor's mix-order kernel leaves the weight/bias gradients'
        # last sum over its row blocks to an aten column sum (~15 us each in O3's profile)
        ("... the same as 22, LayerNorm backward without Inductor's mix-order reduction",
         [*RECOMMENDED_QKV, "inductor.triton.mix_order_reduction=false"]),
        ("... the same as 22, mix-order reduction in blocks of 64 rows (fewer to sum after)",
         [*RECOMMENDED_QKV, "inductor.triton.mix_order_reduction_split_size=64"]),
        # AdamW (3.0 ms of the H100's 22.9, bandwidth-bound) per layer on a side stream,
        # under the next forward's compute-bound GEMMs (not yet measured on a GPU)
        ("... the same as 22, AdamW per layer overlapping the next forward (overlap_optimizer)",
         [*RECOMMENDED_QKV, "train.overlap_optimizer=true"]),
        # FlashAttention 2's backward tiles are 128 x 128: 1.8-2.9x the real work on these
        # lengths, 1.3-1.6x with tiles of 64 (mtl_dist/triton_attention.py)
        ("... the same as 22, attention in mtl_dist's Triton kernel (train.attention_kernel)",
         [*RECOMMENDED_QKV, "train.attention_kernel=triton"]),
        # Inductor tunes each kernel at the first size it compiles it for; the graphs are
        # precaptured in the order the run meets its shapes (S3: GELU forward at 256 elements
        # per 128-thread program, ~1.6 TB/s). Benchmark-only hook, not a trainer switch.
        ("... the same as 22, graphs precaptured widest shape first",
         [*RECOMMENDED_QKV, "bench.largest_first=true"]),
        # Run W1's cache: coordinate descent gave the GELU forward kernel 64, 2048 and 4096
        # elements per program in different compiles of the same layer (noise-driven choices)
        ("... the same as 22, without coordinate descent (train.compile_tuning=none)",
         _replaced(RECOMMENDED_QKV, "train.compile_tuning=none")),
        ("... the same as 22, coordinate descent for reductions only (pointwise: heuristic)",
         [*RECOMMENDED_QKV, "bench.pointwise_heuristic=true"]),
        # Variant 25 through the trainer's own switch (the option reaches the compiled layers
        # only, not the whole process): the README's recommended set in runs W and X
        ("... the same as 22, train.compile_mix_order_reduction=false (recommended in W, X)",
         RECOMMENDED_MIX),
        # Combo kernels on 22 (H200s): +0.9 % real tokens/s in a screening run (P1), +0.2 %
        # paired in one run (R2); H100, run Y2: +0.4 % on 32 (one run)
        ("... the same as 32, Inductor combo kernels (independent kernels launched as one)",
         [*RECOMMENDED_MIX, "inductor.combo_kernels=true"]),
        # Runs S, T: aten's embedding backward takes 276-501 us per step (the 2-row
        # token-type table alone ~140 us); the position and token-type tables by one GEMM each.
        # Run Y: +0.6 and +1.0 % on 32 (Y1, Y2); the window's median 386 -> 189 us
        ("... the same as 32, small embedding tables' gradients by GEMM (gemm_embedding_grads)",
         [*RECOMMENDED_MIX, "train.gemm_embedding_grads=true"]),
        # Run Y: the GELU forward kernel ~0.52 ms per step (24 x ~22 us); one layer's GEMM +
        # GELU 72 -> 59 us with cuBLASLt's epilogue (benchmarks/gelu_epilogue.py).
        # Run Y: +1.3 and +1.5 % on 34 (Y8, Y9): the recommended set since
        ("... the same as 34, GELU (tanh) in the intermediate GEMM's epilogue (gelu_epilogue)",
         RECOMMENDED_NOW),
        # Run Y9: -1.1 % on 35 (one run)
        ("... the same as 35, Inductor combo kernels (independent kernels launched as one)",
         [*RECOMMENDED_NOW, "inductor.combo_kernels=true"]),
        # Run Y's profile: the vocabulary table's gradient by aten, a fill (~14 us) and a kernel
        # serialising each row's tokens (~92-101 us; a sort path of ~180 us above 3,072
        # tokens); mtl_dist's Triton kernel. Run Z1: -0.4 and +0.2 % on 35 (noise): not adopted
        ("... the same as 35, the vocabulary's gradient by sort + a Triton kernel (triton_embedding_grads)",
         [*RECOMMENDED_NOW, "train.triton_embedding_grads=true"]),
        # Run X: cuBLAS's 4-byte workspace memsets, ~59 per step at 3-5 us each in the graphs;
        # the routed Linears' GEMMs by cuBLASLt without a workspace (measured with 39 as 40)
        ("... the same as 35, the layers' GEMMs by cuBLASLt without a workspace (cublaslt_gemms)",
         [*RECOMMENDED_NOW, "train.cublaslt_gemms=true"]),
        # Run Y9's profile: the heads' gather's backward, a fill and a bf16 index_add over
        # 32 x 300 slots, ~80 us per step; a gather from each token's valid slot (measured as 40)
        ("... the same as 35, the heads' gather's backward as a gather (gather_unpack_backward)",
         [*RECOMMENDED_NOW, "train.gather_unpack_backward=true"]),
        # Run AA4: 1438.0 samples/s, 29.8 % MFU (35 ran at 1431.3-1431.6 in AA2-AA3)
        ("... the same as 35, with both cublaslt_gemms and gather_unpack_backward",
         [*RECOMMENDED_NOW, "train.cublaslt_gemms=true", "train.gather_unpack_backward=true"]),
        # Run Y9's trace: a bf16 multi-tensor copy of the tables' gradients into the flat
        # buffer inside the graphs, ~36 of its ~56 us per step for the vocabulary; the tables
        # write theirs there (the vocabulary's needs the Triton kernel). Run AA4: 1435.6
        # against 40's 1438.0 in one run
        ("... the same as 37, the tables' gradients written into the flat buffer (direct_embedding_grads)",
         [*RECOMMENDED_NOW, "train.triton_embedding_grads=true",
          "train.direct_embedding_grads=true"]),
        # Run AA: +1.1 and +1.0 % on 35 (AA2, AA3), 29.9-30.0 % MFU: the recommended set since
        ("... the same as 40, with triton_embedding_grads and direct_embedding_grads",
         RECOMMENDED_AA),
        # Run Y9's trace: the eager heads' dropout, masking, score GEMV and pooling, ~20 small
        # kernels forward and ~25 backward over 32 x 300 slots; compiled (not yet measured)
        ("... the same as 42, each task's dropout + head + loss compiled (compile_heads)",
         [*RECOMMENDED_AA, "train.compile_heads=true"]),
        # Run AB3's trace: ~0.5 ms of a 22.5 ms step is idle GPU in gaps under 5 us between
        # ~1,080 kernels, ~530 of them Inductor's; Programmatic Dependent Launch lets a
        # kernel start while the one before finishes (Hopper+). Run AC: +0.51 and +0.62 % on
        # 42 in both orders: the recommended set since
        ("... the same as 42, the compiled layers' kernels launched with PDL (compile_pdl)",
         RECOMMENDED_AC),
        # Run AB3's trace: the clip norm's aten reduction over the flat bf16 buffer, 231 us
        # (~2.8 TB/s); at the H100's bandwidth ~195 us. Run AC1: -0.25 % on 42 (not adopted)
        ("... the same as 42, the flat buffers' clip norm by Triton (triton_clip_norm)",
         [*RECOMMENDED_AA, "train.triton_clip_norm=true"]),
    ]


# Variant 14: the recommended switches of runs J-K.
RECOMMENDED = ["data.packing=true", "data.pack_multiple=256", "train.cuda_graphs=true",
               "train.compile=true", "train.fused_clipping=true",
               "train.compile_tuning=coordinate_descent", "train.bf16_weights=true",
               "train.flat_masters=true"]


def _replaced(overrides: list[str], override: str) -> list[str]:
    """`overrides` with the one for `override`'s key swapped for it."""
    key = override.split("=", 1)[0] + "="
    return [override if o.startswith(key) else o for o in overrides]


# Variant 18: the README's recommended set of run L (packed rows rounded to 64).
RECOMMENDED_64 = _replaced(RECOMMENDED, "data.pack_multiple=64")
# Variant 22: the README's recommended set of runs O-V.
RECOMMENDED_QKV = [*RECOMMENDED_64, "train.direct_weight_grads=true", "train.fused_qkv=true"]
# Variant 32: the README's recommended set of runs W-X (run X measured the switch itself).
RECOMMENDED_MIX = [*RECOMMENDED_QKV, "train.compile_mix_order_reduction=false"]
# Variant 35: the README's recommended set of runs Y-Z.
RECOMMENDED_NOW = [*RECOMMENDED_MIX, "train.gemm_embedding_grads=true",
                   "train.gelu_epilogue=true"]
# Variant 42: the README's recommended set from run AA to run AC.
RECOMMENDED_AA = [*RECOMMENDED_NOW, "train.cublaslt_gemms=true",
                  "train.gather_unpack_backward=true", "train.triton_embedding_grads=true",
                  "train.direct_embedding_grads=true"]
# Variant 44: the README's recommended set since run AC.
RECOMMENDED_AC = [*RECOMMENDED_AA, "train.compile_pdl=true"]


def add_speedups(rows: list[dict], baselines: list[dict]) -> None:
    """Ratios against the first baseline and, when it ran twice, against the slower and the
    faster of its two runs (the baseline is host-bound and moves by up to ~15 % in one lease)."""
    first = baselines[0]["samples_per_s"]
    rates = [b["samples_per_s"] for b in baselines]
    for row in rows:
        row["speedup_vs_baseline"] = row["samples_per_s"] / first
        if len(baselines) > 1:
            row["speedup_range"] = [row["samples_per_s"] / max(rates),
                                    row["samples_per_s"] / min(rates)]


def flops_note() -> str:
    """The docstring's paragraph on how MFU counts FLOPs, for the results file."""
    return next(p for p in __doc__.split("\n\n") if p.startswith("FLOPs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--baseline-steps", type=int, default=120)
    parser.add_argument("--variants", default="all",
                        help="comma-separated indices, run in that order (default: all)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rebaseline", action="store_true",
                        help="run the baseline again after the variants: its spread within "
                             "the run shows how far the ratios can be trusted")
    parser.add_argument("--log-steps", type=int, default=None,
                        help="trainer log interval (default steps/4); the timed window runs "
                             "from the first logged step after the warm-up to the last")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, few steps, CPU allowed: checks the script, not speed")
    args = parser.parse_args()
    note = flops_note()  # before any run: a docstring without it must not lose their rows
    if args.smoke:
        ARCH.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=128)
        args.warmup, args.steps, args.baseline_steps = 4, 8, 8
        global PROFILE_WARMUP
        PROFILE_WARMUP = 8
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    root = Path(tempfile.mkdtemp(prefix="mtl_bench_"))
    _, real = make_data(root)
    mean_len = float(np.mean(sum(real.values(), [])))
    variants = variant_list()
    if args.variants != "all":  # run in the order given
        variants = [variants[int(i)] for i in args.variants.split(",")]
    rows = [run_baseline(root, args.warmup, args.baseline_steps, mean_len)]
    print(json.dumps(rows[-1]), flush=True)
    failed = []
    for name, overrides in variants:
        try:
            rows.append(run_mtl(root, name, overrides, args.warmup, args.steps,
                                log_every=args.log_steps))
        except SystemExit as exc:  # stopped before its window: say so, keep the other rows
            failed.append({"variant": name, "overrides": overrides, "error": str(exc)})
            print(exc, flush=True)
            continue
        print(json.dumps(rows[-1]), flush=True)
    if args.rebaseline:
        rows.append(run_baseline(root, args.warmup, args.baseline_steps, mean_len))
        rows[-1]["variant"] += " (again, after the variants)"
        print(json.dumps(rows[-1]), flush=True)
    add_speedups(rows, baselines=[rows[0]] + ([rows[-1]] if args.rebaseline else []))
    prof = None
    if args.profile:
        prof_dir = Path(os.environ.get("OUT", root))
        prof = run_mtl(root, "profile", variants[-1][1], 40, 20, profile_dir=prof_dir)
    import accelerate
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
    result = {"gpu": gpu, "command": " ".join(sys.argv),
              "python": platform.python_version(), "torch": torch.__version__,
              # settings read from the environment that change the step (cuBLAS's workspace)
              "environment": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
              "transformers": transformers.__version__, "accelerate": accelerate.__version__,
              "workload": {"arch": ARCH, "vocab": VOCAB, "batch": BATCH, "max_len": MAX_LEN,
                           "tasks": [t[0] for t in TASKS], "precision": "bf16"},
              "flops_note": note, "rows": rows, "failed": failed,
              "profile": prof}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'variant':45s} {'samples/s':>10s} {'tok/s':>10s} {'MFU':>6s} {'mem GiB':>8s} "
          f"{'x base':>7s} {'x range':>11s}")
    for r in rows:
        spread = "{:.2f}-{:.2f}".format(*r["speedup_range"]) if "speedup_range" in r else ""
        print(f"{r['variant'][:45]:45s} {r['samples_per_s']:10.1f} {r['real_tokens_per_s']:10.0f} "
              f"{100 * r['mfu_real_tokens']:5.1f}% {r['peak_memory_gib']:8.1f} "
              f"{r['speedup_vs_baseline']:7.2f} {spread:>11s}")


if __name__ == "__main__":
    main()
