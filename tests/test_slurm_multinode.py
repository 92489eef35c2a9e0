"""slurm/multi_node.sbatch, unchanged, across a real two-node Slurm on this machine.

The nodes are network + hostname namespaces (tests/slurm_cluster.py, nodes=2; see
../shared/slurm.md): every node runs its own slurmd, `srun` starts one `accelerate launch` per
node, the ranks talk gloo over the veth/bridge network, and share this filesystem. CPU settings
go in through the script's documented variables (MTL_DEVICE=cpu, MTL_PROCS_PER_NODE). One
process per node (world size 2) by default; MTL_TEST_PROCS_PER_NODE=2 runs world size 4 (slower).

Job A: `sbatch -N 2`, uninterrupted: completes; each rank on its own node with the right machine
  rank; task agreement guard on; evaluations equal (exactly) a one-node run with the same global
  batch; checkpoint layout as on one node (per-rank files from both nodes, one manifest, one
  commit, rotation, best/).
Job B (one job, three runs, to keep the launches few):
  run 0: USR1 to the batch shell mid-run: both nodes checkpoint the same step, rank 0 requeues;
  run 1: resumes on both nodes from that step; once it has committed a newer checkpoint, the last
         rank's process (on node2) is killed -9: the job ends in seconds (srun
         --kill-on-bad-exit), FAILED, not requeued by itself; the test runs `scontrol requeue`;
  run 2: resumes from the newest committed checkpoint and finishes: evaluations equal job A's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _runs import run_cli
from slurm_cluster import TERMINAL_STATES, SlurmCluster, SubmittedJob, started_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = REPO_ROOT / "configs" / "demo.yaml"
NODES = 2
PROCS_PER_NODE = int(os.environ.get("MTL_TEST_PROCS_PER_NODE", "1"))  # 2: world size 4
WORLD = NODES * PROCS_PER_NODE
MAX_STEPS = 80
# Checkpoints at 20/40/60/80, two kept (rotation); the same for the one-node reference run.
RUN = [f"train.max_steps={MAX_STEPS}", "train.eval_steps=20", "checkpoint.save_steps=20",
       "checkpoint.save_total_limit=2", "train.log_steps=5", "train.collective_timeout_s=60"]
JOB_TIMEOUT_S = 240
KILLED_JOB_ENDS_WITHIN_S = 45  # observed ~7 s: srun --kill-on-bad-exit, not a timeout


# ------------------------------------------------------------------------------- helpers
def records(out: Path, kind: str) -> list[dict]:
    """metrics.jsonl records of one kind (a line still being written is left out)."""
    path = out / "metrics.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record["kind"] == kind:
            found.append(record)
    return found


def evals(out: Path) -> list[dict]:
    """Every evaluation record without its wall-clock time."""
    return [{k: v for k, v in r.items() if k != "time"} for r in records(out, "eval")]


def committed(out: Path) -> list[int]:
    """Steps of the committed periodic checkpoints, oldest first."""
    ckpts = (out / "checkpoints").glob("checkpoint-*")
    return sorted(int(p.name.split("-")[1]) for p in ckpts if (p / "COMMITTED").exists())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Job(SubmittedJob):
    """slurm/multi_node.sbatch submitted with -N 2: its id, working dir, output dir and log."""

    def __init__(self, cluster: SlurmCluster, workdir: Path, env: dict, cache: Path):
        workdir.mkdir()
        self.cluster, self.workdir, self.out = cluster, workdir, workdir / "out"
        self.id = cluster.sbatch(
            [f"--nodes={NODES}", str(REPO_ROOT / "slurm" / "multi_node.sbatch"), str(DEMO),
             f"train.output_dir={self.out}", f"data.cache_dir={cache}", *RUN],
            cwd=workdir, env={**env, "MTL_DEVICE": "cpu", "MTL_PROCS_PER_NODE": str(PROCS_PER_NODE)})

    def wait(self, restarts: int | None = None, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
        return super().wait(restarts, timeout_s=timeout_s)

    def running(self) -> bool:
        """Not ended (pending, running, or on its way back into the queue)."""
        return self.cluster.job_info(self.id).get("JobState") not in TERMINAL_STATES

    def wait_until(self, ready, what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running():
            if ready():
                return
            time.sleep(0.05)
        pytest.fail(f"job {self.id}: no {what}\n{self.explain()}")

    def workers(self) -> list[dict[str, str]]:
        """The training processes (accelerate's workers: RANK in their environment)."""
        return [p for p in self.cluster.job_processes(self.id)
                if "RANK" in p and "TORCHELASTIC_RUN_ID" in p and "mtl_dist.cli" in p["cmdline"]]

    def watch_ranks(self) -> dict[int, dict[str, str]]:
        """Each rank's node (its network namespace) and launcher environment, seen while alive."""
        seen: dict[int, dict[str, str]] = {}

        def all_seen() -> bool:
            seen.update({int(p["RANK"]): p for p in self.workers()})
            return len(seen) == WORLD

        self.wait_until(all_seen, f"{WORLD} training processes")
        return seen

    def runs(self) -> list[str]:
        """The job log cut into its runs (the log is appended to: --open-mode=append)."""
        return re.split(r"(?=\[mtl-slurm [^]]*\] job \d+ \S+ SLURM_RESTART_COUNT=)", self.log)[1:]


def machine_rank_line(node_id: int) -> str:
    return f"node node{node_id + 1} SLURM_NODEID={node_id} -> machine rank {node_id} of {NODES}"


def inspect_checkpoint(ckpt: Path) -> dict:
    """What a test asserts about one checkpoint, taken before rotation may remove it."""
    return {"committed": (ckpt / "COMMITTED").exists(),
            "manifest": json.loads((ckpt / "manifest.json").read_text()),
            "files": sorted(p.name for p in ckpt.iterdir()),
            "trainer_step": json.loads((ckpt / "trainer_state.json").read_text())["global_step"]}


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    yield from started_cluster(NODES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm_mn")


@pytest.fixture(scope="module")
def cache(workdir) -> Path:
    return workdir / "token_cache"


@pytest.fixture(scope="module")
def job_a(cluster, workdir, cache, cpu_env) -> tuple[Job, dict[int, dict[str, str]]]:
    job = Job(cluster, workdir / "a", cpu_env, cache)
    ranks = job.watch_ranks()
    job.wait()
    return job, ranks


@pytest.fixture(scope="module")
def job_b(cluster, workdir, cache, cpu_env) -> tuple[Job, dict]:
    """Preempted by USR1, then a rank killed, then requeued by hand; what was seen on the way."""
    job = Job(cluster, workdir / "b", cpu_env, cache)
    seen: dict = {}
    # run 0: USR1 once training is under way
    job.wait_until(lambda: records(job.out, "train"), "train record")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job.id)], check=True,
                   env=cluster.env, timeout=30)

    def preempted() -> list[dict]:
        return [r for r in records(job.out, "summary") if r["stop_reason"] == "preempted"]

    job.wait_until(preempted, "stop after USR1")
    step = seen["preempted_step"] = preempted()[0]["global_step"]
    seen["preempted_ckpt"] = inspect_checkpoint(job.out / "checkpoints" / f"checkpoint-{step}")
    # run 1 (requeued by rank 0): once it committed a newer checkpoint, kill the last rank
    job.wait_until(lambda: committed(job.out)[-1] > step, "checkpoint after the resume")
    victim = next((p for p in job.workers() if p["RANK"] == str(WORLD - 1)), None)
    assert victim is not None, job.explain()
    os.kill(int(victim["pid"]), signal.SIGKILL)
    killed_at = time.monotonic()
    seen["victim"] = victim
    seen["failed"] = job.wait(restarts=1, timeout_s=KILLED_JOB_ENDS_WITHIN_S + 30)
    seen["ended_after_s"] = time.monotonic() - killed_at
    seen["newest_committed"] = committed(job.out)[-1]
    # run 2: a requeue (or a resubmission: train.resume=auto either way)
    subprocess.run(["scontrol", "requeue", str(job.id)], check=True, env=cluster.env, timeout=30)
    seen["final"] = job.wait(restarts=2)
    return job, seen


@pytest.fixture(scope="module")
def one_node(job_a, workdir, cache) -> Path:
    """The same training as one machine's WORLD processes (same global batch), no Slurm."""
    out = workdir / "one_node"
    run_cli(["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={cache}", *RUN],
            procs=WORLD, timeout=300)
    return out


# ---------------------------------------------------------------------------------- tests
def test_two_node_job_trains_every_rank_on_its_node(job_a):
    job, ranks = job_a
    info = job.cluster.job_info(job.id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.explain()
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == str(NODES)
    log = job.log
    assert "training finished (exit 0)" in log and "head=node1 " in log
    for node_id in range(NODES):
        assert (f"node node{node_id + 1} SLURM_NODEID={node_id} -> machine rank {node_id} "
                f"of {NODES}") in log, job.explain()
        assert (f"--num_machines={NODES} --machine_rank={node_id} --main_process_ip=node1 "
                in log), job.explain()
    # Every rank, seen alive: on the node (network namespace) of its machine rank.
    assert sorted(ranks) == list(range(WORLD))
    for rank, proc in ranks.items():
        node_id = rank // PROCS_PER_NODE
        assert proc["node"] == f"node{node_id + 1}", proc
        assert proc["SLURMD_NODENAME"] == proc["node"]
        assert (proc["SLURM_NODEID"], proc["GROUP_RANK"]) == (str(node_id), str(node_id)), proc
        assert proc["LOCAL_RANK"] == str(rank % PROCS_PER_NODE)
        assert proc["WORLD_SIZE"] == str(WORLD) and proc["MASTER_ADDR"] == "node1", proc
    # The guard that all-gathers every micro-step's task across ranks (raises on divergence).
    assert "check_task_agreement: true" in (job.out / "config.yaml").read_text()
    summary = records(job.out, "summary")[-1]
    assert (summary["stop_reason"], summary["global_step"]) == ("finished", MAX_STEPS)


def test_two_nodes_equal_one_node_with_the_same_global_batch(job_a, one_node):
    """Exact, not within a tolerance: the same samples per step, and gloo reduces the ranks'
    gradients in the same order whichever machine holds which rank (with 2 ranks it is a + b);
    weights and optimizer bytes match too."""
    job, _ = job_a
    a, ref = evals(job.out), evals(one_node)
    assert a[-1]["step"] == MAX_STEPS and len(a) >= MAX_STEPS // 20
    assert a[-1] == ref[-1]
    assert a == ref
    for name in ("model.safetensors", "optimizer.pt"):
        last = Path("checkpoints") / f"checkpoint-{MAX_STEPS}" / name
        assert sha256(job.out / last) == sha256(one_node / last), name


def test_checkpoint_layout_on_the_shared_filesystem(job_a, one_node):
    job, _ = job_a
    out = job.out
    # The same files and directories as the one-node run: nothing left half-written.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_node.iterdir())
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"checkpoint-{MAX_STEPS - 20}", f"checkpoint-{MAX_STEPS}"]  # limit 2
    assert kept == sorted(p.name for p in (one_node / "checkpoints").iterdir())
    rng = [f"rng_state_{r}.pth" for r in range(WORLD)]
    for name in kept:
        ckpt = out / "checkpoints" / name
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest["world_size"] == WORLD and manifest["rng_files"] == rng
        # One manifest listing every file (each rank's RNG file among them), one commit last.
        files = manifest["files"]
        assert sorted(p.name for p in ckpt.iterdir()) == sorted([*files, "manifest.json",
                                                                 "COMMITTED"])
        for file, meta in files.items():  # what node2 wrote, as rank 0 on node1 hashed it
            assert sha256(ckpt / file) == meta["sha256"], f"{name}/{file}"
        assert set(files) == {p.name for p in (one_node / "checkpoints" / name).iterdir()} \
            - {"manifest.json", "COMMITTED"}
        commit = json.loads((ckpt / "COMMITTED").read_text())
        assert commit["step"] == int(name.split("-")[1])
        assert commit["manifest_sha256"] == sha256(ckpt / "manifest.json")
    best = out / "best"
    assert (best / "COMMITTED").exists()
    best_json = json.loads((best / "best.json").read_text())
    assert best_json == json.loads((one_node / "best" / "best.json").read_text())
    assert sha256(best / "model.safetensors") == sha256(one_node / "best" / "model.safetensors")


def test_usr1_checkpoints_both_nodes_requeues_and_resumes(job_b, job_a):
    job, seen = job_b
    step = seen["preempted_step"]
    assert 0 < step < MAX_STEPS
    ckpt = seen["preempted_ckpt"]  # one committed checkpoint of that step, from every rank
    rng = [f"rng_state_{r}.pth" for r in range(WORLD)]
    assert ckpt["committed"] and ckpt["trainer_step"] == step
    assert (ckpt["manifest"]["step"], ckpt["manifest"]["world_size"]) == (step, WORLD)
    assert ckpt["manifest"]["rng_files"] == rng and set(rng) <= set(ckpt["files"])
    runs = job.runs()
    assert len(runs) == 3, job.explain()
    first, second = runs[0], runs[1]
    assert "SLURM_RESTART_COUNT=0" in first and "SLURM_RESTART_COUNT=1" in second
    assert "got SIGUSR1: forwarding SIGTERM to the training (steps)" in first, job.explain()
    assert first.count("[mtl_dist] received SIGTERM") == WORLD, job.explain()  # every rank
    assert f"requested requeue of Slurm job {job.id}" in first, job.explain()
    assert "from the batch shell" not in first, "rank 0 (the trainer) should have requeued"
    for run in (first, second):  # a launcher on every node, both times
        assert all(machine_rank_line(n) in run for n in range(NODES)), job.explain()
    path = job.out / "checkpoints" / f"checkpoint-{step}"
    assert f"resumed from {path} at step {step} " in second, job.explain()
    preempted = [r for r in records(job.out, "summary") if r["stop_reason"] == "preempted"]
    assert [(r["global_step"], r["exit_code"]) for r in preempted] == [(step, 75)]


def test_killed_rank_on_node2_ends_the_job_and_requeue_resumes(job_b, job_a):
    job, seen = job_b
    reference, _ = job_a
    victim = seen["victim"]
    assert (victim["node"], victim["SLURM_NODEID"]) == (f"node{NODES}", str(NODES - 1))
    failed = seen["failed"]
    assert (failed["JobState"], failed["Restarts"]) == ("FAILED", "1"), job.explain()
    assert seen["ended_after_s"] < KILLED_JOB_ENDS_WITHIN_S, seen["ended_after_s"]
    print(f"job {job.id} ended {seen['ended_after_s']:.1f} s after rank {victim['RANK']} was killed")
    runs = job.runs()
    assert len(runs) == 3, job.explain()
    second, third = runs[1], runs[2]
    assert f"node{NODES}: task {NODES - 1}: Exited with exit code" in second, job.explain()
    assert "training FAILED" in second and "not requeued" in second, job.explain()
    newest = seen["newest_committed"]
    assert seen["preempted_step"] < newest < MAX_STEPS
    assert "SLURM_RESTART_COUNT=2" in third
    assert all(machine_rank_line(n) in third for n in range(NODES)), job.explain()
    path = job.out / "checkpoints" / f"checkpoint-{newest}"
    assert f"resumed from {path} at step {newest} " in third, job.explain()
    assert "training finished (exit 0)" in third, job.explain()
    final = seen["final"]
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "2")
    assert records(job.out, "summary")[-1]["stop_reason"] == "finished"
    # Preempted, killed, resumed twice: the same evaluations as the uninterrupted run.
    assert evals(job.out) == evals(reference.out)
