"""slurm/*.sbatch on a real one-node Slurm (started by tests/slurm_cluster.py), demo on CPU.

Job 1: slurm/single_node.sbatch, 2 CPU processes, uninterrupted: completes, writes its outputs.
Job 2: the same, `scancel --signal=USR1 --batch` once training is under way: checkpoint,
requeue (SLURM_RESTART_COUNT=1 in the log), resume, final evaluation equal to job 1's.
Job 3: slurm/multi_node.sbatch on one node (srun + accelerate launch --num_machines 1),
preempted the same way: the srun path forwards the stop to the step and resumes exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SubmittedJob, started_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "configs" / "demo.yaml"
MAX_STEPS = 120
RUN = [f"train.max_steps={MAX_STEPS}", "train.eval_steps=30", "checkpoint.save_steps=30",
       "checkpoint.save_total_limit=null", "train.log_steps=10"]
JOB_TIMEOUT_S = 300
CPUS = min(2, os.cpu_count() or 1)


# ------------------------------------------------------------------------------- helpers
def records(out: Path, kind: str) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == kind]


def final_eval(out: Path) -> dict:
    last = records(out, "eval")[-1]
    return {k: v for k, v in last.items() if k != "time"}


class Job(SubmittedJob):
    """One submitted sbatch script: its id, working dir, output dir and log."""

    LOG_TAIL = 4000

    def __init__(self, cluster: SlurmCluster, script: str, workdir: Path, env: dict,
                 sbatch_args: tuple[str, ...] = ()):
        self.cluster, self.workdir = cluster, workdir
        self.out = workdir / "out"
        self.cache = workdir.parent / "slurm_cache"
        self.id = cluster.sbatch(
            [f"--cpus-per-task={CPUS}", *sbatch_args, str(REPO_ROOT / "slurm" / script), str(DEMO),
             f"train.output_dir={self.out}", f"data.cache_dir={self.cache}", *RUN],
            cwd=workdir, env={**env, "MTL_DEVICE": "cpu", "MTL_PROCS_PER_NODE": "2"})

    def wait(self, restarts: int | None = None) -> dict[str, str]:
        return super().wait(restarts, timeout_s=JOB_TIMEOUT_S)

    def wait_for_training(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if records(self.out, "train"):
                return
            if self.cluster.job_info(self.id).get("JobState") in ("FAILED", "CANCELLED", "COMPLETED"):
                break
            time.sleep(0.05)
        pytest.fail(f"no train record from job {self.id}\n{self.explain()}")

    def usr1(self) -> None:
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(self.id)], check=True,
                       env=self.cluster.env, timeout=30)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def slurm():
    yield from started_cluster()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_jobs")


@pytest.fixture(scope="module")
def uninterrupted(slurm, workdir, cpu_env) -> Job:
    (workdir / "job1").mkdir()
    job = Job(slurm, "single_node.sbatch", workdir / "job1", cpu_env)
    job.wait()
    return job


def assert_preempted_and_resumed(job: Job, reference: Job) -> None:
    info = job.wait(restarts=1)
    log = job.log
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.explain()
    assert info["Restarts"] == "1", job.explain()
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, job.explain()
    assert "got SIGUSR1: forwarding SIGTERM" in log, job.explain()
    # The preempted run's summary survives the resume's log truncation (it is at its step).
    preempted = [r for r in records(job.out, "summary") if r["stop_reason"] == "preempted"]
    assert len(preempted) == 1, job.explain()
    step = preempted[0]["global_step"]
    assert 0 < step < MAX_STEPS and preempted[0]["exit_code"] == 75
    assert "from the batch shell" not in log, "rank 0 (the trainer) should have requeued the job"
    ckpt = job.out / "checkpoints" / f"checkpoint-{step}"
    assert (ckpt / "COMMITTED").exists()
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    assert json.loads((ckpt / "manifest.json").read_text())["world_size"] == 2
    assert f"resumed from {ckpt} at step {step}" in log, job.explain()
    assert records(job.out, "summary")[-1]["stop_reason"] == "finished"
    assert final_eval(job.out) == final_eval(reference.out)


# ---------------------------------------------------------------------------------- tests
def test_single_node_job_completes_with_outputs(uninterrupted):
    job = uninterrupted
    info = job.cluster.job_info(job.id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.explain()
    assert info["Restarts"] == "0"
    log = job.log
    assert f"job {job.id} 'mtl-dist' SLURM_RESTART_COUNT=0" in log
    assert "training finished (exit 0)" in log
    summary = records(job.out, "summary")[-1]
    assert (summary["stop_reason"], summary["global_step"]) == ("finished", MAX_STEPS)
    assert "requeue" not in summary
    last = job.out / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    assert (last / "COMMITTED").exists()
    assert json.loads((last / "manifest.json").read_text())["world_size"] == 2
    assert (last / "rng_state_0.pth").exists() and (last / "rng_state_1.pth").exists()
    assert (job.out / "best" / "COMMITTED").exists()
    assert (job.out / "config.yaml").exists() and (job.out / "labels.json").exists()
    assert records(job.out, "eval")[-1]["step"] == MAX_STEPS


def test_single_node_usr1_checkpoint_requeue_resume(slurm, workdir, uninterrupted, cpu_env):
    (workdir / "job2").mkdir()
    job = Job(slurm, "single_node.sbatch", workdir / "job2", cpu_env)
    job.wait_for_training()
    job.usr1()
    assert_preempted_and_resumed(job, uninterrupted)


def test_multi_node_script_on_one_node_usr1_requeue_resume(slurm, workdir, uninterrupted, cpu_env):
    """srun path: the batch shell signals the step (not srun, which would abort it)."""
    (workdir / "job3").mkdir()
    job = Job(slurm, "multi_node.sbatch", workdir / "job3", cpu_env, ("--nodes=1",))
    job.wait_for_training()
    job.usr1()
    assert_preempted_and_resumed(job, uninterrupted)
    assert "SLURM_NODEID=0 -> machine rank 0 of 1" in job.log
    assert "--num_machines=1 --machine_rank=0" in job.log


def test_a_plain_scancel_ends_the_job_without_a_requeue(slurm, workdir, cpu_env):
    """TERM is Slurm ending the job: the training checkpoints if it can, and nothing requeues
    it (every TERM used to make rank 0 requeue the job, so it could not be cancelled)."""
    (workdir / "job4").mkdir()
    job = Job(slurm, "single_node.sbatch", workdir / "job4", cpu_env)
    job.wait_for_training()
    subprocess.run(["scancel", str(job.id)], check=True, env=slurm.env, timeout=30)
    info = job.wait()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", job.explain()
    time.sleep(8)  # a requeue would show within Slurm's requeue delay (cred_expire=5 here)
    info = slurm.job_info(job.id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", job.explain()
    assert "requested requeue" not in job.log and "from the batch shell" not in job.log
