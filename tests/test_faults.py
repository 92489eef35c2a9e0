"""Fault and bad-input campaign: kill -9 during saves, a rank killed, disk full, corruption,
signals, malicious files, bad configs/data/resumes. tests/FAULTS.md reports the figures.

Cost control (2 cores): the >= 50 kill -9 trials fork a saver from this process (torch is
imported once); the real 2-process runs form ONE chain of launches on one output dir (each
phase resumes the previous one and ends in a different fault) plus one uninterrupted reference;
bad inputs go through `mtl_dist.cli.main` in this process (exit status = its return value).
Forking tests come first: later tests run the trainer in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from mtl_dist import checkpoint as ck
from mtl_dist.checkpoint import CheckpointManager
from mtl_dist.errors import CheckpointError
from tests._runs import CPU_LAUNCH, DEMO, REPO, env, free_port, records, train_losses

slow = pytest.mark.slow  # real launches (or ~30 s of forked kills); the rest is quick

REPORT: dict[str, object] = {}  # figures for tests/FAULTS.md, printed at the end (pytest -s)


def _report(key: str, value: object) -> None:
    REPORT[key] = value
    print(f"\n[faults] {key}: {json.dumps(value, default=str)}")


# =============================================================================== helpers


def _committed(out: Path) -> dict[int, Path]:
    """step -> every checkpoint-N dir under OUTPUT/checkpoints whose commit marker is valid."""
    found = {}
    ckdir = out / "checkpoints"
    for path in ckdir.glob("checkpoint-*") if ckdir.is_dir() else []:
        if re.fullmatch(r"checkpoint-\d+", path.name) and ck.is_committed(path):
            found[int(path.name.split("-")[1])] = path
    return found


def _verify_tree(out: Path) -> list[str]:
    """Problems with final-named dirs: every checkpoint-N (and best/) must be committed and whole."""
    problems = []
    dirs = [p for p in (out / "checkpoints").glob("checkpoint-*")
            if re.fullmatch(r"checkpoint-\d+", p.name)] if (out / "checkpoints").is_dir() else []
    if (out / "best").exists():
        dirs.append(out / "best")
    for d in dirs:
        try:
            manifest = ck.read_manifest(d)
            ck._verify_files(d, manifest, manifest["files"])
        except CheckpointError as exc:
            problems.append(str(exc))
    return problems


def _snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (to prove nothing was touched)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names and tensor bytes (order-independent, bit-exact)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# =============================================================================== 1. kill -9 x N
# A saver child, forked from here, runs the trainer's own app_state (demo model, AdamW with the
# trainer's param groups, schedule, sampler cursor, early stopping, EMA) through the real
# CheckpointManager: every cycle is one periodic save (commit, rotation with limit 2) and one
# best save (replacing best/). Targeted trials kill it at each phase boundary of a cycle
# (the `_pause` test hook), random trials at a random moment (mid-write included).

LIMIT = 2
TASK_LABELS = [3, 7, 15]


def _objects(seed: int, vocab: int) -> dict:
    from transformers import get_linear_schedule_with_warmup

    from mtl_dist.config import load_config
    from mtl_dist.ema import EMA
    from mtl_dist.model import build_model
    from mtl_dist.sampler import MultiTaskBatchPlan, RankBatchSampler
    from mtl_dist.trainer import EarlyStopping, make_optimizer

    cfg = load_config(DEMO)
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab, TASK_LABELS)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    plan = MultiTaskBatchPlan([1200, 900, 1500], global_batch_size=32, seed=42)
    sampler = RankBatchSampler(plan, [0, 1200, 2100], rank=0, world_size=1)
    sampler.set_epoch(0)
    return {"model": model, "optimizer": optimizer,
            "scheduler": get_linear_schedule_with_warmup(optimizer, 2, 10_000),
            "sampler": sampler, "early_stopping": EarlyStopping(3), "ema": EMA(model, 0.9)}


def _manifest(objs: dict) -> dict:
    from mtl_dist.trainer import model_signature

    return {"world_size": 1, "zero_stage": 0, "global_batch_size": 32,
            "tasks": ["nli", "emotion", "news"], "model_shape": model_signature(objs["model"])}


def _train_step(objs: dict, step: int, vocab: int) -> None:
    model, task = objs["model"], step % 3
    ids = torch.randint(5, vocab, (4, 12))
    loss, _ = model(input_ids=ids, attention_mask=torch.ones_like(ids), task_id=task,
                    labels=torch.randint(0, TASK_LABELS[task], (4,)))
    loss.backward()
    objs["optimizer"].step()
    objs["scheduler"].step()
    objs["optimizer"].zero_grad(set_to_none=True)
    sampler = objs["sampler"]
    sampler.advance()
    if sampler.position >= sampler.plan.num_steps(sampler.epoch):
        sampler.set_epoch(sampler.epoch + 1)
    objs["ema"].update(model)
    objs["early_stopping"].update(-loss.item(), step)


def _cycle(mgr: CheckpointManager, objs: dict, step: int) -> None:
    """What the trainer does at a step boundary: periodic save, then a best save."""
    total = _digest(objs["model"].state_dict())
    mgr.save(step, objs, {"global_step": step, "weights": total}, manifest=_manifest(objs))
    mgr.save_best(step, float(step), objs["model"].state_dict(),
                  extra_files={"labels.json": "{}", "config.yaml": "a: 1\n",
                               "tokenizer/vocab.txt": b"[PAD]\n"},
                  metadata={"weights": total}, manifest=_manifest(objs))


def _commit_stages() -> dict[int, str]:
    """Line of each `_pause()` in checkpoint._commit -> what is on disk at that moment."""
    import inspect

    lines, first = inspect.getsourcelines(ck._commit)
    at = [first + i for i, line in enumerate(lines) if "_pause()" in line]
    return dict(zip(at, ["files written", "manifest.json written", "COMMITTED written"],
                    strict=False))


_COMMIT_STAGES = _commit_stages()


def _label() -> str:
    """Which phase just ended: '<periodic|best>/<function>[:file]' of the `_pause` caller."""
    frame = sys._getframe(2)
    caller, kind, f = frame.f_code.co_name, "periodic", frame
    while f is not None:
        if f.f_code.co_name in ("save", "save_best"):
            kind = "best" if f.f_code.co_name == "save_best" else "periodic"
            break
        f = f.f_back
    path = frame.f_locals.get("path")
    if caller == "_write_extra":
        return f"{kind}/{caller}:{frame.f_locals.get('name')}"
    if caller in ("_torch_save", "_save_safetensors", "_write_json") and path is not None:
        return f"{kind}/{caller}:{Path(path).name}"
    if caller == "_commit":
        return f"{kind}/{caller}:{_COMMIT_STAGES.get(frame.f_lineno, frame.f_lineno)}"
    return f"{kind}/{caller}"


def _saver(out: str, seed: int, vocab: int, kill_at: int | None, shared: dict) -> None:
    """Child: resume from the newest checkpoint, then cycle forever; with `kill_at`, SIGKILL
    itself at that pause of its third cycle (the first two warm rotation and best/ up)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ.pop(ck.SLEEP_ENV, None)
    state = {"pauses": 0, "counting": False}

    def hook() -> None:
        shared["label"].value = _label().encode()[:95]
        if state["counting"]:
            state["pauses"] += 1
            if state["pauses"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.001)

    ck._pause = hook
    objs = _objects(seed, vocab)
    mgr = CheckpointManager(out, save_total_limit=LIMIT)
    step, latest = 0, mgr.latest()
    if latest is not None:
        step = mgr.load(latest, objs, expected_manifest=_manifest(objs))["global_step"]
        mgr.restore_rng(latest)
    shared["resumed"].value = step
    for cycle in range(10**6):
        step += 1
        _train_step(objs, step, vocab)
        state["counting"] = kill_at is not None and cycle == 2
        shared["saving"].value = step
        _cycle(mgr, objs, step)
        shared["committed"].value = step


def _audit(out: Path, objs: dict, known_committed: int, known_best: int) -> dict:
    """After a kill: whole final dirs, latest == newest committed, it loads and holds exactly
    the saved weights, best/ (recovered if the swap was cut) is whole and not older than known."""
    result = {"corrupt_dirs": 0, "corrupt_loads": 0, "wrong_state": 0, "lost": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = CheckpointManager(out, save_total_limit=LIMIT)  # also reinstalls a cut best/ swap
        latest = mgr.latest()
    result["corrupt_dirs"] = len(_verify_tree(out))
    committed = _committed(out)
    newest = max(committed, default=0)
    result["newest"] = newest
    result["latest_is_newest"] = (latest is None and newest == 0) or \
        (latest is not None and latest.name == f"checkpoint-{newest}")
    result["lost"] += newest < known_committed
    if latest is not None:
        try:
            state = mgr.load(latest, objs, expected_manifest=_manifest(objs))
            result["wrong_state"] += state["weights"] != _digest(objs["model"].state_dict())
        except CheckpointError:
            result["corrupt_loads"] += 1
    if known_best:
        try:
            info = json.loads((out / "best" / "best.json").read_text())
            weights = ck.load_model_state(out / "best")
            result["lost"] += info["step"] < known_best
            result["wrong_state"] += info["weights"] != _digest(weights)
        except (CheckpointError, OSError, ValueError):
            result["corrupt_loads"] += 1
    return result


@slow
def test_kill_9_at_every_phase_and_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    from mtl_dist.data import demo_tokenizer

    vocab = len(demo_tokenizer())
    # The phases of one cycle, learned from a dry run in this process.
    probe, labels = tmp_path / "probe", []
    real_pause = ck._pause
    ck._pause = lambda: labels.append(_label())
    try:
        objs = _objects(0, vocab)
        mgr = CheckpointManager(probe, save_total_limit=LIMIT)
        for step in (1, 2, 3):
            labels.clear()
            _train_step(objs, step, vocab)
            _cycle(mgr, objs, step)
    finally:
        ck._pause = real_pause
    cycle_phases = list(labels)
    assert any(x.startswith("periodic/rotate") for x in cycle_phases)
    assert any(x.startswith("best/_install") for x in cycle_phases)

    ctx = multiprocessing.get_context("fork")
    rng = random.Random(10)
    out = tmp_path / "out"
    audit_objs = _objects(99, vocab)
    plans = [("phase", k) for k in range(1, len(cycle_phases) + 1)] + [("random", None)] * 30
    rng.shuffle(plans)
    totals = Counter()
    where: Counter = Counter()
    known_committed = known_best = 0
    for trial, (kind, k) in enumerate(plans):
        # lock=False: the child is SIGKILLed at any moment, also inside a locked write of
        # these, which left the lock held and the next read here blocked forever (CI hung)
        shared = {"label": ctx.Array("c", 96, lock=False),
                  **{name: ctx.Value("i", start, lock=False)
                     for name, start in (("resumed", -1), ("saving", 0), ("committed", 0))}}
        newest_before = max(_committed(out), default=0)
        p = ctx.Process(target=_saver, args=(str(out), trial, vocab, k, shared))
        p.start()
        if kind == "random":  # once resumed, at a random moment of its next ~5 cycles
            deadline = time.monotonic() + 60
            while shared["resumed"].value < 0 and p.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(p.pid, signal.SIGKILL)
        p.join(120)
        assert p.exitcode == -signal.SIGKILL, f"trial {trial}: saver ended with {p.exitcode}"
        label = shared["label"].value.decode()
        where[cycle_phases[k - 1] if kind == "phase" else f"random after {label}"] += 1
        totals["trials"] += 1
        totals["resumes"] += shared["resumed"].value >= 0
        totals["resumed_newest"] += shared["resumed"].value == newest_before
        totals["cut_mid_save"] += any((out / "checkpoints").glob(".tmp-checkpoint-*")) or \
            any(out.glob(".tmp-best-*")) or any(out.glob(".old-best-*"))
        known_committed = max(known_committed, shared["committed"].value)
        known_best = max(known_best, shared["committed"].value)  # best saved right after
        audit = _audit(out, audit_objs, known_committed, known_best)
        for key in ("corrupt_dirs", "corrupt_loads", "wrong_state", "lost"):
            totals[key] += audit[key]
        totals["latest_is_newest"] += audit["latest_is_newest"]
    figures = {**totals, "phases_per_cycle": len(cycle_phases), "kills_by_phase": dict(where),
               "newest_committed_step_at_end": known_committed}
    _report("kill9_forked_saver", figures)
    assert totals["trials"] >= 50
    assert totals["corrupt_dirs"] == totals["corrupt_loads"] == totals["wrong_state"] == 0
    assert totals["lost"] == 0
    assert totals["resumed_newest"] == totals["resumes"] == totals["trials"]
    assert totals["latest_is_newest"] == totals["trials"]
    assert totals["cut_mid_save"] >= 10  # many kills did land inside a save
    assert known_committed > 60  # and the saver made progress between kills


# =============================================================================== 3. disk full (unit)
# RLIMIT_FSIZE in a forked child (works without root or mount rights; Python ignores SIGXFSZ,
# so a write past the limit fails with EFBIG after writing what fits, like a full disk).


def _in_child(fn, limit: int, *args):
    """Run fn(*args) in a forked child with RLIMIT_FSIZE=limit; returns its result or error text."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()

    def target() -> None:
        warnings.simplefilter("ignore")
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            queue.put(("ok", fn(*args)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            queue.put((type(exc).__name__, str(exc)))

    p = ctx.Process(target=target)
    p.start()
    p.join(120)
    assert p.exitcode == 0, f"child ended with {p.exitcode}"
    return queue.get()


def _small_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Linear(512, 64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def test_disk_full_during_saves_fails_one_line_and_keeps_what_was_saved(tmp_path: Path) -> None:
    objs = _small_objects()  # model.safetensors ~ 0.5 MB
    mgr = CheckpointManager(tmp_path, save_total_limit=1)
    mgr.save(1, objs, {"global_step": 1}, manifest={})
    mgr.save_best(1, 0.5, objs["model"].state_dict(), extra_files={}, metadata={})
    before = _snapshot(tmp_path)

    def periodic():
        CheckpointManager(tmp_path, save_total_limit=1).save(2, objs, {"global_step": 2},
                                                                 manifest={})

    def best():
        CheckpointManager(tmp_path, save_total_limit=1).save_best(
            2, 0.9, objs["model"].state_dict(), extra_files={}, metadata={})

    kind, message = _in_child(periodic, 100_000)
    assert kind == "CheckpointError" and "\n" not in message
    assert message.startswith("saving checkpoint-2 failed on rank 0: ") and \
        "File too large" in message, message
    kind, message = _in_child(best, 100_000)
    assert kind == "CheckpointError" and "\n" not in message
    assert message.startswith("saving best (step 2) failed: ") and "File too large" in message
    # Nothing committed was touched, nothing half-written is left to eat the disk.
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1"]
    CheckpointManager(tmp_path, save_total_limit=1).load(tmp_path / "checkpoints" /
                                                         "checkpoint-1", _small_objects())
    assert ck.load_model_state(tmp_path / "best").keys() == objs["model"].state_dict().keys()


def test_disk_full_writing_run_files_and_metrics_is_one_line(tmp_path: Path) -> None:
    from mtl_dist.tracking import MetricsLog

    mgr = CheckpointManager(tmp_path, save_total_limit=1)
    mgr.write_run_file("config.yaml", "a: 1\n")
    kind, message = _in_child(lambda: mgr.write_run_file("config.yaml", "b: 2\n" * 500), 1000)
    assert (kind, message) == ("CheckpointError", f"cannot write {tmp_path / 'config.yaml'}: "
                               "OSError: [Errno 27] File too large")
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temp file left
    log = MetricsLog(tmp_path, is_main=True)
    log.log("train", 1, {"loss": 1.0})
    size = (log.path).stat().st_size
    kind, message = _in_child(lambda: log.log("train", 2, {"loss": 2.0, "pad": "x" * 300}),
                              size + 40)
    assert kind == "MtlDistError" and message.startswith(f"cannot append to {log.path}: "), message
    # The torn half line left behind must not stop a resume (nor a report) from reading the log.
    assert not log.path.read_text().endswith("\n")
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: skipping an unreadable line"):
        log.truncate_after(5)
    assert [r["step"] for r in map(json.loads, log.path.read_text().splitlines())] == [1]


# =============================================================================== security


class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _forge(path: Path, name: str, payload: object) -> None:
    """Replace one file and re-sign the manifest and COMMITTED like an attacker would."""
    torch.save(payload, path / name)
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    raw = json.dumps(manifest).encode()
    (path / "manifest.json").write_bytes(raw)
    (path / "COMMITTED").write_text(json.dumps({"step": manifest["step"],
                                                "manifest_sha256": hashlib.sha256(raw).hexdigest()}))


def test_malicious_pickles_are_refused_by_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the payload is real...
    assert marker.exists()
    marker.unlink()
    objs = _small_objects()
    mgr = CheckpointManager(tmp_path / "out", save_total_limit=None)
    path = mgr.save(1, objs, {"global_step": 1}, manifest={})
    _forge(path, "optimizer.pt", _Payload(marker))
    with pytest.raises(CheckpointError) as err:
        mgr.load(path, _small_objects())
    assert str(err.value).startswith(f"cannot load {path / 'optimizer.pt'}: UnpicklingError: "
                                     "Weights only load failed")
    assert "\n" not in str(err.value)
    _forge(path, "rng_state_0.pth", _Payload(marker))
    with pytest.raises(CheckpointError, match=r"cannot load .*rng_state_0\.pth: Unpickling"):
        mgr.restore_rng(path)
    # `mtl-dist ckpt inspect` shows it in the file's place, unloaded
    assert re.match(r"cannot load .*rng_state_0\.pth: Unpickling",
                    ck.inspect(path)["rng"][0]["unreadable"])
    assert not marker.exists()  # ...and it never ran


# =============================================================================== 1, 2, 5: real runs
# One uninterrupted 2-process reference, then ONE chain of 2-process launches on one OUTPUT:
# each phase resumes (train.resume=auto) and ends in a fault; the last finishes, and its final
# evaluation and every logged loss must equal the reference's.

STEPS = 40
RUN = [f"train.max_steps={STEPS}", "train.log_steps=1", "train.eval_steps=10",
       "checkpoint.save_steps=5", "checkpoint.save_total_limit=3",
       "train.early_stopping_patience=null", "train.collective_timeout_s=20"]
SLOW_SAVES = {ck.SLEEP_ENV: "0.1"}  # ~1-2 s per save: room to land a kill -9 inside it


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults_cache")


def _launch(out: Path, cache: Path, log: Path, extra: tuple[str, ...] = (),
            env_extra: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_LAUNCH),
           "--num_processes", "2", "--main_process_port", str(free_port()), "--module",
           "mtl_dist.cli", "train", str(DEMO), f"train.output_dir={out}",
           f"data.cache_dir={cache}", *RUN, "train.resume=auto", *extra]
    with log.open("ab") as f:
        f.write(f"\n===== {' '.join(cmd[-3:])} {env_extra or ''}\n".encode())
        return subprocess.Popen(cmd, env={**env(), **(env_extra or {})}, stdout=f,
                                stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's workers (their RANK variable)."""
    found = {}
    for pid in _children().get(launcher, []):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = pid
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill9(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.02)
    raise AssertionError(f"no {what} after {timeout} s:\n{_tail(log)}")


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace").replace("\r", "\n")[-n:]


def _last_step(out: Path, since: float) -> int:
    """Highest step logged by a process started after `since` (older lines are left over)."""
    path, steps = out / "metrics.jsonl", [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("time", 0) >= since:
                steps.append(rec["step"])
    return max(steps)


def _new_summary(out: Path, since: float) -> dict | None:
    """The summary record a process started after `since` wrote (None: it wrote none)."""
    found = None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("kind") == "summary" and rec.get("time", 0) >= since:
                found = rec
    return found


def _final_eval(out: Path) -> dict:
    return {k: v for k, v in records(out, "eval")[-1].items() if k != "time"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    root = tmp_path_factory.mktemp("faults_ref")
    out, log = root / "out", root / "log.txt"
    proc = _launch(out, cache, log)
    assert proc.wait(400) == 0, _tail(log)
    return out


def _phase(out: Path, cache: Path, log: Path, fault, env_extra: dict | None = None) -> dict:
    """Resume, let `fault(proc, result)` strike, wait for the end; what happened, in a dict."""
    start_text = len(log.read_text(errors="replace")) if log.exists() else 0
    t_start = time.time()
    before = _committed(out)
    result = {"newest_before": max(before, default=0)}
    proc = _launch(out, cache, log, env_extra=env_extra)
    try:
        fault(proc, result)
        t0 = time.monotonic()
        result["rc"] = proc.wait(180)
        result["seconds_to_end"] = round(time.monotonic() - t0, 1)
    finally:
        if proc.poll() is None:
            _kill9([proc.pid, *_rank_pids(proc.pid).values()])
            proc.wait(10)
    ranks = result.get("ranks", {})
    deadline = time.monotonic() + 90  # orphaned ranks (launcher gone) may still be saving
    while any(_alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    result["ranks_alive_after"] = [r for r, pid in ranks.items() if _alive(pid)]
    _kill9([pid for pid in ranks.values() if _alive(pid)])
    text = log.read_text(errors="replace")[start_text:].replace("\r", "\n")
    m = re.search(r"resumed from (\S+) at step (\d+)", text)
    result["resumed_from"] = int(m.group(2)) if m else 0
    # torchrun's failure table: "rank : R (local_rank: R)" then "exitcode : C"
    result["rank_exit_codes"] = {int(r): int(c) for r, c in re.findall(
        r"rank\s*:\s*(\d+) \(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", text)}
    result["summary"] = _new_summary(out, t_start)
    committed = _committed(out)
    result["committed_after"] = sorted(committed)
    result["newest_files"] = sorted(ck.read_manifest(committed[max(committed)])["files"]) \
        if committed else []
    result["problems"] = _verify_tree(out)
    result["tmp_left"] = sorted(p.name for p in [*(out / "checkpoints").glob(".*"),
                                                 *out.glob(".*-best-*")])
    result["log"] = text[-2500:]
    return result


def _kill9_during_save(path_glob: str, delay: tuple[float, float], rng: random.Random,
                       only_rank: int | None = None):
    """kill -9 the launcher and both ranks (a node lost), or one rank, once `path_glob` (a save's
    temp dir) exists plus a random delay (saves are slowed down by the test hook)."""
    def fault(proc: subprocess.Popen, result: dict) -> None:
        out = result["out"]
        stale = set(out.glob(path_glob))  # left by an earlier kill: not this run's save

        def fresh() -> list[Path]:
            return [p for p in out.glob(path_glob) if p not in stale]

        _wait_for(fresh, proc, result["logfile"], path_glob)
        tmp = next(iter(fresh()), None)
        time.sleep(rng.uniform(*delay))
        result["files_in_tmp_at_kill"] = sorted(p.name for p in tmp.iterdir()) \
            if tmp is not None and tmp.exists() else "(renamed already)"
        result["ranks"] = _rank_pids(proc.pid)
        victims = [proc.pid, *result["ranks"].values()] if only_rank is None else \
            [result["ranks"][only_rank]]
        _kill9(victims)
    return fault


def _signal_when_training(target: str, sig: int):
    def fault(proc: subprocess.Popen, result: dict) -> None:
        out, since = result["out"], time.time()
        start = result["newest_before"]
        _wait_for(lambda: _last_step(out, since) >= start + 2, proc, result["logfile"],
                  "2 new steps")
        result["ranks"] = _rank_pids(proc.pid)
        victim = proc.pid if target == "launcher" else result["ranks"][int(target)]
        result["signalled_at_step"] = _last_step(out, since)
        os.kill(victim, sig)
    return fault


@pytest.fixture(scope="module")
def chain(reference, cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults_chain")
    out, log = root / "out", root / "log.txt"
    rng = random.Random(5)
    phases = {
        # kill -9 of the whole job (launcher and both ranks) inside the 2nd periodic save
        "kill9_job_in_periodic_save": (
            _kill9_during_save("checkpoints/.tmp-checkpoint-10-*", (0.0, 0.9), rng), SLOW_SAVES),
        # ... and inside a best/ update (the old best/ is being replaced)
        "kill9_job_in_best_save": (_kill9_during_save(".tmp-best-*", (0.0, 0.9), rng),
                                   SLOW_SAVES),
        # kill -9 of rank 1 alone, inside a periodic save: rank 0 must not wait forever
        "kill9_rank1": (_kill9_during_save("checkpoints/.tmp-checkpoint-*", (0.0, 0.6), rng,
                                           only_rank=1), SLOW_SAVES),
        "usr1_rank0": (_signal_when_training("0", signal.SIGUSR1), None),
        "term_rank1": (_signal_when_training("1", signal.SIGTERM), None),
        "usr1_launcher": (_signal_when_training("launcher", signal.SIGUSR1), None),
        "final": (lambda proc, result: None, None),
    }
    results = {}
    for name, (fault, env_extra) in phases.items():
        def with_paths(proc, result, fault=fault):
            result.update(out=out, logfile=log)
            fault(proc, result)
        try:
            results[name] = _phase(out, cache, log, with_paths, env_extra)
        except AssertionError as exc:
            results[name] = {"error": str(exc)}
        results[name].pop("out", None)
        results[name].pop("logfile", None)
    results["out"] = out
    _report("chain", {k: {x: y for x, y in v.items() if x not in ("log", "newest_files")}
                      for k, v in results.items() if k != "out"})
    return results


def _ok(result: dict) -> dict:
    assert "error" not in result, result["error"]
    assert result["problems"] == [], result["problems"]  # final-named dirs: committed, whole
    assert result["resumed_from"] == result["newest_before"]  # auto-resume took the newest
    return result


@slow
@pytest.mark.parametrize("name", ["kill9_job_in_periodic_save", "kill9_job_in_best_save"])
def test_kill_9_of_the_whole_job_inside_a_save(chain, name) -> None:
    r = _ok(chain[name])
    assert r["rc"] == -signal.SIGKILL
    assert r["files_in_tmp_at_kill"] != "(renamed already)", "the kill missed the save"
    # nothing half-written under a final name (checked in _ok), the newest committed survives
    assert max(r["committed_after"], default=0) >= r["newest_before"]


@slow
def test_kill_9_of_one_rank_inside_a_save_ends_the_job_in_bounded_time(chain) -> None:
    r = _ok(chain["kill9_rank1"])
    assert r["rc"] == 1 and r["seconds_to_end"] < 60, r["log"]
    assert r["rank_exit_codes"][1] == -signal.SIGKILL
    assert r["ranks_alive_after"] == []
    assert max(r["committed_after"]) >= r["newest_before"]


@slow
@pytest.mark.parametrize("name", ["usr1_rank0", "term_rank1"])
def test_signal_to_one_rank_checkpoints_the_same_step_on_all_ranks(chain, name) -> None:
    r = _ok(chain[name])
    step, summary = r["signalled_at_step"], r["summary"]
    assert r["rc"] == 1, r["log"]  # torchrun's agent: a child exited non-zero
    # As soon as one rank exits 75 the agent TERMs the other: 75 too if that lands while the
    # trainer's handlers are installed, -15 if it lands during interpreter exit (all done).
    codes = r["rank_exit_codes"]
    assert set(codes) == {0, 1} and 75 in codes.values() and \
        set(codes.values()) <= {75, -signal.SIGTERM}, r["log"]
    assert summary["stop_reason"] == "preempted" and summary["exit_code"] == 75
    stop = summary["global_step"]
    assert step <= stop <= step + 2 and max(r["committed_after"]) == stop
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(r["newest_files"])


@slow
def test_usr1_to_the_launcher_still_checkpoints_and_stops_the_ranks(chain) -> None:
    """torchrun's agent (in `accelerate launch`) does not handle USR1: it dies of it. Its ranks
    must not train on unsupervised: they get SIGTERM (parent-death signal) and checkpoint."""
    r = _ok(chain["usr1_launcher"])
    assert r["rc"] == -signal.SIGUSR1
    assert r["ranks_alive_after"] == [], r["log"]
    summary = r["summary"]
    assert summary["stop_reason"] == "preempted", r["log"]
    assert max(r["committed_after"]) == summary["global_step"] < STEPS
    assert summary["global_step"] <= r["signalled_at_step"] + 2


@slow
def test_after_every_fault_auto_resume_ends_exactly_like_the_reference(chain, reference) -> None:
    r = _ok(chain["final"])
    out = chain["out"]
    assert r["rc"] == 0, r["log"]
    assert r["tmp_left"] == []  # what killed saves left behind was cleaned by later saves
    assert records(out, "summary")[-1]["stop_reason"] == "finished"
    assert train_losses(out) == train_losses(reference)
    assert _final_eval(out) == _final_eval(reference)
    best, ref_best = (json.loads((o / "best" / "best.json").read_text()) for o in (out, reference))
    assert (best["step"], best["score"]) == (ref_best["step"], ref_best["score"])
    a, b = ck.load_model_state(out / "best"), ck.load_model_state(reference / "best")
    assert all(torch.equal(a[k], b[k]) for k in b)


# =============================================================================== 3. disk full (CLI)


@contextlib.contextmanager
def _small_disk(where: Path, size: str = "8m"):
    """A tmpfs of `size` at `where` when this machine lets us mount one, else None."""
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    try:
        yield where if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(mount: Path, leave: int) -> Path:
    filler = mount / "filler"
    st = os.statvfs(mount)
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def _cli(args: list[str], preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtl_dist.cli", *args], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


@slow
def test_disk_full_during_a_real_save_stops_cleanly_then_resumes(reference, cache, tmp_path):
    """1 process resumes the reference's checkpoint-30 (global batch 32 kept) on an OUTPUT with
    ~300 KB left (a tmpfs, or RLIMIT_FSIZE where mounting is not allowed): checkpoint-35 fails."""
    with _small_disk(tmp_path / "disk") as mount:
        out = (mount or tmp_path) / "out"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(reference / "checkpoints" / "checkpoint-30",
                        out / "checkpoints" / "checkpoint-30")
        shutil.copytree(reference / "best", out / "best")
        shutil.copy(reference / "labels.json", out / "labels.json")
        before = {d: _snapshot(out / d) for d in ("best", "checkpoints")}
        args = ["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={cache}", *RUN,
                "train.per_device_batch_size=32", "train.resume=auto"]
        limit = 300_000
        filler = _fill(mount, limit) if mount else None

        def rlimit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        failed = _cli(args, preexec=None if mount else rlimit)
        why = "No space left on device" if mount else "File too large"
        errors = [line[line.index("error: "):] for line in failed.stderr.splitlines()
                  if "error: " in line]
        _report("disk_full_cli", {"mechanism": "tmpfs" if mount else "RLIMIT_FSIZE",
                                  "rc": failed.returncode, "stderr_error_lines": errors})
        assert failed.returncode == 2, failed.stderr[-3000:]
        assert "Traceback" not in failed.stderr
        assert len(errors) == 1 and errors[0].startswith(
            "error: saving checkpoint-35 failed on rank 0: ") and why in errors[0], errors
        assert {d: _snapshot(out / d) for d in ("best", "checkpoints")} == before
        assert _verify_tree(out) == [] and sorted(_committed(out)) == [30]
        assert not [p for p in out.rglob(".*tmp*")]
        if filler:
            filler.unlink()
        done = _cli(args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert records(out, "summary")[-1]["stop_reason"] == "finished"
        assert sorted(_committed(out)) == [30, 35, 40] and _verify_tree(out) == []


# =============================================================================== bad input (CLI)


def _main(capsys, args: list[str]) -> tuple[int, str]:
    """`mtl-dist ARGS` in this process: (exit status, the stderr text)."""
    from mtl_dist.cli import main

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(args)
    return rc, capsys.readouterr().err


def _one_error(rc: int, err: str) -> str:
    """Exit 2, one `error:` line, no traceback: the line."""
    lines = [line for line in err.splitlines() if "error: " in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0][lines[0].index("error: "):]


MODEL_YAML = """\
model:
  tokenizer: "demo:"
  arch: {hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128,
         max_position_embeddings: 128}
data: {max_length: 64}
train: {per_device_batch_size: 32, lr: 1.0e-3, max_steps: 2, log_steps: 1}
checkpoint: {save_steps: 2}
"""


def _config(tmp: Path, **files: str | bytes) -> Path:
    """A one-task config (train + dev files given as contents) under tmp."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (tmp / f"{name}.tsv").write_bytes(data)
    lines = ["tasks:", "  - name: tiny", "    train: train.tsv"]
    lines += [f"    {split}: {split}.tsv" for split in ("dev", "test") if split in files]
    (tmp / "run.yaml").write_text(MODEL_YAML + "\n".join(lines) + "\n")
    return tmp / "run.yaml"


GOOD = "1\tboy eats apple\tx\n2\tgirl reads book\ty\n3\tboy reads book\tx\n"
LONG = GOOD + "4\t" + "boy eats apple " * 2000 + "\ty\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def test_task_smaller_than_the_global_batch_trains_and_long_lines_are_counted(
        tiny_run: Path, capsys, caplog) -> None:
    """4 rows for a global batch of 32: the plan wraps around; the 6000-word row is cut to 64
    tokens and counted (logged on stderr by the CLI; caught by caplog here)."""
    cfg = _config(tiny_run, train=LONG, dev=GOOD)
    rc, err = _main(capsys, ["train", str(cfg), f"train.output_dir={tiny_run}/out",
                             f"data.cache_dir={tiny_run}/cache"])
    assert rc == 0, err[-3000:]
    assert "tiny (train): 1 of 4 samples were longer than data.max_length=64 tokens and " \
        "were truncated" in caplog.text
    assert records(tiny_run / "out", "summary")[-1]["stop_reason"] == "finished"
    assert ck.is_committed(tiny_run / "out" / "best")


BAD_CONFIGS = [
    (["train.lrr=1"], "override 'train.lrr=1': config key 'train.lrr' is unknown; did you mean "
                      "'train.lr'?"),
    (["train.lr=abc"], "override 'train.lr=abc': config key 'train.lr': expected float, got "
                       "'abc'"),
    (["train.warmup_ratio=1.5"], "override 'train.warmup_ratio=1.5': config key "
                                 "'train.warmup_ratio': expected in [0, 1], got 1.5"),
    (["tasks.0.dev=nope.tsv"], "override 'tasks.0.dev=nope.tsv': tasks[0].dev: file not found: "
                               "{cwd}/nope.tsv"),
    (["train.mixed_precision=fp16"], "override 'train.mixed_precision=fp16': "
                                     "train.mixed_precision: 'fp16' needs a CUDA GPU; use 'bf16' "
                                     "or 'no' on CPU"),
    (["train.cuda_graphs=true", "train.zero_stage=2"],
     "override 'train.cuda_graphs=true': config key 'train.cuda_graphs': expected false with "
     "train.zero_stage=2 (CUDA graphs run on one GPU without DeepSpeed), got true"),
    (["train.zero_stage=2", "train.deepspeed_config={ds}"],
     "override 'train.deepspeed_config={ds}': train.deepspeed_config: 'train_batch_size' is "
     "100 but the run config implies 16; set it to \"auto\""),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_CONFIGS,
                         ids=["unknown", "type", "range", "missing", "fp16_cpu",
                              "graphs_zero", "ds_batch"])
def test_bad_config_is_one_line_and_touches_no_output(tmp_path, capsys, overrides, expected):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 100, "zero_optimization": {"stage": 2}}')
    out = tmp_path / "out"
    args = [o.format(ds=ds) for o in overrides]
    rc, err = _main(capsys, ["train", str(DEMO), f"train.output_dir={out}",
                             f"data.cache_dir={tmp_path}/cache", *args])
    assert _one_error(rc, err) == "error: " + expected.format(cwd=os.getcwd(), ds=ds)
    assert not out.exists()


BAD_DATA = [
    ({"train": ""}, "{config}:10: tasks[0].train: file is empty: {train}"),  # by the config check
    ({"train": "1\ta\tx\n2\tb\n"}, "{train}:2: expected 3 tab-separated columns (id, text, "
                                   "label), got 2"),
    ({"train": "1\ta\tx\n2\t  \tx\n"}, "{train}:2: empty text in column 2"),
    ({"train": b"1\ta\tx\n2\tb\tx\n3\tab\xffc\tx\n"}, "{train}:3: not valid UTF-8 (byte 0xff at "
                                                      "byte 5 of the line)"),
    ({"train": GOOD, "dev": "1\tboy\tx\n2\tgirl\tzzz\n"},
     "{dev}:2: label 'zzz' is not one of the task's labels (x, y)"),
]


@pytest.mark.parametrize(("files", "expected"), BAD_DATA,
                         ids=["empty", "columns", "empty_text", "utf8", "dev_label"])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, files, expected):
    cfg = _config(tmp_path, **files)
    out = tmp_path / "out"
    rc, err = _main(capsys, ["train", str(cfg), f"train.output_dir={out}",
                             f"data.cache_dir={tmp_path}/cache"])
    paths = {k: tmp_path / f"{k}.tsv" for k in ("train", "dev")} | {"config": cfg}
    assert _one_error(rc, err) == "error: " + expected.format(**paths)
    assert not out.exists()


def test_duplicate_ids_in_a_test_file_are_refused_at_predict(tiny_run, tmp_path, capsys):
    out = tiny_run / "out"
    if not ck.is_committed(out / "best"):
        pytest.skip("needs the tiny run")
    cfg = _config(tmp_path, train=GOOD, dev=GOOD, test="1\tboy\n2\tgirl\n1\tapple\n")
    before = _snapshot(out)
    rc, err = _main(capsys, ["predict", str(cfg), f"train.output_dir={out}",
                             f"data.cache_dir={tiny_run}/cache", "--checkpoint", str(out / "best")])
    assert _one_error(rc, err) == f"error: {tmp_path / 'test.tsv'}:3: duplicate id '1' (first " \
        "at line 1)"
    assert _snapshot(out) == before


# ------------------------------------------------------------------ resume and corruption (CLI)


@pytest.fixture()
def copied_run(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def _resume(capsys, out: Path, cache: Path, *overrides: str) -> str:
    """Resume the copied 2-rank run on 1 rank (global batch kept): its one error line, and
    nothing in OUTPUT changed."""
    before = _snapshot(out)
    rc, err = _main(capsys, ["train", str(DEMO), f"train.output_dir={out}",
                             f"data.cache_dir={cache}", *RUN, "train.max_steps=50",
                             "train.per_device_batch_size=32", "train.resume=auto", *overrides])
    line = _one_error(rc, err)
    assert _snapshot(out) == before
    return line


TASKS_2 = ("tasks=[{name: nli, pair: true, train: 'demo:nli/train', dev: 'demo:nli/dev'}, "
           "{name: emotion, train: 'demo:emotion/train', dev: 'demo:emotion/dev'}]")


@slow
def test_resume_with_another_model_size_tasks_or_labels_is_refused(copied_run, cache, capsys):
    ckpt = copied_run / "checkpoints" / f"checkpoint-{STEPS}"
    labels = copied_run / "labels.json"
    prefix = f"error: checkpoint {ckpt}: manifest key"
    assert _resume(capsys, copied_run, cache, "model.arch.hidden_size=32",
                   "model.arch.intermediate_size=64") == \
        f"{prefix} 'model_shape.hidden_size' differs: checkpoint has 64, this run has 32 " \
        "(the checkpoint's weights are of another model: resume with its model settings " \
        "(model.*), or start a new run)"
    assert _resume(capsys, copied_run, cache, TASKS_2) == \
        f'{prefix} \'tasks\' differs: checkpoint has ["nli", "emotion", "news"], this run has ' \
        '["nli", "emotion"]'
    assert _resume(capsys, copied_run, cache, "tasks.0.labels=[a, b, c]") == \
        "error: override 'tasks.0.labels=[a, b, c]': " \
        f"tasks[0].labels: ['a', 'b', 'c'] differ from the labels frozen in {labels}: " \
        "['contradiction', 'entailment', 'neutral']; a run's labels cannot change (use a new " \
        "train.output_dir)"
    assert _resume(capsys, copied_run, cache, "tasks.2.name=headlines") == \
        "error: override 'tasks.2.name=headlines': tasks[2].name: task 'headlines' has no " \
        f"labels in {labels} (it has: nli, " \
        "emotion, news); a run's tasks cannot change (use a new train.output_dir)"


@slow
def test_corrupt_checkpoints_are_named_by_file(copied_run, reference, cache, capsys):
    ckpt = copied_run / "checkpoints" / f"checkpoint-{STEPS}"
    prefix = f"error: checkpoint {ckpt}: file"
    older = copied_run / "checkpoints" / "checkpoint-35"  # every requeue would fail alike
    hint = f"; the newest intact checkpoint is {older}: resume it with train.resume={older} " \
        "(newer ones then move to abandoned/)"
    model = ckpt / "model.safetensors"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[:-100])
    assert _resume(capsys, copied_run, cache) == \
        f"{prefix} 'model.safetensors' has {size - 100} bytes, manifest.json says {size} " \
        f"(truncated or changed){hint}"
    shutil.copy(reference / "checkpoints" / f"checkpoint-{STEPS}" / "model.safetensors", model)
    opt = ckpt / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0x10
    opt.write_bytes(bytes(data))
    assert _resume(capsys, copied_run, cache) == \
        f"{prefix} 'optimizer.pt' is corrupt (sha256 differs from manifest.json){hint}"
    shutil.copy(reference / "checkpoints" / f"checkpoint-{STEPS}" / "optimizer.pt", opt)
    (ckpt / "rng_state_1.pth").unlink()
    assert _resume(capsys, copied_run, cache) == f"{prefix} 'rng_state_1.pth' is missing{hint}"
    assert _resume(capsys, copied_run, cache, f"train.resume={ckpt}") == \
        f"{prefix} 'rng_state_1.pth' is missing"  # named by hand: no hint
    shutil.copy(reference / "checkpoints" / f"checkpoint-{STEPS}" / "rng_state_1.pth", ckpt)
    # A manifest (and its marker) from another checkpoint: its step is not the folder's.
    for name in ("manifest.json", "COMMITTED"):
        shutil.copy(copied_run / "checkpoints" / "checkpoint-35" / name, ckpt / name)
    assert _resume(capsys, copied_run, cache) == (
        f"error: checkpoint {ckpt}: named step {STEPS} but its manifest.json says step 35 "
        "(copied, linked or converted into place by hand?): move it out of checkpoints/")
    # Damaged after the commit: refused with the hint (it was skipped as incomplete, the run
    # resumed checkpoint-35 and its next save at this step wrote over it).
    for name in ("manifest.json", "COMMITTED"):
        shutil.copy(reference / "checkpoints" / f"checkpoint-{STEPS}" / name, ckpt / name)
    (ckpt / "manifest.json").write_text('{"files": ')
    assert _resume(capsys, copied_run, cache) == \
        f"{prefix} 'manifest.json' does not match its hash in COMMITTED{hint}"
    (ckpt / "COMMITTED").write_text("")
    said = _resume(capsys, copied_run, cache)
    assert said.startswith(f"error: checkpoint {ckpt}: unreadable COMMITTED/manifest.json")
    assert said.endswith(hint) and "\n" not in said


@slow
def test_manifest_of_another_run_is_named_by_key(copied_run, tiny_run, cache, capsys):
    """manifest.json + COMMITTED of the tiny one-task run put into the demo run's checkpoint."""
    other = tiny_run / "out" / "checkpoints" / "checkpoint-2"
    if not ck.is_committed(other):
        pytest.skip("needs the tiny run")
    ckpt = copied_run / "checkpoints" / f"checkpoint-{STEPS}"
    for name in ("manifest.json", "COMMITTED"):
        shutil.copy(other / name, ckpt / name)
    assert _resume(capsys, copied_run, cache) == \
        f'error: checkpoint {ckpt}: manifest key \'tasks\' differs: checkpoint has ["tiny"], ' \
        'this run has ["nli", "emotion", "news"]'
