"""Two real ranks on CPU (gloo): they train together, resume bit-exactly, and agree with one rank.

Each launch costs ~10-20 s of start-up, so one straight run serves several checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mtl_dist.checkpoint import weights_read_through_deepspeed
from tests._runs import (
    DEMO,
    FAST,
    REPO,
    assert_same_tensors,
    checkpoint_model,
    env,
    free_port,
    records,
    run_cli,
    train_losses,
)

pytestmark = pytest.mark.slow
STEPS = ["train.max_steps=24"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """24 steps on 2 processes, uninterrupted."""
    root = tmp_path_factory.mktemp("straight")
    out = root / "out"
    run_cli(["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={root}/cache",
             *FAST, *STEPS], procs=2)
    return out


def test_two_ranks_really_train_together(straight):
    manifest = json.loads((straight / "checkpoints" / "checkpoint-24" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["run"]["world_size"] == 2
    assert manifest["run"]["global_batch_size"] == 2 * manifest["run"]["per_device_batch_size"]
    names = {f for f in manifest["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= names
    # Global batch 32 over 24 steps: the samples seen count both ranks.
    state = json.loads((straight / "checkpoints" / "checkpoint-24" / "trainer_state.json")
                       .read_text())
    assert state["samples_seen"] == 24 * 32


def test_stop_and_resume_on_two_ranks_is_bit_exact(straight, tmp_path):
    out = tmp_path / "split"
    base = ["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path}/cache",
            *FAST, *STEPS]
    run_cli([*base, "train.stop_after_steps=13"], procs=2)
    assert (out / "checkpoints" / "checkpoint-13" / "COMMITTED").exists()
    run_cli([*base, "train.resume=auto"], procs=2)
    assert train_losses(out) == train_losses(straight)
    assert_same_tensors(checkpoint_model(out, 24), checkpoint_model(straight, 24))


def test_eval_metrics_on_two_ranks_equal_one_rank(straight):
    args = ["evaluate", str(DEMO), f"train.output_dir={straight}", "--checkpoint",
            str(straight / "best")]
    one = run_cli(args, procs=1).stdout
    two = run_cli(args, procs=2).stdout
    parse = lambda text: json.loads(text[text.index("{"):])  # noqa: E731
    assert parse(one) == parse(two)


def test_logged_loss_is_the_global_batch_loss_two_ranks_equal_one(tmp_path):
    """train/loss is the mean over ranks: 2 x 16 samples log what 1 x 32 samples log."""
    no_dropout = ["model.dropout=0.0", "model.arch.hidden_dropout_prob=0.0",
                  "model.arch.attention_probs_dropout_prob=0.0"]
    outs = {}
    for procs in (1, 2):
        outs[procs] = tmp_path / f"p{procs}"
        run_cli(["train", str(DEMO), f"train.output_dir={outs[procs]}",
                 f"data.cache_dir={tmp_path}/cache", *FAST, "train.max_steps=6",
                 f"train.per_device_batch_size={32 // procs}", "checkpoint.save_best=false",
                 "train.eval_steps=100", *no_dropout], procs=procs)
    one, two = train_losses(outs[1]), train_losses(outs[2])
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 7))
    for (step, a), (_, b) in zip(one, two, strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, a, b)


def test_fused_qkv_trains_like_three_linears_on_two_ranks(straight, tmp_path):
    """train.fused_qkv under DDP (gloo): the stacked GEMM's gradients reach the three weights
    through autograd, DDP all-reduces them, and the two ranks train as with three Linears."""
    out = tmp_path / "fused"
    run_cli(["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path}/cache",
             *FAST, *STEPS, "train.fused_qkv=true"], procs=2)
    fused, split = train_losses(out), train_losses(straight)
    assert [s for s, _ in fused] == [s for s, _ in split] == list(range(1, 25))
    for (step, a), (_, b) in zip(split, fused, strict=True):  # dropout on: same random streams
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (step, a, b)


def test_world_size_two_to_one_resume_continues(straight, tmp_path):
    out = tmp_path / "shrink"
    shutil.copytree(straight, out)
    result = run_cli(["train", str(DEMO), f"train.output_dir={out}",
                      f"data.cache_dir={tmp_path}/cache", *FAST, "train.max_steps=32",
                      "train.per_device_batch_size=32",
                      f"train.resume={out}/checkpoints/checkpoint-16"], procs=1)
    # said, as the other way round is (it was silent)
    assert f"warning: checkpoint {out}/checkpoints/checkpoint-16 was saved by 2 ranks, this " \
        "run has 1: rank 1's RNG state is not used" in result.stderr
    steps = [s for s, _ in train_losses(out)]
    assert steps == list(range(1, 33))
    assert (out / "checkpoints" / "checkpoint-32" / "COMMITTED").exists()


def run_script(script: str, tmp_path, procs: int = 2, *extra: str):
    """A test script from tests/dist_scripts under torchrun with N CPU processes."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
         "--master_port", str(free_port()), f"tests/dist_scripts/{script}",
         str(tmp_path / "out"), str(tmp_path / "cache"), *extra],
        cwd=REPO, env={**env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_idle_heads_stay_unchanged_under_ddp(tmp_path):
    assert run_script("idle_heads.py", tmp_path).count("idle heads unchanged") == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_idle_heads_stay_unchanged_under_zero(tmp_path, stage):
    """ZeRO gives idle heads zero grads (not None): without freezing, weight decay moves them."""
    out = run_script("idle_heads.py", tmp_path, 2, f"train.zero_stage={stage}")
    assert out.count("idle heads unchanged") == 2


def test_zero_accumulation_with_heads_skipping_micro_steps_equals_torch(tmp_path):
    """Two gloo ranks, accumulation 2, one task per micro-batch: ZeRO-1/2/3, with and without
    optimizer offload, trains exactly like plain torch AdamW + clipping. With offload, a head
    used only at the first micro-step lost its gradient (DeepSpeed's managed accumulation),
    and one first used at the second added its stale gradient (offload accumulators)."""
    settings = ["1:1", "2:0", "2:1", "3:0", "3:1", "1:0:bf16"]
    printed = run_script("zero_head_accumulation.py", tmp_path, 2, *settings)
    for setting in settings:
        stage, offload, *bf16 = setting.split(":")
        done = "bf16 steps" if bf16 else "no matches torch"
        assert printed.count(f"stage {stage} offload {offload} {done}") == 2, setting


def test_the_host_groups_collectives_time_out_at_the_runs_collective_timeout(tmp_path):
    """The per-step checks' gloo group was made without a timeout: with rank 0 stopped
    (SIGSTOP) under collective_timeout_s=15, rank 1 still waited after 150 s (torch's
    default is 30 minutes)."""
    assert "timed out while rank 0 was away" in run_script("host_group_timeout.py", tmp_path)


def ds_module_state(output_dir, step):
    path = output_dir / "checkpoints" / f"checkpoint-{step}" / "ds" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def ema_shadow(output_dir, step) -> dict[str, torch.Tensor]:
    path = output_dir / "checkpoints" / f"checkpoint-{step}" / "ema.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["shadow"]


@pytest.fixture(scope="module")
def zero_runs() -> dict:
    """Output dirs of the ZeRO stop/resume runs, by (stage, name): later tests reuse them."""
    return {}


ZERO_STEPS, ZERO_STOP = 10, 5  # ZeRO-3 on CPU is slow: few steps


def _zero_run(tmp_path, name, stage, *extra, resume_with: Sequence[str] | None = None) -> Path:
    """A 2-rank ZeRO run with `extra` overrides; with a stop in `extra`, then resumed (with
    `resume_with`, where given, else `extra` is taken as the stop alone)."""
    out = tmp_path / name
    # ZeRO-3 on CPU gathers weights for every eval forward: evaluate only at the end.
    slow = [] if stage == 2 else ["train.eval_steps=100", "checkpoint.save_best=false"]
    base = ["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path}/c",
            *FAST, f"train.max_steps={ZERO_STEPS}", f"train.zero_stage={stage}", *slow]
    run_cli([*base, *extra], procs=2)
    stopped = any(x.startswith("train.stop_after_steps=") for x in extra)
    if stopped:
        assert (out / "checkpoints" / f"checkpoint-{ZERO_STOP}" / "COMMITTED").exists()
        run_cli([*base, *(resume_with or []), "train.resume=auto"], procs=2)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stop_and_resume_on_two_ranks_is_bit_exact(tmp_path, stage, zero_runs):
    """EMA (the demo config's) on under ZeRO-2 and ZeRO-3: saved, restored, the same EMA."""
    runs = {}
    for name, extra in (("straight", []), ("split", [f"train.stop_after_steps={ZERO_STOP}"])):
        runs[name] = zero_runs[stage, name] = _zero_run(tmp_path, name, stage, *extra)
    split, straight = train_losses(runs["split"]), train_losses(runs["straight"])
    assert split == straight
    assert records(runs["split"], "eval")[-1] == records(runs["straight"], "eval")[-1] | {
        "time": records(runs["split"], "eval")[-1]["time"]}
    manifest = json.loads((runs["split"] / "checkpoints" / f"checkpoint-{ZERO_STEPS}" /
                           "manifest.json").read_text())
    assert {"ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema.pt"} <= set(manifest["files"])
    # The EMA entry: the full fp32 shadow per parameter (also from ZeRO-3's partitions),
    # restored exactly by the resume.
    shadow = ema_shadow(runs["split"], ZERO_STEPS)
    assert_same_tensors(shadow, ema_shadow(runs["straight"], ZERO_STEPS))
    assert all(t.dtype == torch.float32 for t in shadow.values())
    if stage == 2:
        assert_same_tensors(ds_module_state(runs["split"], ZERO_STEPS),
                            ds_module_state(runs["straight"], ZERO_STEPS))
        return
    # parameters are sharded: each rank's shard file
    assert {"ds/zero_pp_rank_0_mp_rank_00_model_states.pt",
            "ds/zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(manifest["files"])
    # The same run under ZeRO-2 (reused from the stage-2 case when it ran): the same EMA.
    zero2 = zero_runs.get((2, "straight")) or _zero_run(tmp_path, "zero2", 2)
    full = ds_module_state(zero2, ZERO_STEPS)
    reference = ema_shadow(zero2, ZERO_STEPS)
    assert shadow.keys() == reference.keys()
    for name, value in shadow.items():
        assert value.shape == reference[name].shape == full[name].shape, name
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero3_offload_with_gradient_accumulation_trains_like_zero2_and_resumes_bit_exactly(
        tmp_path):
    """Accumulation 2 often puts two tasks in one optimizer step. A head first used at the
    second micro-step added to its gradient from the last step that used it (ZeRO-3's
    partitions, ZeRO-1/2's offload accumulators), and with the optimizer offloaded a head
    used only at the first lost its gradient: losses left ZeRO-2's at step 3, and a resume,
    starting from zeroed buffers, left the straight run. The engine-level maths for every
    stage: test_zero_accumulation_with_heads_skipping_micro_steps_equals_torch."""
    offload = tmp_path / "offload.json"
    offload.write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}')
    accumulate = ["train.gradient_accumulation_steps=2", "train.per_device_batch_size=8"]
    zero3 = [*accumulate, f"train.deepspeed_config={offload}"]
    zero2 = _zero_run(tmp_path, "zero2", 2, *accumulate)
    straight = _zero_run(tmp_path, "zero3", 3, *zero3)
    split = _zero_run(tmp_path, "split", 3, *zero3, f"train.stop_after_steps={ZERO_STOP}",
                      resume_with=zero3)
    assert train_losses(split) == train_losses(straight)
    for (step, loss3), (_, loss2) in zip(train_losses(straight), train_losses(zero2),
                                         strict=True):
        assert loss3 == pytest.approx(loss2, rel=1e-5, abs=0), step


def test_ema_applied_restores_zero3_partitions_bit_exactly(tmp_path):
    """applied() swaps EMA weights into the partitions and the kept-gathered (persistent)
    parameters, a forward and the consolidated state dict see them, and all is restored."""
    out = run_script("ema_zero3.py", tmp_path)
    assert out.count("EMA applied and restored bit-exactly") == 2


def test_two_ranks_refused_by_a_run_in_progress_leave_no_process_group(tmp_path):
    """Another process holds OUTPUT (a run going on): both ranks are refused before their
    set-up and tear their process groups down, so each exits with its error, not a gloo
    abort at interpreter exit (it aborted one start in five)."""
    from mtl_dist.checkpoint import CheckpointManager

    holder = CheckpointManager(tmp_path / "out", save_total_limit=None, recover_best=False)
    holder.hold_output_dir()
    try:
        assert run_script("refused_start.py", tmp_path).count("refused and torn down") == 2
    finally:
        holder.let_go_of_output_dir()
    assert list((tmp_path / "out").iterdir()) == []  # nothing written under a live run


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads in /proc")
@pytest.mark.parametrize("mode", ["finished", "refused"])
def test_two_ranks_closed_leave_no_gloo_thread(straight, tmp_path, mode):
    """Resumed to the end, or refused at the resume (the newest checkpoint cut short, after
    the set-up: DDP built): close() ends the process group's gloo threads, not interpreter
    exit (where a gloo worker aborted a rank now and then)."""
    shutil.copytree(straight, tmp_path / "out")
    if mode == "refused":
        cut = tmp_path / "out" / "checkpoints" / "checkpoint-24" / "model.safetensors"
        os.truncate(cut, cut.stat().st_size // 2)
    out = run_script("close_ends_gloo_threads.py", tmp_path, 2, mode)
    assert out.count(f"{mode} and torn down") == 2


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads in /proc")
def test_ddp_group_released_while_a_gloo_worker_holds_a_tensor(tmp_path):
    """A rank late to a collective: the other's gloo worker frees that collective's tensor
    (which takes the GIL) while the group is let go of; no hang, no gloo thread left."""
    assert run_script("ddp_group_release.py", tmp_path).count("group released") == 2


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads in /proc")
@pytest.mark.parametrize(("stage", "mode"), [(2, "refused"), (3, "finished")])
def test_zero_ranks_closed_leave_no_gloo_thread(tmp_path, zero_runs, stage, mode):
    """Under ZeRO the groups outlived close() in DeepSpeed's objects (engine, optimizer, each
    parameter; ZeRO-3's Init, which closures on the parameters keep), in deepspeed.comm.torch's
    default arguments (DeepSpeed imported with the group up) and in the EMA's ZeRO-3 layout:
    refused at the resume (stage 2), or resumed two steps further to the end (stage 3; EMA on,
    the demo config's)."""
    run = zero_runs.get((stage, "straight")) or _zero_run(tmp_path, "straight", stage)
    shutil.copytree(run, tmp_path / "out")
    if mode == "refused":
        cut = tmp_path / "out" / "checkpoints" / f"checkpoint-{ZERO_STEPS}" / "trainer_state.json"
        os.truncate(cut, cut.stat().st_size // 2)
    slow = [] if stage == 2 else ["train.eval_steps=100", "checkpoint.save_best=false"]
    out = run_script("close_ends_gloo_threads.py", tmp_path, 2, mode, f"train.zero_stage={stage}",
                     f"train.max_steps={ZERO_STEPS + 2}", *slow)
    assert out.count(f"{mode} and torn down") == 2


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads in /proc")
def test_evaluate_of_zero_partitions_on_two_ranks_leaves_no_gloo_thread(tmp_path, zero_runs):
    """The partitions are read through DeepSpeed, imported before the process group now:
    imported after it, its comm functions held the group (and gloo's threads) to exit."""
    run = zero_runs.get((2, "straight")) or _zero_run(tmp_path, "zero2", 2)
    ckpt = run / "checkpoints" / f"checkpoint-{ZERO_STEPS}"
    assert not (ckpt / "model.safetensors").exists()  # partitions only
    assert weights_read_through_deepspeed(ckpt)
    assert not weights_read_through_deepspeed(tmp_path / "none")  # loading says why
    out = run_script("cli_leaves_no_gloo_thread.py", tmp_path, 2, "evaluate", str(DEMO),
                     f"train.output_dir={run}", f"data.cache_dir={tmp_path}/c",
                     "--checkpoint", str(ckpt))
    assert out.count("cli done, no gloo thread") == 2 and '"score"' in out


def test_two_ranks_refuse_a_used_output_dir_and_overwrite_it_together(straight, tmp_path):
    """The used-dir refusal on both ranks (no rank left waiting), then
    train.overwrite_output_dir: rank 0 deletes the old run (a collective), both go on."""
    out = tmp_path / "used"
    shutil.copytree(straight, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path}/cache",
            *FAST, "train.max_steps=8"]
    refused = run_cli(args, procs=2, check=False, timeout=240)
    assert refused.returncode != 0 and "already holds a run" in refused.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    run_cli([*args, "train.overwrite_output_dir=true"], procs=2, timeout=240)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-8"]
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 8
    assert [s for s, _ in train_losses(out)] == list(range(1, 9))


def _evals(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "output_dir")}
            for r in records(out, "eval")]


def _preempted_summaries(tmp_path, step: str, rank: str, sig: str, *extra: str) -> list[dict]:
    """Both ranks' summaries of preempt_at_step.py (`sig` to `rank` during `step`)."""
    printed = run_script("preempt_at_step.py", tmp_path, 2, step, rank, sig, *extra)
    summaries = [json.loads(line) for line in printed.splitlines() if line.startswith('{"rank"')]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    return summaries


@pytest.mark.parametrize("sig, requeue", [("SIGUSR1", True), ("SIGTERM", False)])
def test_a_requeue_request_on_rank_1_alone_reaches_rank_0(tmp_path, sig, requeue):
    """Rank 0 runs `scontrol requeue`: it must learn that rank 1 got a USR1 (a requeue
    request) and not a TERM (the job being ended), through the stop flag's all-reduce."""
    summaries = _preempted_summaries(tmp_path, "3", "1", sig, "train.max_steps=8")
    assert {(s["stop_reason"], s["global_step"]) for s in summaries} == {("preempted", 3)}
    assert {s["requeue_wanted"] for s in summaries} == {requeue}


def test_a_preemption_at_an_evaluation_step_on_two_ranks_evaluates_after_the_resume(
        straight, tmp_path):
    """SIGUSR1 to rank 0 alone during step 8 (an evaluation step): both ranks stop there
    with a checkpoint and no evaluation; the resumed 2-rank run evaluates step 8 first, and
    ends with the straight run's evaluations, best/ and losses."""
    out = tmp_path / "out"
    summaries = _preempted_summaries(tmp_path, "8", "0", "SIGUSR1", *STEPS)
    assert {(s["stop_reason"], s["global_step"]) for s in summaries} == {("preempted", 8)}
    assert (out / "checkpoints" / "checkpoint-8" / "COMMITTED").exists()
    assert records(out, "eval") == [] and not (out / "best").exists()
    run_cli(["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path}/cache",
             *FAST, *STEPS, "train.resume=auto"], procs=2)
    assert [r["step"] for r in _evals(out)] == [8, 16, 24] and _evals(out) == _evals(straight)
    assert train_losses(out) == train_losses(straight)
    assert (out / "best" / "best.json").read_text() == \
        (straight / "best" / "best.json").read_text()


def test_a_replan_from_two_ranks_to_one_recounts_the_run_and_survives_a_plain_resume(tmp_path):
    """sampler.on_global_batch_change=replan across a world-size change (2 x 16 -> 1 x 16):
    the 1-rank resume skips the rest of the saved epoch, re-counts the run's length and its
    LR schedule, and a plain resume after it keeps them."""
    out = tmp_path / "out"
    caps = [f"tasks.{i}.max_samples=64" for i in range(3)]  # 192 samples per epoch
    common = ["train", str(DEMO), f"train.output_dir={out}", f"data.cache_dir={tmp_path}/cache",
              *FAST, *caps, "train.max_steps=null", "train.num_epochs=2", "train.warmup_steps=0",
              "train.eval_steps=null", "train.eval_at_epoch_end=false",
              "checkpoint.save_at_epoch_end=false", "train.per_device_batch_size=16"]
    run_cli([*common, "train.stop_after_steps=5"], procs=2)
    replan = [*common, "sampler.on_global_batch_change=replan", "train.resume=auto"]
    said = run_cli([*replan, "train.stop_after_steps=3"], procs=1).stdout
    total = 5 + 192 // 16  # epoch 1 at the new global batch of 16: 12 steps
    assert f"global batch 32 -> 16: continuing at epoch 1 step 0; the run now ends at step " \
        f"{total}" in said
    run_cli(replan, procs=1)  # a plain resume: same batch, the re-counted schedule
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, total + 1))
    assert [r["epoch"] for r in train][5:] == [1] * (total - 5)
    lrs = [r["lr"] for r in train]
    assert all(a > b for a, b in zip(lrs[5:-1], lrs[6:], strict=True)) and lrs[-1] == 0
    assert lrs[-2] == pytest.approx(lrs[5] / (total - 6), rel=1e-6)
    assert records(out, "summary")[-1]["global_step"] == total
