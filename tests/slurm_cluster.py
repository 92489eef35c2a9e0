"""A real, throwaway Slurm cluster on this machine, for tests: munged + slurmctld + slurmd.

Why: the sbatch scripts in slurm/ (requeue, signals, srun) are only proven by running them.
`python tests/slurm_cluster.py up|down|status` for by hand; `SlurmCluster` for test fixtures.
Everything lives in one temporary directory except /etc/slurm/slurm.conf (so plain `sbatch`,
`squeue`, and `scontrol requeue` from inside a job need no environment), which is backed up
and restored (or removed when we created it). See ../shared/slurm.md for what had to be true.
One node now; `nodes` and `SlurmNode` are where a multi-node (network-namespace) cluster grows.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
STATE_FILE = Path(tempfile.gettempdir()) / "mtl_slurm_cluster.json"
LOCK_FILE = Path(tempfile.gettempdir()) / "mtl_slurm_cluster.lock"
PACKAGES = ("slurm-wlm", "munge")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why (tests skip with it)."""


@dataclass
class SlurmNode:
    """One slurmd: its name, the address slurmctld reaches it at, and what it offers."""

    name: str
    addr: str
    cpus: int
    real_memory_mb: int


@dataclass
class ClusterState:
    """What `down` needs, also written to STATE_FILE so another process can tear it down."""

    workdir: str
    name: str = ""
    conf_backup: str | None = None       # where the original slurm.conf was saved, if any
    created_conf: bool = False           # True when no slurm.conf existed before us
    pid_files: list[str] = field(default_factory=list)  # in start order; stopped in reverse
    nodes: list[dict] = field(default_factory=list)


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60,
         env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check,
                          timeout=timeout, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _read_pid(path: str | Path) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2000


def ensure_installed(install: bool = True) -> None:
    """Install slurm-wlm + munge with apt when missing and we are root; else SlurmUnavailable."""
    needed = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in needed):
        return
    if not install:
        raise SlurmUnavailable("Slurm is not installed (slurmctld/slurmd/sbatch/munged missing)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and we are not root to apt-get install it")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with tempfile.TemporaryDirectory(prefix="mtl_apt_") as archives:  # no .deb kept anywhere
        (Path(archives) / "partial").mkdir()
        cmd = ["apt-get", "install", "-y", "-o", f"Dir::Cache::Archives={archives}", *PACKAGES]
        result = _run(cmd, check=False, timeout=600, env=env)
        if result.returncode != 0:  # a fresh machine may need its package lists first
            _run(["apt-get", "update"], check=False, timeout=600, env=env)
            result = _run(cmd, check=False, timeout=600, env=env)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {tail[0]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """Start/stop a local Slurm (one node now) with state under a temp directory."""

    def __init__(self, workdir: str | Path | None = None, *, nodes: int = 1,
                 install: bool = True, lock_timeout_s: float = 900):
        if nodes != 1:
            raise NotImplementedError("only a one-node cluster so far (two nodes: issue 12, "
                                      "network namespaces as in ../shared/slurm.md)")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mtl_slurm_"))
        self.install = install
        self.lock_timeout_s = lock_timeout_s
        self.host = socket.gethostname().split(".")[0]
        self.name = f"mtl{secrets.token_hex(3)}"  # jobs' processes carry it in their environment
        cpus = os.cpu_count() or 1
        self.nodes = [SlurmNode(self.host, "127.0.0.1", cpus, max(500, int(_mem_mb() * 0.85)))]
        self.state = ClusterState(workdir=str(self.workdir), name=self.name,
                                  nodes=[asdict(n) for n in self.nodes])
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ public
    def __enter__(self) -> SlurmCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (slurm.conf is also at its default path)."""
        return {**os.environ, "SLURM_CONF": str(SLURM_CONF)}

    def up(self, timeout_s: float = 60) -> SlurmCluster:
        """Install if needed, write the config, start munged, slurmctld, slurmd; wait for idle."""
        ensure_installed(self.install)
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd/munged needs root")
        self._take_lock()
        try:
            self._refuse_if_running()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.workdir.chmod(0o755)  # munged (user munge) must reach its files below
            self._start_munge()
            self._install_conf(self._conf_text())
            self._write_state()
            self._start([_sbin("slurmctld"), "-c", "-i"], self.workdir / "slurmctld.pid")
            for node in self.nodes:
                self._start_slurmd(node)
            self._wait_idle(timeout_s)
        except BaseException:
            self.down()
            raise
        return self

    def down(self, keep_workdir: bool = False) -> None:
        """Cancel jobs, stop daemons by pid (reverse order), restore slurm.conf, drop state
        and (unless keep_workdir) the work directory with the daemons' logs."""
        self._cancel_all_jobs()
        self._kill_job_leftovers()
        for pid_file in reversed(self.state.pid_files):
            pid = _read_pid(pid_file)
            if pid is not None:
                _stop_pid(pid)
        self._kill_stray_stepds()
        self._restore_conf()
        if STATE_FILE.exists():
            try:
                if json.loads(STATE_FILE.read_text()).get("workdir") == self.state.workdir:
                    STATE_FILE.unlink()
            except (OSError, ValueError):
                pass
        self.state.pid_files.clear()
        if not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._release_lock()

    @classmethod
    def from_state_file(cls, path: Path = STATE_FILE) -> SlurmCluster:
        """The cluster a previous `up` (maybe another process) left running."""
        state = ClusterState(**json.loads(path.read_text()))
        cluster = cls(state.workdir, install=False)
        cluster.state, cluster.name = state, state.name
        return cluster

    def sbatch(self, args: Sequence[str], *, cwd: str | Path, env: dict | None = None) -> int:
        """Submit; return the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                                timeout=60, env={**self.env, **(env or {})}, cwd=str(cwd))
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...); {} if unknown."""
        result = _run(["scontrol", "show", "job", "-o", str(job_id)], check=False, env=self.env)
        if result.returncode != 0:
            return {}
        info = {}
        for item in result.stdout.split():
            key, sep, value = item.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def wait_job(self, job_id: int, *, timeout_s: float, restarts: int | None = None,
                 poll_s: float = 0.5) -> dict[str, str]:
        """Poll until the job is in a terminal state (and restarted `restarts` times, if given)."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            done = info.get("JobState") in TERMINAL_STATES
            if done and (restarts is None or int(info.get("Restarts", "0")) >= restarts):
                return info
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s:.0f} s: {info}")

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    # ----------------------------------------------------------------- set-up
    def _take_lock(self) -> None:
        """One cluster per machine: ports, /etc/slurm/slurm.conf and munge are shared."""
        fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SlurmUnavailable(f"another local test cluster holds {LOCK_FILE}") from None
                time.sleep(1)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _refuse_if_running(self) -> None:
        if not STATE_FILE.exists():
            return
        try:
            other = SlurmCluster.from_state_file()
        except (OSError, ValueError, TypeError):
            STATE_FILE.unlink(missing_ok=True)
            return
        alive = [p for p in (_read_pid(f) for f in other.state.pid_files) if p and _pid_alive(p)]
        if alive:
            raise SlurmUnavailable(f"a local test cluster is already up (state {STATE_FILE}); "
                                   "stop it with `python tests/slurm_cluster.py down`")
        other.down()  # stale: a crashed session; restore its slurm.conf backup

    def _start_munge(self) -> None:
        """Our own munged (own key, socket, pid file) so nothing system-wide is touched."""
        mdir = self.workdir / "munge"
        mdir.mkdir(mode=0o700, exist_ok=True)
        key = mdir / "munge.key"
        if not key.exists():
            _run([_sbin("mungekey"), "--create", f"--keyfile={key}"])
        shutil.chown(mdir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        self.munge_socket = mdir / "munge.socket"
        pid_file = mdir / "munged.pid"
        self._start(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={pid_file}", f"--seed-file={mdir / 'seed'}",
                     f"--log-file={mdir / 'munged.log'}", "--force"], pid_file)

    def _conf_text(self) -> str:
        w = self.workdir
        for sub in ("state", "spool"):
            (w / sub).mkdir(exist_ok=True)
        lines = [
            "# written by tests/slurm_cluster.py -- removed/restored by its `down`",
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=5: a requeued job runs again after seconds, not ~2 minutes
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'slurmd.pid'}",
            f"SlurmctldLogFile={w / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'slurmd.log'}",
            "ProctrackType=proctrack/pgid",   # kills the batch shell's whole process group
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobRequeue=1",
            "ReturnToService=2",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=300",
            "KillWait=5",
            "InactiveLimit=0",
        ]
        for n in self.nodes:
            lines.append(f"NodeName={n.name} NodeAddr={n.addr} CPUs={n.cpus} "
                         f"RealMemory={n.real_memory_mb} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _install_conf(self, text: str) -> None:
        (self.workdir / "slurm.conf").write_text(text)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        if SLURM_CONF.exists() and self.state.conf_backup is None and not self.state.created_conf:
            backup = self.workdir / "slurm.conf.orig"
            shutil.copy2(SLURM_CONF, backup)
            self.state.conf_backup = str(backup)
        elif not SLURM_CONF.exists():
            self.state.created_conf = True
        SLURM_CONF.write_text(text)

    def _restore_conf(self) -> None:
        if self.state.conf_backup and Path(self.state.conf_backup).exists():
            shutil.copy2(self.state.conf_backup, SLURM_CONF)
        elif self.state.created_conf:
            SLURM_CONF.unlink(missing_ok=True)
        self.state.conf_backup, self.state.created_conf = None, False

    def _start_slurmd(self, node: SlurmNode) -> None:
        # A second node would run under `nsenter --net=... unshare --uts` with `-N name`.
        self._start([_sbin("slurmd"), "-N", node.name], self.workdir / "slurmd.pid")

    def _start(self, cmd: list[str], pid_file: Path, timeout_s: float = 20) -> None:
        """Run a self-daemonizing daemon; wait for its pid file and remember it."""
        pid_file.unlink(missing_ok=True)
        self.state.pid_files.append(str(pid_file))
        self._write_state()
        result = _run(cmd, check=False, env=self.env)
        deadline = time.monotonic() + (timeout_s if result.returncode == 0 else 0)
        while time.monotonic() < deadline:
            pid = _read_pid(pid_file)
            if pid and _pid_alive(pid):
                return
            time.sleep(0.05)
        raise SlurmUnavailable(f"{Path(cmd[0]).name if cmd[0] != 'runuser' else 'munged'} did "
                               f"not start (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-300:]}\n{self.logs()}")

    def _write_state(self) -> None:
        STATE_FILE.write_text(json.dumps(asdict(self.state), indent=1))

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            out = _run(["sinfo", "-h", "-o", "%T"], check=False, env=self.env).stdout.strip()
            if out and all(s.rstrip("*") == "idle" for s in out.split()):
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"Slurm node not idle after {timeout_s:.0f} s (sinfo: {out!r})\n"
                               + self.logs())

    def _cancel_all_jobs(self, timeout_s: float = 30) -> None:
        """scancel every job, then wait until none is left running (their processes end)."""
        ctld = _read_pid(self.workdir / "slurmctld.pid")
        if not (ctld and _pid_alive(ctld)) or not shutil.which("squeue"):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = _run(["squeue", "-h", "-o", "%i %T"], check=False, env=self.env).stdout.split("\n")
            active = [line.split()[0] for line in out if line.strip()]
            if not active:
                return
            _run(["scancel", *active], check=False, env=self.env)
            time.sleep(0.5)

    def _kill_job_leftovers(self) -> None:
        """SIGKILL what our jobs left behind. proctrack/pgid only kills a job's process groups,
        and torchrun starts every worker in its own session: a cancelled job can orphan them."""
        if not self.name:
            return
        marker = f"SLURM_CLUSTER_NAME={self.name}".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def _kill_stray_stepds(self) -> None:
        """SIGKILL our slurmstepd processes that outlived slurmd (a job still completing at
        `down`); they are ours when they work in, or write into, our work directory."""
        root = str(self.workdir)
        for comm in Path("/proc").glob("[0-9]*/comm"):
            proc = comm.parent
            try:
                if comm.read_text().strip() != "slurmstepd":
                    continue
                links = [os.readlink(proc / "cwd")]
                links += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            except OSError:
                continue
            if any(link.startswith(root) for link in links):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except (OSError, ValueError):
                    pass


def _stop_pid(pid: int, timeout_s: float = 15) -> None:
    """TERM, wait, then KILL: one daemon, by its own pid."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--workdir", help="state/log directory (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="down: keep the work directory")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            cluster = SlurmCluster(args.workdir).up()
            cluster._release_lock()
            print(f"Slurm is up: node {cluster.host}, state and logs in {cluster.workdir}; "
                  f"stop with `python {sys.argv[0]} down`")
        elif args.action == "down":
            if not STATE_FILE.exists():
                print("no local test cluster is up")
                return 0
            cluster = SlurmCluster.from_state_file()
            cluster.down(keep_workdir=args.keep)
            print(f"Slurm is down (state was in {cluster.workdir})")
        else:
            print(STATE_FILE.read_text() if STATE_FILE.exists() else "no local test cluster is up")
            if shutil.which("sinfo") and STATE_FILE.exists():
                print(_run(["sinfo"], check=False).stdout)
    except SlurmUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
