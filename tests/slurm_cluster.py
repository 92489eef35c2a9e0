"""A real, throwaway Slurm cluster on this machine, for tests: munged + slurmctld + slurmd(s).

Why: the sbatch scripts in slurm/ (requeue, signals, srun) are only proven by running them.
`python tests/slurm_cluster.py up [--nodes 2]|down|status` by hand; `SlurmCluster` for fixtures.
Everything lives in one temporary directory except /etc/slurm/slurm.conf (so plain `sbatch`,
`squeue`, and `scontrol requeue` from inside a job need no environment), which is backed up
and restored (or removed when we created it). See ../shared/slurm.md for what had to be true.

nodes=1: one slurmd on this host. nodes=N>1: every node is a network namespace
(/run/netns/mtlnI, `eth0` = SUBNET.I, a veth on bridge mtlbr0 = SUBNET.254 where slurmctld and
the client commands live) plus a hostname namespace (`nodeI`), with `nodeI` lines added to
/etc/hosts (removed again by `down`). The nodes share the filesystem, the pid table and the cores.
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
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
STATE_FILE = Path(tempfile.gettempdir()) / "mtl_slurm_cluster.json"
LOCK_FILE = Path(tempfile.gettempdir()) / "mtl_slurm_cluster.lock"
HOSTS = Path("/etc/hosts")
HOSTS_TAG = "# mtl_slurm_cluster"  # ends every line we add to /etc/hosts
NETNS_PREFIX = "mtln"              # /run/netns/mtln1, mtln2, ...
BRIDGE = "mtlbr0"
DEFAULT_SUBNET = "10.77.0"         # nodes at .1, .2, ...; the bridge (slurmctld) at .254
_UP_HERE: list[SlurmCluster] = []  # clusters this process started and has not stopped yet
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
    netns: list[str] = field(default_factory=list)       # network namespaces we created
    links: list[str] = field(default_factory=list)       # bridge + host-side veths we created
    hosts_lines: list[str] = field(default_factory=list)  # lines we appended to /etc/hosts


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


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can): root, `ip`, nsenter."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [b for b in ("ip", "nsenter", "unshare") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not found (package iproute2 / util-linux)"
    probe = f"{NETNS_PREFIX}p{os.getpid() % 10**6}"  # + "v": within 15 characters
    result = _run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {(result.stderr or result.stdout).strip()[-200:]}"
    try:
        made = _run(["ip", "link", "add", f"{probe}v", "type", "veth", "peer", "name", "eth0",
                     "netns", probe], check=False)
        if made.returncode != 0:
            return f"cannot make a veth pair: {(made.stderr or made.stdout).strip()[-200:]}"
        inner = _run(["nsenter", f"--net=/run/netns/{probe}", "unshare", "--uts", "sh", "-c",
                      "hostname mtlprobe && hostname"], check=False)
        if inner.stdout.strip() != "mtlprobe":
            return f"cannot enter a namespace with its own host name: {inner.stderr.strip()[-200:]}"
    finally:
        _run(["ip", "link", "del", f"{probe}v"], check=False)
        _run(["ip", "netns", "del", probe], check=False)
    return None


class SlurmCluster:
    """Start/stop a local Slurm of `nodes` nodes with state under a temp directory."""

    def __init__(self, workdir: str | Path | None = None, *, nodes: int = 1,
                 install: bool = True, lock_timeout_s: float = 900,
                 subnet: str = DEFAULT_SUBNET):
        if not 1 <= nodes <= 250:
            raise ValueError(f"nodes: expected 1..250, got {nodes}")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mtl_slurm_"))
        self.install = install
        self.lock_timeout_s = lock_timeout_s
        self.host = socket.gethostname().split(".")[0]
        self.name = f"mtl{secrets.token_hex(3)}"  # jobs' processes carry it in their environment
        self.subnet = subnet
        self.multi = nodes > 1
        cpus = os.cpu_count() or 1
        if self.multi:  # the cores are shared: split them (at least one each)
            self.ctld_addr = f"{subnet}.254"
            self.nodes = [SlurmNode(f"node{i}", f"{subnet}.{i}", max(1, cpus // nodes),
                                    max(500, int(_mem_mb() * 0.85) // nodes))
                          for i in range(1, nodes + 1)]
        else:
            self.ctld_addr = "127.0.0.1"
            self.nodes = [SlurmNode(self.host, "127.0.0.1", cpus,
                                    max(500, int(_mem_mb() * 0.85)))]
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
        if self.multi and (why := namespaces_unavailable()):
            raise SlurmUnavailable(f"{len(self.nodes)} nodes need network namespaces: {why}")
        self._stop_others_of_this_process()
        self._take_lock()
        try:
            self._refuse_if_running()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.workdir.chmod(0o755)  # munged (user munge) must reach its files below
            if self.multi:
                self._make_network()
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
        _UP_HERE.append(self)
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
        self._remove_network()
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
        if self in _UP_HERE:
            _UP_HERE.remove(self)

    @classmethod
    def from_state_file(cls, path: Path = STATE_FILE) -> SlurmCluster:
        """The cluster a previous `up` (maybe another process) left running."""
        state = ClusterState(**json.loads(path.read_text()))
        cluster = cls(state.workdir, install=False)
        cluster.state, cluster.name = state, state.name
        cluster.nodes = [SlurmNode(**n) for n in state.nodes]
        cluster.multi = len(cluster.nodes) > 1
        return cluster

    def node_of_pid(self, pid: int) -> str | None:
        """The node a process runs on (its network namespace's), or None if not one of ours."""
        try:
            mine = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        if not self.multi:
            return self.nodes[0].name
        for node, ns in zip(self.nodes, self.state.netns, strict=False):
            try:
                if os.stat(f"/run/netns/{ns}").st_ino == mine:
                    return node.name
            except OSError:
                continue
        return None

    def job_processes(self, job_id: int | None = None) -> list[dict[str, str]]:
        """Processes started by our jobs: {"pid", "cmdline", "node", and their SLURM_*/RANK/...
        environment}; only those of `job_id` when given. How tests find a rank on a node."""
        marker = f"SLURM_CLUSTER_NAME={self.name}"
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                items = environ.read_bytes().decode(errors="replace").split("\0")
                cmdline = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker not in items:
                continue
            env = dict(item.partition("=")[::2] for item in items if "=" in item)
            if job_id is not None and env.get("SLURM_JOB_ID") != str(job_id):
                continue
            pid = int(environ.parent.name)
            found.append({**env, "pid": str(pid), "node": self.node_of_pid(pid) or "?",
                          "cmdline": cmdline.decode(errors="replace").strip()})
        return found

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
        slurmds = [f"slurmd-{n.name}.log" for n in self.nodes] if self.multi else ["slurmd.log"]
        for name in ("slurmctld.log", *slurmds, "munge/munged.log"):
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

    def _stop_others_of_this_process(self) -> None:
        """One cluster per machine, and the lock would make this process wait on itself: a
        cluster it started earlier (e.g. a session-scoped fixture whose tests are done) is
        stopped first, with a warning."""
        for other in list(_UP_HERE):
            if other is not self:
                warnings.warn(f"stopping the local Slurm cluster this process started in "
                              f"{other.workdir} ({len(other.nodes)} node(s)) to start one of "
                              f"{len(self.nodes)}: one cluster per machine", stacklevel=3)
                other.down()

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
        if self.multi:  # per-node paths (%n = node name): the nodes share this filesystem
            for n in self.nodes:
                (w / f"spool-{n.name}").mkdir(exist_ok=True)
            spool, pid, log = w / "spool-%n", w / "slurmd-%n.pid", w / "slurmd-%n.log"
        else:
            spool, pid, log = w / "spool", w / "slurmd.pid", w / "slurmd.log"
        lines = [
            "# written by tests/slurm_cluster.py -- removed/restored by its `down`",
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.host}({self.ctld_addr})",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=5: a requeued job runs again after seconds, not ~2 minutes
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={pid}",
            f"SlurmctldLogFile={w / 'slurmctld.log'}",
            f"SlurmdLogFile={log}",
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
        if not self.multi:
            self._start([_sbin("slurmd"), "-N", node.name], self.workdir / "slurmd.pid")
            return
        # Not `ip netns exec`: it remounts /sys and slurmd dies ("No filesystem mounted on
        # /sys/fs/cgroup"). Own host name: else gloo advertises the shared one (127.0.0.1).
        ns = self.state.netns[self.nodes.index(node)]
        inner = f"hostname {node.name} && exec {_sbin('slurmd')} -N {node.name}"
        self._start(["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "sh", "-c", inner],
                    self.workdir / f"slurmd-{node.name}.pid")

    # ---------------------------------------------------------------- network
    def _make_network(self) -> None:
        """Bridge (slurmctld's address) + one namespace per node with a veth `eth0`, loopback
        up; /etc/hosts names the nodes (lookups in a namespace reach no DNS server)."""
        taken = [n.addr for n in self.nodes if _addr_in_use(n.addr)]
        if _addr_in_use(self.ctld_addr) or taken:
            raise SlurmUnavailable(f"subnet {self.subnet}.0/24 is in use here ("
                                   f"{', '.join(taken) or self.ctld_addr}); pass another subnet")
        for i in range(1, len(self.nodes) + 1):  # a crashed run's, lost with its state file
            _wait_netns_gone(f"{NETNS_PREFIX}{i}")
        for link in (BRIDGE, *(f"{NETNS_PREFIX}{i}v" for i in range(1, len(self.nodes) + 1))):
            if Path(f"/sys/class/net/{link}").exists():
                _run(["ip", "link", "del", link], check=False)
        self._ip("link", "add", BRIDGE, "type", "bridge", record_link=BRIDGE)
        self._ip("addr", "add", f"{self.ctld_addr}/24", "dev", BRIDGE)
        self._ip("link", "set", BRIDGE, "up")
        for i, node in enumerate(self.nodes, start=1):
            ns, veth = f"{NETNS_PREFIX}{i}", f"{NETNS_PREFIX}{i}v"
            self._ip("netns", "add", ns, record_netns=ns)
            self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                     record_link=veth)
            self._ip("link", "set", veth, "master", BRIDGE, "up")
            self._ip("-n", ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._add_hosts([f"{n.addr} {n.name} {HOSTS_TAG} {self.name}" for n in self.nodes])

    def _ip(self, *args: str, record_link: str | None = None,
            record_netns: str | None = None) -> None:
        result = _run(["ip", *args], check=False)
        if result.returncode != 0:
            raise SlurmUnavailable(f"`ip {' '.join(args)}` failed: "
                                   f"{(result.stderr or result.stdout).strip()[-200:]}")
        if record_link:
            self.state.links.append(record_link)
        if record_netns:
            self.state.netns.append(record_netns)
        if record_link or record_netns:
            self._write_state()

    def _add_hosts(self, lines: list[str]) -> None:
        # Written in place (not renamed over): /etc/hosts is often a bind mount.
        text = HOSTS.read_text() if HOSTS.exists() else ""
        self.state.hosts_lines = lines
        self._write_state()
        HOSTS.write_text(text + ("" if not text or text.endswith("\n") else "\n")
                         + "".join(line + "\n" for line in lines))

    def _remove_network(self) -> None:
        """Undo _make_network: our /etc/hosts lines, veths, bridge, namespaces."""
        if self.state.hosts_lines and HOSTS.exists():
            ours = set(self.state.hosts_lines)
            kept = [ln for ln in HOSTS.read_text().splitlines(keepends=True)
                    if ln.rstrip("\n") not in ours]
            HOSTS.write_text("".join(kept))
        for link in reversed(self.state.links):
            _run(["ip", "link", "del", link], check=False)
        for ns in self.state.netns:
            _run(["ip", "netns", "del", ns], check=False)
        self.state.hosts_lines, self.state.links, self.state.netns = [], [], []

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


def _addr_in_use(addr: str) -> bool:
    """An IPv4 address already configured on this host (root namespace)."""
    out = _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    return any(f" {addr}/" in line for line in out.splitlines())


def _wait_netns_gone(ns: str, timeout_s: float = 10) -> None:
    """A namespace of a previous run may still be going away (`ip netns del` lags a second or
    two): delete a stale one and wait until its name is free."""
    if not Path(f"/run/netns/{ns}").exists():
        return
    _run(["ip", "netns", "del", ns], check=False)
    deadline = time.monotonic() + timeout_s
    while Path(f"/run/netns/{ns}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


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
    parser.add_argument("--nodes", type=int, default=1,
                        help="up: nodes (more than 1: network namespaces node1, node2, ...)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            cluster = SlurmCluster(args.workdir, nodes=args.nodes).up()
            cluster._release_lock()
            names = ", ".join(n.name for n in cluster.nodes)
            print(f"Slurm is up: nodes {names}, state and logs in {cluster.workdir}; "
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


def started_cluster(nodes: int = 1):
    """Generator for a module-scoped pytest fixture: a started cluster, torn down after the
    module; the module's tests are skipped when this machine cannot run Slurm."""
    import pytest

    try:
        cluster = SlurmCluster(nodes=nodes).up()
    except SlurmUnavailable as err:
        pytest.skip(f"no local {nodes}-node Slurm: {err}")
    try:
        yield cluster
    finally:
        cluster.down()


class SubmittedJob:
    """One job submitted to a SlurmCluster (subclasses submit it and set `id`): its log, a
    failure explanation with the cluster's logs, and waiting for its end."""

    cluster: SlurmCluster
    workdir: Path
    id: int
    LOG_TAIL = 5000  # characters of the job log in an explanation

    @property
    def log(self) -> str:
        logs = sorted(self.workdir.glob(f"*-{self.id}.out"))
        return logs[0].read_text(errors="replace") if logs else ""

    def explain(self) -> str:
        return (f"job {self.id}: {self.cluster.job_info(self.id)}\n--- job log (tail)\n"
                f"{self.log[-self.LOG_TAIL:]}\n{self.cluster.logs()}")

    def wait(self, restarts: int | None = None, *, timeout_s: float) -> dict[str, str]:
        import pytest

        try:
            return self.cluster.wait_job(self.id, timeout_s=timeout_s, restarts=restarts)
        except TimeoutError as err:
            pytest.fail(f"{err}\n{self.explain()}")
