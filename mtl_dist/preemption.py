"""Preemption: signals set a flag; ranks agree on it at a step boundary; Slurm requeues the job.

Nothing is saved inside a signal handler: the trainer polls `should_stop()` between optimizer
steps, where every rank checkpoints the same step through the checkpoint manager.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import torch
import torch.distributed as dist

from mtl_dist.collectives import host_group
from mtl_dist.errors import fresh_line

# EX_TEMPFAIL: "try again later" -- a checkpointed stop that should be resumed, not a failure.
PREEMPTED_EXIT_CODE = 75
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")
# USR1/USR2 ask for a checkpoint and a requeue (Slurm's warning before a time limit or a
# preemption); TERM/INT are Slurm (or a user) ending the job: checkpoint, no requeue.
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
# slurm/common.sh forwards USR1 to the training as TERM (torchrun's agent drops USR1): it
# writes the signal's name to this file first, and reads the run's stop reason from FILE.stop.
SIGNAL_FILE_ENV = "MTL_SIGNAL_FILE"


class PreemptionFlag:
    """Remembers the first stop signal; further signals change nothing (the save is not redone)."""

    def __init__(self, signal_names=DEFAULT_SIGNALS):
        self.received: int | None = None
        self.requeue_wanted = False  # set by should_stop: some rank got a requeue request
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        if self._previous:
            _signal_when_launcher_dies(signal.SIGTERM if signal.SIGTERM in self._previous
                                       else next(iter(self._previous)))

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"{fresh_line()}[mtl_dist] received {signal.Signals(signum).name}: "
                  "checkpointing at the next step boundary", file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self._previous:
            _signal_when_launcher_dies(0)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank got a signal (an all-reduce of one flag).

        The flag travels over gloo, host to host (`collectives.host_group`)."""
        local = self._stop_code()
        group = host_group()
        if group is not None:
            flag = torch.tensor([local], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            local = int(flag.item())
        self.requeue_wanted = local == 2
        return local > 0

    def _stop_code(self) -> int:
        """0: no signal; 1: stop (TERM/INT: the job is being ended); 2: stop and requeue."""
        if self.received is None:
            return 0
        name = signal.Signals(self.received).name
        return 2 if name in REQUEUE_SIGNALS or requeue_requested_by_batch_shell() else 1


def requeue_requested_by_batch_shell() -> bool:
    """Whether slurm/*.sbatch forwarded a USR1/USR2 to this training (as TERM)."""
    path = os.environ.get(SIGNAL_FILE_ENV)
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as handle:
            return f"SIG{handle.read().strip()}" in REQUEUE_SIGNALS
    except OSError:
        return False


def tell_batch_shell(stop_reason: str) -> None:
    """Main process: the run's stop reason for slurm/common.sh, which requeues after a USR1
    only when the run was really preempted (not when it finished first)."""
    path = os.environ.get(SIGNAL_FILE_ENV)
    if path:
        try:
            with open(f"{path}.stop", "w", encoding="utf-8") as handle:
                handle.write(stop_reason + "\n")
        except OSError:
            pass  # the shell then requeues after a USR1, as before: a resume that finishes


def _signal_when_launcher_dies(signum: int) -> None:
    """Under torchrun / `accelerate launch` (Linux), have the kernel send `signum` (0: nothing)
    when the launcher dies. Its agent dies of signals it does not forward (USR1) and of kill -9;
    the ranks would then train on unsupervised, never checkpointing. Now they stop like on TERM."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)


def request_requeue(enabled: bool) -> str | None:
    """Under Slurm, ask for this job to be requeued (main process only); returns an error
    line when `scontrol requeue` failed, else None."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not enabled or not job_id:
        return None
    # Said before the call: a successful requeue makes Slurm signal (then kill) this job at
    # once, so a line printed afterwards may never reach the log.
    print(f"[mtl_dist] requested requeue of Slurm job {job_id}", flush=True)
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return f"scontrol requeue {job_id} failed: {result.stderr.strip()}"
    return None
