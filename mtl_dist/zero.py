"""DeepSpeed ZeRO, driven through its engine directly: one code path on CPU (gloo) and GPUs.

accelerate cannot drive DeepSpeed on CPU (FACTS.md: every rank believes it is rank 0), so the
trainer keeps accelerate for devices, autocast and the process group, and hands the model to
`deepspeed.initialize` itself. A DeepSpeed JSON may say "auto" for anything the run config
already states; batch sizes are stated once, in the run config. EMA works at every stage
(under ZeRO-3 it shadows each rank's parameter partitions: see `mtl_dist.ema`).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mtl_dist.config import deepspeed_json_stage, read_deepspeed_json, set_elsewhere
from mtl_dist.errors import ConfigError

ACCELERATE_DS_ENV = "ACCELERATE_USE_DEEPSPEED"
ACCELERATE_DS_FILE_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"


def adopt_accelerate_launch(cfg) -> None:
    """`accelerate launch --use_deepspeed --deepspeed_config_file X`: take X as our DeepSpeed
    config, and keep accelerate out of DeepSpeed (its CPU path gets the ranks wrong)."""
    if os.environ.get(ACCELERATE_DS_ENV, "").lower() != "true":
        return
    os.environ.pop(ACCELERATE_DS_ENV)
    path = os.environ.get(ACCELERATE_DS_FILE_ENV)
    if path and not cfg.train.deepspeed_config:
        cfg.train.deepspeed_config = str(Path(path).resolve())
        set_elsewhere(cfg, "train.deepspeed_config",
                      f"accelerate launch --deepspeed_config_file {path}")
    if cfg.train.zero_stage == 0:
        cfg.train.zero_stage = deepspeed_json_stage(cfg.train.deepspeed_config) \
            if cfg.train.deepspeed_config else 2


# Sections the trainer owns: it builds AdamW from train.lr/weight_decay/adam_* and the linear
# schedule from train.warmup_*; DeepSpeed would build others beside them, which never act.
_OWNED_SECTIONS = {"optimizer": "train.lr, train.weight_decay and train.adam_*",
                   "scheduler": "train.warmup_ratio/warmup_steps (linear decay)"}


def build_ds_config(cfg, world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed config: the JSON's values, with "auto" (or absent) filled from the run.
    `world_size=None` (`mtl-dist check`, before any launch): all but the total batch."""
    ds = read_deepspeed_json(cfg.train.deepspeed_config) if cfg.train.deepspeed_config else {}
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config: {cfg.train.deepspeed_config} holds a JSON "
                          f"{type(ds).__name__}, expected an object")
    for section, instead in _OWNED_SECTIONS.items():
        if section in ds:
            raise ConfigError(f"train.deepspeed_config: its '{section}' section would not be "
                              f"used (the trainer's comes from {instead}): remove it")
    t = cfg.train
    filled = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
    }
    if world_size is not None:
        filled["train_batch_size"] = (t.per_device_batch_size * t.gradient_accumulation_steps
                                      * world_size)
    # The trainer owns the accumulation boundary: a step is its group of micro-batches (one
    # task each, fewer at an epoch's end), and step() finalizes every gradient accumulated
    # since the last one. Under DeepSpeed's counter (managed mode) with optimizer offload, a
    # head used only before the group's last micro-batch lost its gradient for that step.
    filled["managed_gradient_accumulation"] = False
    for key, value in filled.items():
        _fill(ds, key, value, key)
    zero = ds.setdefault("zero_optimization", {})
    _fill(zero, "stage", t.zero_stage, "zero_optimization.stage")
    _check_zero_section(zero)
    if zero["stage"] == 1 and zero.get("overlap_comm") is True:
        # stage 1 reduces once, at the trainer's step (DeepSpeed asserts, on every rank)
        raise ConfigError("train.deepspeed_config: 'zero_optimization.overlap_comm' true needs "
                          "ZeRO stage 2 or 3 (stage 1 reduces once per step, at the step): "
                          "remove it")
    for name in ("bf16", "fp16"):
        _fill(ds.setdefault(name, {}), "enabled", t.mixed_precision == name, f"{name}.enabled")
    ds.setdefault("zero_allow_untested_optimizer", True)  # a plain torch AdamW, by design
    # ...also with an offloaded optimizer: DeepSpeed would insist on its DeepSpeedCPUAdam
    # (a client optimizer on CPU states steps correctly, and resumes bit-exactly)
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _check_zero_section(zero: dict) -> None:
    """The JSON's zero_optimization against DeepSpeed's own model of it: a misspelled key
    (`stag`) passed `check` and failed at the engine's start on every rank, as a pydantic
    traceback. Where DeepSpeed is not installed, the run's start says so anyway."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError
    except ImportError:
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        why = "not a DeepSpeed key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"train.deepspeed_config: 'zero_optimization.{where}': {why} "
                          f"(got {_show_json(first.get('input'))})") from None


def _show_json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _fill(section: dict, key: str, value: Any, dotted: str) -> None:
    """Set "auto"/absent values; a stated value must agree with the run config."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(f"train.deepspeed_config: '{dotted}' is {current!r} but the run "
                          f"config implies {value!r}; set it to \"auto\"")


def choose_accelerator(device: torch.device) -> None:
    """DS_ACCELERATOR=cpu for a run on the CPU, before anything imports DeepSpeed (its first
    import fixes the accelerator for the process: the trainer imports it before the process
    group, see make_accelerator). Else, on a GPU machine, a `train.device=cpu` run got
    DeepSpeed's CUDA accelerator. Where DeepSpeed has fixed one already (imported earlier in
    this process), it must be the run's: one line otherwise, not a model on the GPU fed from
    the CPU."""
    asked = os.environ.get("DS_ACCELERATOR", "unset")
    if device.type == "cpu":
        _set_env_default("DS_ACCELERATOR", "cpu")
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    picked = getattr(real, "ds_accelerator", None)
    if picked is not None and picked.device_name() != device.type:
        raise ConfigError(
            f"DeepSpeed runs on '{picked.device_name()}' (fixed when this process first imported "
            f"it; DS_ACCELERATOR={asked}), this run on '{device.type}': set "
            f"DS_ACCELERATOR={device.type} before anything imports DeepSpeed")


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict,
               device: torch.device):
    """A DeepSpeed engine over our model and our torch AdamW, on the existing process group."""
    choose_accelerator(device)  # (a check where the trainer chose it, in make_accelerator)
    if device.type == "cpu":
        skip_cpu_shm_build()
    _ensure_process_group(device)
    import deepspeed

    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                      config=ds_config, dist_init_required=False)
    return engine, ds_optimizer


def skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce the first time it starts
    (minutes on 2 cores, with a C++ toolchain). gloo does the same job: skip the build
    (`MTL_DIST_DS_SHM=1` keeps it)."""
    if os.environ.get("MTL_DIST_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_ENV_SET_HERE: set[str] = set()  # undone by end_process_group


def _set_env_default(name: str, value: str) -> None:
    if name not in os.environ:
        os.environ[name] = value
        _ENV_SET_HERE.add(name)


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process (plain `python`)."""
    import torch.distributed as dist

    _set_env_default("LOCAL_RANK", "0")  # DeepSpeed asserts it is set, and reads it while stepping
    if dist.is_initialized():
        return
    # an address of its own, not MASTER_ADDR/MASTER_PORT set in os.environ: child processes
    # inherited them and took themselves for ranks of this group (EADDRINUSE on its port)
    address = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:" \
        f"{os.environ.get('MASTER_PORT') or free_port()}"
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", init_method=address,
                            rank=0, world_size=1)


def end_process_group(keep_group: bool = False) -> None:
    """At a trainer's close (a ZeRO set-up that failed part way too): destroy the process
    group through DeepSpeed, where DeepSpeed's comm is up, so that it forgets the groups it
    cached from it (torch's own destroy, as accelerate's end_training does it, left them: the
    next engine in this process failed on a group "not registered"); `keep_group` where
    accelerate keeps it (a fork launch). And undo the variables set for DeepSpeed here (with
    LOCAL_RANK, a `mtl-dist train` started later from this process took itself for rank 0 of
    a launch; with DS_ACCELERATOR=cpu, one on a GPU ran DeepSpeed on the CPU). DeepSpeed read
    both already."""
    import torch.distributed as dist

    try:
        comm = sys.modules.get("deepspeed.comm.comm")  # its `cdb`: the package's copy stays None
        if not keep_group and dist.is_initialized() and getattr(comm, "cdb", None) is not None:
            comm.destroy_process_group()
            let_go_of_destroyed_groups()
    finally:
        undo_env()


def undo_env() -> None:
    """Remove the variables set here for DeepSpeed (see end_process_group)."""
    for name in _ENV_SET_HERE:
        os.environ.pop(name, None)
    _ENV_SET_HERE.clear()


def let_go_of_destroyed_groups() -> None:
    """Drop what DeepSpeed's objects, and the parameters it converted, still hold of the
    process groups just destroyed (engine, ZeRO optimizer and its list of groups, each
    parameter's `_dp_group` / `ds_process_group`, ZeRO-3's `Init`, which closures on the
    parameters keep). Why: `destroy_process_group()` only unregisters a gloo group; its threads
    end when its last reference goes, and these held it to interpreter exit, where a gloo
    worker needing the GIL could abort the rank (see collectives.release_ddp_group). A sweep
    of the live objects, not a list of attributes: DeepSpeed keeps groups in many places,
    differently per stage and version. Every group of the process is destroyed here, so no
    live one is touched. The last reference goes through torch's holder, which lets go of
    the GIL while the group's threads end."""
    import gc

    from torch.distributed import ProcessGroup

    def is_groups(value) -> bool:
        if isinstance(value, (list, tuple)):
            return bool(value) and all(isinstance(v, ProcessGroup) for v in value)
        return isinstance(value, ProcessGroup)

    def may_hold_groups(kind: type) -> bool:
        module = kind.__module__  # (a descriptor, for some extension types)
        return issubclass(kind, torch.Tensor) or (isinstance(module, str)
                                                   and module.startswith("deepspeed."))

    for obj in gc.get_objects():
        # by type alone: isinstance() reads `__class__` of an object whose type does not
        # match, and some objects warn when read (torch.distributed.reduce_op)
        if not may_hold_groups(type(obj)):
            continue
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            for name in [name for name, value in attrs.items() if is_groups(value)]:
                attrs[name] = None  # the instance's own dict: no property setter runs


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_step(engine, ds_optimizer, idle_tasks: set[int]) -> None:
    """One optimizer step of the ZeRO engine over the micro-batches since the last one:
    the idle tasks' heads left exactly as they were, every head's ZeRO buffers cleared after.
    Param groups carry "head": their task id, or None for the encoder."""
    groups = ds_optimizer.optimizer.param_groups
    heads = {i for i, g in enumerate(groups) if g.get("head") is not None}
    with frozen_groups(ds_optimizer, {i for i in heads if groups[i]["head"] in idle_tasks}):
        engine.step()
    clear_head_grads(ds_optimizer, heads)


@contextmanager
def frozen_groups(ds_optimizer, group_ids: set[int]):
    """Leave whole param groups untouched by one ZeRO step: lr 0 and their Adam state restored.

    ZeRO gives an idle head a zero gradient instead of None, so AdamW would still decay its
    moments and apply weight decay; single-GPU training leaves it exactly as it was.
    """
    inner = ds_optimizer.optimizer
    groups = inner.param_groups
    # ZeRO-1/2 keep our group dicts with their flat fp32 partitions as params; ZeRO-3 swaps
    # each sub-group's flat partition into its group only while stepping it.
    sub_to_group = getattr(ds_optimizer, "sub_group_to_group_id", None)
    if sub_to_group:
        flat = ds_optimizer.fp32_partitioned_groups_flat
        params = [flat[sub] for sub in _stage3_sub_groups(ds_optimizer, group_ids)]
    else:
        params = [p for i in group_ids for p in groups[i]["params"]]
    saved_lr = {i: groups[i]["lr"] for i in group_ids}
    saved_state = [(p, {k: (v.clone() if torch.is_tensor(v) else v)
                        for k, v in inner.state.get(p, {}).items()}) for p in params]
    for i in group_ids:
        groups[i]["lr"] = 0.0
    try:
        yield
    finally:
        for i, lr in saved_lr.items():
            groups[i]["lr"] = lr
        for p, state in saved_state:
            if not state:
                inner.state.pop(p, None)
                continue
            for k, v in state.items():
                current = inner.state[p].get(k)
                if torch.is_tensor(current):
                    current.copy_(v)
                else:
                    inner.state[p][k] = v


def clear_head_grads(ds_optimizer, group_ids: set[int]) -> None:
    """After every ZeRO step: zero these groups' (the heads') persistent gradient buffers.

    Where ZeRO keeps a gradient across micro-steps in a buffer of its own (every ZeRO-3
    partition; ZeRO-1/2's CPU accumulators under optimizer offload), it copies a gradient in
    on the first micro-step of a step and adds on the later ones, assuming every parameter
    gets a gradient every micro-step. A head does not: one first used at a later micro-step
    (accumulation often puts two tasks in one step) added to its gradient from the last step
    that used it, and under ZeRO-3 an idle head's stale partition entered the global norm
    used for clipping. A resume starts from zeroed buffers, so either made it train
    differently from the uninterrupted run, and from DDP."""
    partitions = getattr(ds_optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
                         None)
    if partitions is not None:
        for sub in _stage3_sub_groups(ds_optimizer, group_ids):
            for param in ds_optimizer.fp16_groups[sub]:
                grad = partitions.get(param.ds_id)
                if grad is not None:
                    grad.zero_()
        return
    cpu_accumulators = getattr(ds_optimizer, "accumulated_grads_in_cpu", None)
    if not cpu_accumulators:  # no offload (or DeepSpeed's BF16_Optimizer): nothing kept
        return
    for group in group_ids:
        for param in ds_optimizer.bit16_groups[group]:
            buffer = cpu_accumulators.get(ds_optimizer.get_param_id(param))
            if buffer is not None:
                buffer.zero_()


def _stage3_sub_groups(ds_optimizer, group_ids: set[int]) -> list[int]:
    """ZeRO-3's sub-groups (flat partitions) of these param groups; [] under ZeRO-1/2."""
    sub_to_group = getattr(ds_optimizer, "sub_group_to_group_id", None) or {}
    return [sub for sub, group in sub_to_group.items() if group in group_ids]
