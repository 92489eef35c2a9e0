"""The trainer end to end in one process: outputs, early stopping, exact resume, evaluate."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time

import pytest
import torch

from mtl_dist import checkpoint as ck
from mtl_dist.cli import bench_rates, bench_schedule, main
from mtl_dist.config import load_config
from mtl_dist.errors import CheckpointError, ConfigError
from mtl_dist.trainer import Trainer, make_accelerator
from tests._runs import (
    DEMO,
    FAST,
    assert_same_tensors,
    checkpoint_model,
    records,
    run_cli,
    train_losses,
)


def demo_cfg(tmp_path, *overrides):
    return load_config(DEMO, [f"train.output_dir={tmp_path / 'out'}",
                              f"data.cache_dir={tmp_path / 'cache'}", *FAST, *overrides])


def test_short_run_writes_config_labels_metrics_checkpoints_and_best(tmp_path):
    summary = Trainer(demo_cfg(tmp_path, "train.max_steps=16")).fit()
    out = tmp_path / "out"
    assert summary["global_step"] == 16 and summary["stop_reason"] == "finished"
    assert (out / "config.yaml").exists()
    assert set(json.loads((out / "labels.json").read_text())) == {"nli", "emotion", "news"}
    assert [r["step"] for r in records(out, "train")] == list(range(1, 17))
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [8, 16]
    assert {"eval/nli/accuracy", "eval/emotion/macro_f1", "eval/news/loss", "eval/score"} <= \
        set(evals[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["checkpoint-16", "checkpoint-8"]
    assert (out / "best" / "model.safetensors").exists()


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    # lr so small that the score cannot move: the first evaluation stays the best.
    cfg = demo_cfg(tmp_path, "train.lr=1e-12", "train.head_lr=1e-12", "train.ema_decay=null",
                   "train.eval_steps=4", "train.early_stopping_patience=2", "train.max_steps=40")
    summary = Trainer(cfg).fit()
    assert summary["stop_reason"] == "early_stopping"
    assert summary["global_step"] == 12 and summary["best_step"] == 4
    assert [r["step"] for r in records(tmp_path / "out", "eval")] == [4, 8, 12]
    # A rerun with resume=auto (a requeue) trained on to the next evaluation and rotated a
    # checkpoint out; now the run stays ended, like one that reached max_steps.
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    cfg.train.resume = "auto"
    again = Trainer(cfg).fit()
    assert again["stop_reason"] == "early_stopping" and again["global_step"] == 12
    assert [r["step"] for r in records(tmp_path / "out", "eval")] == [4, 8, 12]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == checkpoints


def test_stop_and_resume_mid_epoch_is_bit_exact_with_dropout(tmp_path):
    """2N steps straight == N steps, stop, resume, N more: losses and parameters bit for bit."""
    straight = tmp_path / "straight"
    common = ["train.max_steps=24", "train.gradient_accumulation_steps=2"]
    Trainer(load_config(DEMO, [f"train.output_dir={straight}", f"data.cache_dir={tmp_path}/c",
                               *FAST, *common])).fit()
    split = tmp_path / "split"
    base = [f"train.output_dir={split}", f"data.cache_dir={tmp_path}/c", *FAST, *common]
    first = Trainer(load_config(DEMO, [*base, "train.stop_after_steps=11"])).fit()
    assert first["stop_reason"] == "stop_after_steps" and first["global_step"] == 11
    Trainer(load_config(DEMO, [*base, "train.resume=auto"])).fit()
    assert train_losses(split) == train_losses(straight)
    assert len(train_losses(split)) == 24
    assert_same_tensors(checkpoint_model(split, 24), checkpoint_model(straight, 24))
    assert records(split, "eval")[-1]["eval/score"] == records(straight, "eval")[-1]["eval/score"]


@pytest.mark.slow
def test_cli_evaluate_and_predict_from_best(tmp_path):
    out = tmp_path / "out"
    args = [str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *FAST,
            "train.max_steps=8"]
    run_cli(["train", *args])
    result = run_cli(["evaluate", *args, "--checkpoint", str(out / "best")])
    metrics = json.loads(result.stdout)  # stdout is the JSON alone: `| jq` works
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["score"] == pytest.approx(best["score"], abs=1e-12)
    best_step = json.loads((out / "best" / "best.json").read_text())["step"]
    assert f"[eval step {best_step}]" in result.stderr  # the weights' step
    run_cli(["predict", *args, "--checkpoint", str(out / "best")])
    rows = [json.loads(line) for line in (out / "predictions" / "nli.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
    labels = json.loads((out / "labels.json").read_text())["nli"]
    assert all(r["label"] in labels and len(r["probs"]) == 3 for r in rows)
    assert all(abs(sum(r["probs"]) - 1) < 1e-4 for r in rows)


def test_bad_override_is_one_line_error_and_nothing_runs(tmp_path):
    result = run_cli(["train", str(DEMO), "train.lrr=1", f"train.output_dir={tmp_path}/o"],
                     check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: override 'train.lrr=1': config key 'train.lrr' is unknown; did you mean 'train.lr'?"
    assert not (tmp_path / "o").exists()


def test_bench_command_reports_throughput_without_writing_checkpoints(tmp_path):
    result = run_cli(["bench", str(DEMO), "--steps", "8", "--warmup", "3",
                      f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path}/o",
                      "train.stop_after_steps=2"])  # a config's time slice: not for bench
    report = json.loads(result.stdout[result.stdout.rindex("{"):])
    assert report["warmup_steps"] == 4  # rounded up to whole log intervals (8 // 4 = 2 steps)
    assert report["steps_timed"] == 8 and report["samples_per_s"] > 0
    assert report["tokens_per_s"] > 0 and report["world_size"] == 1
    assert not (tmp_path / "o").exists()  # bench writes into a temporary directory only
    assert "[eval step" not in result.stdout + result.stderr  # not even at the run's end
    assert "mtl_bench_" not in result.stdout + result.stderr  # no hint at its deleted directory


def test_a_run_told_not_to_save_on_stop_leaves_no_checkpoint(tmp_path):
    """What `bench` sets: its last step (which saves in a training run) writes nothing."""
    trainer = Trainer(demo_cfg(tmp_path, "train.max_steps=4", "checkpoint.save_steps=null",
                               "checkpoint.save_best=false"))
    trainer.save_on_stop = False
    trainer.fit()
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("warmup, steps, expected", [
    (20, 100, (25, 25, 125)),  # the warm-up ends on a log step: no timed interval holds it
    (25, 100, (25, 25, 125)),
    (1, 10, (2, 2, 12)),
    (3, 7, (1, 3, 10)),  # fewer than 4 timed steps per log: log every step
])
def test_bench_schedule_keeps_the_warm_up_out_of_every_timed_interval(warmup, steps, expected):
    every, untimed, total = bench_schedule(warmup, steps)
    assert (every, untimed, total) == expected
    assert untimed >= warmup and untimed % every == 0 and total - untimed >= steps


def test_bench_rates_are_totals_over_wall_time_not_a_mean_of_interval_rates():
    # 10 steps of 4 samples per log; the first timed interval ran at 40 samples/s (1 s), the
    # second at 10 (4 s): 80 samples in 5 s = 16/s (the mean of the rates would say 25).
    records = [{"step": 10, "time": 100.0, "samples_per_s": 1.0, "tokens_per_s": 1.0},
               {"step": 20, "time": 101.0, "samples_per_s": 40.0, "tokens_per_s": 400.0},
               {"step": 30, "time": 105.0, "samples_per_s": 10.0, "tokens_per_s": 50.0}]
    steps, sps, tps = bench_rates(records, untimed=10, every=10, samples_per_step=4)
    assert steps == 20
    assert sps == pytest.approx(16.0)
    assert tps == pytest.approx((400 * 1 + 50 * 4) / 5)


def test_bench_refuses_a_zero_warm_up():
    result = run_cli(["bench", str(DEMO), "--warmup", "0"], check=False)
    assert result.returncode != 0
    assert "bench: --warmup and --steps must be >= 1" in result.stderr


def test_demo_reaches_clearly_above_chance_dev_accuracy_on_every_task(tmp_path):
    """The embedded demo learns: 240 steps on one CPU process, well above chance per task."""
    cfg = demo_cfg(tmp_path, "train.max_steps=240", "train.eval_steps=240",
                   "checkpoint.save_steps=null", "train.log_steps=40")
    Trainer(cfg).fit()
    final = records(tmp_path / "out", "eval")[-1]
    chance = {"nli": 1 / 3, "emotion": 1 / 7, "news": 1 / 15}
    for task, p in chance.items():
        assert final[f"eval/{task}/accuracy"] > 2 * p, (task, final[f"eval/{task}/accuracy"])


RATE_KEYS = {"time", "samples_per_s", "tokens_per_s", "output_dir"}  # differ by run


def _log_lines(output_dir):
    """metrics.jsonl in order, without the wall-clock fields."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in RATE_KEYS} for x in lines]


def test_async_log_writes_the_same_records_in_the_same_order(tmp_path):
    """train.async_log reads a record's losses one micro-step later: same records, same
    order around evaluations and checkpoints, same log_history in every checkpoint."""
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        Trainer(load_config(DEMO, [
            f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *FAST,
            "train.max_steps=18", "train.log_steps=4", "train.eval_steps=8",
            "checkpoint.save_steps=6", "train.gradient_accumulation_steps=2",
            f"train.async_log={flag}"])).fit()
        runs[flag] = out
    on, off = _log_lines(runs["true"]), _log_lines(runs["false"])
    assert on == off
    assert [(r["kind"], r["step"]) for r in on if r["kind"] in ("train", "eval")] == [
        ("train", 4), ("train", 8), ("eval", 8), ("train", 12), ("train", 16), ("eval", 16),
        ("eval", 18), ("train", 18)]  # the run's last two steps: a record of their own
    assert all(r["samples_per_s"] > 0 for r in records(runs["true"], "train"))
    for step in (6, 12, 18):
        states = [json.loads((out / "checkpoints" / f"checkpoint-{step}" /
                              "trainer_state.json").read_text())["log_history"]
                  for out in runs.values()]
        on_h, off_h = ([{k: v for k, v in r.items() if k not in RATE_KEYS} for r in h]
                       for h in states)
        assert on_h == off_h and on_h[-1]["step"] == (18 if step == 18 else step // 4 * 4)


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_fresh_run_refuses_an_output_dir_holding_a_run_and_changes_nothing(tmp_path, capsys):
    """Without train.resume, a second run into a used output dir would replace best/ with its
    own first evaluation and leave its checkpoints beside the old run's: refused in one line
    before any work, nothing touched; train.overwrite_output_dir=true starts over."""
    Trainer(demo_cfg(tmp_path, "train.max_steps=16")).fit()
    out = tmp_path / "out"
    before = _tree(out)
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoint-8, "
                       r"checkpoint-16, best/\): resume it with train.resume=auto"):
        Trainer(demo_cfg(tmp_path, "train.max_steps=4", "train.lr=1e-3"))
    assert _tree(out) == before
    assert main(["report", str(out)]) == 0  # made from the run about to be deleted
    capsys.readouterr()
    Trainer(demo_cfg(tmp_path, "train.max_steps=4", "train.eval_steps=4",
                     "checkpoint.save_steps=4", "train.overwrite_output_dir=true")).fit()
    assert f"train.overwrite_output_dir: {out / 'report'}/ kept: made from the deleted run, " \
        "not this one (re-make or delete)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4"]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 4
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing set aside left
    # OUTPUT/config.yaml, run again, must not delete the run it describes: the per-invocation
    # keys are saved unset, so it is refused like any fresh run, and resumes when told to
    saved = load_config(out / "config.yaml")
    assert (saved.train.overwrite_output_dir, saved.train.resume) == (False, None)
    before = _tree(out)
    with pytest.raises(CheckpointError, match="already holds a run"):
        Trainer(saved)
    assert _tree(out) == before
    resumed = Trainer(load_config(out / "config.yaml", ["train.resume=auto", "train.max_steps=6"]))
    assert resumed.fit()["global_step"] == 6


def test_the_saved_config_resumes_from_another_directory_and_auto_says_when_it_starts_anew(
        tmp_path, monkeypatch, capsys):
    """OUTPUT/config.yaml kept a relative output_dir (its data paths are absolute): run from
    elsewhere with resume=auto, it silently started a new run in another directory."""
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    cfg = load_config(DEMO, ["train.output_dir=out", "data.cache_dir=cache", *FAST,
                             "train.max_steps=4", "checkpoint.save_steps=4", "train.resume=auto"])
    Trainer(cfg).fit()
    out = tmp_path / "project" / "out"
    assert f"train.resume=auto: no checkpoint in {out}: starting a new run" in \
        capsys.readouterr().out
    saved = load_config(out / "config.yaml")
    assert (saved.train.output_dir, saved.data.cache_dir) == (str(out), str(out.parent / "cache"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    Trainer(load_config(out / "config.yaml", ["train.resume=auto", "train.max_steps=6"])).fit()
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-4'}" in capsys.readouterr().out
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_resume_with_more_steps_recounts_the_lr_schedule_and_says_so(tmp_path, capsys):
    """Extending a finished run (train.max_steps 6 -> 10) re-counts the linear schedule, as
    transformers' Trainer does, silently there: one line says so, and the first resumed step
    runs at the new schedule's LR (it ran at the restored one: 0, the old schedule's end, so
    it changed no weight). A resume with the same settings says nothing."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    common = ["train.eval_steps=null", "checkpoint.save_steps=3", "checkpoint.save_best=false",
              "train.warmup_steps=2"]
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=6", "train.stop_after_steps=3")).fit()
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=6", "train.resume=auto")).fit()
    assert "LR schedule" not in capsys.readouterr().out
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=10", "train.resume=auto",
                     "train.stop_after_steps=1")).fit()
    lr = 1e-3 * (10 - 6) / (10 - 2)  # linear decay from step 2 to zero at step 10
    assert f"LR schedule re-counted from the checkpoint's (total 6 -> 10 steps: train.max_steps, " \
        f"num_epochs, the warm-up or lr_scheduler changed): the next step's lr 0 -> {lr:.3g}" in \
        capsys.readouterr().out
    six, seven = (load_file(str(out / "checkpoints" / f"checkpoint-{n}" / "model.safetensors"))
                  for n in (6, 7))
    assert any(not torch.equal(six[k], seven[k]) for k in six if k.startswith("encoder."))
    assert records(out, "train")[-1]["lr"] == pytest.approx(1e-3 * (10 - 7) / (10 - 2))
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=5", "train.resume=auto")).fit()
    assert "(total 10 -> 5 steps: train.max_steps, num_epochs, the warm-up or lr_scheduler " \
        "changed): no step is left after step 7" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (4, 4), (2, 7)])
def test_lr_factor_is_transformers_schedule(kind, warmup, total):
    """train.lr_scheduler's factors are transformers' get_scheduler(kind)'s, step by step
    (past the end too: a resume may run past a shortened total)."""
    from transformers import get_scheduler

    from mtl_dist.trainer import lr_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total + 3):
        assert lr_factor(kind, step, warmup, total) == pytest.approx(
            theirs.lr_lambdas[0](step), abs=1e-12), step


def _reseal(edited):
    """A checkpoint's file edited by a test, sealed again (manifest and COMMITTED), as a run
    would have written it: the edit is no damage."""
    folder = edited.parent
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][edited.name] = {"size": edited.stat().st_size,
                                      "sha256": hashlib.sha256(edited.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    marker = json.loads((folder / "COMMITTED").read_text())
    marker["manifest_sha256"] = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    (folder / "COMMITTED").write_text(json.dumps(marker))


def test_an_edited_trainer_state_that_passes_its_checksum_is_refused_in_one_line(tmp_path):
    """trainer_state.json edited and re-sealed: a global_step off by one resumed at a shifted
    step, a missing one at step 0, a string or a list gave a traceback."""
    common = ["train.max_steps=4", "checkpoint.save_steps=4", "train.eval_steps=null"]
    Trainer(demo_cfg(tmp_path, *common)).fit()
    state_file = tmp_path / "out" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for edited, why in (({**state, "global_step": 5}, "'global_step' is 5, the manifest's step 4"),
                        ({**state, "global_step": "4"}, "'global_step' is \"4\", expected an "
                         "integer >= 0"),
                        ({k: v for k, v in state.items() if k != "epoch"},
                         "has no 'epoch'"),
                        ([1, 2], "holds a list, expected a JSON object")):
        state_file.write_text(json.dumps(edited))
        _reseal(state_file)
        with pytest.raises(CheckpointError) as err:
            Trainer(demo_cfg(tmp_path, *common, "train.max_steps=6", "train.resume=auto")).fit()
        assert str(err.value) == f"checkpoint {state_file.parent}: file 'trainer_state.json' " \
            f"{why}"


def test_a_replan_that_also_changes_the_schedule_kind_says_so(tmp_path, capsys):
    """An epoch-counted run replanned (new global batch) with another train.lr_scheduler in
    the same resume: the replan's re-count followed the new kind without a word."""
    common = ["train.eval_steps=null", "checkpoint.save_steps=3", "train.num_epochs=2"]
    Trainer(demo_cfg(tmp_path, *common, "train.per_device_batch_size=16",
                     "train.stop_after_steps=3")).fit()
    capsys.readouterr()
    Trainer(demo_cfg(tmp_path, *common, "train.per_device_batch_size=8",
                     "sampler.on_global_batch_change=replan", "train.lr_scheduler=cosine",
                     "train.resume=auto", "train.stop_after_steps=1")).fit()
    said = capsys.readouterr().out
    assert "global batch 16 -> 8: continuing at epoch 1 step 0" in said
    assert "LR schedule linear -> cosine (train.lr_scheduler) from the next step" in said


def test_a_cosine_run_follows_its_schedule_and_a_resume_with_another_kind_says_so(
        tmp_path, capsys):
    """train.lr_scheduler=cosine: each step's logged lr is the cosine schedule's; resumed
    with constant_with_warmup, the schedule is re-aimed from the next step and one line says
    so; a checkpoint saved before the kind was recorded ([warm-up, total]) counts as linear."""
    import math

    out = tmp_path / "out"
    common = ["train.eval_steps=null", "checkpoint.save_steps=3", "checkpoint.save_best=false",
              "train.warmup_steps=2", "train.max_steps=8", "train.log_steps=1"]
    Trainer(demo_cfg(tmp_path, *common, "train.lr_scheduler=cosine",
                     "train.stop_after_steps=3")).fit()

    def cosine(step):  # the lr logged at a step: the schedule's after it (the next step's)
        return 1e-3 * (step / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 6)))

    assert [r["lr"] for r in records(out, "train")] == pytest.approx(
        [cosine(s) for s in (1, 2, 3)])
    capsys.readouterr()
    Trainer(demo_cfg(tmp_path, *common, "train.lr_scheduler=constant_with_warmup",
                     "train.resume=auto", "train.stop_after_steps=3")).fit()
    assert "LR schedule re-counted from the checkpoint's (cosine -> constant_with_warmup: " \
        f"train.max_steps, num_epochs, the warm-up or lr_scheduler changed): the next step's " \
        f"lr {cosine(3):.3g} -> 0.001" in capsys.readouterr().out
    assert [r["lr"] for r in records(out, "train")][3:] == pytest.approx([1e-3] * 3)
    # an older checkpoint's two items: linear; resumed linear, nothing to say
    state_file = out / "checkpoints" / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["lr_schedule"] == [2, 8, "constant_with_warmup"]
    state["lr_schedule"] = [2, 8]
    state_file.write_text(json.dumps(state))
    _reseal(state_file)
    Trainer(demo_cfg(tmp_path, *common, "train.resume=auto", "train.stop_after_steps=1")).fit()
    assert "LR schedule" not in capsys.readouterr().out
    assert records(out, "train")[-1]["lr"] == pytest.approx(1e-3 * (8 - 7) / (8 - 2))


def test_resuming_an_older_checkpoint_branches_and_auto_resume_follows_the_branch(tmp_path,
                                                                                   capsys):
    """train.resume=<older checkpoint>: the newer ones (the branch left) move to
    OUTPUT/abandoned/; rotation keeps the new branch, and resume=auto (a requeue) continues
    it instead of jumping back to the old branch's newest."""
    common = ["train.eval_steps=null", "checkpoint.save_steps=2"]
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=8",
                     "checkpoint.save_total_limit=null")).fit()
    out = tmp_path / "out"
    old_8 = (out / "checkpoints" / "checkpoint-8" / "manifest.json").read_bytes()
    capsys.readouterr()
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=8", "checkpoint.save_total_limit=2",
                     f"train.resume={out}/checkpoints/checkpoint-2",
                     "train.stop_after_steps=3")).fit()
    said = capsys.readouterr().out
    assert "checkpoint-4, checkpoint-6, checkpoint-8: newer than step 2, where the branch " \
        "this resume takes leaves the run's line; moved to " in said
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4",
                                                                       "checkpoint-5"]
    (branch,) = (out / "abandoned").iterdir()
    assert (branch / "checkpoint-8" / "manifest.json").read_bytes() == old_8
    # its records after step 2, cut from metrics.jsonl, are kept with its checkpoints
    kept = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept if r["kind"] == "train"] == list(range(3, 9))
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=8", "train.resume=auto")).fit()
    assert "resumed from " + str(out / "checkpoints" / "checkpoint-5") in capsys.readouterr().out
    assert [r["step"] for r in records(out, "train")] == list(range(1, 9))
    # Back to the abandoned branch: the current line after its fork (step 2) is set aside in
    # turn, not mixed with (or, same steps, replaced by) the branch's new saves.
    line = {p.name: (p / "manifest.json").read_bytes() for p in (out / "checkpoints").iterdir()}
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=8", "checkpoint.save_total_limit=2",
                     f"train.resume={branch}/checkpoint-6", "train.stop_after_steps=1")).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-7"]
    (left,) = [p for p in (out / "abandoned").iterdir() if p != branch]
    assert {p.name: (p / "manifest.json").read_bytes() for p in left.iterdir() if p.is_dir()} \
        == line
    # the log: the shared steps, the branch's own records back (3-6), then its new step 7;
    # the line set aside keeps its records (3-8) with its checkpoints
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 8))
    assert [r for r in log if r["kind"] == "train" and 3 <= r["step"] <= 6] == \
        [r for r in kept if r["kind"] == "train" and r["step"] <= 6]
    left_log = [json.loads(x) for x in (left / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in left_log if r["kind"] == "train"] == list(range(3, 9))
    assert (branch / "checkpoint-8" / "manifest.json").read_bytes() == old_8
    Trainer(demo_cfg(tmp_path, "train.max_steps=2", "train.overwrite_output_dir=true")).fit()
    assert not (out / "abandoned").exists()  # a fresh start deletes the old branches too


def test_resuming_another_runs_checkpoint_into_a_used_output_dir_is_refused(tmp_path):
    """train.resume skipped the used-output-dir refusal: run A's checkpoint-4 resumed into
    run B's OUTPUT replaced B's checkpoint-6 and -8 with A's branch, cut B's metrics and
    config without a word. Into an empty output dir it is a fine start."""
    common = ["train.eval_steps=null", "checkpoint.save_steps=2", "train.max_steps=8",
              "checkpoint.save_total_limit=null"]
    Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/a", f"data.cache_dir={tmp_path}/c",
                               *common])).fit()
    Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/b", f"data.cache_dir={tmp_path}/c",
                               *common, "train.seed=7"])).fit()
    b = tmp_path / "b"
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    resume = [f"train.resume={tmp_path}/a/checkpoints/checkpoint-4", *common]
    with pytest.raises(CheckpointError, match=r"train.resume=.*/a/checkpoints/checkpoint-4 is "
                       r"another run's checkpoint, and train.output_dir=.*/b already holds a "
                       r"run \(.*checkpoint-8, best/\): pick a new train.output_dir"):
        Trainer(load_config(DEMO, [f"train.output_dir={b}", f"data.cache_dir={tmp_path}/c",
                                   *resume, "train.seed=7"])).fit()
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == before
    fresh = Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/fresh",
                                       f"data.cache_dir={tmp_path}/c", *resume])).fit()
    assert fresh["global_step"] == 8


def test_ckpt_export_of_a_periodic_checkpoint_loads_with_from_pretrained(tmp_path, capsys):
    """A periodic checkpoint holds weights only: the export takes config.json and the
    tokenizer from the run's output dir. Without them: one line, nothing written."""
    from transformers import AutoModel, AutoTokenizer

    from mtl_dist import checkpoint as ck
    from mtl_dist.cli import main

    Trainer(demo_cfg(tmp_path, "train.max_steps=4", "train.eval_steps=null",
                     "checkpoint.save_steps=4", "checkpoint.save_best=false")).fit()
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert main(["ckpt", "export", str(checkpoint), str(tmp_path / "hf")]) == 0
    encoder = AutoModel.from_pretrained(tmp_path / "hf")
    saved = {k[len("encoder."):]: v for k, v in ck.load_model_state(checkpoint).items()
             if k.startswith("encoder.")}
    assert_same_tensors({k: v for k, v in encoder.state_dict().items() if k in saved}, saved)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("boy eats apple")["input_ids"]
    (out / "encoder_config.json").unlink()  # as a run of an earlier version left it
    capsys.readouterr()
    assert main(["ckpt", "export", str(checkpoint), str(tmp_path / "hf2")]) == 2
    assert "export: no encoder_config.json in" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_a_periodic_checkpoint_is_evaluated_and_exported_with_its_ema_weights(tmp_path):
    """The demo keeps an EMA (ema_decay 0.99): the run evaluated step 8 with the shadow and
    best/ holds it. checkpoint-8, evaluated or exported later, must be the same model, not
    the raw trained weights beside the shadow in it."""
    from safetensors.torch import load_file

    from mtl_dist import checkpoint as ck

    cfg = demo_cfg(tmp_path, "train.max_steps=8")
    assert cfg.train.ema_decay
    Trainer(cfg).fit()
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "checkpoint-8"
    assert "ema.pt" in json.loads((checkpoint / "manifest.json").read_text())["files"]
    best = load_file(str(out / "best" / "model.safetensors"))
    assert_same_tensors(ck.load_model_state(checkpoint), best)
    raw = load_file(str(checkpoint / "model.safetensors"))
    assert any(not torch.equal(raw[name], best[name]) for name in best)  # the shadow differs
    assert_same_tensors(ck.load_model_state(checkpoint, with_ema=False), raw)
    evaluator = Trainer(demo_cfg(tmp_path, "train.max_steps=8"), for_training=False)
    evaluator.load_weights(checkpoint)
    assert evaluator.evaluate()["score"] == records(out, "eval")[-1]["eval/score"]


def test_the_exported_encoder_and_heads_reproduce_predict_as_the_readme_says(tmp_path):
    """README's recipe: AutoModel's last_hidden_state, then the attention head from
    heads.safetensors (masked softmax pooling, classifier), gives predict's probabilities."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from mtl_dist import data as mdata
    from mtl_dist.config import TaskConfig

    args = [str(DEMO), f"train.output_dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}", *FAST, "train.max_steps=8"]
    Trainer(load_config(args[0], args[1:])).fit()
    assert main(["predict", *args, "--checkpoint", str(tmp_path / "out" / "best")]) == 0
    assert main(["ckpt", "export", str(tmp_path / "out" / "best"), str(tmp_path / "hf")]) == 0
    encoder = AutoModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    heads = load_file(str(tmp_path / "hf" / "heads.safetensors"))
    task = 1  # emotion, the second task of labels.json
    name = list(json.loads((tmp_path / "hf" / "labels.json").read_text()))[task]
    rows, _ = mdata.read_examples("demo:emotion/test", TaskConfig(name=name, train="x"),
                                  require_label=False)
    predicted = [json.loads(line) for line in
                 (tmp_path / "out" / "predictions" / f"{name}.jsonl").read_text().splitlines()]
    inputs = tokenizer([r.text_a for r in rows[:32]], truncation=True, max_length=128,
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        h = encoder(**inputs).last_hidden_state
        scores = (h @ heads[f"heads.{task}.score.weight"].T).squeeze(-1)
        scores = scores.masked_fill(inputs["attention_mask"] == 0, float("-inf"))
        pooled = (torch.softmax(scores, dim=-1).unsqueeze(-1) * h).sum(1)
        logits = pooled @ heads[f"heads.{task}.classifier.weight"].T + \
            heads[f"heads.{task}.classifier.bias"]
    by_id = {p["id"]: p["probs"] for p in predicted}
    expected = torch.tensor([by_id[r.id] for r in rows[:32]])
    torch.testing.assert_close(torch.softmax(logits, -1), expected, rtol=0, atol=1e-5)


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(ConfigError, match="'train.output_dir': .* exists and is not a directory"):
        Trainer(demo_cfg(tmp_path, "train.max_steps=4"))
    with pytest.raises(ConfigError, match=f"'train.output_dir': {tmp_path}/out/run cannot be "
                       f"created: {tmp_path}/out is a file"):
        Trainer(demo_cfg(tmp_path, "train.max_steps=4", f"train.output_dir={tmp_path}/out/run"))


@pytest.mark.parametrize("args, message", [
    (["--processes", "0"], "demo: --processes must be >= 1, got 0"),
    (["--stop-after", "0"], "demo: --stop-after must be >= 1, got 0"),
    (["train.lr=abc"], "config key 'train.lr': expected float, got 'abc'"),
])
def test_demo_checks_its_arguments_before_launching(tmp_path, capsys, args, message):
    assert main(["demo", "--output", str(tmp_path / "d"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_never_starts_over_a_run_it_did_not_write(tmp_path, capsys):
    Trainer(demo_cfg(tmp_path, "train.max_steps=8")).fit()
    before = _tree(tmp_path / "out")
    assert main(["demo", "--output", str(tmp_path / "out")]) == 2
    assert "holds a run the demo did not write (checkpoint-8, best/)" in capsys.readouterr().err
    assert _tree(tmp_path / "out") == before
    # nor through an override of what the demo sets: phase 1 started the run in OUTPUT over
    for override, named in [(f"train.output_dir={tmp_path / 'out'}", "train.output_dir (use --output)"),
                            (f"train={{output_dir: {tmp_path / 'out'}}}", "train.output_dir"),
                            ("train.overwrite_output_dir=true", "train.overwrite_output_dir"),
                            ("train.resume=auto", "train.resume"),
                            ("train.stop_after_steps=5", "train.stop_after_steps (use --stop-after)")]:
        assert main(["demo", "--output", str(tmp_path / "d"), override]) == 2
        assert f"demo: {named}" in capsys.readouterr().err
    assert _tree(tmp_path / "out") == before and not (tmp_path / "d").exists()


def test_a_resumed_run_keeps_a_better_best_than_its_checkpoint_knows_of(tmp_path, capsys):
    """best/ can hold a better model than the checkpoint a run resumes from knows of (a kill
    after best/ was written, during the next periodic save): the resumed run's improvements
    replace best/ only when they also beat best/'s own score."""
    from mtl_dist.checkpoint import CheckpointManager, load_model_state

    Trainer(demo_cfg(tmp_path, "train.max_steps=8")).fit()
    out = tmp_path / "out"
    mgr = CheckpointManager(out, save_total_limit=None)
    mgr.save_best(12, 0.99, load_model_state(out / "best"), extra_files={}, metadata={})
    capsys.readouterr()
    Trainer(demo_cfg(tmp_path, "train.max_steps=16", "train.resume=auto")).fit()
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [8, 16] and evals[1]["eval/score"] > evals[0]["eval/score"]
    assert json.loads((out / "best" / "best.json").read_text())["score"] == 0.99
    # the end line and the report pair best/ with its own step and score, not this line's
    printed = capsys.readouterr().out
    assert f"best checkpoint: {out / 'best'} (it holds step 12, score 0.99: better than this " \
        "line's best, so kept)" in printed
    from mtl_dist.report import build_report

    page = build_report(out).read_text()
    assert "<th>best score</th><td>0.9900</td>" in page and "<th>best step</th><td>12</td>" in page
    assert "is this run's best but not best/'s (0.99); best/ kept" in printed


def test_a_best_with_a_damaged_file_has_no_score_to_beat(tmp_path, capsys):
    """best/'s model file cut short (`ckpt ls`: DAMAGED): its score was kept "to beat", so a
    resume that reached it again saved nothing and ended naming the damaged best/. Now the
    start says so, the run's first best replaces it (the damaged one set aside), and an end
    line with no new best says DAMAGED."""
    common = ["train.max_steps=2", "train.eval_steps=2", "checkpoint.save_steps=1",
              "checkpoint.save_total_limit=null"]
    Trainer(demo_cfg(tmp_path, *common)).fit()
    out = tmp_path / "out"
    best_step = json.loads((out / "best" / "best.json").read_text())["step"]
    os.truncate(out / "best" / "model.safetensors", 5000)
    capsys.readouterr()
    # from the step before its one evaluation: the resume reaches best/'s score again (bit
    # for bit), which did not beat it
    with pytest.warns(UserWarning, match=r"moved to .*abandoned"):
        Trainer(demo_cfg(tmp_path, *common,
                         f"train.resume={out / 'checkpoints' / 'checkpoint-1'}")).fit()
    said = capsys.readouterr().out
    assert "[mtl_dist] best/ is damaged (checkpoint " in said and "has 5000 bytes" in said \
        and "it has no score to beat; this run's first evaluation replaces it" in said
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best_step
    from mtl_dist.checkpoint import damage
    assert damage(out / "best") is None
    # resumed past the line's best (the usual case): an evaluation that does not beat it
    # replaces the damaged best/ under its own score; nothing was saved before
    os.truncate(out / "best" / "model.safetensors", 5000)
    with pytest.warns(UserWarning, match=r"moved to .*abandoned"):
        summary = Trainer(demo_cfg(tmp_path, *common, "train.max_steps=3", "train.eval_steps=1",
                                   "train.resume=auto")).fit()
    info = json.loads((out / "best" / "best.json").read_text())
    assert damage(out / "best") is None and info["step"] == 3
    assert summary["best_step"] == best_step and info["score"] < summary["best_score"]
    assert f"(it holds step 3, score {info['score']}; this line's best, step {best_step}, " \
        "was not saved as best/)" in capsys.readouterr().out
    # nothing to replace it (save_best off): the end line says DAMAGED
    os.truncate(out / "best" / "model.safetensors", 5000)
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=4", "checkpoint.save_best=false",
                     "train.resume=auto")).fit()
    assert f"best checkpoint: {out / 'best'} (DAMAGED: checkpoint {out / 'best'}: file " \
        "'model.safetensors' has 5000 bytes" in capsys.readouterr().out


def test_a_best_worse_than_this_lines_is_not_called_better(tmp_path, capsys):
    """best/ worse than the line's best (save_best off when that was evaluated): the end line
    called it "better than this line's best, so kept"."""
    from mtl_dist.checkpoint import CheckpointManager, load_model_state

    Trainer(demo_cfg(tmp_path, "train.max_steps=8")).fit()
    out = tmp_path / "out"
    CheckpointManager(out, save_total_limit=None).save_best(
        12, 0.01, load_model_state(out / "best"), extra_files={}, metadata={})
    capsys.readouterr()
    summary = Trainer(demo_cfg(tmp_path, "train.max_steps=16", "train.resume=auto",
                               "checkpoint.save_best=false")).fit()
    assert summary["best_score"] > 0.01
    said = capsys.readouterr().out
    assert f"best checkpoint: {out / 'best'} (it holds step 12, score 0.01; this line's best, " \
        f"step {summary['best_step']}, was not saved as best/)" in said, said


def test_a_kept_best_at_the_same_step_as_this_lines_best_is_not_taken_for_it(tmp_path, capsys):
    """best/ from the line set aside and this line's best at the same step: the end line,
    the report and `ckpt ls` paired them by step alone (no "it holds" note, this line's
    last evaluation left out of the report, this line's checkpoint marked [best])."""
    from mtl_dist.checkpoint import CheckpointManager, load_model_state
    from mtl_dist.cli import main
    from mtl_dist.report import build_report

    Trainer(demo_cfg(tmp_path, "train.max_steps=8")).fit()
    out = tmp_path / "out"
    kept = {"score": 0.99, "loss": 0.5, "tasks": {}}
    CheckpointManager(out, save_total_limit=None).save_best(
        16, 0.99, load_model_state(out / "best"), metadata={},
        extra_files={"metrics.json": json.dumps(kept)})
    capsys.readouterr()
    Trainer(demo_cfg(tmp_path, "train.max_steps=16", "train.resume=auto")).fit()
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [8, 16] and evals[1]["eval/score"] < 0.99
    printed = capsys.readouterr().out
    assert f"best checkpoint: {out / 'best'} (it holds step 16, score 0.99: better than this " \
        "line's best, so kept)" in printed
    page = build_report(out).read_text()
    assert "Last evaluation (step 16)" in page and "<th>best score</th><td>0.9900</td>" in page
    assert main(["ckpt", "ls", str(out)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows if r.rstrip().endswith("[best]")] == [str(out / "best")]


def fit_with_a_signal_during_step(trainer, step: int, sig: int = signal.SIGUSR1) -> dict:
    """fit(), with a real `sig` (a stop signal) sent to this process during `step`."""
    optimizer_step = trainer._optimizer_step

    def step_then_signal():
        optimizer_step()
        if trainer.state.global_step == step - 1:  # counted up right after this call
            os.kill(os.getpid(), sig)

    trainer._optimizer_step = step_then_signal
    try:
        return trainer.fit()
    finally:
        trainer.close()


def test_a_preemption_at_an_evaluation_step_evaluates_after_the_resume(tmp_path, capsys):
    """A stop signal at an evaluation step checkpoints first; the resumed run evaluates at
    that step before training on: the same evaluations, best/ and losses as a straight run."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["train.max_steps=16", "train.requeue_on_preempt=false"]
    Trainer(demo_cfg(tmp_path, *common, f"train.output_dir={straight}")).fit()
    summary = fit_with_a_signal_during_step(
        Trainer(demo_cfg(tmp_path, *common, f"train.output_dir={split}")), 8)
    assert (summary["stop_reason"], summary["global_step"]) == ("preempted", 8)
    assert "[mtl_dist] stopped: preempted at step 8; no evaluation; continue with " \
        f"train.resume=auto (from {split / 'checkpoints' / 'checkpoint-8'})" in \
        capsys.readouterr().out
    assert records(split, "eval") == [] and not (split / "best").exists()
    # a resume that does the pending evaluation, then crashes before its next checkpoint:
    # the next resume evaluates again, and the log keeps one evaluation at step 8
    crashing = Trainer(demo_cfg(tmp_path, *common, f"train.output_dir={split}",
                                "train.resume=auto"))

    def crash():
        raise RuntimeError("crash after the pending evaluation")

    crashing._optimizer_step = crash
    with pytest.raises(RuntimeError, match="crash after"):
        crashing.fit()
    assert [r["step"] for r in records(split, "eval")] == [8]
    Trainer(demo_cfg(tmp_path, *common, f"train.output_dir={split}", "train.resume=auto")).fit()

    def evals(out):
        return [{k: v for k, v in r.items() if k not in ("time", "output_dir")}
                for r in records(out, "eval")]

    assert [r["step"] for r in evals(split)] == [8, 16] and evals(split) == evals(straight)
    assert train_losses(split) == train_losses(straight)
    assert (split / "best" / "best.json").read_text() == (straight / "best" / "best.json").read_text()


@pytest.mark.parametrize("first, then, total", [(16, 8, 5 + 24), (8, 16, 5 + 12)])
def test_replan_resumes_with_a_new_global_batch_from_the_next_epoch(tmp_path, capsys, first,
                                                                    then, total):
    """sampler.on_global_batch_change=replan: a resume at another global batch skips the
    rest of the saved epoch and trains the remaining epochs at the new batch; the run's
    length and its LR schedule (linear to zero) are re-counted, and kept by the checkpoints
    for the resumes after it."""
    caps = [f"tasks.{i}.max_samples=64" for i in range(3)]  # 192 samples per epoch
    common = [*caps, "train.max_steps=null", "train.num_epochs=2", "train.warmup_steps=0",
              "train.eval_steps=null", "train.eval_at_epoch_end=false",
              "checkpoint.save_at_epoch_end=false"]
    Trainer(demo_cfg(tmp_path, *common, f"train.per_device_batch_size={first}",
                     "train.stop_after_steps=5")).fit()
    with pytest.raises(CheckpointError, match=f"'global_batch_size' differs: checkpoint has "
                       f"{first}, this run has {then}"):
        Trainer(demo_cfg(tmp_path, *common, f"train.per_device_batch_size={then}",
                         "train.resume=auto")).fit()
    capsys.readouterr()
    resumed = [*common, f"train.per_device_batch_size={then}",
               "sampler.on_global_batch_change=replan", "train.resume=auto"]
    Trainer(demo_cfg(tmp_path, *resumed, "train.stop_after_steps=3")).fit()
    assert f"global batch {first} -> {then}: continuing at epoch 1 step 0; the run now ends " \
        f"at step {total}" in capsys.readouterr().out
    summary = Trainer(demo_cfg(tmp_path, *resumed)).fit()  # a plain resume: same batch
    assert summary["global_step"] == total
    train = records(tmp_path / "out", "train")
    assert [r["step"] for r in train] == list(range(1, total + 1))
    assert [r["epoch"] for r in train][5:] == [1] * (total - 5)
    lrs = [r["lr"] for r in train]
    # from the replan on, linear to zero at the new end, across the plain resume too
    # (logged after each step: step s has lr * (total - s) / total)
    assert all(a > b for a, b in zip(lrs[5:-1], lrs[6:], strict=True)) and lrs[-1] == 0
    assert lrs[-2] == pytest.approx(lrs[5] / (total - 6), rel=1e-6)


def test_a_replanned_run_follows_a_new_length_at_a_later_resume_and_at_the_replan(tmp_path,
                                                                                 capsys):
    """After a replan the checkpoints keep its count (5 + 24 steps), which the config alone no
    longer gives: a later resume with num_epochs 2 -> 3 kept it too (the run stopped at 29),
    silently; now the added epoch's 24 steps count. A max_steps run replanned and lengthened
    in one resume was not re-aimed (its first step ran at the restored LR, 0)."""
    caps = [f"tasks.{i}.max_samples=64" for i in range(3)]  # 192 samples per epoch
    common = [*caps, "train.max_steps=null", "train.warmup_steps=0", "train.eval_steps=null",
              "train.eval_at_epoch_end=false", "checkpoint.save_at_epoch_end=false"]
    Trainer(demo_cfg(tmp_path, *common, "train.num_epochs=2", "train.per_device_batch_size=16",
                     "train.stop_after_steps=5")).fit()
    resumed = [*common, "train.per_device_batch_size=8", "sampler.on_global_batch_change=replan",
               "train.resume=auto"]
    Trainer(demo_cfg(tmp_path, *resumed, "train.num_epochs=2", "train.stop_after_steps=3")).fit()
    capsys.readouterr()
    summary = Trainer(demo_cfg(tmp_path, *resumed, "train.num_epochs=3")).fit()
    assert "LR schedule re-counted from the checkpoint's (total 29 -> 53 steps: " in \
        capsys.readouterr().out
    assert summary["global_step"] == 53
    # cut below the replan's epoch: those epochs ran at the old batch; the count is not taken
    # below the step (it said "total 53 -> 5 steps" and a warm-up below zero with a ratio)
    summary = Trainer(demo_cfg(tmp_path, *resumed, "train.num_epochs=1")).fit()
    assert summary["global_step"] == 53 and "LR schedule" not in capsys.readouterr().out

    from safetensors.torch import load_file

    out = tmp_path / "max_steps"
    Trainer(demo_cfg(tmp_path, *common, "train.max_steps=6", f"train.output_dir={out}",
                     "train.per_device_batch_size=16")).fit()
    Trainer(demo_cfg(tmp_path, *common, "train.per_device_batch_size=8", "train.resume=auto",
                     "sampler.on_global_batch_change=replan", f"train.output_dir={out}",
                     "train.max_steps=20", "train.stop_after_steps=1")).fit()
    said = capsys.readouterr().out
    assert "global batch 16 -> 8" in said and "(total 6 -> 20 steps: " in said
    six, seven = (load_file(str(out / "checkpoints" / f"checkpoint-{n}" / "model.safetensors"))
                  for n in (6, 7))  # step 7 ran at the new schedule's LR, not at 0
    assert any(not torch.equal(six[k], seven[k]) for k in six if k.startswith("encoder."))


def test_a_replan_inside_the_warm_up_re_counts_it_from_the_new_run_length(tmp_path, capsys):
    """warmup_ratio of the re-counted run (5 + 24 steps: 8), not of a run that never happens
    (two whole epochs at the new batch, 48 steps: 12)."""
    caps = [f"tasks.{i}.max_samples=64" for i in range(3)]  # 192 samples per epoch
    common = [*caps, "train.max_steps=null", "train.num_epochs=2", "train.warmup_ratio=0.25",
              "train.eval_steps=null", "train.eval_at_epoch_end=false",
              "checkpoint.save_at_epoch_end=false", "train.lr=1e-3", "train.head_lr=1e-3"]
    Trainer(demo_cfg(tmp_path, *common, "train.per_device_batch_size=16",
                     "train.stop_after_steps=5")).fit()  # 24 steps, warm-up 6
    Trainer(demo_cfg(tmp_path, *common, "train.per_device_batch_size=8", "train.resume=auto",
                     "sampler.on_global_batch_change=replan", "train.stop_after_steps=2")).fit()
    assert "the run now ends at step 29" in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "out", "train")}
    assert lrs[5] == pytest.approx(1e-3 * 5 / 6)
    assert (lrs[6], lrs[7]) == (pytest.approx(1e-3 * 6 / 8), pytest.approx(1e-3 * 7 / 8))


def test_a_resume_refuses_another_max_length(tmp_path):
    """The data fingerprints are of the files: a new truncation would train the rest of the
    run on other inputs, silently."""
    Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.stop_after_steps=4")).fit()
    before = _tree(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"'max_length' differs: checkpoint has 64, this "
                       r"run has 32 \(the rest of the run would train on other truncations"):
        Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.resume=auto",
                         "data.max_length=32")).fit()
    assert _tree(tmp_path / "out") == before


@pytest.mark.parametrize("change", ["train.lr=0.01", "train.weight_decay=0.5",
                                    "train.adam_beta2=0.98"])
def test_a_resume_refuses_optimizer_settings_its_restored_state_would_ignore(tmp_path, change):
    Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.stop_after_steps=4")).fit()
    before = _tree(tmp_path / "out")
    key = change.split("=")[0].split(".")[1]
    with pytest.raises(CheckpointError, match=rf"'optimizer_settings.{key}' differs: checkpoint "
                       rf"has .*, this run has {change.split('=')[1]} \(the restored AdamW state"):
        Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.resume=auto", change)).fit()
    assert _tree(tmp_path / "out") == before


def test_a_bad_test_file_fails_before_training_not_at_predict(tmp_path):
    """What predict would refuse fails at the start; a label the run never saw does not
    (predict reads no label; evaluate --split test checks them when it scores them)."""
    from mtl_dist.errors import DataError

    bad = tmp_path / "test.jsonl"
    bad.write_text('{"id": "a", "text": "", "label": "anger"}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: empty text in field 'text'"):
        Trainer(demo_cfg(tmp_path, "train.max_steps=4", f"tasks.1.test={bad}"))
    assert not (tmp_path / "out").exists()
    bad.write_text('{"id": "a", "text": "x", "label": "no-such-label"}\n')
    Trainer(demo_cfg(tmp_path, "train.max_steps=4", f"tasks.1.test={bad}")).close()


@pytest.mark.parametrize("eval_steps", ["null", "5"])  # 5: the checkpoint's step evaluated
def test_a_replan_in_the_last_epoch_ends_the_run_with_its_final_evaluation(tmp_path, capsys,
                                                                           eval_steps):
    caps = [f"tasks.{i}.max_samples=64" for i in range(3)]
    common = [*caps, "train.max_steps=null", "train.num_epochs=1",
              f"train.eval_steps={eval_steps}"]
    Trainer(demo_cfg(tmp_path, *common, "train.per_device_batch_size=16",
                     "train.stop_after_steps=5")).fit()
    capsys.readouterr()
    summary = Trainer(demo_cfg(tmp_path, *common, "train.per_device_batch_size=8",
                               "sampler.on_global_batch_change=replan", "train.resume=auto")).fit()
    assert "no epoch is left (num_epochs=1): the run ends here" in capsys.readouterr().out
    assert summary["global_step"] == 5
    assert [r["step"] for r in records(tmp_path / "out", "eval")] == [5]


def test_a_resume_with_another_metric_for_best_does_not_compare_a_loss_with_a_score(
        tmp_path, capsys):
    """A resume refuses another metric (early stopping's best was measured by the old one);
    with no checkpoint left, a best/ of another config is refused, and one saved without its
    config hash (older) is not compared with when its metric differs."""
    Trainer(demo_cfg(tmp_path, "train.max_steps=8")).fit()
    with pytest.raises(CheckpointError, match="'metric_for_best' differs: checkpoint has "
                       "\"score\", this run has \"loss\""):
        Trainer(demo_cfg(tmp_path, "train.max_steps=16", "train.resume=auto",
                         "train.metric_for_best=loss")).fit()
    shutil.rmtree(tmp_path / "out" / "checkpoints")  # best/ alone: resume=auto starts afresh
    with pytest.raises(CheckpointError, match="no checkpoint to resume, and its best/ was "
                       "trained with another config"):  # metric_for_best is in the config
        Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.resume=auto",
                         "train.metric_for_best=loss"))
    info = tmp_path / "out" / "best" / "best.json"  # as a best/ saved before config_hash was
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items()
                                if k != "config_hash"}))
    _reseal(info)
    capsys.readouterr()
    Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.resume=auto",
                     "train.metric_for_best=loss")).fit()
    out = capsys.readouterr().out
    assert "no checkpoint to resume in" in out and "starting afresh beside best/ (step 8" in out
    assert "best/ was chosen by metric_for_best=score, this run uses loss" in out
    best = json.loads((tmp_path / "out" / "best" / "best.json").read_text())
    assert best["metric_for_best"] == "loss" and best["step"] == 8


@pytest.mark.parametrize(("override", "difference"), [
    ("tasks.0.metric=macro_f1", r"'task_scoring.nli.metric' differs: checkpoint has "
                                r"\"accuracy\", this run has \"macro_f1\""),
    ("tasks.1.score_weight=3.0", r"'task_scoring.emotion.score_weight' differs: checkpoint "
                                 r"has 1.0, this run has 3.0")])
def test_a_resume_with_another_task_metric_or_weight_is_refused(tmp_path, override, difference):
    """The run score early stopping and best/ compare is built from the tasks' metrics and
    weights: changed on resume, new scores were compared with the old best (the reviewer's
    run improved at every evaluation, yet stopped early and never updated best/)."""
    Trainer(demo_cfg(tmp_path, "train.max_steps=8")).fit()
    with pytest.raises(CheckpointError, match=difference + r" \(early stopping's best"):
        Trainer(demo_cfg(tmp_path, "train.max_steps=16", "train.resume=auto", override)).fit()


def test_head_lr_null_and_head_lr_equal_to_lr_resume_alike(tmp_path):
    Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.stop_after_steps=4",
                     "train.head_lr=null")).fit()
    lr = load_config(DEMO, []).train.lr
    summary = Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.resume=auto",
                               f"train.head_lr={lr}")).fit()
    assert summary["global_step"] == 8


@pytest.mark.parametrize("rerun", ["overwrite", "resume_path"])
def test_a_preempted_run_whose_rerun_would_go_wrong_is_not_requeued(tmp_path, capsys,
                                                                    monkeypatch, rerun):
    """Requeued, the job would rerun its command line: with overwrite_output_dir it would
    delete the checkpoint it just saved and start over at every preemption; with
    train.resume=PATH it would go back to PATH (or, PATH another run's, be refused)."""
    import mtl_dist.preemption

    def no_scontrol(*args, **kwargs):  # never a real `scontrol requeue` from a test
        raise AssertionError(f"scontrol called: {args}")

    monkeypatch.setattr(mtl_dist.preemption.subprocess, "run", no_scontrol)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if rerun == "overwrite":
        extra, problem = ["train.overwrite_output_dir=true"], \
            "train.overwrite_output_dir=true would delete this checkpoint"
    else:
        Trainer(demo_cfg(tmp_path / "a", "train.max_steps=4", "checkpoint.save_steps=4")).fit()
        path = tmp_path / "a" / "out" / "checkpoints" / "checkpoint-4"
        extra, problem = [f"train.resume={path}"], \
            f"train.resume={path} would go back to that checkpoint"
    summary = fit_with_a_signal_during_step(
        Trainer(demo_cfg(tmp_path, "train.max_steps=8", *extra)), 6)
    out = capsys.readouterr().out
    assert summary["stop_reason"] == "preempted"
    assert "requested requeue" not in out
    assert f"not requeued ({problem} on the rerun): rerun with train.resume=auto (and " \
        "without train.overwrite_output_dir)" in out


@pytest.mark.parametrize("sig, shell_wrote, requeued", [
    (signal.SIGTERM, None, False),  # a plain scancel / time limit: Slurm ends the job
    (signal.SIGTERM, "USR1", True),  # slurm/common.sh forwarded a USR1 as TERM
    (signal.SIGUSR1, None, True),  # srun --signal=USR1@N straight to the training
])
def test_under_slurm_only_a_requeue_request_requeues(tmp_path, capsys, monkeypatch, sig,
                                                    shell_wrote, requeued):
    """A job whose every TERM requeued itself could not be cancelled: TERM checkpoints and
    stops; USR1 (or the batch shell's note that its TERM carries one) also requeues."""
    import subprocess

    import mtl_dist.preemption

    calls = []

    def fake_scontrol(cmd, **kwargs):  # never a real `scontrol requeue` from a test
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mtl_dist.preemption.subprocess, "run", fake_scontrol)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    signal_file = tmp_path / "signal"
    monkeypatch.setenv("MTL_SIGNAL_FILE", str(signal_file))
    if shell_wrote:
        signal_file.write_text(shell_wrote + "\n")
    summary = fit_with_a_signal_during_step(Trainer(demo_cfg(tmp_path, "train.max_steps=8")), 3,
                                            sig)
    out = capsys.readouterr().out
    assert summary["stop_reason"] == "preempted" and summary["global_step"] == 3
    assert calls == ([["scontrol", "requeue", "4242"]] if requeued else [])
    assert ("not requeued: a TERM/INT ends the job" in out) is not requeued
    assert (tmp_path / "signal.stop").read_text() == "preempted\n"  # for the batch shell


def test_a_train_record_is_the_mean_over_the_steps_it_covers(tmp_path):
    """A record after a resume, or at the run's end, covers fewer than log_steps steps; one
    across an epoch end covers steps of both epochs (their last steps used to be dropped):
    its loss is the mean over them, as every-step records of the same run show."""
    caps = [f"tasks.{i}.max_samples=64" for i in range(3)]  # 12 steps per epoch at 16
    common = [*caps, "train.max_steps=22", "train.per_device_batch_size=16",
              "train.eval_steps=null", "train.eval_at_epoch_end=false",
              "checkpoint.save_at_epoch_end=false"]
    every = tmp_path / "every"
    Trainer(demo_cfg(tmp_path, *common, f"train.output_dir={every}", "train.log_steps=1")).fit()
    loss = dict(train_losses(every))
    base = [*common, "train.log_steps=5"]
    Trainer(demo_cfg(tmp_path, *base, "train.stop_after_steps=7")).fit()
    Trainer(demo_cfg(tmp_path, *base, "train.resume=auto")).fit()
    covered = {5: range(1, 6), 10: range(8, 11), 15: range(11, 16), 20: range(16, 21),
               22: range(21, 23)}  # 6-7: summed before the stop, not logged
    got = dict(train_losses(tmp_path / "out"))
    assert sorted(got) == sorted(covered)
    for step, steps in covered.items():
        mean = sum(loss[s] for s in steps) / len(steps)
        assert got[step] == pytest.approx(mean, rel=1e-5), step


def test_ckpt_convert_of_a_checkpoint_with_an_untrained_head_is_one_line(tmp_path, capsys):
    """One step under ZeRO-2 (CPU) trains one task's head: the other heads' parameter groups
    have no AdamW state, which DeepSpeed's universal conversion looks up (KeyError)."""
    from mtl_dist.cli import main

    Trainer(demo_cfg(tmp_path, "train.zero_stage=2", "train.max_steps=1", "train.eval_steps=null",
                     "checkpoint.save_steps=1", "checkpoint.save_best=false")).fit()
    capsys.readouterr()
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-1"
    assert main(["ckpt", "convert", str(checkpoint), str(tmp_path / "universal")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: convert: checkpoint-1 has no optimizer state for "
                              "parameter group ") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "universal").exists() and not list(tmp_path.glob(".tmp-convert-*"))


@pytest.mark.parametrize("first_fails", [False, True], ids=["closed", "failed_in_deepspeed"])
def test_in_process_zero_runs_one_after_another(tmp_path, monkeypatch, first_fails):
    """A plain-python ZeRO run, closed (or failed inside deepspeed.initialize, which closes
    too), then another: close() destroyed the process group behind DeepSpeed's back (the
    second engine failed on a group "not registered"), and the LOCAL_RANK and DS_ACCELERATOR
    set for DeepSpeed stayed (a `mtl-dist train` started from this process then took itself
    for a rank, and ran DeepSpeed on the CPU)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)

    def cfg(name):
        return demo_cfg(tmp_path, "train.zero_stage=2", "train.max_steps=1",
                        "train.eval_steps=null", "checkpoint.save_best=false",
                        f"train.output_dir={tmp_path / name}")

    if first_fails:
        with monkeypatch.context() as patch:
            def fail(*args, **kwargs):
                raise RuntimeError("injected: DeepSpeed failed while building the engine")

            patch.setattr(DeepSpeedEngine, "_configure_optimizer", fail)
            with pytest.raises(RuntimeError, match="injected"):
                Trainer(cfg("first"))
    else:
        trainer = Trainer(cfg("first"))
        assert os.environ.get("LOCAL_RANK") == "0"
        assert trainer.fit()["global_step"] == 1
        trainer.close()
    assert "LOCAL_RANK" not in os.environ and "DS_ACCELERATOR" not in os.environ
    second = Trainer(cfg("second"))
    assert second.fit()["global_step"] == 1
    second.close()
    assert "LOCAL_RANK" not in os.environ and "DS_ACCELERATOR" not in os.environ


def test_zero_on_cpu_sets_ds_accelerator_before_deepspeed_is_first_imported(tmp_path):
    """DeepSpeed fixes its accelerator when first imported: build_ds_config's check imported
    it before DS_ACCELERATOR=cpu was set, so on a GPU machine a plain-python ZeRO run with
    train.device=cpu got the CUDA accelerator. A fresh interpreter records the variable at
    DeepSpeed's first import."""
    import subprocess
    import sys

    from tests._runs import REPO, env

    script = f"""
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "deepspeed.accelerator" and not seen:  # (find_spec("deepspeed") alone
            # is accelerate asking whether it is installed)
            seen.append(os.environ.get("DS_ACCELERATOR", "unset"))
        return None
sys.meta_path.insert(0, Watch())
from mtl_dist.config import load_config
from mtl_dist.trainer import Trainer
cfg = load_config({str(DEMO)!r}, ["train.zero_stage=2", "train.max_steps=1",
    "train.eval_steps=null", "checkpoint.save_best=false", "train.device=cpu",
    "train.output_dir={tmp_path / 'out'}", "data.cache_dir={tmp_path / 'cache'}"])
trainer = Trainer(cfg)
trainer.close()
print("DS_ACCELERATOR at DeepSpeed's first import:", seen)
"""
    child_env = {k: v for k, v in env().items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DS_ACCELERATOR at DeepSpeed's first import: ['cpu']" in proc.stdout, proc.stdout


def test_zero_under_accelerate_use_cpu_on_a_gpu_machine_gets_deepspeeds_cpu_accelerator(tmp_path):
    """DeepSpeed is imported before the process group (make_accelerator); accelerate runs on
    the CPU with ACCELERATE_USE_CPU=true (`mtl-dist demo`, `ACCELERATE_USE_CPU=true accelerate
    launch`) even where a GPU is visible: DS_ACCELERATOR=cpu must be set by then (it was
    left to auto-detection: CUDA). A GPU machine as far as the device choice goes (torch.cuda
    answers yes); make_accelerator failing after the choice leaves no DS_ACCELERATOR behind."""
    import subprocess
    import sys

    from tests._runs import REPO, env

    script = f"""
import importlib.abc, os, sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "deepspeed.accelerator" and not seen:
            seen.append(os.environ.get("DS_ACCELERATOR", "unset"))
        return None
sys.meta_path.insert(0, Watch())
from mtl_dist import trainer, zero
from mtl_dist.config import load_config
cfg = load_config({str(DEMO)!r}, ["train.zero_stage=2", "train.output_dir={tmp_path / 'out'}",
                                  "data.cache_dir={tmp_path / 'cache'}"])
def fails(*args):
    raise RuntimeError("the Accelerator could not be made")
trainer._accelerator = fails
try:
    trainer.make_accelerator(cfg, with_deepspeed=True)
except RuntimeError:
    pass
assert "DS_ACCELERATOR" not in os.environ, "left set by a make_accelerator that failed"
print("DS_ACCELERATOR at DeepSpeed's first import:", seen)
zero.choose_accelerator(torch.device("cpu"))  # the trainer's check, once accelerate chose
zero.undo_env()
"""
    child_env = {**env(), "ACCELERATE_USE_CPU": "true"}
    child_env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DS_ACCELERATOR at DeepSpeed's first import: ['cpu']" in proc.stdout, proc.stdout


def test_a_deepspeed_accelerator_fixed_for_another_device_is_one_line(tmp_path, monkeypatch):
    """DeepSpeed fixes its accelerator at its first import in the process: one on 'cuda' for
    a run on the CPU would put the engine's model on the GPU and feed it from the CPU."""
    import sys
    from types import SimpleNamespace

    from mtl_dist import zero

    picked = SimpleNamespace(ds_accelerator=SimpleNamespace(device_name=lambda: "cuda"))
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator.real_accelerator", picked)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(ConfigError, match=r"^DeepSpeed runs on 'cuda' \(fixed when this process "
                       r"first imported it; DS_ACCELERATOR=cuda\), this run on 'cpu': set "
                       r"DS_ACCELERATOR=cpu before anything imports DeepSpeed$"):
        zero.choose_accelerator(torch.device("cpu"))
    zero.choose_accelerator(torch.device("cuda"))  # the same device: no complaint
    monkeypatch.delenv("DS_ACCELERATOR")  # make_accelerator sets it for a CPU run, then fails:
    with pytest.raises(ConfigError, match="^DeepSpeed runs on 'cuda'"):
        make_accelerator(demo_cfg(tmp_path, "train.zero_stage=2", "train.device=cpu"),
                         with_deepspeed=True)
    assert "DS_ACCELERATOR" not in os.environ, "left set by a set-up that failed"


def test_end_process_group_keeps_a_kept_group_and_lets_go_of_a_destroyed_one():
    """`keep_group` (a fork launch, where accelerate keeps the group): the group stays up and
    the engine usable, only the variables set for DeepSpeed go. Without it every group is
    destroyed and its gloo threads end at once, though the engine is still referenced (its
    groups were dropped from DeepSpeed's objects and the parameters), with no warning (a
    sweep that read every live object warned of torch.distributed.reduce_op)."""
    import subprocess
    import sys

    from tests._runs import REPO, env

    script = """
import os, torch, torch.distributed as dist
from mtl_dist import zero
from tests._runs import gloo_threads
model = torch.nn.Linear(4, 2)
engine, optimizer = zero.initialize(
    model, torch.optim.AdamW(model.parameters()), {"train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 2}}, torch.device("cpu"))
assert gloo_threads() and os.environ.get("DS_ACCELERATOR") == "cpu"
zero.end_process_group(keep_group=True)
assert dist.is_initialized() and gloo_threads(), "a kept group was destroyed"
assert "LOCAL_RANK" not in os.environ and "DS_ACCELERATOR" not in os.environ
engine.backward(engine(torch.ones(1, 4)).sum())
engine.step()  # still usable
import warnings
with warnings.catch_warnings(record=True) as caught:  # the sweep reads no deprecated object
    warnings.simplefilter("always")
    zero.end_process_group()
assert not caught, [str(w.message) for w in caught]
assert not dist.is_initialized(), "the group is still registered"
assert not gloo_threads(), f"gloo threads left with the engine referenced: {gloo_threads()}"
assert engine.module is model
print("kept, then let go of")
"""
    child_env = {k: v for k, v in env().items() if k not in ("DS_ACCELERATOR", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept, then let go of" in proc.stdout


def test_check_leaves_the_zero_stage_of_a_resume_to_the_launch(tmp_path, capsys):
    """`train.sh --launch zero2 CONFIG train.resume=auto` runs `check` on the config alone
    (stage 0); the launch's DeepSpeed file sets the stage after it: no refusal there."""
    from mtl_dist.cli import main

    common = [str(DEMO), f"train.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
              "train.max_steps=1", "checkpoint.save_steps=1", "checkpoint.save_best=false",
              "train.eval_steps=null", "train.resume=auto"]
    Trainer(demo_cfg(tmp_path, "train.zero_stage=2", "train.max_steps=1", "train.eval_steps=null",
                     "checkpoint.save_steps=1", "checkpoint.save_best=false")).fit()
    capsys.readouterr()
    assert main(["check", *common]) == 0, capsys.readouterr().err
    assert main(["check", *common, "train.lr=0.5"]) == 2  # what the config decides still is
    assert "manifest key 'optimizer_settings.lr' differs" in capsys.readouterr().err


def test_check_with_the_launchs_world_size_checks_what_the_launch_decides(tmp_path, capsys,
                                                                          monkeypatch):
    """Given the launch's world size and DeepSpeed file (launch/train.sh passes both),
    `check` also refuses a resume's other ZeRO stage and world size (ZeRO partitions): they
    used to be refused once per rank, after the launch. (The global batch: test_launch.)"""
    from mtl_dist.cli import main
    from tests._runs import REPO

    common = [str(DEMO), f"train.output_dir={tmp_path / 'out'}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.resume=auto"]
    Trainer(demo_cfg(tmp_path, "train.zero_stage=2", "train.max_steps=1", "train.eval_steps=null",
                     "checkpoint.save_steps=1", "checkpoint.save_best=false")).fit()
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-1"
    capsys.readouterr()
    # a DDP launch of 1 process: the checkpoint's ZeRO-2 partitions cannot be taken
    assert main(["check", "--world-size", "1", *common]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: checkpoint {ckpt}: manifest key 'zero_stage' differs: checkpoint has 2, this "
        "run has 0")

    def zero2_launch():  # what `accelerate launch --deepspeed_config_file` gives the process
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "launch" / "ds_zero2.json"))

    zero2_launch()
    assert main(["check", "--world-size", "1", *common]) == 0, capsys.readouterr().err
    zero2_launch()
    assert main(["check", "--world-size", "2", *common]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: checkpoint {ckpt}: manifest key 'world_size' differs: checkpoint has 1, this "
        "run has 2; ZeRO stage 2 partitions cannot be re-sharded in place: run `mtl-dist ckpt "
        "convert")


def test_accelerates_own_compile_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """`accelerate launch --dynamo_backend inductor` would have accelerate compile the DDP
    wrapper (the trainer compiles with train.compile, and close() lets go of DDP's group):
    refused before anything is written; accelerate's own "NO" is fine."""
    from mtl_dist.cli import main

    args = ["train", str(DEMO), f"train.output_dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1", "train.eval_steps=null"]
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: ACCELERATE_DYNAMO_BACKEND=INDUCTOR (accelerate launch --dynamo_backend): not "
        "supported; compile with train.compile=true and launch with --dynamo_backend no")
    assert not (tmp_path / "out" / "checkpoints").exists()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert main(args) == 0, capsys.readouterr().err


def test_patience_without_any_scheduled_evaluation_warns(tmp_path):
    """Patience with eval_steps null and no epoch-end evaluation can never act (only the
    final evaluation runs): said once at the start. Not where no task has a dev file any more
    (`mtl-dist bench` drops them after loading the user's config)."""
    import warnings

    no_schedule = ["train.eval_steps=null", "train.eval_at_epoch_end=false",
                   "train.early_stopping_patience=5"]
    with pytest.warns(UserWarning, match=r"train.early_stopping_patience=5 cannot act: no "
                      r"evaluation is scheduled"):
        Trainer(demo_cfg(tmp_path, *no_schedule)).close()
    cfg = demo_cfg(tmp_path, *no_schedule)
    for task in cfg.tasks:
        task.dev = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg).close()
    assert not [w for w in caught if "cannot act" in str(w.message)]


def test_a_run_whose_every_evaluation_was_nan_says_so_at_its_end(tmp_path, capsys):
    """NaN is never a best; the end line then said "no evaluation", though evaluations ran."""
    trainer = Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.metric_for_best=loss"))
    real_evaluate = trainer.evaluate

    def diverged(*args, **kwargs):  # a diverged run's evaluations
        return {**real_evaluate(*args, **kwargs), "loss": float("nan")}

    trainer.evaluate = diverged
    trainer.fit()
    trainer.close()
    out = capsys.readouterr().out
    assert "loss is NaN (diverged?): not taken as a best" in out
    assert "at step 8; no finite evaluation (loss NaN at every one)" in out


def test_under_metric_for_best_loss_best_is_shown_as_a_loss(tmp_path, capsys):
    """best/'s number is the eval loss then: `ckpt ls` and the end line say so, beside the
    periodic checkpoints' run scores."""
    from mtl_dist.cli import main

    Trainer(demo_cfg(tmp_path, "train.max_steps=8", "train.metric_for_best=loss")).fit()
    loss = json.loads((tmp_path / "out" / "best" / "best.json").read_text())["score"]
    assert f"best loss {loss} at step" in capsys.readouterr().out
    assert main(["ckpt", "ls", str(tmp_path / "out")]) == 0
    rows = capsys.readouterr().out.splitlines()
    (best,) = [r for r in rows if r.rstrip().endswith("[best]") and "/best " in r]
    assert f"loss={loss:.4f}" in best
    assert all("score=" in r for r in rows if "checkpoint-" in r)
    from mtl_dist.report import build_report  # the report's row said "best score" for it

    page = build_report(tmp_path / "out").read_text()
    assert f"<th>best loss</th><td>{loss:.4f}</td>" in page and "best score" not in page
    shutil.rmtree(tmp_path / "out" / "best")  # save_best off: the run's config.yaml says it
    assert "<th>best loss</th>" in build_report(tmp_path / "out").read_text()


def test_a_second_run_on_an_output_dir_in_use_is_refused(tmp_path):
    """Two runs on one OUTPUT: the second's save clean-up deleted the first's in-progress
    save (the first died), metrics.jsonl got duplicated and out-of-order steps, and each
    replaced the other's checkpoints. The run holds a lock on OUTPUT while it goes on."""
    from mtl_dist.checkpoint import CheckpointManager

    cfg = demo_cfg(tmp_path, "train.max_steps=4", "train.eval_steps=4")
    first = Trainer(cfg).fit()
    out = tmp_path / "out"
    holder = CheckpointManager(out, save_total_limit=None, recover_best=False)
    holder.hold_output_dir()  # another run, going on...
    (out / "best").rename(out / ".old-best-0123abcd")  # ...and mid best/ swap
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg.train.resume = "auto"
    cfg.train.max_steps = 8
    with pytest.raises(CheckpointError, match=r"train.output_dir=.*/out is in use by another "
                       r"run \(it holds the directory's lock\)"):
        Trainer(cfg).fit()
    # untouched: not even its best/ swap "recovered" under it
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    holder.let_go_of_output_dir()  # it ended (or was killed: the kernel lets go)
    assert Trainer(cfg).fit()["global_step"] == 8 and first["global_step"] == 4
    assert (out / "best").is_dir() and not (out / ".old-best-0123abcd").exists()


def test_a_second_run_is_refused_before_its_set_up(tmp_path, monkeypatch):
    """`train` started directly (not through train.sh's `check`) built its model and read its
    data before the lock refused it: minutes on a large model, per rank."""
    from mtl_dist import trainer as trainer_module
    from mtl_dist.checkpoint import CheckpointManager

    built = []
    real_build = trainer_module.build_model
    monkeypatch.setattr(trainer_module, "build_model",
                        lambda *a, **k: built.append(1) or real_build(*a, **k))
    cfg = demo_cfg(tmp_path, "train.max_steps=2")
    holder = CheckpointManager(tmp_path / "out", save_total_limit=None, recover_best=False)
    holder.hold_output_dir()
    with pytest.raises(CheckpointError, match=r"is in use by another run"):
        Trainer(cfg)
    assert built == []
    holder.let_go_of_output_dir()
    Trainer(cfg).close()
    assert built == [1]


def test_lock_probes_do_not_refuse_each_other_or_a_run(tmp_path, monkeypatch):
    """A probe (`check`, another run's start) holds a shared lock for a moment: a second
    probe must not read it as a run, and a run taking its lock then must not be refused."""
    import fcntl

    from mtl_dist.checkpoint import CheckpointManager

    probe = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)  # a probe, caught mid-moment
    waits = []

    def probe_ends(seconds):  # the run's first pause outlasts the probe's moment
        waits.append(seconds)
        fcntl.flock(probe, fcntl.LOCK_UN)

    try:
        assert not CheckpointManager(tmp_path, save_total_limit=None, recover_best=False).in_use()
        monkeypatch.setattr(ck.time, "sleep", probe_ends)
        run = CheckpointManager(tmp_path, save_total_limit=None, recover_best=False)
        run.hold_output_dir()  # waits out the probe instead of refusing
        assert len(waits) == 1
        assert CheckpointManager(tmp_path, save_total_limit=None, recover_best=False).in_use()
        run.let_go_of_output_dir()
    finally:
        os.close(probe)


def test_an_unreadable_output_dir_is_one_line_at_the_probe_and_the_lock(tmp_path, monkeypatch):
    """rank 0's os.open failing raised there alone: the other ranks waited at the broadcast."""
    real_open = os.open
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(ck.os, "open", lambda path, *a: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(path))) if str(path) == str(out)
        else real_open(path, *a))
    manager = ck.CheckpointManager(out, save_total_limit=None, recover_best=False)
    for step in (manager.refuse_if_in_use, manager.hold_output_dir):
        with pytest.raises(CheckpointError, match=rf"^train.output_dir={out}: PermissionError: "):
            step()


def test_a_forked_child_does_not_keep_the_output_dir_locked(tmp_path):
    """DataLoader workers (forked) shared the lock's open file: after a kill -9 of the run
    they kept OUTPUT locked for seconds, and a resume then was refused."""
    from mtl_dist.checkpoint import CheckpointManager

    run = CheckpointManager(tmp_path, save_total_limit=None, recover_best=False)
    run.hold_output_dir()
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # a worker, outliving its parent's descriptor for a while
        os.write(ready, b"1")  # after the fork hooks
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"
        os.close(started)
        run.let_go_of_output_dir()  # the run's own descriptor gone, as at its death
        again = CheckpointManager(tmp_path, save_total_limit=None, recover_best=False)
        again.hold_output_dir()  # refused while the child kept the lock
        again.let_go_of_output_dir()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    """A plain Ctrl-C (SIGINT, not a stop signal by default) gave one traceback per rank."""
    optimizer_step = Trainer._optimizer_step

    def step_then_interrupt(self):
        optimizer_step(self)
        if self.state.global_step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_interrupt)
    args = ["train", str(DEMO), f"train.output_dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=12", "checkpoint.save_steps=4"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "interrupted (Ctrl-C): stopped without a checkpoint; train.resume=auto continues from "
        "the newest committed one (SIGINT in train.preemption_signals stops with a checkpoint)")
    monkeypatch.setattr(Trainer, "_optimizer_step", optimizer_step)
    assert main([*args, "train.resume=auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
