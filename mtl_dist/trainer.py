"""The training loop: accelerate, AMP, accumulation, clipping, schedule, EMA, eval, early stop.

The trainer composes the other modules and never writes files itself: checkpoints go through
`CheckpointManager`, metrics through `MetricsLog`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mtl_dist import data as mdata
from mtl_dist import zero
from mtl_dist.checkpoint import (
    MANAGED,
    CheckpointManager,
    check_head_of,
    check_label_maps_of,
    check_manifest,
    check_named_step,
    check_pairs_of,
    check_tokenizer_of,
    checkpoint_label_maps,
    damage,
    improves_on,
    inside_text,
    is_committed,
    load_state_checked,
    managing_folder,
    read_manifest,
    training_manifest,
    why_not_a_directory,
)
from mtl_dist.collectives import (
    import_before_the_process_group,
    release_ddp_group,
    release_host_group,
    set_host_timeout,
)
from mtl_dist.config import RunConfig, config_hash, is_saved_config, saved_config_yaml
from mtl_dist.ema import EMA
from mtl_dist.embedding_grads import enable_gemm_embedding_grads
from mtl_dist.errors import CheckpointError, ConfigError, MtlDistWarning
from mtl_dist.flat_adamw import FlatAdamW
from mtl_dist.gelu_epilogue import enable_gelu_epilogue
from mtl_dist.master import MasterWeights
from mtl_dist.metrics import run_score, task_metrics
from mtl_dist.model import (
    MultiTaskModel,
    build_model,
    compile_encoder_layers,
    compile_heads,
    enable_fused_qkv,
    enable_packed_attention,
    transformer_layers,
    verify_packed_attention,
)
from mtl_dist.overlap import OverlappedStep
from mtl_dist.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionFlag,
    request_requeue,
    tell_batch_shell,
)
from mtl_dist.rng import rank_seed
from mtl_dist.sampler import MultiTaskBatchPlan, RankBatchSampler, check_task_agreement, eval_shard
from mtl_dist.tracking import Tracking, format_eval_line

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def _shown(names: list[str]) -> str:
    """A run's saved items for a one-line message: all, or the newest three."""
    return ", ".join(names if len(names) <= 3 else ["...", *names[-3:]])


@dataclass
class EarlyStopping:
    """Best score so far and how many evaluations in a row failed to beat it."""

    patience: int | None
    greater_is_better: bool = True
    best_score: float | None = None
    best_step: int = -1
    bad_evals: int = 0

    def update(self, score: float, step: int) -> bool:
        """Record an evaluation; True when it is a new best."""
        better = improves_on(score, self.best_score, self.greater_is_better)
        if better:
            self.best_score, self.best_step, self.bad_evals = score, step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step,
                "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_step = state["best_score"], state["best_step"]
        self.bad_evals = state["bad_evals"]


@dataclass
class TrainState:
    """The loop's counters: what a checkpoint must carry besides the objects' own state."""

    global_step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tracker_run_id: str | None = None
    score: float | None = None  # the latest evaluation's run score (shown by `ckpt ls`)
    log_history: list = field(default_factory=list)
    # A preemption at an evaluation step checkpoints first: the resumed run evaluates then.
    pending_eval: bool = False
    # After a replan of an epoch-counted run: [warm-up steps, total steps] it was re-counted
    # to, which the config alone no longer gives.
    schedule: list | None = None
    schedule_epochs: int | None = None  # the num_epochs `schedule` was counted for
    last_eval_step: int | None = None
    # [warm-up steps, total steps, train.lr_scheduler] the LR schedule ran on: a resume that
    # re-counts it says so (two items: saved before the kind was, which was then linear)
    lr_schedule: list | None = None

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch,
                "samples_seen": self.samples_seen, "tracker_run_id": self.tracker_run_id,
                "score": self.score, "log_history": self.log_history[-50:],
                "pending_eval": self.pending_eval, "schedule": self.schedule,
                "schedule_epochs": self.schedule_epochs, "last_eval_step": self.last_eval_step,
                "lr_schedule": self.lr_schedule}

    def load_state_dict(self, state: dict) -> None:
        for key in ("global_step", "epoch", "samples_seen", "tracker_run_id", "score",
                    "log_history", "pending_eval", "schedule", "schedule_epochs",
                    "last_eval_step", "lr_schedule"):
            setattr(self, key, state.get(key, getattr(self, key)))


@dataclass
class LossSums:
    """Train losses summed on the device since the last train record."""

    loss: torch.Tensor  # sum over optimizer steps of each step's mean micro-batch loss
    task_loss: torch.Tensor  # per task, sum over its micro-batches
    task_count: torch.Tensor  # per task, micro-batches
    steps: int = 0  # optimizer steps summed

    @classmethod
    def zeros(cls, tasks: int, device: torch.device) -> LossSums:
        return cls(torch.zeros((), device=device), torch.zeros(tasks, device=device),
                   torch.zeros(tasks, device=device))

    def reset(self) -> None:
        self.loss.zero_(), self.task_loss.zero_(), self.task_count.zero_()
        self.steps = 0


@dataclass
class QueuedTrainLog:
    """A train record whose device values are still on their way to the host.

    `train.async_log`: the copy is queued behind the logged step's GPU work and read after
    the next micro-step has been queued, so reading it never leaves the GPU without work
    (a plain `.item()` drains the queue, and the GPU then idles while the host prepares the
    next batch)."""

    step: int
    lr: float
    epoch: int
    samples_seen: int
    tokens: int  # real tokens since the last record, all ranks
    values: torch.Tensor  # [mean loss, per-task mean losses..., per-task micro-batch counts...]
    done: Any = None  # a CUDA event recorded after the copy; None: `values` is ready

    @classmethod
    def queue(cls, values: torch.Tensor, **fields) -> QueuedTrainLog:
        if values.device.type != "cuda":
            return cls(values=values.clone(), **fields)  # the accumulators are zeroed next
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(values=host, done=done, **fields)

    def read(self) -> list[float]:
        if self.done is not None:
            self.done.synchronize()  # this step's work only; later steps stay queued
        return self.values.tolist()


def check_device(cfg: RunConfig) -> bool:
    """The device and precision asked for exist here (also `mtl-dist check`'s); whether the
    run is on CPU."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA GPU is visible")
    use_cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    if use_cpu and cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on CPU")
    return use_cpu


# What a resumed run must match in its checkpoint's manifest, in the order refusals name them.
RESUME_MUST_MATCH = ("world_size", "zero_stage", "global_batch_size", "gradient_accumulation_steps",
                     "bf16_weights", "optimizer_settings", "metric_for_best", "tasks",
                     "task_scoring", "labels", "data_fingerprints", "max_length", "model_shape",
                     "tokenizer", "versions")


def resume_must_match(cfg: RunConfig) -> tuple[str, ...]:
    """RESUME_MUST_MATCH for this run: with sampler.on_global_batch_change=replan the sampler
    takes a new global batch (from the next epoch) instead of refusing it."""
    if cfg.sampler.on_global_batch_change == "replan":
        return tuple(k for k in RESUME_MUST_MATCH if k != "global_batch_size")
    return RESUME_MUST_MATCH


def config_manifest(cfg: RunConfig, label_maps: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The manifest keys the config alone decides (no model, data or launch): what `check`
    compares with the checkpoint a run would resume from."""
    train = cfg.train
    return {
        "zero_stage": train.zero_stage,
        "per_device_batch_size": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "mixed_precision": train.mixed_precision,
        "bf16_weights": train.bf16_weights,
        # restored with AdamW's state (param groups) and the schedule's base LRs
        "optimizer_settings": {**{k: getattr(train, k) for k in (
            "lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")},
            "head_lr": train.head_lr or train.lr},  # null means lr
        "metric_for_best": train.metric_for_best,
        # what the run score (early stopping's best so far, best/) is made of
        "task_scoring": None if train.metric_for_best == "loss" else {
            t.name: {"metric": t.metric, "score_weight": t.score_weight} for t in cfg.tasks},
        "config_hash": config_hash(cfg),
        "tasks": [t.name for t in cfg.tasks],
        "pair": {t.name: t.pair for t in cfg.tasks},  # what inference must read alike
        "labels": dict(label_maps),
        "max_length": cfg.data.max_length,  # the fingerprints are of the files
    }


def check_resume_settings(cfg: RunConfig, ckpt: CheckpointManager,
                          label_maps: Mapping[str, Sequence[str]],
                          world_size: int | None = None,
                          model_shape: Mapping[str, Any] | None = None) -> None:
    """`mtl-dist check`: the config-decided keys the run's resume would refuse (lr, tasks,
    labels, ...), one line before any launch rather than one per rank. With the launch's
    `world_size` (launch/train.sh passes it, and sets the ZeRO stage as the launch will),
    also the world size (ZeRO partitions), the ZeRO stage and the global batch; with the
    `model_shape` of the model `check` built (random init, on the meta device), all of it."""
    resume = cfg.train.resume
    path = (ckpt.latest() if resume == "auto" else ckpt.resolve(resume)) if resume else None
    if path is None:
        return
    decided = config_manifest(cfg, label_maps)
    if world_size is not None:
        decided["world_size"] = world_size
        decided["global_batch_size"] = cfg.train.per_device_batch_size * world_size
    manifest = training_manifest(path, named_step=False)
    if model_shape is not None:
        decided["model_shape"] = dict(model_shape)
    else:  # without the model: the head kind alone
        shape = manifest.get("run", {}).get("model_shape", manifest.get("model_shape"))
        if isinstance(shape, dict) and "head" in shape:
            decided["model_shape"] = {**shape, "head": cfg.model.head}
    # without the launch's world size, not the ZeRO stage either: `accelerate launch
    # --deepspeed_config_file` (train.sh --launch zero2) may set it at the run's start
    check_manifest(path, manifest, {k: decided[k] for k in resume_must_match(cfg)
                                    if k in decided and (world_size or k != "zero_stage")})
    # then, as the resume does, its files (sizes only: no reading): `check` passed a cut
    # file, and every rank refused it after its set-up
    check_named_step(path, manifest)
    why = damage(path)
    if why is not None:
        raise CheckpointError(why + (intact_hint(ckpt, path) if resume == "auto" else ""))


RUN_FILES = ("labels.json", "metrics.jsonl", "checkpoints", "best")  # beside a run's config


def _refuse_a_cache_dir_file(cfg: RunConfig) -> None:
    """The token cache's dir (data.cache_dir, or its default from $MTL_DIST_CACHE_DIR...)
    a file or below one: the run went on with a warning per task and split, tokenizing
    afresh every time."""
    cache = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir \
        else mdata.default_cache_dir()
    where = "config key 'data.cache_dir'" if cfg.data.cache_dir else \
        "data.cache_dir (null: the default, from $MTL_DIST_CACHE_DIR, $XDG_CACHE_HOME or ~/.cache)"
    why = why_not_a_directory(cache, writable=False)  # a shared cache may be read-only
    if why is not None:  # the default is set by no line
        raise ConfigError(f"{where}: {cache} {why}", located=not cfg.data.cache_dir)


def _refuse_replacing_the_config_file(cfg: RunConfig, out: Path) -> None:
    """A hand-written config.yaml in the output dir (`train.output_dir: .` beside the config
    itself, or any other): the run's resolved config replaced it (comments, layout,
    interpolations lost). A run's own saved config.yaml, given back as the config to resume
    with, is fine."""
    loaded = getattr(getattr(cfg, "_sources", None), "path", None)
    target = out / "config.yaml"
    try:
        if not target.exists() and not target.is_symlink():
            return
        # a run's own: its header, or (saved before the header, or the header edited away)
        # beside the run's other files
        if any((out / name).exists() for name in RUN_FILES) or is_saved_config(target):
            return
        same = loaded is not None and target.samefile(loaded)
    except OSError:
        same = False  # unreadable or not text: not a run's own either
    if same:
        raise ConfigError(f"config key 'train.output_dir': {out} holds the config file itself "
                          f"({loaded}), which the run's resolved config.yaml would replace: "
                          "pick another train.output_dir (or rename the config)")
    what = "a config.yaml that no run saved" if target.is_file() else \
        "a config.yaml that is not a file"
    raise ConfigError(f"config key 'train.output_dir': {out} holds {what} ({target}), which "
                      "the run's resolved config.yaml would replace: pick another "
                      "train.output_dir (or move that file)")


def _refuse_a_copied_runs_config(cfg: RunConfig, out: Path) -> None:
    """A run's saved config.yaml given from another folder than its output dir (a copy of
    the run, `cp -a run copy`): its absolute train.output_dir trained (and, with
    resume=auto, extended, best/ replaced) the original run, not the copy. Refused unless
    an override names the output dir."""
    sources = getattr(cfg, "_sources", None)
    loaded = getattr(sources, "path", None)
    if loaded is None or sources.override_for("train.output_dir") is not None \
            or Path(loaded).name != "config.yaml" or not is_saved_config(Path(loaded)):
        return
    folder = Path(loaded).resolve().parent
    # a copy holds a run's own files beside the config; best/ (its config.yaml too) holds
    # neither, nor does a template folder with the config alone
    copied = (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()
    if folder == out.resolve() or not copied:
        return
    raise ConfigError(
        f"config key 'train.output_dir': {loaded} is the saved config of the run in {out}, but "
        f"lies in {folder} (a copy of that run?): it would train {out}; to train the copy, add "
        f"train.output_dir={folder}; to train that run, give {out / 'config.yaml'} (or add "
        f"train.output_dir={out})")


def check_output_dir(cfg: RunConfig, ckpt: CheckpointManager, say=print) -> None:
    """Before any work (and in `mtl-dist check`); collective. No run may be going on in the
    output dir (its lock). A `train.resume` path must be a committed
    checkpoint. A fresh run (no `train.resume`) refuses an output dir that holds a saved run:
    it would replace best/ with its own first evaluation, cut the metrics log, and leave its
    checkpoints beside the old run's (resume=auto would then pick the old newest)."""
    out, train = ckpt.output_dir, cfg.train
    try:
        ckpt.refuse_if_in_use()  # a run going on there: refused before any set-up
    except CheckpointError as exc:  # named where train.output_dir was set
        raise CheckpointError(str(exc), key="train.output_dir") from None
    why = why_not_a_directory(out)
    if why is not None:  # found on every rank alike, before any of them waits
        raise ConfigError(f"config key 'train.output_dir': {out} {why}")
    saves = out / "checkpoints"  # read-only: the run trained up to its first save, then died
    why = why_not_a_directory(saves)
    if why is not None:
        raise ConfigError(f"config key 'train.output_dir': its checkpoints folder {saves} {why}")
    inside = managing_folder(out)  # a run's best/ (say): its next save swapped best/ away
    if inside is not None:
        raise ConfigError(f"config key 'train.output_dir': {out} {inside_text(out, inside)}, "
                          f"{MANAGED}")
    _refuse_replacing_the_config_file(cfg, out)
    _refuse_a_copied_runs_config(cfg, out)
    _refuse_a_cache_dir_file(cfg)
    if train.resume and train.resume != "auto":
        path = ckpt.resolve(train.resume)  # a wrong path fails here, not after set-up
        if path is not None:  # best/, say: it has no optimizer, sampler or RNG state
            try:
                training_manifest(path)
            except CheckpointError as exc:
                raise CheckpointError(str(exc), key="train.resume") from None
        saved = [] if ckpt.is_own(path) else ckpt.saved_run()
        if saved:  # its saves would replace this run's checkpoints of the same steps
            raise CheckpointError(
                f"train.resume={train.resume} is another run's checkpoint, and "
                f"train.output_dir={out} already holds a run ({_shown(saved)}): pick a new "
                "train.output_dir (or move that run away)")
    if train.resume == "auto":
        _check_nothing_to_resume(cfg, ckpt, say)
    saved = [] if train.resume or train.overwrite_output_dir else ckpt.saved_run()
    if saved:
        raise CheckpointError(
            f"train.output_dir={out} already holds a run ({_shown(saved)}): resume it with "
            "train.resume=auto, start over with train.overwrite_output_dir=true (deletes "
            "it), or pick a new train.output_dir", key="train.output_dir")


def intact_hint(ckpt: CheckpointManager, damaged: Path) -> str:
    """The newest intact checkpoint before a damaged one resume=auto met (every requeue
    would fail on it alike), to resume by hand; '' when there is none."""
    older = ckpt.newest_intact(before=damaged)
    if older is None:
        return ""
    return (f"; the newest intact checkpoint is {older}: resume it with "
            f"train.resume={older} (newer ones then move to abandoned/)")


def _check_nothing_to_resume(cfg: RunConfig, ckpt: CheckpointManager, say) -> None:
    """`resume=auto` with no checkpoint but a best/ (a crash before the first save, or
    checkpoints deleted): the run starts afresh beside that best/, which is replaced only
    by a better score. Refused when best/ was trained with another config: the run would
    mix with another's best/."""
    if ckpt.latest() is not None:
        return
    if not is_committed(ckpt.best_dir) or ckpt.best_damage() is not None:
        # said, or a wrong output dir goes unnoticed (a damaged best/ is said at the start)
        say(f"train.resume=auto: no checkpoint in {ckpt.output_dir}: starting a new run")
        return
    info = ckpt.best_info()
    if info.get("config_hash") not in (None, config_hash(cfg)):
        raise CheckpointError(
            f"train.resume=auto: {cfg.train.output_dir} has no checkpoint to resume, and its "
            "best/ was trained with another config: pick a new train.output_dir, or start "
            "over with train.overwrite_output_dir=true (without train.resume)")
    say(f"no checkpoint to resume in {cfg.train.output_dir}: starting afresh beside "
        f"best/ (step {info.get('step')}, score {info.get('score')}), which only a "
        "better score replaces")


def make_accelerator(cfg: RunConfig, with_deepspeed: bool = False):
    """An Accelerator that sees every rank, whichever launcher started us. `with_deepspeed`
    (a ZeRO training run): DeepSpeed imported before the process group is made (imported
    after it, it held the group to interpreter exit: see
    collectives.import_before_the_process_group), its accelerator chosen for the device
    accelerate will pick."""
    from accelerate.utils import parse_flag_from_env

    _refuse_accelerates_compile()
    use_cpu = check_device(cfg)
    try:
        if with_deepspeed:  # accelerate's own rule too: ACCELERATE_USE_CPU puts it on the CPU
            cpu = use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU")
            zero.choose_accelerator(torch.device("cpu" if cpu else "cuda"))
        import_before_the_process_group(with_deepspeed=with_deepspeed)
        set_host_timeout(cfg.train.collective_timeout_s)  # the per-step checks' gloo group too
        return _accelerator(cfg, use_cpu)
    except BaseException:
        zero.undo_env()  # no Trainer to close() yet: DS_ACCELERATOR set above goes here
        raise


def _accelerator(cfg: RunConfig, use_cpu: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [
        # Only one head runs per step: the others are unused parameters for DDP.
        DistributedDataParallelKwargs(find_unused_parameters=True),
        InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s)),
    ]
    # Under ZeRO, DeepSpeed runs the model in bf16/fp16 itself, and with bf16_weights the
    # model is bf16 already: no autocast on top.
    precision = "no" if cfg.train.zero_stage or cfg.train.bf16_weights \
        else cfg.train.mixed_precision
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision,
                              kwargs_handlers=handlers,
                              log_with=list(cfg.tracking.backends) or None,
                              project_dir=cfg.train.output_dir)
    _check_world_size(accelerator)
    return accelerator


def _refuse_accelerates_compile() -> None:
    """`accelerate launch --dynamo_backend X` would have accelerate compile the DDP-wrapped
    model: a wrapper over the wrapper, which the trainer's own compilation (train.compile),
    CUDA graphs and close() (it lets go of DDP's process group) do not expect."""
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO")
    if backend.upper() not in ("NO", ""):
        raise ConfigError(f"ACCELERATE_DYNAMO_BACKEND={backend} (accelerate launch "
                          "--dynamo_backend): not supported; compile with train.compile=true "
                          "and launch with --dynamo_backend no")


def _check_world_size(accelerator) -> None:
    """Fail loudly when a launcher started N processes that each believe they are alone."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"launcher started WORLD_SIZE={expected} processes but accelerate sees "
            f"{accelerator.num_processes} (distributed type {accelerator.distributed_type}); "
            "on CPU use `ACCELERATE_USE_CPU=true accelerate launch` or launch/cpu_multi.yaml")


def param_groups(model: torch.nn.Module, cfg, masters: MasterWeights | None = None) -> list[dict]:
    """AdamW groups: no decay on biases/LayerNorm; each head in groups of its own (own lr, and
    ZeRO can leave an idle head's groups untouched). Group key "head": task id or None.
    With `masters` (train.bf16_weights) the groups hold the fp32 masters."""
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = int(name.split(".")[1]) if name.startswith("heads.") else -1
        groups.setdefault((head, not name.endswith(NO_DECAY)), []).append(
            p if masters is None else masters.master(p))
    head_lr = cfg.train.head_lr or cfg.train.lr
    return [{"params": ps, "head": None if head < 0 else head,
             "lr": cfg.train.lr if head < 0 else head_lr,
             "weight_decay": cfg.train.weight_decay if decay else 0.0}
            for (head, decay), ps in sorted(groups.items())]


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device,
                   masters: MasterWeights | None = None) -> torch.optim.Optimizer:
    # Fused AdamW runs on CPU too (torch >= 2.4): there only where fused clipping needs it.
    fused = cfg.train.fused_optimizer and (device.type == "cuda" or cfg.train.fused_clipping)
    groups = param_groups(model, cfg, masters)
    settings = {"lr": cfg.train.lr, "betas": (cfg.train.adam_beta1, cfg.train.adam_beta2),
                "eps": cfg.train.adam_eps, "fused": fused or None,
                "foreach": None if fused else True}
    if masters is not None and masters.segments:  # train.flat_masters
        return FlatAdamW(groups, masters, compiled=device.type == "cuda", **settings)
    return torch.optim.AdamW(groups, **settings)


def flat_segments(model: torch.nn.Module, cfg) -> list[list[torch.nn.Parameter]]:
    """`train.flat_masters`: the encoder's optimizer groups, each laid flat (heads stay
    per tensor: an idle head's step is skipped)."""
    if not cfg.train.flat_masters:
        return []
    return [g["params"] for g in param_groups(model, cfg) if g["head"] is None]


def clip_divisor(grads: list[torch.Tensor], max_norm: float,
                 flat: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """What fused AdamW divides every gradient by (its `grad_scale`) to clip them to `max_norm`:
    the norm over `grads` and `flat` together.

    torch's clip_grad_norm_ multiplies by min(max_norm / (norm + 1e-6), 1) in a pass of its
    own; handing the fused step the reciprocal saves that read+write of every gradient.
    `flat` (`train.triton_clip_norm`: the flat segments' gradient buffers): read by
    mtl_dist's Triton kernel (mtl_dist/triton_norm.py) where it can (contiguous CUDA
    tensors of its dtypes), else with `grads` by torch's foreach norm."""
    # fp32 norms also of bf16 gradients (MasterWeights.grads_in_bf16): get_total_norm would
    # round a bf16 tensor's norm to bf16
    norms = []
    if flat:
        from .triton_norm import sum_of_squares, takes_triton

        norms = [sum_of_squares(g).sqrt() for g in flat if takes_triton(g)]
        grads = [*(g for g in flat if not takes_triton(g)), *grads]
    if grads:
        norms += torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    if not norms:  # nothing to clip (as get_total_norm: a norm of 0)
        return torch.ones(())
    norm = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    return torch.clamp((norm + 1e-6) / max_norm, min=1.0)


def library_versions() -> dict[str, str]:
    import accelerate
    import transformers

    import mtl_dist

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "mtl_dist": mtl_dist.__version__,
            "numpy": np.__version__}


class Trainer:
    """Builds everything from a RunConfig, then trains, evaluates and predicts."""

    def __init__(self, cfg: RunConfig, *, for_training: bool = True,
                 checkpoint: str | Path | None = None):
        self.cfg = cfg
        self.inference_checkpoint = checkpoint  # evaluate/predict: whose labels the heads have
        self.best_damaged = False  # best/ unusable at the start: the first evaluation replaces it
        zero.adopt_accelerate_launch(cfg)
        self.accelerator = make_accelerator(cfg, with_deepspeed=for_training
                                            and bool(cfg.train.zero_stage))
        try:
            self._set_up(cfg, for_training)
        except BaseException:
            # Why: a process group left to interpreter exit aborted a rank of a refused
            # 2-rank start (gloo: "terminate called without an active exception", SIGABRT)
            # after its one-line error
            self.close()
            raise

    def _set_up(self, cfg: RunConfig, for_training: bool) -> None:
        self.engine = None
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        from accelerate.utils import set_seed

        # Dropout differs per rank (as in any data-parallel run); the plan never uses these streams.
        set_seed(rank_seed(cfg.train.seed, self.rank))
        self.output_dir = Path(cfg.train.output_dir)
        # a training run touches OUTPUT only once it holds it (fit: hold_output_dir)
        self.ckpt = CheckpointManager(self.output_dir, save_total_limit=cfg.checkpoint.save_total_limit,
                                      greater_is_better=cfg.train.metric_for_best != "loss",
                                      async_save=cfg.checkpoint.async_save,
                                      recover_best=not for_training)
        if for_training:
            self._check_output_dir()  # before any work (it reads OUTPUT only)
        self.tokenizer = mdata.load_tokenizer(cfg.model)
        # once: hashing a 250k vocabulary at every save would cost ~0.3 s each
        self.tokenizer_identity = mdata.tokenizer_identity(self.tokenizer)
        self.label_maps = self._frozen_label_maps()
        if for_training:  # a bad test file fails now, not after training, at predict
            mdata.check_split(cfg, "test", self.label_maps)
        self.task_names = [t.name for t in cfg.tasks]
        self.pad_multiple = mdata.resolve_pad_multiple(cfg.data.pad_to_multiple_of,
                                                       acc.device.type == "cuda")
        self.collate = partial(mdata.collate, pad_token_id=self.tokenizer.pad_token_id,
                               pad_to_multiple_of=self.pad_multiple, max_length=cfg.data.max_length)
        with acc.main_process_first():  # rank 0 fills the token cache, the others reuse it
            self.train_data = mdata.load_task_data(cfg, self.tokenizer, "train", self.label_maps) \
                if for_training else []
            self.dev_data = mdata.load_task_data(cfg, self.tokenizer, "dev", self.label_maps)
        self.model: MultiTaskModel = build_model(
            cfg.model, len(self.tokenizer), [len(self.label_maps[t]) for t in self.task_names],
            pad_token_id=self.tokenizer.pad_token_id, max_length=cfg.data.max_length)
        if cfg.data.packing:
            enable_packed_attention(self.model, cfg.data.max_length, cfg.train.attention_kernel)
            verify_packed_attention(self.model, *mdata.packing_probe(
                self.model.encoder.get_input_embeddings().num_embeddings,
                self.tokenizer.pad_token_id, cfg.data.max_length,
                cfg.data.pack_multiple))
        self.model.gather_unpack_backward = cfg.train.gather_unpack_backward
        if cfg.train.fused_qkv:
            enable_fused_qkv(self.model)
        if cfg.train.gemm_embedding_grads:
            enable_gemm_embedding_grads(
                self.model.encoder, "triton" if cfg.train.triton_embedding_grads else "aten")
        if cfg.train.gelu_epilogue:
            enable_gelu_epilogue(self.model)
        if cfg.train.compile:
            compile_encoder_layers(self.model, cfg.train.compile_tuning,
                                   cfg.train.compile_mix_order_reduction, cfg.train.compile_pdl)
        if cfg.train.compile_heads and for_training:  # evaluation runs the heads eager
            compile_heads(self.model)
        self.state = TrainState()
        if for_training and cfg.train.early_stopping_patience and not cfg.train.eval_steps \
                and not cfg.train.eval_at_epoch_end and any(t.dev for t in cfg.tasks) \
                and acc.is_main_process:
            warnings.warn(f"train.early_stopping_patience={cfg.train.early_stopping_patience} "
                          "cannot act: no evaluation is scheduled (train.eval_steps null, "
                          "train.eval_at_epoch_end false), only the one at the end",
                          MtlDistWarning, stacklevel=3)
        self.early = EarlyStopping(cfg.train.early_stopping_patience,
                                   greater_is_better=cfg.train.metric_for_best != "loss")
        self.tracking = Tracking(cfg, acc, self.output_dir)
        self.stop_reason: str | None = None
        self.abandoned_to: Path | None = None  # where a resume set a branch aside (rank 0)
        self.resumed_branch: tuple[int, Path] | None = None  # resumed from abandoned/: fork
        self.save_on_stop = True  # `mtl-dist bench` measures without the final checkpoint
        self.masters: MasterWeights | None = None
        self.overlap: OverlappedStep | None = None  # train.overlap_optimizer
        if for_training:
            self._build_training()
        else:
            if cfg.train.bf16_weights:
                self.model.to(torch.bfloat16)
            plain = self.model
            self.model = acc.prepare_model(self.model, evaluation_mode=True)
            self._set_module(plain)

    # ----------------------------------------------------------------- set-up
    def _check_output_dir(self) -> None:
        check_output_dir(self.cfg, self.ckpt, self._say)

    def _frozen_label_maps(self) -> dict[str, list[str]]:
        """Labels from the config or the train data, then frozen: a resumed run reuses the
        saved map. Inference with a checkpoint: the labels its heads were trained with (the
        config's output dir may hold another run, with labels of its own)."""
        saved = None if self.inference_checkpoint is None else \
            checkpoint_label_maps(self.inference_checkpoint)
        if saved is None:
            return mdata.frozen_label_maps(self.cfg)
        where = f"checkpoint {self.inference_checkpoint}"
        mdata.check_label_maps(self.cfg, saved[0], where, (
            "list the tasks it was trained with", "use the labels it was trained with"))
        return {task.name: list(saved[0][task.name]) for task in self.cfg.tasks}

    def _build_training(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.dataset = mdata.MultiTaskDataset(self.train_data)
        sizes = [len(t.labels) for t in self.train_data]
        self.global_batch = cfg.train.per_device_batch_size * self.world_size
        self.plan = MultiTaskBatchPlan(
            sizes, global_batch_size=self.global_batch, seed=cfg.train.seed,
            strategy=cfg.sampler.strategy, temperature=cfg.sampler.temperature,
            task_weights=[t.sample_weight for t in cfg.tasks],
            task_caps=[t.max_samples for t in cfg.tasks], drop_last=cfg.sampler.drop_last,
            lengths=[t.lengths for t in self.train_data],
            group_by_length=cfg.sampler.group_by_length,
            mega_batch_mult=cfg.sampler.mega_batch_mult)
        self.batch_sampler = RankBatchSampler(
            self.plan, self.dataset.offsets, self.rank, self.world_size,
            on_global_batch_change=cfg.sampler.on_global_batch_change)
        # The loader is NOT passed to accelerator.prepare: the sampler already shards by rank.
        self.loader = DataLoader(self.dataset, batch_sampler=self.batch_sampler,
                                 collate_fn=self._train_collate(),
                                 num_workers=cfg.data.num_workers,
                                 pin_memory=acc.device.type == "cuda",
                                 # Each iter() draws a seed: from our own generator, not from the
                                 # global stream, or a mid-epoch resume would shift dropout.
                                 generator=torch.Generator().manual_seed(cfg.train.seed))
        self.total_steps = self._total_optimizer_steps()
        if cfg.train.bf16_weights:  # masters on the device, taken from the fp32 weights
            self.masters = MasterWeights(self.model.to(acc.device),
                                         flat_segments(self.model, cfg))
            if self.world_size > 1:
                self.masters.broadcast_from_first_rank()
        optimizer = make_optimizer(self.model, cfg, acc.device, self.masters)
        self.warmup_steps = self._warmup_steps_for(self.total_steps)
        self.state.lr_schedule = self._lr_schedule()  # (a resume: the saved)
        # Linear warm-up, then train.lr_scheduler's decay to total_steps (transformers'
        # schedules), read at each step: a replan re-aims it by changing total_steps. Not
        # prepared by accelerate: its wrapper would step the schedule once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        plain = self.model
        if cfg.train.zero_stage:
            ds_config = zero.build_ds_config(cfg, self.world_size)
            self.engine, self.optimizer = zero.initialize(self.model, optimizer, ds_config,
                                                          acc.device)
            self.model = self.engine
        else:
            self.model, self.optimizer = acc.prepare(self.model, optimizer)
        if self.masters is not None:
            self.masters.relink_model()
        self._set_module(plain)
        # Under ZeRO-3 the EMA shadows this rank's parameter partitions only.
        zero3 = self.optimizer if self.engine is not None and cfg.train.zero_stage == 3 else None
        self.ema = EMA(self._fp32_weights(), cfg.train.ema_decay, zero3_optimizer=zero3) \
            if cfg.train.ema_decay else None
        self.graphs = self._make_step_graphs(self.module)
        self.overlap = self._overlap_optimizer()
        self.group_tasks: set[int] = set()  # tasks seen in the current accumulation group
        self._queued_log: QueuedTrainLog | None = None  # written by _emit_train_log

    def _set_module(self, plain: MultiTaskModel) -> None:
        """The plain module under DDP / DeepSpeed wrappers: eval, EMA and best saves use it.
        `plain`: the module handed to accelerate, which wraps it without replacing it (its
        own compilation, which would, is refused: _refuse_accelerates_compile). Not
        accelerate's unwrap_model: it imports DeepSpeed, whose comm functions then hold the
        process group (a default argument) past close() to interpreter exit."""
        self.module: MultiTaskModel = self.engine.module if self.engine is not None else plain

    def _fp32_weights(self):
        """What EMA tracks (by the model's parameter names): the masters with bf16_weights."""
        return self.masters if self.masters is not None else self.module

    def _trainable(self) -> list[torch.Tensor]:
        """The tensors the optimizer updates and clipping measures."""
        if self.masters is not None:
            return self.masters.masters
        return [p for p in self.model.parameters() if p.requires_grad]

    def _train_collate(self):
        """Training batches: packed end to end (`data.packing`) or padded like eval batches."""
        data = self.cfg.data
        if not data.packing:
            return self.collate
        return partial(mdata.collate_packed, pad_token_id=self.tokenizer.pad_token_id,
                       max_length=data.max_length, pack_multiple=data.pack_multiple)

    def _make_step_graphs(self, module: MultiTaskModel):
        """CUDA graphs of the micro-step (`train.cuda_graphs`): one GPU, no DeepSpeed."""
        cfg = self.cfg.train
        if not cfg.cuda_graphs:
            return None
        if self.accelerator.device.type != "cuda":
            warnings.warn("train.cuda_graphs is ignored on CPU", MtlDistWarning, stacklevel=2)
            return None
        if self.world_size > 1 or cfg.zero_stage:
            raise ConfigError("train.cuda_graphs: supported on one GPU without DeepSpeed; "
                              f"this run has world size {self.world_size}, zero_stage "
                              f"{cfg.zero_stage}")
        from mtl_dist.graphs import StepGraphs

        if cfg.mixed_precision == "fp16":
            raise ConfigError("train.cuda_graphs: use mixed_precision bf16 (fp16's grad scaler "
                              "syncs with the host every step)")
        # autocast to bf16, except for a model that is bf16 already (bf16_weights)
        autocast = cfg.mixed_precision == "bf16" and self.masters is None
        return StepGraphs(module, torch.bfloat16 if autocast else None, self.masters,
                          single_micro_step=cfg.gradient_accumulation_steps == 1,
                          direct_weight_grads=cfg.direct_weight_grads,
                          cublaslt_gemms=cfg.cublaslt_gemms,
                          direct_embedding_grads=cfg.direct_embedding_grads)

    def _overlap_optimizer(self) -> OverlappedStep | None:
        """`train.overlap_optimizer`: the flat AdamW step runs chunk by chunk on a side
        stream while the next forward starts (mtl_dist/overlap.py). Before any graph is
        captured: the graphs hold the forward's waits."""
        train = self.cfg.train
        if not train.overlap_optimizer:
            return None
        nothing_overlaps = "no CUDA streams on CPU: each layer's update runs when the " \
            "forward reaches it" if self.accelerator.device.type != "cuda" else \
            f"train.ema_decay={train.ema_decay} reads the whole step after each one" \
            if train.ema_decay else None
        if nothing_overlaps and self.accelerator.is_main_process:
            warnings.warn(f"train.overlap_optimizer: nothing overlaps ({nothing_overlaps}); "
                          "same results as without it", MtlDistWarning, stacklevel=3)
        return self.optimizer.optimizer.overlap_next_forward(
            self.module.encoder, transformer_layers(self.module, "train.overlap_optimizer"),
            zero_grads=self.graphs is None)

    def _settle_optimizer(self) -> None:
        """Whatever reads the weights, masters or moments next (not the next micro-step's
        forward, which waits per layer) sees the whole optimizer step."""
        if self.overlap is not None:
            self.overlap.settle()

    def _precapture_graphs(self) -> None:
        """`train.precapture_graphs`: capture the graph of every (task, shape) the rest of the
        run will meet before its first step, so that no capture (with its compile of a new
        shape, ~0.35 s for BERT-large) stalls training later. The shapes are predicted from
        the plan and the samples' lengths by the collate's own width rule; each graph is
        captured from a real collated batch and keyed by its real shapes, so a shape
        predicted wrongly would be captured on first sight, as without this switch (and the
        graph of the wrong prediction never used)."""
        if self.graphs is None or not self.cfg.train.precapture_graphs:
            return
        start, before = time.perf_counter(), len(self.graphs.graphs)
        accum = self.cfg.train.gradient_accumulation_steps
        self.model.train()  # dropout is part of the captured graph
        firsts = self._first_step_of_each_shape()
        for epoch, step in tqdm(firsts, desc="capturing CUDA graphs", dynamic_ncols=True,
                                disable=not self.accelerator.is_main_process):
            flat = self.batch_sampler.flat_indices(epoch, step)
            inputs = _model_inputs(self.loader.collate_fn([self.dataset[i] for i in flat]),
                                   self.accelerator.device)
            task_id = inputs.pop("task_id")
            self.graphs.prepare(inputs, task_id, first=step % accum == 0)
        self._say(f"captured {len(self.graphs.graphs) - before} CUDA graphs of the run's "
                  f"(task, shape)s in {time.perf_counter() - start:.1f} s")

    def _first_step_of_each_shape(self) -> list[tuple[int, int]]:
        """(epoch, micro-step) of the first batch of each (task, width, opens-its-group)
        among the micro-steps the rest of the run (this invocation) trains on."""
        accum = self.cfg.train.gradient_accumulation_steps
        chunk = max(1, (1 << 21) // self.plan.global_batch_size)  # ~2 M indices at a time
        seen: dict[tuple[int, int, bool], tuple[int, int]] = {}
        for epoch, start, stop in self._remaining_micro_steps():
            for lo in range(start, stop, chunk):
                tasks, idx = self.plan.batches(epoch, lo, min(stop, lo + chunk))
                keys = np.stack([tasks, self._batch_widths(tasks, self.batch_sampler.local(idx)),
                                 (np.arange(lo, lo + len(tasks)) % accum) == 0], axis=1)
                _, where = np.unique(keys, axis=0, return_index=True)
                for i in sorted(where):
                    seen.setdefault(tuple(int(v) for v in keys[i]), (epoch, lo + int(i)))
        return sorted(seen.values())

    def _remaining_micro_steps(self):
        """(epoch, start, stop) ranges of the micro-steps the rest of the run trains on (up
        to `train.stop_after_steps` optimizer steps in this invocation)."""
        accum = self.cfg.train.gradient_accumulation_steps
        left = self.total_steps - self.state.global_step
        if self.cfg.train.stop_after_steps:
            left = min(left, self.cfg.train.stop_after_steps)
        epoch, start = self.batch_sampler.epoch, self.batch_sampler.position
        while left > 0 and (self.cfg.train.max_steps or epoch < self.cfg.train.num_epochs):
            groups = min(left, self._optimizer_steps_in_epoch(epoch) - start // accum)
            if groups <= 0:
                return
            yield epoch, start, min(self.plan.num_steps(epoch), (start // accum + groups) * accum)
            left -= groups
            epoch, start = epoch + 1, 0

    def _batch_widths(self, tasks: np.ndarray, local_idx: np.ndarray) -> np.ndarray:
        """The width (padded) or row length (packed) the collate gives each batch."""
        lengths = np.empty(local_idx.shape, dtype=np.int64)
        for t in range(len(self.task_names)):
            mine = tasks == t
            lengths[mine] = self.dataset.lengths(t)[local_idx[mine]]
        data = self.cfg.data
        if data.packing:
            return mdata.packed_width(lengths, data.pack_multiple)
        return mdata.padded_width(lengths, self.pad_multiple, data.max_length)

    def _optimizer_steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(self.plan.num_steps(epoch) / self.cfg.train.gradient_accumulation_steps)

    def _total_optimizer_steps(self) -> int:
        if self.cfg.train.max_steps:
            return self.cfg.train.max_steps
        return sum(self._optimizer_steps_in_epoch(e) for e in range(self.cfg.train.num_epochs))

    def app_state(self) -> dict[str, Any]:
        """Everything a checkpoint restores, by name (each has state_dict/load_state_dict)."""
        state = {"model": self.module, "optimizer": self.optimizer,
                 "scheduler": self.scheduler, "sampler": self.batch_sampler,
                 "early_stopping": self.early}
        if self.accelerator.scaler is not None:
            state["grad_scaler"] = self.accelerator.scaler
        if self.ema is not None:
            state["ema"] = self.ema
        if self.masters is not None:
            state["master_weights"] = self.masters
        return state

    def manifest(self) -> dict[str, Any]:
        """What a resumed run must match (and what `ckpt inspect` shows)."""
        return {
            "world_size": self.world_size,
            "distributed_type": str(self.accelerator.distributed_type),
            "global_batch_size": self.cfg.train.per_device_batch_size * self.world_size,
            **config_manifest(self.cfg, self.label_maps),
            "data_fingerprints": {t.name: t.fingerprint for t in self.train_data},
            "model_shape": model_signature(self.module),
            "tokenizer": self.tokenizer_identity,
            "versions": library_versions(),
        }

    # ---------------------------------------------------------------- training
    def fit(self) -> dict[str, Any]:
        """Train to the end (or early stop / preemption); return the final summary. The
        output dir is held for the run's length: a second run on it is refused at once (it
        deleted the first's in-progress save, and each replaced the other's checkpoints)."""
        self.ckpt.hold_output_dir()
        try:
            return self._fit()
        finally:
            if not self.ckpt.saving:  # else close() lets go, once the save is finished
                self.ckpt.let_go_of_output_dir()

    def _fit(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        resumed = self._maybe_resume()  # first: a refused resume leaves OUTPUT untouched
        if cfg.train.overwrite_output_dir:
            self.ckpt.clear_run()
            self._name_what_overwrite_kept()
        self.ckpt.write_run_file("config.yaml", saved_config_yaml(cfg))
        self.ckpt.write_run_file("labels.json", json.dumps(self.label_maps, indent=1))
        self._write_model_run_files()
        if not resumed:
            self.batch_sampler.set_epoch(0)
        # Read once, before any rank can evaluate (a collective): every rank decides alike.
        self.saved_best = self._saved_best_score()
        self.start_step = self.state.global_step
        self.preemption = PreemptionFlag(cfg.train.preemption_signals)
        self._precapture_graphs()  # after the handlers: a stop signal now is a clean stop
        branch = self.resumed_branch  # (fork step, its folder) when resumed from abandoned/
        self.tracking.truncate_after(self.state.global_step, redo_eval=self.state.pending_eval,
                                     keep_cut_in=self.abandoned_to,
                                     fork=branch[0] if branch else None,
                                     branch_log=branch[1] / "metrics.jsonl" if branch else None)
        self.state.tracker_run_id = self.tracking.start(self.state.tracker_run_id,
                                                        resume_step=self.state.global_step)
        stop = self.state.global_step >= self.total_steps
        if not stop and self.early.should_stop:  # resumed after an early stop: it stays ended
            self.stop_reason = "early_stopping"
            self._say(f"train.resume: the run stopped early at step {self.state.global_step} "
                      f"({self.early.bad_evals} evaluations without a better score; "
                      "train.early_stopping_patience raised would go on): nothing to train")
            stop = True
        if self.state.pending_eval:  # put off by a preemption (or a replan's end)
            self.state.pending_eval = False
            # An early stop here ends the run; its checkpoint (this step's) keeps the
            # evaluation pending, so a later resume decides the same way.
            if self._has_dev_labels():
                stop = self._evaluate_for_best(self.state.global_step) or stop
        self._loss_sums = LossSums.zeros(len(self.task_names), acc.device)
        bar = self._bar = tqdm(total=self.total_steps, initial=self.state.global_step,
                               desc="train", disable=not acc.is_main_process,
                               dynamic_ncols=True)
        try:  # closed also when a step raises (Ctrl-C, a crash): a bar left open is still
            # on the console's books, and later lines were started after its text
            while not stop:
                stop = self._train_epoch(bar)
                if not cfg.train.max_steps and self.state.epoch >= cfg.train.num_epochs:
                    stop = True
            self._emit_train_log()
        finally:
            bar.close()
        # The last (or preemption) checkpoint is committed before fit returns (exit code 75).
        self.ckpt.wait()
        self._log_checkpoint_timings()
        acc.wait_for_everyone()
        preempted = self.stop_reason == "preempted"
        summary = {"global_step": self.state.global_step, "best_score": self.early.best_score,
                   "best_step": self.early.best_step, "output_dir": str(self.output_dir),
                   "stop_reason": self.stop_reason or "finished",
                   "exit_code": PREEMPTED_EXIT_CODE if preempted else 0,
                   "best_damage": self.ckpt.best_damage()}
        if acc.is_main_process:
            if summary["best_score"] is not None:  # metric_for_best=loss: the loss
                best = (f"best {self.cfg.train.metric_for_best} {summary['best_score']} at "
                        f"step {summary['best_step']}")
            else:  # evaluations that were all NaN are no best, but they ran
                best = "no evaluation" if self.state.last_eval_step is None else \
                    f"no finite evaluation ({self.cfg.train.metric_for_best} NaN at every one)"
            # a preempted run's checkpoint: how to go on (a requeue does it by itself)
            resume = f"; continue with train.resume=auto (from {self.ckpt.latest()})" \
                if preempted and self.ckpt.latest() is not None else ""
            print(f"[mtl_dist] stopped: {summary['stop_reason']} at step "
                  f"{summary['global_step']}; {best}{resume}")
        self.tracking.finish(summary)
        if acc.is_main_process:
            tell_batch_shell(summary["stop_reason"])
        if preempted and acc.is_main_process:
            self._requeue_after_preemption()
        else:
            self.preemption.restore()
        return summary

    def _requeue_after_preemption(self) -> None:
        """Under Slurm, `scontrol requeue` after a requeue request (USR1/USR2), not after
        TERM: that is Slurm ending the job (scancel, a time limit reached)."""
        # Last: `scontrol requeue` makes Slurm signal the job at once. Our handlers stay
        # installed until close(), so that signal cannot cut the summary above short.
        # The requeued job reruns this command line: with overwrite_output_dir it would
        # delete the checkpoint just saved and start over, at every preemption.
        train, under_slurm = self.cfg.train, bool(os.environ.get("SLURM_JOB_ID"))
        if not self.preemption.requeue_wanted:
            if under_slurm:
                print("[mtl_dist] not requeued: a TERM/INT ends the job (scancel, a time limit); "
                      "SIGUSR1 asks for a checkpoint and a requeue", flush=True)
            return
        # ...and with train.resume=PATH it would go back to PATH (this run's progress set
        # aside, or, PATH another run's, refused into this now used output dir)
        rerun_problem = "train.overwrite_output_dir=true would delete this checkpoint" \
            if train.overwrite_output_dir else f"train.resume={train.resume} would go back " \
            "to that checkpoint" if train.resume not in (None, "auto") else None
        failure = request_requeue(train.requeue_on_preempt and rerun_problem is None)
        if failure:
            print(f"[mtl_dist] {failure}", flush=True)
        if rerun_problem and train.requeue_on_preempt and under_slurm:
            print(f"[mtl_dist] not requeued ({rerun_problem} on the rerun): rerun with "
                  "train.resume=auto (and without train.overwrite_output_dir)", flush=True)

    def close(self) -> None:
        """Tear down the process group (end of the program; not done by fit, so callers can
        still inspect sharded state after training) and restore the signal handlers. Also
        after a set-up that failed part way (the constructor calls it)."""
        ckpt = getattr(self, "ckpt", None)
        try:  # an async save left in flight (fit raised): finish it, report a failure, go on
            if ckpt is not None:
                ckpt.wait()
        except Exception as exc:  # noqa: BLE001 - an exception is on its way already
            warnings.warn(f"checkpoint: {exc}", MtlDistWarning, stacklevel=2)
        if ckpt is not None:
            ckpt.let_go_of_output_dir()
        if getattr(self, "preemption", None) is not None:
            self.preemption.restore()
        release_host_group()
        try:
            try:  # before accelerate's end_training, which then finds the group gone
                zero.end_process_group(keep_group=self.accelerator.state.fork_launched)
            finally:
                self.accelerator.end_training()
        finally:  # also when a tracker's finish() raised
            model = getattr(self, "model", None)
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                release_ddp_group(model)  # its gloo threads end here, not at interpreter exit
                self.model = model.module  # (self.module: unset after an early set-up failure)

    def _maybe_resume(self) -> bool:
        if not self.cfg.train.resume:
            return False
        path = self.ckpt.resolve(self.cfg.train.resume)
        if path is None:
            return False
        manifest = self.manifest()
        try:
            trainer_state = self.ckpt.load(path, self.app_state(), engine=self.engine,
                                           expected_manifest={k: manifest[k] for k in
                                                              resume_must_match(self.cfg)})
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}{self._intact_hint(path, exc)}") from None
        why = _trainer_state_problem(trainer_state, read_manifest(path).get("step"))
        if why is not None:  # sealed as the run wrote it, yet not what a run writes (an edit)
            raise CheckpointError(f"checkpoint {path}: file 'trainer_state.json' {why}")
        self.state.load_state_dict(trainer_state)
        ran_on = trainer_state.get("lr_schedule")  # (None: saved before it was recorded)
        epoch_counted = not self.cfg.train.max_steps
        if self.state.schedule and epoch_counted:  # re-counted by a replan
            self._keep_the_replans_count(trainer_state.get("schedule_epochs"))
        replanned = self.batch_sampler.replanned_from is not None
        if replanned:
            self._follow_replanned_sampler()  # an epoch-counted run: re-counted, said there
            if ran_on is not None and len(ran_on) > 2 and epoch_counted \
                    and ran_on[2] != self.cfg.train.lr_scheduler:  # its kind is not said there
                self._say(f"LR schedule {ran_on[2]} -> {self.cfg.train.lr_scheduler} "
                          "(train.lr_scheduler) from the next step")
        if ran_on is not None:
            ran_on = [*ran_on, "linear"][:3]  # saved before the kind was: linear then
        if ran_on is not None and ran_on != self._lr_schedule() \
                and not (replanned and epoch_counted):
            self._follow_recounted_schedule(*ran_on)
        self.state.lr_schedule = self._lr_schedule()
        self.ckpt.restore_rng(path)  # last: after the sampler jumped to its cursor
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {self.state.global_step} "
                  f"(epoch {self.state.epoch}, step in epoch {self.batch_sampler.position})")
        moved, target = self.ckpt.set_aside_newer()
        self.abandoned_to = target
        fork = self.ckpt.branch_of(path)
        self.resumed_branch = None if fork is None else (fork, path.parent)
        if moved:
            step = target.name.split("-")[2]  # after-checkpoint-<step>-<hex>
            self._say(f"{', '.join(moved)}: newer than step {step}, where the branch this "
                      f"resume takes leaves the run's line; moved to {target} (rotation and "
                      "train.resume=auto leave it)")
        return True

    def _name_what_overwrite_kept(self) -> None:
        """`overwrite_output_dir` deletes the run's checkpoints and best/, not what was made
        from them (`mtl-dist predict`'s and `report`'s default folders): said, so that a
        report of the deleted run is not read as this run's."""
        out = Path(self.cfg.train.output_dir)
        kept = [name for name in ("predictions", "report") if (out / name).exists()]
        if kept:
            self._say(f"train.overwrite_output_dir: {', '.join(f'{out / k}/' for k in kept)} "
                      "kept: made from the deleted run, not this one (re-make or delete)")

    def _intact_hint(self, path: Path, exc: CheckpointError) -> str:
        """Where resume=auto met a damaged newest checkpoint (every requeue would fail on it
        alike): the newest intact one before it, to resume by hand."""
        damaged = (f"checkpoint {path}: file '", f"checkpoint {path}: unreadable ")
        if self.cfg.train.resume != "auto" or not any(d in str(exc) for d in damaged):
            return ""
        return intact_hint(self.ckpt, path)

    def _follow_replanned_sampler(self) -> None:
        """`sampler.on_global_batch_change=replan`: the sampler skipped to the start of the
        next epoch under the new global batch. The loop's epoch follows it; an epoch-counted
        run is re-counted (steps done + the rest of its epochs at the new batch), and its
        LR schedule re-aimed at the new total."""
        self.state.epoch = self.batch_sampler.epoch
        left = "" if self.cfg.train.max_steps else self._recount_epochs()
        self._say(f"global batch {self.batch_sampler.replanned_from} -> {self.global_batch}: "
                  f"continuing at epoch {self.state.epoch} step 0{left}")

    def _keep_the_replans_count(self, counted_for: int | None) -> None:
        """An epoch-counted run replanned earlier: its total is the replan's count (steps done
        then, plus its epochs at the new batch), which the config alone no longer gives;
        epochs added or removed since (num_epochs; `schedule_epochs`: what it was counted for)
        move it by their steps, and the warm-up is counted from the total as at the replan.
        Checkpoints saved before `schedule_epochs` was recorded keep their count as it is."""
        warmup, total = self.state.schedule
        epochs = self.cfg.train.num_epochs
        if counted_for is not None:
            steps = self._optimizer_steps_in_epoch
            total += sum(steps(e) for e in range(counted_for, epochs)) \
                - sum(steps(e) for e in range(epochs, counted_for))
            # (epochs cut from before the replan ran at the old batch: no step is left then)
            total = max(total, self.state.global_step)
            warmup = self._warmup_steps_for(total)  # as the replan counted it: same settings,
            # same warm-up; a changed train.warmup_steps / warmup_ratio is followed
            self.state.schedule_epochs = epochs
        self.warmup_steps, self.total_steps = warmup, total
        self.state.schedule = [warmup, total]

    def _follow_recounted_schedule(self, warmup_before: int, total_before: int,
                                   kind_before: str) -> None:
        """A resume whose train.max_steps, num_epochs, warm-up or lr_scheduler differ from the
        checkpoint's run: the schedule is the new settings' (as transformers' Trainer does,
        silently there), from the next step on; said in one line, with the LR that step gets."""
        before = self.scheduler.get_last_lr()[0]
        self._reaim_lr()
        changed = [f"{what} {old} -> {new} steps" for what, old, new in
                   (("warm-up", warmup_before, self.warmup_steps),
                    ("total", total_before, self.total_steps)) if old != new]
        if kind_before != self.cfg.train.lr_scheduler:
            changed.append(f"{kind_before} -> {self.cfg.train.lr_scheduler}")
        step = self.state.global_step
        then = f"the next step's lr {before:.3g} -> " \
            f"{self.scheduler.optimizer.param_groups[0]['lr']:.3g}" \
            if self.total_steps > step else f"no step is left after step {step}"
        self._say(f"LR schedule re-counted from the checkpoint's ({', '.join(changed)}: "
                  f"train.max_steps, num_epochs, the warm-up or lr_scheduler changed): {then}")

    def _reaim_lr(self) -> None:
        """The optimizer's LRs for the next step under the current (re-counted) schedule:
        those restored from the checkpoint were the old schedule's."""
        sched = self.scheduler
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):
            group["lr"] = base * self._lr_factor(sched.last_epoch)

    def _lr_schedule(self) -> list:
        """What the LR schedule runs on, as trainer_state.json keeps it."""
        return [self.warmup_steps, self.total_steps, self.cfg.train.lr_scheduler]

    def _lr_factor(self, step: int) -> float:
        """The LR's factor at `step` under the run's (possibly re-counted) schedule."""
        return lr_factor(self.cfg.train.lr_scheduler, step, self.warmup_steps, self.total_steps)

    def _warmup_steps_for(self, total_steps: int) -> int:
        """`train.warmup_steps`, else `warmup_ratio` of a run of `total_steps`."""
        train = self.cfg.train
        if train.warmup_steps is not None:
            return train.warmup_steps
        return math.ceil(train.warmup_ratio * total_steps)

    def _recount_epochs(self) -> str:
        """An epoch-counted run after a replan: its total is the steps done plus the rest of
        its epochs at the new batch, kept in the checkpoints from now on (`state.schedule`);
        the LR schedule, which reads the total, is re-aimed from the current step."""
        cfg = self.cfg.train
        self.total_steps = self.state.global_step + sum(
            self._optimizer_steps_in_epoch(e) for e in range(self.state.epoch, cfg.num_epochs))
        self.warmup_steps = self._warmup_steps_for(self.total_steps)  # not the unreplanned run's
        self.state.schedule = [self.warmup_steps, self.total_steps]
        self.state.schedule_epochs = cfg.num_epochs
        self._reaim_lr()
        if self.state.epoch >= cfg.num_epochs:  # no epoch left: the finish-time evaluation
            self.state.pending_eval = self._has_dev_labels() and \
                self.state.last_eval_step != self.state.global_step
            return f"; no epoch is left (num_epochs={cfg.num_epochs}): the run ends here"
        return f"; the run now ends at step {self.total_steps}"

    def _train_epoch(self, bar) -> bool:
        """One pass over the rest of this epoch's plan; True when training must stop."""
        cfg = self.cfg
        accum = cfg.train.gradient_accumulation_steps
        n_micro = self.plan.num_steps(self.state.epoch)
        self.model.train()
        sums = self._loss_sums  # kept across epochs: a record covers the steps since the last
        self._log_clock = (time.perf_counter(), self.state.samples_seen)
        self.tokens_seen = 0  # real (non-pad) tokens on this rank since the last log
        for batch in self.loader:
            pos = self.batch_sampler.position
            group = min(accum, n_micro - (pos // accum) * accum)  # last group may be shorter
            last_in_group = (pos % accum) == group - 1
            task_id = batch["task_id"]
            if cfg.sampler.check_task_agreement:
                check_task_agreement(task_id, pos)
            self.group_tasks.add(task_id)
            self.tokens_seen += int(batch["attention_mask"].sum())  # CPU tensor: no GPU sync
            loss = self._forward_backward(batch, group, pos % accum == 0, last_in_group)
            self._emit_train_log()  # the step logged last, now that this one is queued behind it
            self.batch_sampler.advance()
            sums.loss += loss.detach() / group
            sums.task_loss[task_id] += loss.detach()
            sums.task_count[task_id] += 1
            self.state.samples_seen += self.global_batch
            if not last_in_group:
                continue
            self._optimizer_step()
            self.state.global_step += 1
            sums.steps += 1
            bar.update(1)
            step = self.state.global_step
            if step % cfg.train.log_steps == 0:
                self._queue_train_log(bar, sums)
            epoch_done = self.batch_sampler.position >= n_micro
            if epoch_done:  # a checkpoint taken now must resume at the start of the next epoch
                self.state.epoch += 1
                self.batch_sampler.set_epoch(self.state.epoch)
            if self._after_step(epoch_done):
                return True
            if epoch_done:
                return False
        return False

    def _forward_backward(self, batch: dict, group: int, first_in_group: bool,
                          last_in_group: bool) -> torch.Tensor:
        """One micro-batch; gradients are averaged over the accumulation group."""
        acc = self.accelerator
        inputs = _model_inputs(batch, acc.device)
        if self.graphs is not None:
            task_id = inputs.pop("task_id")
            return self.graphs.run(inputs, task_id, group, first=first_in_group)
        if self.engine is not None:
            loss, _ = self.engine(**inputs)  # the boundary is step() (unmanaged accumulation)
            self.engine.backward(loss / group, scale_wrt_gas=False)
            return loss
        sync = nullcontext() if last_in_group else acc.no_sync(self.model)
        with sync, acc.autocast():
            loss, _ = self.model(**inputs)
            acc.backward(loss / group)
        if self.masters is not None and self.world_size == 1:
            # Summed over the group in fp32; under DDP the bf16 gradients must stay in .grad
            # until the group's all-reduce (they are summed there in bf16).
            self.masters.take_grads()
        return loss

    def _optimizer_step(self) -> None:
        idle = {i for i in range(len(self.task_names))} - self.group_tasks
        self.group_tasks = set()
        if self.engine is not None:
            zero.engine_step(self.engine, self.optimizer, idle)  # clipping: in the engine
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.module)
            return
        if self.masters is not None and self.world_size > 1:
            self.masters.take_grads()  # DDP: the group's all-reduced bf16 gradients, only now
        hide = self.graphs.idle_heads_detached(
            {t: self._head_trainables(t) for t in idle}) \
            if self.graphs is not None else nullcontext()
        with hide:
            self._clip_and_step()
        if self.masters is not None:  # flat segments: the flat step wrote their weights
            self.masters.copy_to_model(flat=False)
        self.scheduler.step()
        # None, not zero: an idle head's grad stays None, so AdamW leaves it untouched.
        # (CUDA graphs write fixed .grad tensors: the first micro-step of a group overwrites
        # the encoder's, heads' are zeroed here; idle heads are hidden above.)
        if self.graphs is not None:
            self.graphs.zero_head_grads()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self._settle_optimizer()
            self.ema.update(self._fp32_weights())

    def _head_trainables(self, task_id: int) -> list[torch.Tensor]:
        params = list(self.module.heads[str(task_id)].parameters())
        return params if self.masters is None else [self.masters.master(p) for p in params]

    def _clip_and_step(self) -> None:
        max_norm = self.cfg.train.max_grad_norm
        if not (max_norm and self.cfg.train.fused_clipping):
            if max_norm:
                if self.masters is not None:  # clip_grad_norm_ reads the masters' fp32 .grad
                    self.masters.grads_to_fp32()
                self.accelerator.clip_grad_norm_(self._trainable(), max_norm)
            self.optimizer.step()
            return
        inner = self.optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
        if self.masters is None:
            inner.grad_scale = clip_divisor(
                [p.grad for p in self._trainable() if p.grad is not None], max_norm)
        elif self.cfg.train.triton_clip_norm:  # the flat buffers by mtl_dist's Triton kernel
            inner.grad_scale = clip_divisor(self.masters.loose_grads(), max_norm,
                                            flat=self.masters.flat_grads())
        else:
            inner.grad_scale = clip_divisor(self.masters.grads_for_norm(), max_norm)
        try:
            self.optimizer.step()
        finally:
            del inner.grad_scale

    def _after_step(self, epoch_done: bool) -> bool:
        """Evaluate, save, decide to stop: at step boundaries only."""
        cfg, step = self.cfg, self.state.global_step
        finished = step >= self.total_steps
        want_eval = (cfg.train.eval_steps and step % cfg.train.eval_steps == 0) or \
            (epoch_done and cfg.train.eval_at_epoch_end) or finished
        interrupted = self._interrupted(step)
        stop = finished or interrupted
        periodic_save = cfg.checkpoint.save_steps and step % cfg.checkpoint.save_steps == 0
        if epoch_done or stop or want_eval or periodic_save:
            self._settle_optimizer()
            self._emit_train_log()  # records in step order; a checkpoint's log_history complete
        # A preempted job has seconds left: checkpoint first, evaluate after the resume.
        want_eval = want_eval and self._has_dev_labels()
        self.state.pending_eval = bool(want_eval and self.stop_reason == "preempted")
        if want_eval and not self.state.pending_eval:
            stop = self._evaluate_for_best(step) or stop
        if stop and not interrupted and self._loss_sums.steps:  # the run's last steps
            self._queue_train_log(self._bar, self._loss_sums)
            self._emit_train_log()
        want_save = periodic_save or (epoch_done and cfg.checkpoint.save_at_epoch_end) or \
            (stop and self.save_on_stop)
        if want_save:
            self.save_checkpoint()
        if want_eval or want_save:  # the next record's rates: training time only
            self._log_clock = (time.perf_counter(), self.state.samples_seen)
            self.tokens_seen = 0
        return stop

    def _has_dev_labels(self) -> bool:
        return bool(self.dev_data) and any(len(t.labels) for t in self.dev_data)

    def _evaluate_for_best(self, step: int) -> bool:
        """Evaluate, update early stopping and best/; True when early stopping says stop."""
        cfg = self.cfg
        result = self.evaluate()
        self.state.score, self.state.last_eval_step = result["score"], step
        value = result["score"] if cfg.train.metric_for_best != "loss" else result["loss"]
        if math.isnan(value):
            self._say(f"eval at step {step}: {cfg.train.metric_for_best} is NaN (diverged?): "
                      "not taken as a best")
        improved = self.early.update(value, step)
        if improved and cfg.checkpoint.save_best and self._beats_saved_best(step):
            self._save_best(result)
            self.best_damaged = False
        elif self.best_damaged and cfg.checkpoint.save_best and not math.isnan(value):
            # best/ unusable: this evaluation's model in its place, under its own score (the
            # line's best, of an earlier step, is in no file any more)
            self._save_best(result, score=value)
            self.saved_best, self.best_damaged = value, False
        if not self.early.should_stop:
            return False
        self.stop_reason = "early_stopping"
        if self.accelerator.is_main_process:
            print(f"early stopping at step {step}: no improvement in "
                  f"{self.early.bad_evals} evaluations (best {self.early.best_score} "
                  f"at step {self.early.best_step})")
        return True

    def _interrupted(self, step: int) -> bool:
        """A stop signal on any rank (agreed by all-reduce), or this invocation's step budget."""
        cfg = self.cfg.train
        if step % cfg.preemption_check_steps == 0 and \
                self.preemption.should_stop():
            self.stop_reason = "preempted"
            return True
        if cfg.stop_after_steps and step - self.start_step >= cfg.stop_after_steps:
            self.stop_reason = "stop_after_steps"
            return True
        return False

    def save_checkpoint(self) -> Path:
        # ZeRO-3: the EMA's full shadow is gathered to rank 0 (collective) for the save.
        with self.ema.for_checkpoint(self.module) if self.ema is not None else nullcontext():
            path = self.ckpt.save(self.state.global_step, self.app_state(),
                                  self.state.state_dict(), manifest=self.manifest(),
                                  engine=self.engine)
        self._log_checkpoint_timings()
        return path

    def _log_checkpoint_timings(self) -> None:
        """With checkpoint.async_save: one `checkpoint` record per finished save, at its step."""
        timings = self.ckpt.take_timings()  # drained either way
        if not self.cfg.checkpoint.async_save:
            return
        for t in timings:
            self.tracking.log("checkpoint", t["step"], {
                "checkpoint/blocking_s": t["blocking_s"],
                "checkpoint/background_s": t["background_s"],
                "checkpoint/async": t["async"]})

    def _queue_train_log(self, bar, sums: LossSums) -> None:
        """Start this step's train record (the mean over the steps since the last one: fewer
        than log_steps after a resume, or at the run's end): its losses leave the GPU without
        a host sync; the record is written by `_emit_train_log` (at once without
        `train.async_log`)."""
        loss_sum, task_loss, task_count = sums.loss, sums.task_loss, sums.task_count
        if self.world_size > 1:  # the loss of the global batch: the mean over ranks
            means = self.accelerator.reduce(torch.cat([loss_sum.view(1), task_loss]), "mean")
            loss_sum, task_loss = means[0], means[1:]
        values = torch.cat([(loss_sum / max(1, sums.steps)).view(1),
                            task_loss / task_count.clamp(min=1), task_count])
        sums.reset()
        self._emit_train_log()  # an earlier one still waiting (none in the loop's order)
        # this rank's real tokens x world size (ranks see equal batch counts)
        self._queued_log = QueuedTrainLog.queue(
            values, step=self.state.global_step, lr=self.scheduler.get_last_lr()[0],
            epoch=self.state.epoch, samples_seen=self.state.samples_seen,
            tokens=self.tokens_seen * self.world_size)
        self._log_bar = bar
        self.tokens_seen = 0
        if not self.cfg.train.async_log:
            self._emit_train_log()

    def _emit_train_log(self) -> None:
        """Write the queued train record, if any: rates over the time since the previous one
        (both read once their step's GPU work had finished)."""
        queued, self._queued_log = self._queued_log, None
        if queued is None:
            return
        read = queued.read()
        now = time.perf_counter()
        t0, samples0 = self._log_clock
        self._log_clock = (now, queued.samples_seen)
        elapsed = now - t0
        n = len(self.task_names)
        values = {"train/loss": read[0], "lr": queued.lr, "epoch": queued.epoch,
                  "samples_per_s": (queued.samples_seen - samples0) / elapsed,
                  "tokens_per_s": queued.tokens / elapsed}
        for name, value, count in zip(self.task_names, read[1:1 + n], read[1 + n:], strict=True):
            if count:
                values[f"train/loss/{name}"] = value
        self.state.log_history.append({"step": queued.step, **values})
        self.tracking.log("train", queued.step, values)
        self._log_bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['lr']:.2e}",
                                  sps=f"{values['samples_per_s']:.0f}")

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """Every weight on rank 0 (ZeRO-3 gathers its partitions: a collective call)."""
        if self.engine is not None and self.cfg.train.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        if self.masters is not None:  # the fp32 weights (EMA's when on), not the bf16 copy
            exact = zip(self.ema.names, self.ema.shadow, strict=True) if self.ema is not None \
                else self.masters.named_parameters()
            state.update({name: t.detach().cpu() for name, t in exact})
        return state

    def _say(self, text: str) -> None:
        """One line on the main process's console."""
        if self.accelerator.is_main_process:
            print(f"[mtl_dist] {text}", flush=True)

    def _saved_best_score(self) -> float | None:
        """best/'s score, if it was chosen by this run's `metric_for_best` (a score and a loss
        do not compare: best/ of another metric is replaced by this run's first best)."""
        why = self.ckpt.best_damage()
        self.best_damaged = why is not None
        if why is not None and self.cfg.checkpoint.save_best:
            self._say(f"best/ is damaged ({why}): it has no score to beat; this run's first "
                      f"evaluation replaces it, and it moves to {self.output_dir / 'abandoned'}/")
        score = self.ckpt.best_score()
        metric = self.ckpt.best_info().get("metric_for_best")
        if score is None or metric in (None, self.cfg.train.metric_for_best):
            return score
        if self.cfg.checkpoint.save_best:
            self._say(f"best/ was chosen by metric_for_best={metric}, this run uses "
                      f"{self.cfg.train.metric_for_best}: its next best replaces it")
        return None

    def _beats_saved_best(self, step: int) -> bool:
        """This run's new best must also beat best/ on disk, which may hold a better model
        than the checkpoint this run resumed from knows of (a save killed after best/ was
        written, then a resume from the checkpoint before)."""
        score, saved = self.early.best_score, self.saved_best
        if score is None or improves_on(score, saved, self.ckpt.greater_is_better):
            self.saved_best = score
            return True
        self._say(f"eval at step {step}: {score:.6g} is this run's best but not best/'s "
                  f"({saved:.6g}); best/ kept")
        return False

    def _write_model_run_files(self) -> None:
        """OUTPUT/encoder_config.json and OUTPUT/tokenizer/: what `ckpt export` needs beside a
        periodic checkpoint's weights for a `from_pretrained` dir (best/ holds its own)."""
        self.ckpt.write_run_file("encoder_config.json",
                                 self.module.encoder.config.to_json_string())
        if not self.accelerator.is_main_process:
            return
        with tempfile.TemporaryDirectory() as tok_dir:
            self.tokenizer.save_pretrained(tok_dir)
            for path in Path(tok_dir).iterdir():
                self.ckpt.write_run_file(f"tokenizer/{path.name}", path.read_bytes())

    def _save_best(self, result: dict, score: float | None = None) -> None:
        """best/ from the current weights; `score`: its own when it is not the line's best
        (early stopping's), as when it replaces a damaged best/."""
        model = self.module
        ctx = self.ema.applied(model) if self.ema is not None else nullcontext()
        with ctx, tempfile.TemporaryDirectory() as tok_dir:
            state = self._full_model_state()
            if self.accelerator.is_main_process:
                self.tokenizer.save_pretrained(tok_dir)
            extra = {"config.yaml": saved_config_yaml(self.cfg),
                     "encoder_config.json": model.encoder.config.to_json_string(),
                     "labels.json": json.dumps(self.label_maps, indent=1),
                     "metrics.json": json.dumps(_strip_cm(result), indent=1)}
            extra.update({f"tokenizer/{p.name}": p for p in Path(tok_dir).iterdir()})
            self.ckpt.save_best(self.state.global_step,
                                self.early.best_score if score is None else score, state,
                                extra_files=extra,
                                metadata={"metric_for_best": self.cfg.train.metric_for_best,
                                          "config_hash": config_hash(self.cfg),
                                          "tokenizer": self.tokenizer_identity,
                                          "ema": self.ema is not None})

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _run_split(self, tasks: list[mdata.TokenizedTask]) -> dict[str, dict]:
        """Forward every sample of every task once across ranks; gather exact per-task outputs."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        model = self.module
        was_training = model.training
        model.eval()
        bs = self.cfg.train.effective_eval_batch_size()
        outputs, dataset = {}, mdata.MultiTaskDataset(tasks)
        for task_id, task in enumerate(tasks):
            n = len(task.labels)
            shard = eval_shard(n, self.rank, self.world_size)
            local: list[tuple[int, list[float], float]] = []
            # Every rank runs the same number of batches (ZeRO-3 gathers weights per forward):
            # a rank whose shard is shorter repeats a sample and drops the result.
            for start in range(0, math.ceil(n / self.world_size), bs):
                idx = shard[start:start + bs]
                keep = len(idx)
                if keep == 0:
                    idx = np.zeros(1, dtype=np.int64)
                batch = self.collate([dataset[dataset.offsets[task_id] + int(i)] for i in idx])
                with acc.autocast():
                    _, logits = model(**_model_inputs(batch, acc.device, with_labels=False))
                probs = torch.softmax(logits.float(), dim=-1).cpu()
                labels = batch["labels"]
                losses = torch.nn.functional.cross_entropy(
                    logits.float().cpu(), labels.clamp(min=0), reduction="none")
                local.extend((int(i), p.tolist(), float(lo))
                             for i, p, lo in list(zip(idx, probs, losses, strict=True))[:keep])
            gathered = sorted(gather_object(local) if self.world_size > 1 else local)
            outputs[task.name] = {"index": [g[0] for g in gathered],
                                  "probs": [g[1] for g in gathered],
                                  "loss": [g[2] for g in gathered]}
        model.train(was_training)
        return outputs

    def evaluate(self, tasks: list[mdata.TokenizedTask] | None = None) -> dict[str, Any]:
        """Per-task metrics + run score on the dev sets (with EMA weights when enabled)."""
        tasks = self.dev_data if tasks is None else tasks
        ema = getattr(self, "ema", None)
        with ema.applied(self.module) if ema is not None else nullcontext():
            outputs = self._run_split(tasks)
        per_task, losses = {}, []
        for task in tasks:
            out = outputs[task.name]
            if not out["index"] or (task.labels < 0).all():
                continue
            preds = np.argmax(np.asarray(out["probs"]), axis=-1)
            per_task[task.name] = task_metrics(task.labels[out["index"]], preds,
                                               len(self.label_maps[task.name]))
            per_task[task.name]["loss"] = float(np.mean(out["loss"]))
            losses.extend(out["loss"])
        cfg_tasks = {t.name: t for t in self.cfg.tasks}
        score = run_score(per_task, {t: cfg_tasks[t].metric for t in per_task},
                          {t: cfg_tasks[t].score_weight for t in per_task}) if per_task else float("nan")
        result = {"score": score, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "tasks": per_task}
        step = self.state.global_step
        self.tracking.log_eval(step, result, self.label_maps)
        if self.accelerator.is_main_process:
            tqdm.write(format_eval_line(step, per_task, score))
        return result

    def predict(self, split: str = "test") -> dict[str, list[dict]]:
        """Per task, one record per row: id, predicted label, probabilities (rank 0 gets all)."""
        tasks = mdata.load_task_data(self.cfg, self.tokenizer, split, self.label_maps,
                                     with_labels=False)  # unread: a predicted file may hold any
        outputs = self._run_split(tasks)
        records = {}
        for task in tasks:
            out, labels = outputs[task.name], self.label_maps[task.name]
            records[task.name] = [
                {"id": task.ids[i], "label": labels[int(np.argmax(p))], "probs": p}
                for i, p in zip(out["index"], out["probs"], strict=True)]
        return records

    def load_weights(self, path: str | Path) -> None:
        """Model weights (and nothing else) from best/ or a checkpoint directory; refused in
        one line when its tasks, labels or shapes are not this run's (a label order that
        differs would load fine and predict the wrong classes)."""
        check_label_maps_of(path, self.label_maps)  # in the config's order, as the heads
        check_pairs_of(path, {t.name: t.pair for t in self.cfg.tasks})
        check_head_of(path, self.cfg.model.head)
        check_tokenizer_of(path, self.tokenizer_identity,
                           "model.tokenizer" if self.cfg.model.tokenizer else "model.pretrained")
        state = self.ckpt.load_model_state(path)
        load_state_checked(self.module, state, Path(path))
        if self.masters is not None:
            self.masters.load_state_dict(state)
        # the step its evaluation line names: the weights', not 0
        self.state.global_step = int(read_manifest(path).get("step") or 0)


def _trainer_state_problem(state: Any, step: Any) -> str | None:
    """What makes a loaded trainer_state.json unfit to resume from (its checksum matched: it
    was edited and re-sealed), or None: a traceback, or a run going on at a wrong step.
    `step`: the manifest's."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, expected a JSON object"
    for key in ("global_step", "epoch", "samples_seen"):
        if key not in state and key != "samples_seen":
            return f"has no '{key}'"
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"'{key}' is {json.dumps(value)}, expected an integer >= 0"
    if isinstance(step, int) and state["global_step"] != step:
        return f"'global_step' is {state['global_step']}, the manifest's step {step}"
    return None


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The LR factor at `step` of transformers' schedule `kind` (get_linear_schedule_with_warmup,
    get_cosine_schedule_with_warmup with half a cosine, get_constant_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total - step) / max(1, total - warmup))


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """A compact description of the model's shape: a checkpoint must match it to load."""
    cfg = model.encoder.config
    # the head kind first: a model.head change is named as such, not by the parameter count
    return {"head": model.head_kind,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size, "num_labels": list(model.num_labels),
            # ZeRO-3 leaves empty placeholders in the module: count the real sizes.
            "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}


PACKED_KEYS = ("position_ids", "cu_seqlens", "unpack_index")  # data.collate_packed's extras


def _model_inputs(batch: dict, device: torch.device, with_labels: bool = True) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "token_type_ids": batch["token_type_ids"]}
    inputs.update({k: batch[k] for k in PACKED_KEYS if k in batch})
    if with_labels:
        inputs["labels"] = batch["labels"]
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    inputs["task_id"] = batch["task_id"]
    return inputs


def _strip_cm(result: dict) -> dict:
    return {"score": result["score"], "loss": result["loss"],
            "tasks": {t: {k: v for k, v in m.items()} for t, m in result["tasks"].items()}}
