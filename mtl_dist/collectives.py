"""Host-side agreement between ranks: a gloo process group beside the training backend.

Why: a flag or a pair of integers all-reduced over NCCL is a GPU tensor, and reading it back
(`.item()`) waits for every kernel queued before it: done every step (the preemption check,
the task guard), it drained each rank's GPU queue once per step. Over gloo the values stay in
host memory and the GPU queue is left alone.
"""

from __future__ import annotations

import atexit
from contextlib import suppress
from datetime import timedelta

import torch.distributed as dist

_GROUP: list = []  # the one gloo group of this process, made on first use
_TIMEOUT: list[timedelta] = []  # set_host_timeout's; torch's default (30 minutes) otherwise


def set_host_timeout(seconds: float) -> None:
    """How long the host group's collectives wait for a missing rank (the trainer passes
    `train.collective_timeout_s`, as for the training backend): a group made without one
    waited torch's 30 minutes, so a rank stuck or gone before a per-step check held the
    others that long. For groups made from now on."""
    _TIMEOUT[:] = [timedelta(seconds=seconds)]


def host_group():
    """The gloo group of all ranks; None without torch.distributed (or with a single rank).

    Made on first use, which is a collective call: every rank must reach its first use at the
    same point (the trainer's per-step checks do: same step on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _GROUP and not _registered(_GROUP[0]):  # destroyed with its world: a new run
        _GROUP.clear()
    if not _GROUP:
        _GROUP.append(dist.new_group(backend="gloo", timeout=_TIMEOUT[0] if _TIMEOUT else None))
    return _GROUP[0]


def release_host_group() -> None:
    """Destroy the gloo group and drop this module's reference to it. Why: a group still
    referenced here outlives `destroy_process_group()` and is freed during interpreter
    finalization, where gloo's teardown aborted a rank ("terminate called without an active
    exception", SIGABRT) after a finished run."""
    if not _GROUP:
        return
    group = _GROUP.pop()
    if _registered(group):
        dist.destroy_process_group(group)


def import_before_the_process_group(with_deepspeed: bool = False) -> None:
    """torch.distributed.nn.functional (which DDP's constructor imports), and DeepSpeed's
    `deepspeed.comm.torch` (any DeepSpeed import), take the default process group as their
    functions' default argument when first imported with one up: they held the group past
    `destroy_process_group()` to interpreter exit (see release_ddp_group). Imported before the
    group exists, they hold None. DeepSpeed only where asked (`with_deepspeed`: to train under
    ZeRO, or to read ZeRO partitions, on the CPU whichever accelerator it picks): a heavy
    import, which also fixes DeepSpeed's accelerator for the process (DS_ACCELERATOR, else
    auto-detected) and sets PYTORCH_NVML_BASED_CUDA_CHECK=1 unless set."""
    import torch.distributed.nn.functional  # noqa: F401

    if with_deepspeed:
        with suppress(ImportError):  # loading the weights then fails on the same import
            import deepspeed.comm.torch  # noqa: F401


def release_ddp_group(ddp) -> None:
    """Let go of the process group a DistributedDataParallel wrapper holds, after
    `destroy_process_group()`, which for gloo only unregisters it (gloo's shutdown does
    nothing: the group's destructor joins its threads). Where the group stays registered (a
    fork launch keeps it), only the wrapper's reference goes. Why: the wrapper kept the group,
    its gloo threads and sockets, to interpreter exit; a gloo worker that freed a finished
    collective's tensors there needed the GIL, and the exiting interpreter ended that thread
    inside a destructor: "terminate called without an active exception", SIGABRT, after a
    refused resume's one-line error. The reducer and logger go first: their C++ destructors
    hold the GIL, and with the group's last reference one joined a gloo worker that waited for
    it (a hang); the last reference goes here, through torch's holder, which lets go of the
    GIL while the group's threads end. That join waits for a collective still in flight (one
    a live peer has not joined yet: up to the group's timeout), as interpreter exit did."""
    group = ddp.process_group
    ddp.reducer = ddp.logger = ddp.process_group = None
    del group


def _registered(group) -> bool:
    """Still one of torch's live groups (`destroy_process_group()` unregisters them all;
    `get_backend` refuses a group it no longer knows)."""
    try:
        dist.get_backend(group)
    except (ValueError, RuntimeError):
        return False
    return True


atexit.register(release_host_group)  # for runs that end without Trainer.close(); else a no-op
