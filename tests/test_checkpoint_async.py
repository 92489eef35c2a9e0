"""Async periodic saves (`checkpoint.async_save`): the snapshot, the background write + commit.

Mostly in one process with the tiny objects of test_checkpoint; one in-process trainer resume;
one forked kill -9 campaign; one 2-rank gloo run through the CLI (the marker protocol).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint import MANIFEST, _check_output, make_objects, save, state_equal, train_step

from mtl_dist import checkpoint as ck
from mtl_dist.checkpoint import CheckpointManager
from mtl_dist.config import load_config
from mtl_dist.errors import CheckpointError, ConfigError
from tests._runs import DEMO, FAST, records, run_cli, train_losses


def _digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint but the manifest and its marker (they hold times)."""
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.iterdir())
        if f.name not in (ck.MANIFEST, ck.COMMITTED)
    }


def _tmp_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob(".tmp-checkpoint-*"))


class _Unsaveable:
    """A Stateful whose state torch.load(weights_only=True) could not read back."""

    def state_dict(self) -> dict:
        return {"arr": np.zeros(3)}

    def load_state_dict(self, state: dict) -> None:
        pass


class _Boom:
    """A Stateful whose state_dict() raises (a failure during the snapshot)."""

    def state_dict(self) -> dict:
        raise RuntimeError("boom")

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------- same checkpoint


def test_async_and_sync_saves_write_the_same_checkpoint(tmp_path: Path) -> None:
    objs = make_objects(0)
    for _ in range(2):
        train_step(objs)
    sync = CheckpointManager(tmp_path / "sync", save_total_limit=None)
    asyn = CheckpointManager(tmp_path / "async", save_total_limit=None, async_save=True)
    torch.manual_seed(5)
    a = save(sync, 2, objs)
    torch.manual_seed(5)  # the same RNG state goes into rng_state_0.pth
    b = save(asyn, 2, objs)
    assert asyn.save_in_flight and asyn.last_save_timing["background_s"] is None
    asyn.wait()
    assert not asyn.save_in_flight
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    assert _digests(a) == _digests(b)  # byte for byte (on CPU): tensors, sharing, JSON
    ma, mb = ck.read_manifest(a), ck.read_manifest(b)
    for key in ("created", "created_unix"):
        ma.pop(key), mb.pop(key)
    assert ma == mb
    fresh = make_objects(3)
    CheckpointManager(tmp_path / "async", save_total_limit=None).load(
        b, fresh, expected_manifest=MANIFEST
    )
    for name in objs:
        assert state_equal(fresh[name].state_dict(), objs[name].state_dict()), name
    assert fresh["model"].out.weight is fresh["model"].emb.weight
    timing = asyn.take_timings()
    assert [t["step"] for t in timing] == [2] and timing[0]["async"]
    assert timing[0]["blocking_s"] >= 0 and timing[0]["background_s"] > 0
    assert sync.take_timings()[0] | {"blocking_s": 0} == {
        "step": 2, "async": False, "blocking_s": 0, "background_s": 0.0
    }


def test_resume_from_an_async_checkpoint_continues_like_the_blocking_run(tmp_path: Path) -> None:
    losses = {}
    for mode in ("sync", "async"):
        torch.manual_seed(11)
        objs = make_objects(0)
        mgr = CheckpointManager(tmp_path / mode, save_total_limit=None, async_save=mode == "async")
        losses[mode] = [train_step(objs) for _ in range(3)]
        save(mgr, 3, objs)
        losses[mode] += [train_step(objs) for _ in range(3)]  # while the write goes on
        mgr.wait()
    assert losses["sync"] == losses["async"]
    fresh = make_objects(5)
    mgr = CheckpointManager(tmp_path / "async", save_total_limit=None)
    path = mgr.latest()
    mgr.load(path, fresh, expected_manifest=MANIFEST)
    mgr.restore_rng(path)
    assert [train_step(fresh) for _ in range(3)] == losses["sync"][3:]


def test_snapshot_keeps_sharing_and_copies_cpu_tensors() -> None:
    base = torch.arange(12.0)
    tree = {"a": base, "b": base[2:6], "tied": base, "other": torch.ones(2), "n": [1, (2, "x")]}
    snapshotter = ck._Snapshotter()
    copy, events = snapshotter.take(tree)
    assert events == []
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr()
    assert copy["a"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert copy["tied"].untyped_storage().data_ptr() == copy["a"].untyped_storage().data_ptr()
    base.add_(100)
    assert copy["b"].tolist() == [2.0, 3.0, 4.0, 5.0] and copy["n"] == [1, (2, "x")]
    assert copy["n"] is not tree["n"]
    again, _ = snapshotter.take(tree)  # the buffer is reused (no fresh allocation per save)
    assert again["a"].untyped_storage().data_ptr() == copy["a"].untyped_storage().data_ptr()
    assert again["a"].tolist() == base.tolist()
    alike, _ = snapshotter.take({"a/b": torch.zeros(2), "a": {"b": torch.ones(2)}})
    assert alike["a/b"].tolist() == [0.0, 0.0] and alike["a"]["b"].tolist() == [1.0, 1.0]


def test_parameters_changed_after_save_returns_do_not_leak_into_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv(ck.SLEEP_ENV, "0.02")  # the background write starts after the changes
    objs = make_objects(0)
    train_step(objs)
    expected = {n: _deep_clone(o.state_dict()) for n, o in objs.items()}
    mgr = CheckpointManager(tmp_path, save_total_limit=None, async_save=True)
    path = save(mgr, 1, objs)
    with torch.no_grad():  # in place, as the optimizer does
        for p in objs["model"].parameters():
            p.add_(1.0)
        for state in objs["optimizer"].state.values():
            state["exp_avg"].mul_(-3.0)
    train_step(objs)
    objs["counter"].history.append(123.0)
    mgr.wait()
    fresh = make_objects(4)
    mgr.load(path, fresh)
    for name in objs:
        assert state_equal(fresh[name].state_dict(), expected[name]), name


def _deep_clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _deep_clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_deep_clone(v) for v in value)
    return value


# --------------------------------------------------------------------------- one at a time


def test_a_second_save_waits_for_the_first(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ck.SLEEP_ENV, "0.05")  # ~10 pauses per save: ~0.5 s in the background
    objs = make_objects(0)
    mgr = CheckpointManager(tmp_path, save_total_limit=None, async_save=True)
    save(mgr, 1, objs)
    first = mgr._pending
    assert mgr.last_save_timing["blocking_s"] < 0.2
    assert len(_tmp_dirs(tmp_path)) == 1 and not (tmp_path / "checkpoints" / "checkpoint-1").exists()
    train_step(objs)
    save(mgr, 2, objs)  # blocks until checkpoint-1 is committed
    assert not first.thread.is_alive()
    assert ck.is_committed(tmp_path / "checkpoints" / "checkpoint-1")
    assert [d.split("-")[2] for d in _tmp_dirs(tmp_path)] == ["2"]  # only the new one in flight
    done = mgr.take_timings()
    assert [t["step"] for t in done] == [1]
    assert done[0]["background_s"] > 0.3
    assert mgr.last_save_timing["step"] == 2 and mgr.last_save_timing["blocking_s"] > 0.1
    mgr.wait()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-1", "checkpoint-2"]


def test_rotation_keeps_the_limit_and_the_resumed_checkpoint(tmp_path: Path) -> None:
    objs = make_objects(0)
    mgr = CheckpointManager(tmp_path, save_total_limit=2, async_save=True)
    for step in range(1, 7):
        train_step(objs)
        save(mgr, step, objs)
        committed = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
        assert len(committed) <= 2
    mgr.wait()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-5", "checkpoint-6"]
    resumed = CheckpointManager(tmp_path, save_total_limit=1, async_save=True)
    resumed.load(tmp_path / "checkpoints" / "checkpoint-5", make_objects())
    save(resumed, 5, objs)  # not newer: checkpoint-5 stays protected
    resumed.wait()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-5", "checkpoint-6"]
    save(resumed, 7, objs)
    resumed.wait()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-7"]


# --------------------------------------------------------------------------- failures


def _disk_full(*_args, **_kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("unsaveable", r"saving checkpoint-2 failed on rank 0: app_state\['bad'\].*numpy\.ndarray"),
        ("state_dict_raises", r"saving checkpoint-2 failed on rank 0: RuntimeError: boom"),
        ("disk_full", r"saving checkpoint-2 failed on rank 0: OSError: \[Errno 28\] No space"),
    ],
    ids=["unsaveable", "state_dict_raises", "disk_full"],
)
def test_a_failed_background_save_raises_at_the_next_save_and_keeps_older_ones(
    tmp_path: Path, monkeypatch, how: str, expected: str
) -> None:
    objs = make_objects(0)
    mgr = CheckpointManager(tmp_path, save_total_limit=1, async_save=True)
    save(mgr, 1, objs)
    mgr.wait()
    good = tmp_path / "checkpoints" / "checkpoint-1"
    before = _digests(good)
    bad = dict(objs)
    if how == "unsaveable":
        bad["bad"] = _Unsaveable()
    elif how == "state_dict_raises":
        bad["bad"] = _Boom()
    else:
        monkeypatch.setattr(ck, "_torch_save", _disk_full)
    save(mgr, 2, bad)  # returns: the failure happens (or is reported) in the background
    mgr._pending.thread.join()
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=expected) as err:
        save(mgr, 3, objs)  # the next save raises it, before starting
    assert "\n" not in str(err.value)
    assert _tmp_dirs(tmp_path) == []  # the failed temp dir is gone
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-1"]
    assert _digests(good) == before and ck.is_committed(good)
    assert mgr.latest() == good
    assert mgr.take_timings()[-1]["error"].startswith("saving checkpoint-2 failed")
    save(mgr, 3, objs)  # the error was reported once; saving works again
    mgr.wait()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-3"]


def test_a_failed_commit_raises_at_wait(tmp_path: Path, monkeypatch) -> None:
    objs = make_objects(0)
    mgr = CheckpointManager(tmp_path, save_total_limit=None, async_save=True)
    monkeypatch.setattr(ck, "_commit", _disk_full)
    save(mgr, 1, objs)
    with pytest.raises(CheckpointError, match=r"^committing checkpoint-1 failed: OSError"):
        mgr.wait()
    assert _tmp_dirs(tmp_path) == [] and mgr.latest() is None
    mgr.wait()  # nothing in flight any more


def test_a_rank_that_never_reports_fails_the_save_not_the_process(
    tmp_path: Path, monkeypatch
) -> None:
    """Rank 0's writer waits for the markers of the other ranks; here rank 1 never writes one."""
    monkeypatch.setattr(ck, "_dist_info", lambda: (0, 2))
    monkeypatch.setattr(ck, "_all_gather", lambda obj: [obj, None])
    monkeypatch.setattr(ck, "_broadcast", lambda obj: obj)
    mgr = CheckpointManager(tmp_path, save_total_limit=None, async_save=True)
    mgr.marker_timeout_s = 0.3
    path = save(mgr, 1, make_objects(0), manifest={**MANIFEST, "world_size": 2})
    with pytest.raises(CheckpointError, match="rank 1 did not report its files within 0.3 s"):
        mgr.wait()
    assert not path.exists() and _tmp_dirs(tmp_path) == []


def test_markers_of_other_ranks_are_merged_into_the_manifest(tmp_path: Path, monkeypatch) -> None:
    """Rank 1's part, played by hand: its RNG file and its marker; rank 0 commits both."""
    monkeypatch.setattr(ck, "_dist_info", lambda: (0, 2))
    monkeypatch.setattr(ck, "_all_gather", lambda obj: [obj, None])
    monkeypatch.setattr(ck, "_broadcast", lambda obj: obj)
    monkeypatch.setenv(ck.SLEEP_ENV, "0.02")
    mgr = CheckpointManager(tmp_path, save_total_limit=None, async_save=True)
    path = save(mgr, 1, make_objects(0), manifest={**MANIFEST, "world_size": 2})
    tmp = mgr._pending.tmp
    ck._torch_save(ck.capture_rng_state(), tmp / "rng_state_1.pth")
    digest = ck._file_digest(tmp / "rng_state_1.pth")
    ck._write_marker(tmp, 1, {"error": None, "files": {"rng_state_1.pth": digest}})
    mgr.wait()
    manifest = ck.read_manifest(path)
    assert manifest["files"]["rng_state_1.pth"] == digest
    assert not any(name.startswith(".rank-") for name in os.listdir(path))
    ck._verify_files(path, manifest, manifest["files"])


def test_deepspeed_engine_saves_block_and_say_so_once(tmp_path: Path, caplog) -> None:
    class FakeEngine:
        def save_checkpoint(self, path, tag, client_state, save_latest) -> None:
            (Path(path) / tag).mkdir()
            (Path(path) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")

        def zero_optimization_stage(self) -> int:
            return 2

    objs = make_objects(0)
    state = {k: v for k, v in objs.items() if k not in ("model", "optimizer")}
    mgr = CheckpointManager(tmp_path, save_total_limit=None, async_save=True)
    with caplog.at_level(logging.WARNING, logger="mtl_dist.checkpoint"):
        for step in (1, 2):
            path = save(mgr, step, {"model": objs["model"], **state}, engine=FakeEngine())
            assert ck.is_committed(path) and not mgr.save_in_flight
    assert sum("DeepSpeed" in r.getMessage() for r in caplog.records) == 1
    assert [t["async"] for t in mgr.take_timings()] == [False, False]


def test_async_save_is_a_validated_bool() -> None:
    assert load_config(DEMO, ["checkpoint.async_save=true"]).checkpoint.async_save is True
    assert load_config(DEMO, []).checkpoint.async_save is False
    with pytest.raises(ConfigError, match="'checkpoint.async_save': expected bool, got 'maybe'"):
        load_config(DEMO, ["checkpoint.async_save=maybe"])


# --------------------------------------------------------------------------- kill -9


def _async_saver(out: str, seed: int, committed, saving, resumed) -> None:
    """Child: resume from the newest checkpoint, then save asynchronously forever (killed)."""
    os.environ[ck.SLEEP_ENV] = "0.003"
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    objs = make_objects(seed)
    mgr = CheckpointManager(out, save_total_limit=2, async_save=True)
    step = 0
    latest = mgr.latest()
    if latest is not None:
        step = mgr.load(latest, objs)["global_step"]
    resumed.value = step
    while True:
        step += 1
        train_step(objs)
        saving.value = step
        save(mgr, step, objs)  # returns once the previous one is committed
        committed.value = step - 1 if step > 1 else 0


def test_kill_9_during_background_writes_never_leaves_a_half_checkpoint(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1)
    warm = make_objects()  # lazy imports happen here, not in each forked child
    train_step(warm)
    save(warm_mgr := CheckpointManager(tmp_path / "warm-up", save_total_limit=1, async_save=True),
         1, warm)
    warm_mgr.wait()  # (and no writer thread is running when we fork)
    committed_max = interrupted = 0
    out = tmp_path / "out"
    for trial in range(12):
        # lock=False: a child SIGKILLed inside a locked write would leave the lock held and
        # the next read here blocked forever
        committed, saving, resumed = (ctx.Value("i", v, lock=False) for v in (0, 0, -1))
        p = ctx.Process(target=_async_saver, args=(str(out), trial, committed, saving, resumed))
        p.start()
        deadline = time.monotonic() + 60
        while resumed.value < 0 and p.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.02, 0.3))  # once resumed: a random moment of its next saves
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL, "the saver died by itself"
        interrupted += any((out / "checkpoints").glob(".tmp-checkpoint-*"))
        committed_max = max(committed_max, committed.value)
        _check_output(out, committed_max, max(saving.value, committed_max), 0)
        for d in (out / "checkpoints").glob("checkpoint-*"):
            assert not any(n.startswith(".rank-") for n in os.listdir(d))
    assert committed_max >= 6  # the saves did make progress between kills
    assert interrupted >= 4


# --------------------------------------------------------------------------- the trainer


def _trainer_run(out: Path, cache: Path, *extra: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from mtl_dist.trainer import Trainer

    for cls in (AcceleratorState, GradientState, PartialState):
        cls._reset_state()
    no_eval = [f"tasks.{t}.dev=null" for t in ("nli", "emotion", "news")] + ["train.eval_steps=null"]
    cfg = load_config(DEMO, [f"train.output_dir={out}", f"data.cache_dir={cache}", *FAST,
                             "checkpoint.save_steps=3", "train.max_steps=9", *no_eval, *extra])
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
        assert not trainer.ckpt.save_in_flight  # fit waited for its last save
    finally:
        trainer.close()
    return summary


@pytest.mark.slow  # three short trainer runs in this process (~15 s on 2 cores)
def test_trainer_resume_from_async_checkpoints_is_bit_exact(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    _trainer_run(straight, cache)  # blocking saves
    first = _trainer_run(split, cache, "checkpoint.async_save=true", "train.stop_after_steps=5")
    assert first["stop_reason"] == "stop_after_steps" and first["global_step"] == 5
    assert ck.is_committed(split / "checkpoints" / "checkpoint-5")  # committed before returning
    _trainer_run(split, cache, "checkpoint.async_save=true", "train.resume=auto")
    assert train_losses(split) == train_losses(straight)
    for step in (6, 9):
        a, b = (out / "checkpoints" / f"checkpoint-{step}" for out in (split, straight))
        # trainer_state.json: its log history holds samples/s. optimizer.pt: after a resume
        # its pickle holds loaded and fresh copies of the key strings (same values).
        differ = {"trainer_state.json", "optimizer.pt"}
        assert {k: v for k, v in _digests(a).items() if k not in differ} == {
            k: v for k, v in _digests(b).items() if k not in differ
        }, step
        loaded = [torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b)]
        assert state_equal(*loaded), step
    saves = records(split, "checkpoint")
    assert [r["step"] for r in saves] == [3, 5, 6, 9]
    assert all(r["checkpoint/async"] and r["checkpoint/background_s"] > 0 for r in saves)
    assert all(0 <= r["checkpoint/blocking_s"] < 5 for r in saves)
    assert records(straight, "checkpoint") == []  # blocking saves log no such record


# --------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_async_save_commit_rotate_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli(["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path}/cache",
             *FAST, "train.max_steps=24", "train.stop_after_steps=13", "train.eval_steps=100",
             "checkpoint.save_total_limit=1", "checkpoint.async_save=true"], procs=2)
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-13"]  # 8 rotated away
    path = out / "checkpoints" / "checkpoint-13"
    manifest = ck.read_manifest(path)
    assert manifest["world_size"] == 2
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= set(manifest["files"])
    assert sorted(manifest["files"]) == sorted(n for n in os.listdir(path)
                                               if n not in (ck.MANIFEST, ck.COMMITTED))
    ck._verify_files(path, manifest, manifest["files"])
    rng = ck.inspect(path)["rng"]
    assert rng[0] != rng[1]  # each rank wrote its own
    saves = records(out, "checkpoint")
    assert [r["step"] for r in saves] == [8, 13]
    assert all(r["checkpoint/background_s"] > 0 for r in saves)
    assert json.loads((path / "trainer_state.json").read_text())["global_step"] == 13


# --------------------------------------------------------------------------- CUDA (skipped on CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_snapshot_is_pinned_reused_and_ordered_before_later_updates(tmp_path: Path) -> None:
    x = torch.randn(1 << 20, device="cuda")
    tree = {"x": x, "view": x[10:20], "tied": x, "cpu": torch.ones(3)}
    snapshotter = ck._Snapshotter()
    expected = x.cpu()
    copy, events = snapshotter.take(tree)
    x.mul_(2.0)  # queued after the copy on the same stream: must not reach the snapshot
    for event in events:
        event.synchronize()
    assert copy["x"].device.type == "cpu" and copy["x"].is_pinned()
    assert torch.equal(copy["x"], expected) and torch.equal(copy["view"], expected[10:20])
    assert copy["tied"].untyped_storage().data_ptr() == copy["x"].untyped_storage().data_ptr()
    again, events = snapshotter.take(tree)  # the pinned buffer is reused
    assert again["x"].untyped_storage().data_ptr() == copy["x"].untyped_storage().data_ptr()
    for event in events:
        event.synchronize()
    assert torch.equal(again["x"], x.cpu())
    # Through the manager: weights changed in place right after save() returns stay out.
    model = make_objects(0)["model"].cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 11, (4, 3), device="cuda")).sum().backward()
    opt.step()
    want = {k: v.cpu() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(tmp_path, save_total_limit=None, async_save=True)
    path = save(mgr, 1, {"model": model, "optimizer": opt})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mgr.wait()
    got = ck.load_model_state(path)
    assert all(torch.equal(got[k], want[k]) for k in want)
