"""Checkpoint manager, single process: round trip, RNG, rotation, best, validation, crash safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import stat
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mtl_dist import checkpoint as ck
from mtl_dist.checkpoint import CheckpointManager
from mtl_dist.errors import CheckpointError

# --------------------------------------------------------------------------- fixtures


class TinyNet(nn.Module):
    """Embedding + output layer sharing one weight (tied), dropout so RNG matters."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.mid(self.emb(ids)))))


class Counter:
    """A custom Stateful (like the trainer's early stopping / counters)."""

    def __init__(self) -> None:
        self.n = 0
        self.history: list[float] = []
        self.best = torch.tensor(float("-inf"))

    def state_dict(self) -> dict:
        return {"n": self.n, "history": list(self.history), "best": self.best.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.n, self.history, self.best = state["n"], list(state["history"]), state["best"]


def make_objects(seed: int = 0) -> dict:
    """model, AdamW, scheduler, custom Stateful."""
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return {"model": model, "optimizer": opt, "scheduler": sched, "counter": Counter()}


def train_step(objs: dict) -> float:
    """One optimizer step (uses the global RNG for data and dropout)."""
    ids = torch.randint(0, 11, (4, 3))
    loss = objs["model"](ids).logsumexp(-1).mean()
    loss.backward()
    objs["optimizer"].step()
    objs["optimizer"].zero_grad()
    objs["scheduler"].step()
    c = objs["counter"]
    c.n += 1
    c.history.append(loss.item())
    c.best = torch.maximum(c.best, loss.detach())
    return loss.item()


MANIFEST = {
    "global_batch_size": 64,
    "tasks": ["nli", "emotion"],
    "labels": {"nli": ["a", "b", "c"], "emotion": ["x", "y"]},
    "data_fingerprints": {"nli": "aa11", "emotion": "bb22"},
    "model_shape": {"hidden_size": 6, "num_labels": [3, 2]},
    "zero_stage": 0,
    "world_size": 1,
}


def save(mgr: CheckpointManager, step: int, objs: dict, **kw) -> Path:
    """save() with the test's trainer state and manifest."""
    return mgr.save(
        step,
        objs,
        {"global_step": step, "sampler": {"epoch": 0, "step": step}},
        manifest=kw.pop("manifest", MANIFEST),
        **kw,
    )


def flip_byte(path: Path, offset: int) -> None:
    """Flip one bit of a file in place (size unchanged)."""
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def state_equal(a, b) -> bool:
    """Deep equality of nested state dicts with tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# --------------------------------------------------------------------------- round trip


def test_round_trip_restores_every_object(tmp_path: Path) -> None:
    objs = make_objects(0)
    for _ in range(3):
        train_step(objs)
    mgr = CheckpointManager(tmp_path, save_total_limit=3)
    path = save(mgr, 3, objs)
    assert path == tmp_path.absolute() / "checkpoints" / "checkpoint-3"
    names = set(os.listdir(path))
    assert {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "counter.pt",
        "rng_state_0.pth",
        "trainer_state.json",
        "manifest.json",
        "COMMITTED",
    } <= names
    assert not [n for n in os.listdir(path.parent) if n.startswith(".")]

    fresh = make_objects(1)
    assert not torch.equal(fresh["model"].mid.weight, objs["model"].mid.weight)
    trainer_state = CheckpointManager(tmp_path, save_total_limit=3).load(
        path, fresh, expected_manifest=MANIFEST
    )
    assert trainer_state == {"global_step": 3, "sampler": {"epoch": 0, "step": 3}}
    for name in ("model", "optimizer", "scheduler", "counter"):
        assert state_equal(fresh[name].state_dict(), objs[name].state_dict()), name
    assert fresh["model"].out.weight is fresh["model"].emb.weight  # still tied after loading
    # The continuation is the same: one more step from both gives equal losses and weights.
    torch.manual_seed(7)
    a = train_step(objs)
    torch.manual_seed(7)
    b = train_step(fresh)
    assert a == b
    assert state_equal(fresh["model"].state_dict(), objs["model"].state_dict())


def test_every_file_loads_with_weights_only(tmp_path: Path) -> None:
    objs = make_objects()
    train_step(objs)
    path = save(CheckpointManager(tmp_path, save_total_limit=None), 1, objs)
    for f in path.iterdir():
        if f.suffix in (".pt", ".pth"):
            torch.load(f, weights_only=True)


def test_state_that_weights_only_cannot_read_is_refused_at_save(tmp_path: Path) -> None:
    class Bad:
        def state_dict(self) -> dict:
            return {"ok": 1, "arr": {"inner": np.zeros(3)}}

        def load_state_dict(self, state: dict) -> None:
            pass

    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    with pytest.raises(
        CheckpointError, match=r"app_state\['bad'\].*arr\.inner is a numpy\.ndarray"
    ):
        save(mgr, 1, {"bad": Bad()})
    assert mgr.latest() is None


def test_rng_restore_reproduces_draws(tmp_path: Path) -> None:
    objs = make_objects()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    path = save(CheckpointManager(tmp_path, save_total_limit=None), 1, objs)
    before = (
        random.random(),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(4).tolist(),
    )
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    CheckpointManager(tmp_path, save_total_limit=None).restore_rng(path)
    after = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist())
    assert before == after


def test_rng_for_rank_beyond_saved_world_is_derived_and_deterministic(
    tmp_path: Path, monkeypatch
) -> None:
    path = save(CheckpointManager(tmp_path, save_total_limit=None), 1, make_objects())
    monkeypatch.setattr(ck, "_dist_info", lambda: (1, 2))
    draws = []
    for _ in range(2):
        torch.manual_seed(123 + len(draws))
        with pytest.warns(UserWarning, match="no RNG state for rank 1.*derived seed"):
            CheckpointManager(tmp_path, save_total_limit=None).restore_rng(path)
        draws.append((random.random(), torch.rand(2).tolist()))
    assert draws[0] == draws[1]


# --------------------------------------------------------------------------- rotation and best


@settings(max_examples=15, deadline=None)
@given(
    scores=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=7),
    limit=st.integers(1, 4),
    greater=st.booleans(),
)
def test_rotation_keeps_best_apart_and_newest(
    scores: list[float], limit: int, greater: bool
) -> None:
    objs = make_objects()
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d, save_total_limit=limit, greater_is_better=greater)
        best_step, best_score = None, None
        for i, score in enumerate(scores):
            step = 10 * (i + 1)
            save(mgr, step, objs)
            if mgr.improves(score):
                mgr.save_best(
                    step,
                    score,
                    objs["model"].state_dict(),
                    extra_files={"labels.json": "{}"},
                    metadata={"metrics": {"s": score}},
                )
            if best_score is None or (score > best_score if greater else score < best_score):
                best_step, best_score = step, score
            periodic = sorted(
                int(p.name.split("-")[1]) for p in (Path(d) / "checkpoints").iterdir()
            )
            assert periodic == [10 * (j + 1) for j in range(max(0, i + 1 - limit), i + 1)]
            info = json.loads((Path(d) / "best" / "best.json").read_text())
            assert (info["step"], info["score"]) == (best_step, best_score)
            assert ck.is_committed(Path(d) / "best")
        assert sorted(os.listdir(d)) == ["best", "checkpoints"]


def test_resumed_from_survives_rotation_until_newer_commit(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    for step in (1, 2, 3):
        save(mgr, step, objs)
    resumed = CheckpointManager(tmp_path, save_total_limit=1)
    resumed.load(tmp_path / "checkpoints" / "checkpoint-1", make_objects())
    resumed.rotate()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-1", "checkpoint-3"]
    save(
        resumed, 1, objs
    )  # same step again: not newer, it replaces checkpoint-1 but stays protected
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-1", "checkpoint-3"]
    # the limit lowered on resume deletes two at once: said, naming them (it was silent)
    with pytest.warns(UserWarning, match=r"^checkpoint.save_total_limit=1: deleted 2 "
                      r"checkpoints at once \(checkpoint-1, checkpoint-3\), more than the limit "
                      r"were there; kept: checkpoint-4$"):
        save(resumed, 4, objs)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-4"]


def test_save_same_step_twice_replaces(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=2)
    save(mgr, 5, objs)
    train_step(objs)
    path = save(mgr, 5, objs)
    fresh = make_objects(3)
    mgr.load(path, fresh)
    assert state_equal(fresh["model"].state_dict(), objs["model"].state_dict())
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint-5"]


def test_best_holds_model_extras_and_metadata(tmp_path: Path) -> None:
    objs = make_objects()
    tok = tmp_path / "tok.json"
    tok.write_text('{"vocab": 1}')
    mgr = CheckpointManager(tmp_path / "out", save_total_limit=1)
    mgr.save_best(
        7,
        0.75,
        objs["model"].state_dict(),
        extra_files={"config.yaml": "a: 1\n", "labels.json": b"{}", "tokenizer/tok.json": tok},
        metadata={"metrics": {"nli": 0.7}},
    )
    best = tmp_path / "out" / "best"
    assert (best / "config.yaml").read_text() == "a: 1\n"
    assert (best / "tokenizer" / "tok.json").read_text() == '{"vocab": 1}'
    assert json.loads((best / "best.json").read_text()) == {
        "step": 7,
        "score": 0.75,
        "greater_is_better": True,
        "metrics": {"nli": 0.7},
    }
    state = mgr.load_model_state(best)
    assert state_equal(state["mid.weight"], objs["model"].mid.weight.detach())
    assert mgr.best_score() == 0.75 and mgr.improves(0.8) and not mgr.improves(0.7)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        mgr.load(best, objs)


def test_best_recovered_after_crash_mid_swap(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=1)
    mgr.save_best(1, 0.1, objs["model"].state_dict(), extra_files={}, metadata={})
    mgr.save_best(2, 0.2, objs["model"].state_dict(), extra_files={}, metadata={})
    # A crash right after "rename old best aside": best/ is missing, the committed old one is aside.
    os.rename(tmp_path / "best", tmp_path / ".old-best-0123abcd")
    with pytest.warns(UserWarning, match="recovered"):
        mgr2 = CheckpointManager(tmp_path, save_total_limit=1)
    assert mgr2.best_score() == 0.2
    assert not (tmp_path / ".old-best-0123abcd").exists()


def test_a_failed_best_install_leaves_no_copy_or_loses_none(tmp_path: Path, monkeypatch) -> None:
    """Installing a new best/ failed (e.g. the old one could not be moved): the committed
    new copy stayed beside it, model-sized, until the next best save. Where the old best/
    was already aside, both stay and the newest comes back at the next start."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=1)
    mgr.save_best(1, 0.1, objs["model"].state_dict(), extra_files={}, metadata={})
    real_rename = os.rename

    def refuse(src, dst, moving):
        if moving(Path(src), Path(dst)):
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", lambda s, d: refuse(s, d, lambda a, b: a.name == "best"))
    with pytest.raises(CheckpointError, match=r"saving best \(step 2\) failed: PermissionError"):
        mgr.save_best(2, 0.2, objs["model"].state_dict(), extra_files={}, metadata={})
    assert sorted(os.listdir(tmp_path)) == ["best"] and mgr.best_score() == 0.1
    # the old best/ aside, then the new one's rename refused: nothing deleted
    monkeypatch.setattr(ck.os, "rename", lambda s, d: refuse(s, d, lambda a, b: b.name == "best"))
    with pytest.raises(CheckpointError, match=r"saving best \(step 2\) failed"):
        mgr.save_best(2, 0.2, objs["model"].state_dict(), extra_files={}, metadata={})
    monkeypatch.setattr(ck.os, "rename", real_rename)
    with pytest.warns(UserWarning, match="recovered"):
        assert CheckpointManager(tmp_path, save_total_limit=1).best_score() == 0.2


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        (
            "global_batch_size",
            32,
            "'global_batch_size' differs: checkpoint has 64, this run has 32 (global batch "
            "= per_device_batch_size x world size: keep it, or set "
            "sampler.on_global_batch_change=replan",
        ),
        ("tasks", ["nli"], "'tasks' differs"),
        (
            "labels",
            {"nli": ["a", "b", "c"], "emotion": ["x", "z"]},
            '\'labels.emotion[1]\' differs: checkpoint has "y", this run has "z"',
        ),
        (
            "data_fingerprints",
            {"nli": "aa11", "emotion": "cc33"},
            "'data_fingerprints.emotion' differs",
        ),
        (
            "model_shape",
            {"hidden_size": 8, "num_labels": [3, 2]},
            "'model_shape.hidden_size' differs: checkpoint has 6, this run has 8",
        ),
        ("zero_stage", 2, "'zero_stage' differs"),
        ("new_key", 1, "manifest has no key 'new_key'"),
    ],
)
def test_manifest_mismatch_names_the_key(tmp_path: Path, key: str, value, shown: str) -> None:
    objs = make_objects()
    path = save(CheckpointManager(tmp_path, save_total_limit=None), 1, objs)
    expected = {**MANIFEST, key: value}
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(tmp_path, save_total_limit=None).load(
            path, make_objects(), expected_manifest=expected
        )
    assert shown in str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_shape_key_added_later_is_compared_only_where_saved(tmp_path: Path) -> None:
    """model_shape.head came after checkpoints were saved without it: those still resume
    (nothing to compare), newer ones name a head change."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    older = save(mgr, 1, objs)  # MANIFEST's model_shape has no head
    newer = save(mgr, 2, objs, manifest={**MANIFEST, "model_shape": {
        "head": "attention", **MANIFEST["model_shape"]}})
    expected = {**MANIFEST, "model_shape": {"head": "cls", **MANIFEST["model_shape"]}}
    mgr.load(older, make_objects(), expected_manifest=expected)
    with pytest.raises(CheckpointError, match=r"'model_shape.head' differs: checkpoint has "
                       r'"attention", this run has "cls" \(the checkpoint\'s weights'):
        mgr.load(newer, make_objects(), expected_manifest=expected)


def test_ckpt_ls_marks_a_checkpoint_saved_before_its_steps_evaluation_as_best(tmp_path):
    """A preemption at an eval step saves the checkpoint first (it holds the previous
    evaluation's score); the resume evaluates these very weights into best/. Told apart by
    score, it lost its [best]; a checkpoint saved after its own evaluation is compared."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    mgr.save(8, objs, {"global_step": 8, "last_eval_step": 4, "score": 0.6875},
             manifest=MANIFEST)
    mgr.save(12, objs, {"global_step": 12, "last_eval_step": 12, "score": 0.7},
             manifest=MANIFEST)
    mgr.save_best(8, 0.5, objs["model"].state_dict(), metadata={},
                  extra_files={"metrics.json": json.dumps({"score": 0.5, "tasks": {}})})
    marked = {r.path.name: r.is_best for r in ck.list_checkpoints(tmp_path) if r.kind != "best"}
    assert marked == {"checkpoint-8": True, "checkpoint-12": False}
    mgr.save_best(12, 0.9, objs["model"].state_dict(), metadata={},  # another line's, step 12
                  extra_files={"metrics.json": json.dumps({"score": 0.9, "tasks": {}})})
    marked = {r.path.name: r.is_best for r in ck.list_checkpoints(tmp_path) if r.kind != "best"}
    assert marked == {"checkpoint-8": False, "checkpoint-12": False}


def test_tasks_with_equal_label_counts_in_another_order_are_refused(tmp_path: Path) -> None:
    """Heads are stored by position: two 2-label tasks swapped would load without any shape
    error and each be scored with the other's head; periodic checkpoints and best/ alike."""
    labels = {"nli": ["a", "b"], "emotion": ["x", "y"]}
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    periodic = save(mgr, 1, objs, manifest={**MANIFEST, "labels": labels})
    mgr.save_best(1, 0.5, objs["model"].state_dict(),
                  extra_files={"labels.json": json.dumps(labels)}, metadata={})
    swapped = {"emotion": labels["emotion"], "nli": labels["nli"]}
    for path in (periodic, tmp_path / "best"):
        ck.check_label_maps_of(path, labels)
        with pytest.raises(CheckpointError, match=r'its heads are for the tasks in the order '
                           r'\["nli", "emotion"\], this run lists them as \["emotion", "nli"\]'):
            ck.check_label_maps_of(path, swapped)


def test_world_size_change_allowed_for_ddp_refused_for_zero(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 1, objs, manifest={**MANIFEST, "world_size": 1, "per_device_batch_size": 64})
    mgr.load(
        path,
        make_objects(),
        expected_manifest={**MANIFEST, "world_size": 2, "per_device_batch_size": 32},
    )
    zpath = save(mgr, 2, objs, manifest={**MANIFEST, "zero_stage": 2})
    with pytest.raises(
        CheckpointError,
        match=r"'world_size' differs: checkpoint has 1, this run has 2; ZeRO stage 2.*mtl-dist ckpt convert",
    ):
        mgr.load(
            zpath, make_objects(), expected_manifest={**MANIFEST, "zero_stage": 2, "world_size": 2}
        )


def test_library_version_change_only_warns(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 1, make_objects(), manifest={**MANIFEST, "versions": {"torch": "2.13"}})
    with pytest.warns(UserWarning, match='\'versions.torch\' was "2.13", now "2.14"'):
        mgr.load(
            path, make_objects(), expected_manifest={**MANIFEST, "versions": {"torch": "2.14"}}
        )


@pytest.mark.parametrize(
    "victim",
    ["model.safetensors", "optimizer.pt", "counter.pt", "rng_state_0.pth", "trainer_state.json"],
)
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_named(tmp_path: Path, victim: str, damage: str) -> None:
    objs = make_objects()
    train_step(objs)
    path = save(CheckpointManager(tmp_path, save_total_limit=None), 1, objs)
    f = path / victim
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "flip":
        flip_byte(f, f.stat().st_size // 2)
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=rf"file '{re.escape(victim)}'"):
        CheckpointManager(tmp_path, save_total_limit=None).load(path, make_objects())


def test_tampered_manifest_is_refused(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 1, make_objects())
    text = (
        (path / "manifest.json")
        .read_text()
        .replace('"global_batch_size": 64', '"global_batch_size": 65')
    )
    (path / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match="file 'manifest.json' does not match"):
        mgr.load(path, make_objects())


def test_model_that_does_not_fit_gets_one_line(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 1, make_objects())
    other = make_objects()
    other["model"].mid = nn.Linear(6, 5)
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors does not fit the model: key 'mid.bias' has shape \(6,\), the model has \(5,\)",
    ):
        mgr.load(path, other)


def test_incomplete_dirs_are_skipped_with_a_warning(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    save(mgr, 5, make_objects())
    partial = tmp_path / "checkpoints" / "checkpoint-9"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoints" / ".tmp-checkpoint-12-0badf00d").mkdir()
    with pytest.warns(
        UserWarning,
        match=r"skipping incomplete checkpoint\(s\).*\.tmp-checkpoint-12-0badf00d, checkpoint-9",
    ):
        latest = mgr.latest()
    assert latest.name == "checkpoint-5"
    assert mgr.resolve("auto") == latest
    with pytest.raises(CheckpointError, match="not committed"):
        mgr.resolve(partial)
    with pytest.raises(CheckpointError, match="not committed"):
        mgr.load(partial, make_objects())
    save(mgr, 13, make_objects())  # the next save cleans the crashed temp dir (not checkpoint-9)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "checkpoint-13",
        "checkpoint-5",
        "checkpoint-9",
    ]
    rows = ck.list_checkpoints(tmp_path)
    assert [(r.step, r.complete) for r in rows] == [(5, True), (9, False), (13, True)]


def test_resolve_auto_without_checkpoints_is_none(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path, save_total_limit=None).resolve("auto") is None


# --------------------------------------------------------------------------- deletion safety


def test_deletion_refuses_symlinks_escapes_and_foreign_names(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outside = tmp_path / "precious" / "checkpoint-1"
    outside.mkdir(parents=True)
    (outside / "data").write_text("keep me")
    mgr = CheckpointManager(out, save_total_limit=1)
    save(mgr, 2, make_objects())
    ckdir = out / "checkpoints"
    escape = ckdir / ".." / ".." / "precious" / "checkpoint-1"
    with pytest.raises(CheckpointError, match="refusing to delete"):
        ck._safe_rmtree(escape, out)
    (ckdir / "checkpoint-1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="symlink"):
        ck._safe_rmtree(ckdir / "checkpoint-1", out)
    (ckdir / "notes").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory name"):
        ck._safe_rmtree(ckdir / "notes", out)
    save(mgr, 3, make_objects())  # rotation must not follow the symlink
    assert (outside / "data").read_text() == "keep me"
    assert sorted(os.listdir(ckdir)) == ["checkpoint-1", "checkpoint-3", "notes"]


def test_rotation_refuses_checkpoints_dir_outside_output(tmp_path: Path) -> None:
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    mgr = CheckpointManager(out, save_total_limit=1)
    save(mgr, 1, make_objects())
    with pytest.warns(UserWarning, match="rotation: refusing to delete"):
        save(mgr, 2, make_objects())
    assert sorted(os.listdir(elsewhere)) == ["checkpoint-1", "checkpoint-2"]


def test_write_run_file_is_atomic_and_contained(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    mgr.write_run_file("config.yaml", "a: 1\n")
    mgr.write_run_file("config.yaml", "a: 2\n")
    mgr.write_run_file("labels.json", {"nli": ["a"]})
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n"
    assert json.loads((tmp_path / "labels.json").read_text()) == {"nli": ["a"]}
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "labels.json"]
    for bad in ("../x.yaml", "/etc/x", "checkpoints/x", "best/x"):
        with pytest.raises(CheckpointError):
            mgr.write_run_file(bad, "x")


def test_convert_refuses_a_checkpoint_without_zero_state(tmp_path: Path) -> None:
    path = save(CheckpointManager(tmp_path, save_total_limit=None), 1, make_objects())
    with pytest.raises(CheckpointError, match="has no DeepSpeed ZeRO state"):
        ck.convert_zero_to_universal(path, tmp_path / "universal")


def test_weights_get_the_same_file_mode_as_every_other_file(tmp_path: Path) -> None:
    """safetensors creates its file 0600: teammates on a shared disk could read optimizer.pt
    but not the weights."""
    path = save(CheckpointManager(tmp_path, save_total_limit=None), 4, make_objects())
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes["model.safetensors"] == modes["optimizer.pt"] == modes["manifest.json"]


def test_inspect_and_export(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 4, objs)
    info = ck.inspect(path)
    assert info["manifest"]["step"] == 4 and info["manifest"]["run"]["tasks"] == ["nli", "emotion"]
    assert set(info["rng"]) == {0} and set(info["rng"][0]) >= {"python", "numpy", "torch_cpu"}
    assert info["sampler"] == {"epoch": 0, "step": 4}
    json.dumps(info, default=str)
    mgr.write_run_file("labels.json", "{}")
    out = ck.export_checkpoint(
        path, tmp_path / "export", encoder_prefix="mid.", encoder_config={"model_type": "x"}
    )
    assert sorted(os.listdir(out)) == [
        "config.json",
        "heads.safetensors",
        "labels.json",
        "model.safetensors",
    ]
    assert set(ck._load_safetensors(out / "model.safetensors")) == {"weight", "bias"}


# --------------------------------------------------------------------------- crash safety


def _saver(out: str, seed: int, committed, saving, best_done) -> None:
    """Child process: resume from the newest checkpoint, then save forever (killed by the test)."""
    os.environ[ck.SLEEP_ENV] = "0.003"
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    objs = make_objects(seed)
    mgr = CheckpointManager(out, save_total_limit=2)
    step = 0
    latest = mgr.latest()
    if latest is not None:
        step = mgr.load(latest, objs)["global_step"]
    while True:
        step += 1
        train_step(objs)
        saving.value = step
        save(mgr, step, objs)
        committed.value = step
        if step % 2 == 0:
            mgr.save_best(
                step,
                float(step),
                objs["model"].state_dict(),
                extra_files={"labels.json": "{}"},
                metadata={},
            )
            best_done.value = step


def _check_output(out: Path, committed: int, saving: int, best_done: int) -> None:
    """Every final-named dir is a whole checkpoint; latest is the newest committed one and loads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = CheckpointManager(out, save_total_limit=2)  # also recovers best/ if a swap was cut
        latest = mgr.latest()
    for d in (out / "checkpoints").glob("checkpoint-*"):
        if re.fullmatch(r"checkpoint-\d+", d.name):
            manifest = ck.read_manifest(d)  # raises if uncommitted under a final name
            ck._verify_files(d, manifest, manifest["files"])
    if committed:
        assert latest is not None
        assert committed <= int(latest.name.split("-")[1]) <= saving
        mgr.load(latest, make_objects())
    if best_done:
        assert ck.is_committed(out / "best")
        assert json.loads((out / "best" / "best.json").read_text())["step"] >= best_done


def test_kill_9_at_random_moments_never_leaves_a_half_checkpoint(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    warm = make_objects()  # lazy imports happen here, not in each forked child
    train_step(warm)
    save(CheckpointManager(tmp_path / "warm-up", save_total_limit=1), 1, warm)
    tmp_path = tmp_path / "out"
    committed_max = best_max = interrupted = trial = 0
    # At least 24 kills; on a slow (loaded) machine more, until the saves made progress.
    while trial < 24 or ((committed_max <= 24 or interrupted < 5) and trial < 96):
        trial += 1
        # lock=False: a child SIGKILLed inside a locked write would leave the lock held and
        # the next read here blocked forever (the suite hung on CI this way)
        committed, saving, best_done = (ctx.Value("i", 0, lock=False) for _ in range(3))
        p = ctx.Process(target=_saver, args=(str(tmp_path), trial, committed, saving, best_done))
        p.start()
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL, "the saver died by itself"
        interrupted += any((tmp_path / "checkpoints").glob(".tmp-checkpoint-*"))
        committed_max = max(committed_max, committed.value)
        best_max = max(best_max, best_done.value)
        _check_output(tmp_path, committed_max, max(saving.value, committed_max), best_max)
    assert committed_max > 24  # the saves did make progress between kills
    assert interrupted >= 5  # and many kills landed inside a save


def test_ckpt_ls_names_a_damaged_file_and_reads_best_from_its_manifest(tmp_path: Path) -> None:
    """A committed checkpoint whose file was truncated is listed DAMAGED (its manifest hash
    alone still matches); best/ without best.json still lists its step and score."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 3, objs)
    mgr.save_best(3, 0.5, objs["model"].state_dict(), extra_files={}, metadata={})
    rows = {r.kind: r for r in ck.list_checkpoints(tmp_path)}
    assert rows["periodic"].damage is None and rows["best"].damage is None
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    (tmp_path / "best" / "best.json").unlink()
    rows = {r.kind: r for r in ck.list_checkpoints(tmp_path)}
    assert "file 'model.safetensors' has 1000 bytes" in rows["periodic"].damage
    assert "file 'best.json' is missing" in rows["best"].damage
    assert (rows["best"].step, rows["best"].score) == (3, 0.5)
    assert mgr.best_score() is None  # damaged: no score to beat (the next best replaces it)
    assert ck.inspect(path)["damage"] == rows["periodic"].damage


def test_a_run_dir_given_as_a_checkpoint_names_what_to_give(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    save(mgr, 2, objs)
    latest = save(mgr, 4, objs)
    with pytest.raises(CheckpointError, match="is a run's output dir, not a checkpoint: give "):
        ck.read_manifest(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        ck.read_manifest(tmp_path / "nope")
    # train.resume=OUTPUT/checkpoints means that run's newest, as OUTPUT does
    assert mgr.resolve(tmp_path / "checkpoints") == mgr.resolve(tmp_path) == latest
    with pytest.raises(CheckpointError, match="^train.resume: checkpoint .*nope: no such"):
        mgr.resolve(tmp_path / "nope")


def test_saved_run_and_clear_run(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    assert mgr.saved_run() == []
    for step in (2, 10):
        save(mgr, step, objs)
    mgr.save_best(10, 0.5, objs["model"].state_dict(), extra_files={}, metadata={})
    (tmp_path / "checkpoints" / ".tmp-checkpoint-12-0123abcd").mkdir()  # a crashed save
    (tmp_path / "notes.txt").write_text("mine")
    assert mgr.saved_run() == ["checkpoint-2", "checkpoint-10", "best/"]
    mgr.clear_run()
    assert mgr.saved_run() == [] and mgr.best_score() is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "notes.txt"]


def test_resuming_an_older_checkpoint_sets_the_newer_committed_ones_aside(tmp_path: Path) -> None:
    """A new branch: the old one's newer checkpoints would outlive its saves in rotation (by
    step) and be what resume=auto picks; they move to OUTPUT/abandoned/, whole."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    older = save(mgr, 2, objs)
    newer = save(mgr, 4, objs)
    (newer / "COMMITTED").unlink()  # incomplete: resume=auto skips it; left where it is
    resumed = CheckpointManager(tmp_path, save_total_limit=None)
    resumed.load(older, make_objects())
    assert resumed.set_aside_newer() == ([], None)
    for step in (6, 8):
        save(mgr, step, objs)
    files = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "checkpoint-8").iterdir()}
    resumed = CheckpointManager(tmp_path, save_total_limit=1)
    resumed.load(older, make_objects())
    moved, target = resumed.set_aside_newer()
    assert moved == ["checkpoint-6", "checkpoint-8"]
    assert target.parent == tmp_path / "abandoned" and target.name.startswith("after-checkpoint-2-")
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert {p.name: p.read_bytes() for p in (target / "checkpoint-8").iterdir()} == files
    assert resumed.latest() == older
    save(resumed, 3, objs)  # the new branch's first save: rotation keeps it, not step 8
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-3", "checkpoint-4"]
    assert resumed.latest() == tmp_path / "checkpoints" / "checkpoint-3"


def test_a_clear_killed_after_setting_best_aside_never_brings_it_back(tmp_path: Path) -> None:
    """clear_run sets best/ aside before deleting it: a kill then must not let the next
    manager "recover" the old run's best/ (as it does an interrupted best swap)."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    mgr.save_best(4, 0.5, objs["model"].state_dict(), extra_files={}, metadata={})
    os.rename(tmp_path / "best", tmp_path / ".cleared-best-0123abcd")  # where a kill leaves it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "recovered ..." warning
        again = CheckpointManager(tmp_path, save_total_limit=None)
    assert again.best_score() is None and not (tmp_path / "best").exists()
    again.save_best(1, 0.1, objs["model"].state_dict(), extra_files={}, metadata={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # the leftover is cleaned


def test_a_head_lr_saved_as_null_means_the_saved_lr() -> None:
    """Checkpoints saved optimizer_settings.head_lr as set (null: same as lr) before it was
    saved as the effective value: they must still resume."""
    settings = {"lr": 1e-3, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999,
                "adam_eps": 1e-8}
    saved = {"world_size": 1, "optimizer_settings": {**settings, "head_lr": None}}
    ck.check_manifest(Path("ck"), saved, {"optimizer_settings": {**settings, "head_lr": 1e-3}})
    with pytest.raises(CheckpointError, match="'optimizer_settings.head_lr' differs"):
        ck.check_manifest(Path("ck"), saved, {"optimizer_settings": {**settings,
                                                                      "head_lr": 5e-3}})


@pytest.mark.parametrize("damage", ["manifest", "marker", "marker_not_an_object"])
def test_a_committed_checkpoint_damaged_later_is_refused_not_skipped_and_kept(
        tmp_path: Path, damage: str) -> None:
    """A checkpoint whose manifest or COMMITTED marker was damaged after its commit was taken
    for an incomplete save: resume=auto went back to the one before, and the run's next save
    at that step wrote over it. Now it is the newest committed one, refused in one line, kept
    (and set aside, whole, if an older one is resumed by hand), and `ckpt ls` says DAMAGED."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    older = save(mgr, 4, objs)
    newest = save(mgr, 6, objs)
    victim = newest / ("manifest.json" if damage == "manifest" else "COMMITTED")
    victim.write_text({"manifest": '{"files": ', "marker": "", "marker_not_an_object": "[]"}[damage])
    files = {p.name: p.read_bytes() for p in newest.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping incomplete" warning
        assert mgr.latest() == newest
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(newest))}: "
                                              r"(unreadable|file 'manifest.json' does not match)"):
        mgr.load(newest, make_objects())
    assert mgr.newest_intact(before=newest) == older
    assert mgr.saved_run() == ["checkpoint-4", "checkpoint-6"]  # a fresh run here is refused
    row = next(r for r in ck.list_checkpoints(tmp_path) if r.step == 6)
    assert row.complete and row.damage
    resumed = CheckpointManager(tmp_path, save_total_limit=1)
    resumed.load(older, make_objects())
    moved, target = resumed.set_aside_newer()
    assert moved == ["checkpoint-6"]
    assert {p.name: p.read_bytes() for p in (target / "checkpoint-6").iterdir()} == files


def test_an_unreadable_file_in_hashing_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """A file the process may not read (permissions; injected at `open`, as root reads
    anything) was a PermissionError traceback from the verification's hashing; now one line
    naming the checkpoint and the file."""
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 1, make_objects())
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("optimizer.pt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(CheckpointError, match=r"unreadable file: .*Permission denied.*optimizer\.pt"):
        mgr.load(path, make_objects())


def test_inspect_shows_a_damaged_checkpoint_naming_what_cannot_be_read(tmp_path: Path) -> None:
    """Inspecting a damaged checkpoint is what inspect is for: a damaged JSON file, a deleted
    RNG file or a cut sampler state stopped it with an error, the damage found unshown."""
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 1, make_objects())
    (path / "trainer_state.json").write_text("{")
    (path / "rng_state_0.pth").unlink()
    found = ck.inspect(path)
    assert found["trainer_state"]["unreadable"].startswith(
        f"checkpoint {path}: file 'trainer_state.json' is unreadable or not JSON")
    assert found["rng"][0]["unreadable"].startswith(f"cannot load {path / 'rng_state_0.pth'}")
    assert found["damage"] is not None and found["manifest"]["step"] == 1


def test_a_checkpoint_named_for_another_step_is_refused_and_listed_damaged(tmp_path: Path) -> None:
    """A checkpoint copied (or converted) into checkpoints/ as checkpoint-99 was taken for step
    99: resume=auto went back to its real step, and the next saves wrote over the run's own."""
    import shutil

    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 4, make_objects())
    copy = tmp_path / "checkpoints" / "checkpoint-99"
    shutil.copytree(path, copy)
    why = (f"checkpoint {copy}: named step 99 but its manifest.json says step 4 (copied, linked "
           "or converted into place by hand?): move it out of checkpoints/")
    with pytest.raises(CheckpointError) as info:
        ck.training_manifest(copy)
    assert str(info.value) == why
    rows = {r.path.name: r for r in ck.list_checkpoints(tmp_path)}
    assert rows["checkpoint-99"].damage == why and rows["checkpoint-4"].damage is None
    (tmp_path / "checkpoints" / "checkpoint-50").symlink_to(path)  # a link: the same
    assert "named step 50 but" in ck.damage(tmp_path / "checkpoints" / "checkpoint-50")


def test_ckpt_ls_lists_the_checkpoints_a_resume_set_aside(tmp_path: Path) -> None:
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    older = save(mgr, 2, objs)
    save(mgr, 4, objs)
    (tmp_path / "labels.json").write_text("{}")  # a run's output dir (of an earlier version)
    (tmp_path / "metrics.jsonl").write_text("")
    resumed = CheckpointManager(tmp_path, save_total_limit=None)
    resumed.load(older, make_objects())
    _, target = resumed.set_aside_newer()
    rows = ck.list_checkpoints(tmp_path)
    assert [(r.path, r.kind, r.step, r.complete, r.damage) for r in rows] == [
        (older, "periodic", 2, True, None), (target / "checkpoint-4", "abandoned", 4, True, None)]
    assert ck.run_holding(target / "checkpoint-4") == tmp_path


def test_a_folder_of_checkpoints_or_an_export_given_as_a_checkpoint_says_so(tmp_path: Path) -> None:
    """Both were 'not committed (no COMMITTED marker); it is incomplete'."""
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 2, make_objects())
    with pytest.raises(CheckpointError, match=r"is a folder of checkpoints, not one: give one of"):
        ck.read_manifest(tmp_path / "checkpoints")
    out = ck.export_checkpoint(path, tmp_path / "hf", encoder_prefix="mid.",
                               encoder_config={"model_type": "x"})
    with pytest.raises(CheckpointError, match=r"is a model dir written by `ckpt export`"):
        ck.read_manifest(out)


def test_export_finds_the_run_files_of_a_checkpoint_kept_out_of_rotation_and_fills_a_linked_dir(
        tmp_path: Path) -> None:
    """RUN/keep/checkpoint-N (kept away from rotation) exports with RUN's files; a DIR that is a
    link to an empty folder is filled (the rename onto the link failed after all the work)."""
    import shutil

    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 2, make_objects())
    (tmp_path / "encoder_config.json").write_text('{"model_type": "x"}')
    (tmp_path / "keep").mkdir()
    kept = Path(shutil.copytree(path, tmp_path / "keep" / "checkpoint-2"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    ck.export_checkpoint(kept, tmp_path / "link", encoder_prefix="mid.")
    assert json.loads((tmp_path / "empty" / "config.json").read_text()) == {"model_type": "x"}


def test_inspect_and_ckpt_ls_show_what_is_wrong_rather_than_fail(tmp_path: Path) -> None:
    """An RNG file that loads but holds no RNG state was a KeyError traceback; a damaged best/
    set aside in abandoned/ was not listed."""
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 2, make_objects())
    torch.save({"x": 1}, path / "rng_state_0.pth")
    assert ck.inspect(path)["rng"][0]["unreadable"].startswith("not what it should hold (")
    aside = tmp_path / "abandoned" / "damaged-best-ab12"
    aside.parent.mkdir()
    shutil_copy = __import__("shutil").copytree
    shutil_copy(path, aside)
    rows = [r for r in ck.list_checkpoints(tmp_path) if r.kind == "abandoned"]
    assert [(r.path, r.step) for r in rows] == [(aside, None)] and rows[0].damage is not None


def test_a_target_filled_while_exporting_is_one_line_and_keeps_what_is_there(
        tmp_path: Path) -> None:
    """Two exports or conversions to one DIR: the loser's rename failed with a traceback."""
    tmp, dst = tmp_path / ".tmp-export-x", tmp_path / "dst"
    tmp.mkdir()
    dst.mkdir()
    (dst / "theirs").write_text("kept")
    with pytest.raises(CheckpointError, match=rf"^export: cannot put the result in place at "
                       rf"{dst} \(.*; written by another command meanwhile\?\): nothing there "
                       r"was replaced$"):
        ck._rename_into_place(tmp, dst, "export")
    assert (dst / "theirs").read_text() == "kept"


def test_export_refuses_a_target_the_runs_saves_manage(tmp_path: Path) -> None:
    """An export into the run's checkpoints/ (as checkpoint-8) or best/ was taken for a
    damaged or incomplete checkpoint and written over by the run's next save."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 6, objs)
    mgr.save_best(6, 0.5, objs["model"].state_dict(), extra_files={}, metadata={})
    for target in (tmp_path / "checkpoints" / "checkpoint-8", tmp_path / "best" / "hf",
                   path / "hf", tmp_path / "best"):
        with pytest.raises(CheckpointError, match=r"export: .* is (inside )?.*pick a folder outside"):
            ck.export_checkpoint(path, target, encoder_prefix="mid.",
                                 encoder_config={"model_type": "x"})
        assert not target.exists() or target == tmp_path / "best"
    out = ck.export_checkpoint(path, tmp_path / "hf", encoder_prefix="mid.",
                               encoder_config={"model_type": "x"})
    assert (out / "model.safetensors").is_file()
    # from a checkpoint of another place (another run, abandoned/) into this run's folders
    (tmp_path / "labels.json").write_text("{}")  # what every run writes at its start
    (tmp_path / "metrics.jsonl").write_text("")
    other = CheckpointManager(tmp_path / "other", save_total_limit=None)
    foreign = save(other, 3, objs)
    with pytest.raises(CheckpointError, match=r"export: .* is inside .*checkpoints"):
        ck.export_checkpoint(foreign, tmp_path / "checkpoints" / "checkpoint-9",
                             encoder_prefix="mid.", encoder_config={"model_type": "x"})
    assert not (tmp_path / "checkpoints" / "checkpoint-9").exists()


def test_export_refuses_damaged_run_json_files(tmp_path: Path) -> None:
    """A damaged encoder_config.json or tokenizer file was copied as is: the export 'worked'
    and from_pretrained failed on it later."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    path = save(mgr, 6, objs)
    mgr.write_run_file("encoder_config.json", '{"model_type": ')
    with pytest.raises(CheckpointError, match=r"export: config.json .* not valid JSON"):
        ck.export_checkpoint(path, tmp_path / "hf", encoder_prefix="mid.")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".tmp-export-*"))


@pytest.mark.parametrize("damage, why", [
    ("marker", r"unreadable COMMITTED"),
    # a file cut short (a disk or copy problem): its score was kept "to beat", and the run
    # ended naming best/ while `ckpt ls` listed it DAMAGED
    ("model", r"file 'model.safetensors' has 100 bytes"),
])
def test_a_best_damaged_after_its_commit_is_set_aside_not_deleted(tmp_path: Path, damage,
                                                                  why) -> None:
    """A best/ with a damaged COMMITTED has no readable score: the next best replaced it and
    the swap deleted it. Now it moves whole to abandoned/, with a warning naming where."""
    objs = make_objects()
    mgr = CheckpointManager(tmp_path, save_total_limit=None)
    mgr.save_best(4, 0.5, objs["model"].state_dict(), extra_files={}, metadata={})
    if damage == "marker":
        (tmp_path / "best" / "COMMITTED").write_text("")
    else:
        os.truncate(tmp_path / "best" / "model.safetensors", 100)
    files = {p.name: p.read_bytes() for p in (tmp_path / "best").iterdir()}
    assert mgr.best_score() is None and mgr.improves(0.1) and mgr.best_info() == {}
    assert re.search(why, mgr.best_damage())
    with pytest.warns(UserWarning, match=rf"best: .*{why}.*moved to .*abandoned"):
        mgr.save_best(6, 0.1, objs["model"].state_dict(), extra_files={}, metadata={})
    assert mgr.best_score() == 0.1
    (aside,) = (tmp_path / "abandoned").iterdir()
    assert aside.name.startswith("damaged-best-")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == files
    mgr.save_best(8, 0.9, objs["model"].state_dict(), extra_files={}, metadata={})  # intact: no move
    assert [p.name for p in (tmp_path / "abandoned").iterdir()] == [aside.name]


def _committed_dir(path: Path, manifest: object) -> Path:
    """A directory holding `manifest` as a committed checkpoint's manifest.json."""
    import hashlib

    path.mkdir()
    raw = json.dumps(manifest).encode()
    (path / "manifest.json").write_bytes(raw)
    (path / "COMMITTED").write_text(json.dumps(
        {"step": 1, "manifest_sha256": hashlib.sha256(raw).hexdigest()}))
    return path


_ENGINE = {"type": "deepspeed", "tag": "ds", "zero_stage": 2, "universal": False}


@pytest.mark.parametrize("manifest, through_deepspeed", [
    ({"engine": None, "files": {"model.safetensors": {}}}, False),
    ({"engine": _ENGINE, "files": {"model.safetensors": {}, "ds/a.pt": {}}}, False),
    ({"engine": _ENGINE, "files": {"ds/a.pt": {}}}, True),
    ({"engine": {**_ENGINE, "universal": True}, "files": {"ds/a.pt": {}}}, False),
    ({"engine": None, "files": {}}, False),
    ({"engine": _ENGINE}, False),  # no "files": loading refuses it
    ([1, 2], False),
], ids=["model", "model_and_partitions", "partitions", "universal", "nothing", "no_files",
        "not_a_mapping"])
def test_the_cli_asks_the_loaders_own_question_before_the_process_group(
        tmp_path, manifest, through_deepspeed):
    """`evaluate`/`predict` import DeepSpeed before the process group exactly where loading
    reads ZeRO partitions through it (one decision, ck._weights_source); a checkpoint it
    cannot judge is left to loading, which refuses it in its own words."""
    path = _committed_dir(tmp_path / "ckpt", manifest)
    assert ck.weights_read_through_deepspeed(path) is through_deepspeed
    assert ck.weights_read_through_deepspeed(tmp_path / "missing") is False
    (tmp_path / "a_file").write_text("x")
    assert ck.weights_read_through_deepspeed(tmp_path / "a_file") is False
