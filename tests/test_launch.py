"""launch/: the accelerate configs, the DeepSpeed JSONs and launch/train.sh, run for real on CPU.

Three 2-process launches in all: an uninterrupted reference through
`accelerate launch --config_file launch/cpu_multi.yaml`, then `launch/train.sh` stopped by a
SIGTERM to the launcher and resumed with `train.resume=auto`; the resumed run must end with
exactly the reference's final evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mtl_dist.config import load_config
from mtl_dist.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
TRAIN_SH = LAUNCH / "train.sh"
DEMO = REPO_ROOT / "configs" / "demo.yaml"
MAX_STEPS = 120
# Short demo: eval + checkpoint every 30 steps, keep every checkpoint, log every 10 steps.
RUN = [f"train.max_steps={MAX_STEPS}", "train.eval_steps=30", "checkpoint.save_steps=30",
       "checkpoint.save_total_limit=null", "train.log_steps=10"]
DS_AUTO_KEYS = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "train_batch_size", "gradient_clipping", "bf16.enabled", "fp16.enabled"}


# ------------------------------------------------------------------------------- helpers
def demo_args(out: Path, cache: Path) -> list[str]:
    return [str(DEMO), f"train.output_dir={out}", f"data.cache_dir={cache}", *RUN]


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == kind]


def final_eval(out: Path) -> dict:
    """The last evaluation record without its wall-clock time: equal runs give equal dicts."""
    last = records(out, "eval")[-1]
    return {k: v for k, v in last.items() if k != "time"}


def committed(out: Path) -> dict[int, Path]:
    """step -> directory of every committed periodic checkpoint."""
    found = {}
    for path in (out / "checkpoints").glob("checkpoint-*"):
        if (path / "COMMITTED").exists():
            found[int(path.name.rsplit("-", 1)[1])] = path
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (torch's workers start their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher we started and each of its descendants, by pid."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def run(cmd: list[str], env: dict, log: Path, timeout: float = 300) -> int:
    """Run to the end with output in `log`; fail with its tail when it does not end in time."""
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"{cmd[:6]} did not end in {timeout} s:\n{tail(log)}")


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def wait_for_train_record(out: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until training is under way: the first `train` record is in metrics.jsonl."""
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and '"kind": "train"' in path.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended ({proc.returncode}) before it logged:\n{tail(log)}")
        time.sleep(0.05)
    kill_tree(proc)
    pytest.fail(f"no train record after {timeout} s:\n{tail(log)}")


def dry_run(args: list[str], env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TRAIN_SH), *args],
                          env={**env, "MTL_DRY_RUN": "1", "MTL_PYTHON": sys.executable, **extra},
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def launched_command(result: subprocess.CompletedProcess) -> list[str]:
    line = next(s for s in result.stderr.splitlines() if s.startswith("[train.sh] accelerate"))
    return line.split()[1:]


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch_cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir, cpu_env) -> tuple[Path, int, Path]:
    """`accelerate launch --config_file launch/cpu_multi.yaml`, 2 processes, no interruption."""
    tmp = tmp_path_factory.mktemp("launch_ref")
    out, log = tmp / "out", tmp / "log.txt"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(LAUNCH / "cpu_multi.yaml"), "--num_processes", "2", "--main_process_port", "0",
           "-m", "mtl_dist.cli", "train", *demo_args(out, cache_dir)]
    return out, run(cmd, cpu_env, log), log


# --------------------------------------------------------------------- configs (fast tests)
def _accelerate_config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(LAUNCH / name))


@pytest.mark.parametrize("name, dist_type, procs", [
    ("cpu_multi.yaml", "MULTI_GPU", 2), ("gpu_single.yaml", "MULTI_GPU", 1),
    ("ddp.yaml", "MULTI_GPU", -1), ("zero2.yaml", "DEEPSPEED", -1), ("zero3.yaml", "DEEPSPEED", -1)])
def test_accelerate_configs_load(name, dist_type, procs):
    """accelerate reads each file; N-GPU files leave num_processes to --num_processes (-1).
    None is distributed_type NO: accelerate's simple launcher does not forward SIGTERM, while
    these types all start the training under torchrun's agent, which does."""
    cfg = _accelerate_config(name)
    assert cfg.distributed_type.value == dist_type
    assert cfg.num_processes == procs
    raw = yaml.safe_load((LAUNCH / name).read_text())
    if dist_type == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert (REPO_ROOT / ds["deepspeed_config_file"]).is_file()
        assert ds["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, no pdsh
        # accelerate refuses mixed_precision next to a deepspeed_config_file: the JSON decides.
        assert "mixed_precision" not in raw
    else:
        assert raw["mixed_precision"] == "no"  # the run config's train.mixed_precision decides


def _auto_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_autos_and_validation(stage, tmp_path):
    """Batch sizes, accumulation, clipping and precision are "auto" (stated once, in the run
    config); the stage is explicit; filled by the trainer's code, DeepSpeed accepts the result."""
    path = LAUNCH / f"ds_zero{stage}.json"
    ds = json.loads(path.read_text())
    assert _auto_keys(ds) == DS_AUTO_KEYS
    assert ds["zero_optimization"]["stage"] == stage
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer's AdamW + schedule

    from deepspeed.runtime.config import DeepSpeedConfig

    from mtl_dist.zero import build_ds_config

    cfg = load_config(DEMO, [f"train.zero_stage={stage}", f"train.deepspeed_config={path}",
                             "train.gradient_accumulation_steps=2", "train.mixed_precision=bf16",
                             "train.ema_decay=null", f"data.cache_dir={tmp_path}"])
    filled = build_ds_config(cfg, world_size=1)
    assert not _auto_keys(filled)
    assert filled["train_batch_size"] == cfg.train.per_device_batch_size * 2
    checked = DeepSpeedConfig(filled)  # strict: unknown zero keys, batch arithmetic
    assert checked.zero_optimization_stage == stage
    assert checked.gradient_clipping == cfg.train.max_grad_norm


@pytest.mark.parametrize(("json_text", "stage"), [('{"zero_optimization": {"stage": 3}}', 3),
                                                   ('{"zero_optimization": {"stage": "auto"}}', 2),
                                                   ("{}", 2)])
def test_a_deepspeed_json_with_zero_off_is_its_stage_not_silently_ddp(tmp_path, json_text,
                                                                     stage):
    """train.deepspeed_config with train.zero_stage 0 (the default) trained plain DDP (a full
    model copy per rank) without a word; through accelerate's zero yaml the JSON's stage was
    used. Now both take it (2 for "auto", as accelerate's path does); a stage 0 is refused."""
    path = tmp_path / "ds.json"
    path.write_text(json_text)
    cfg = load_config(DEMO, [f"train.deepspeed_config={path}", f"data.cache_dir={tmp_path}"])
    assert cfg.train.zero_stage == stage
    path.write_text('{"zero_optimization": {"stage": 0}}')
    with pytest.raises(ConfigError, match=r"override 'train.deepspeed_config=.*': config key "
                       r"'train.deepspeed_config': .* states zero_optimization.stage 0: "
                       r"expected 1, 2, 3 or \"auto\""):
        load_config(DEMO, [f"train.deepspeed_config={path}"])
    path.write_text('{"zero_optimization": {"stage": 3},')  # unreadable: not silently DDP
    with pytest.raises(ConfigError, match=r"override 'train.deepspeed_config=.*': "
                       r"train.deepspeed_config: cannot read .*ds.json"):
        load_config(DEMO, [f"train.deepspeed_config={path}"])


@pytest.mark.parametrize(("json_text", "message"), [
    ('{"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}',
     "its 'optimizer' section would not be used (the trainer's comes from train.lr"),
    ('{"scheduler": {"type": "WarmupLR"}}', "its 'scheduler' section would not be used"),
    ('{"train_micro_batch_size_per_gpu": 3}',
     "'train_micro_batch_size_per_gpu' is 3 but the run config implies 16"),
    ('{"zero_optimization": {"stage": 2},', "cannot read"),
    # DeepSpeed's own model of the section: a typo failed at the engine's start, per rank
    ('{"zero_optimization": {"stag": 2}}', "'zero_optimization.stag': not a DeepSpeed key (got 2)"),
    ('{"zero_optimization": {"offload_optimizer": {"devise": "cpu"}}}',
     "'zero_optimization.offload_optimizer.devise': not a DeepSpeed key (got \"cpu\")"),
    ('{"managed_gradient_accumulation": true}',  # the trainer owns the accumulation boundary
     "'managed_gradient_accumulation' is True but the run config implies False"),
])
def test_check_refuses_what_the_deepspeed_json_would_get_wrong(cpu_env, tmp_path, json_text,
                                                               message):
    """Sections DeepSpeed would build beside the trainer's AdamW and schedule (silently
    overridden: lr 0.5 was never used), and conflicts: one line from `check`, so train.sh
    stops before launching instead of failing once per rank with the launcher's traceback."""
    path = tmp_path / "ds.json"
    path.write_text(json_text)
    result = dry_run(["configs/demo.yaml", "train.zero_stage=2",
                      f"train.deepspeed_config={path}", f"train.output_dir={tmp_path}/o"],
                     cpu_env, MTL_NUM_GPUS="0")
    assert result.returncode == 2 and "[train.sh]" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: override 'train.deepspeed_config={path}': "
                           "train.deepspeed_config: ") and message in line


def test_overlap_comm_under_zero1_is_one_line(tmp_path):
    """Stage 1 reduces at the trainer's step (unmanaged accumulation), where DeepSpeed
    refuses overlap_comm with an assertion on every rank."""
    from mtl_dist.zero import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1, "overlap_comm": true}}')
    cfg = load_config(DEMO, [f"train.deepspeed_config={path}", f"data.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"'zero_optimization.overlap_comm' true needs ZeRO "
                       r"stage 2 or 3"):
        build_ds_config(cfg, world_size=1)


def test_an_offloaded_optimizer_keeps_the_trainers_adamw(tmp_path):
    """DeepSpeed refuses a client optimizer with offload_optimizer unless told not to force
    its DeepSpeedCPUAdam: every rank died with a ZeRORuntimeException traceback."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from mtl_dist.zero import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    cfg = load_config(DEMO, [f"train.deepspeed_config={path}", f"data.cache_dir={tmp_path}"])
    filled = build_ds_config(cfg, world_size=1)
    assert DeepSpeedConfig(filled).zero_force_ds_cpu_optimizer is False


@pytest.mark.parametrize("args, extra, config, procs", [
    ([], {"MTL_NUM_GPUS": "0"}, "cpu_multi.yaml", 2),
    (["--procs", "3"], {"MTL_NUM_GPUS": "0"}, "cpu_multi.yaml", 3),
    ([], {"MTL_NUM_GPUS": "1"}, "gpu_single.yaml", 1),
    ([], {"MTL_NUM_GPUS": "4"}, "ddp.yaml", 4),
    ([], {"MTL_NUM_GPUS": "2", "MTL_LAUNCH": "zero2"}, "zero2.yaml", 2),
    (["--launch=zero3", "--num_machines=2", "--machine_rank=1"], {"MTL_NUM_GPUS": "4"},
     "zero3.yaml", 8),
    # accelerate's hyphenated spelling counts too (it launched 4 of the 8 processes)
    (["--launch=zero3", "--num-machines=2", "--machine-rank=1"], {"MTL_NUM_GPUS": "4"},
     "zero3.yaml", 8),
    (["--launch", "cpu"], {"MTL_NUM_GPUS": "4", "MTL_NUM_PROCS": "2"}, "cpu_multi.yaml", 2),
    (["--launch", "zero3"], {"MTL_NUM_GPUS": "0"}, "zero3.yaml", 2),  # ZeRO on CPU processes
])
def test_train_sh_picks_the_config(args, extra, config, procs, cpu_env):
    """GPU count -> config and process count (TOTAL over machines), a port, the CLI module."""
    result = dry_run([*args, "configs/demo.yaml", "train.lr=1e-4"], cpu_env, **extra)
    assert result.returncode == 0, result.stderr
    cmd = launched_command(result)
    assert Path(option(cmd, "--config_file")) == LAUNCH / config
    assert int(option(cmd, "--num_processes")) == procs
    assert int(option(cmd, "--main_process_port")) > 0
    assert cmd[-5:] == ["-m", "mtl_dist.cli", "train", "configs/demo.yaml", "train.lr=1e-4"]
    if config.startswith("zero"):
        assert Path(option(cmd, "--deepspeed_config_file")) == LAUNCH / f"ds_{config[:5]}.json"
    for opt in args:
        if opt.startswith(("--num_machines", "--machine_rank", "--num-machines", "--machine-rank")):
            assert opt in cmd  # passed through to accelerate launch


@pytest.mark.parametrize("args, extra, message", [
    (["--launch", "ddp", "c.yaml"], {"MTL_NUM_GPUS": "0"}, "needs CUDA GPUs"),
    (["--launch", "tpu", "c.yaml"], {"MTL_NUM_GPUS": "0"}, "unknown --launch 'tpu'"),
    (["--procs", "0", "c.yaml"], {"MTL_NUM_GPUS": "0"}, "expected a positive integer"),
    (["--launch", "gpu", "--procs", "2", "c.yaml"], {"MTL_NUM_GPUS": "2"}, "use --launch ddp"),
    (["--num_processes=4", "c.yaml"], {"MTL_NUM_GPUS": "0"}, "use --procs"),
    (["--launch", "cpu"], {}, "missing CONFIG"),
    (["--multi_gpu", "nope.yaml"], {"MTL_NUM_GPUS": "0"}, "nope.yaml: config file not found"),
    (["c.yaml", "--procs", "2"], {"MTL_NUM_GPUS": "0"},  # went to `mtl-dist check` as an override
     "launch/train.sh: '--procs' comes after CONFIG 'c.yaml': options go before it, overrides "
     "(key=value) after"),
])
def test_train_sh_refuses_bad_requests(args, extra, message, cpu_env):
    result = dry_run(args, cpu_env, **extra)
    assert result.returncode == 2
    assert message in result.stderr


def test_train_sh_checks_the_config_once_before_launching(cpu_env, tmp_path):
    """A config mistake: one line and exit 2 from one process (through a launcher it was one
    line per rank, then the launcher's traceback and exit 1); nothing is launched."""
    result = dry_run(["configs/demo.yaml", "train.lrr=1"], cpu_env, MTL_NUM_GPUS="0")
    assert result.returncode == 2 and "[train.sh]" not in result.stderr  # before the launch
    assert result.stderr.strip().splitlines() == [
        "error: override 'train.lrr=1': config key 'train.lrr' is unknown; did you mean "
        "'train.lr'?"]
    check = subprocess.run([sys.executable, "-m", "mtl_dist.cli", "check", "configs/demo.yaml",
                            f"train.output_dir={tmp_path}/o"], cwd=REPO_ROOT, env=cpu_env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.startswith("config OK: 3 task(s) (nli, emotion")
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


@pytest.mark.parametrize(("train", "dev", "bad", "message"), [
    ("1\ta\tx\n2\tb\n", "1\tc\tx\n", "train",
     "2: expected 3 tab-separated columns (id, text, label), got 2"),
    ("1\ta\tx\n2\tb\ty\n", "1\tc\tz\n", "dev",
     "1: label 'z' is not one of the task's labels (x, y)"),
])
def test_check_reads_the_data_files_as_training_would(cpu_env, tmp_path, train, dev, bad,
                                                      message):
    """Bad rows and unknown dev labels passed `check` (it only saw that the files exist),
    then failed on every rank of the launched run, with the launcher's traceback."""
    (tmp_path / "train.tsv").write_text(train)
    (tmp_path / "dev.tsv").write_text(dev)
    task = f"tasks=[{{name: t, train: {tmp_path}/train.tsv, dev: {tmp_path}/dev.tsv}}]"
    result = dry_run(["configs/demo.yaml", task, f"train.output_dir={tmp_path}/o"], cpu_env,
                     MTL_NUM_GPUS="0")
    assert result.returncode == 2 and "[train.sh]" not in result.stderr  # before the launch
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path}/{bad}.tsv:{message}"]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ real launches (slow)
@pytest.mark.slow
def test_train_sh_checks_a_resumes_global_batch_before_launching(reference_run, cache_dir,
                                                                 cpu_env):
    """train.sh's `check` now knows the launch's world size: resuming the 2-process run on 1
    process (global batch 32 -> 16) is one line before the launch, not one per rank after."""
    out, _, _ = reference_run
    ckpt = out / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    resume = [*demo_args(out, cache_dir), "train.resume=auto"]
    refused = dry_run(["--launch", "cpu", "--procs", "1", *resume], cpu_env, MTL_NUM_GPUS="0")
    assert refused.returncode == 2 and "[train.sh]" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: checkpoint {ckpt}: manifest key 'global_batch_size' differs: checkpoint has 32, "
        "this run has 16 (global batch = per_device_batch_size x world size: keep it, or set "
        "sampler.on_global_batch_change=replan to go on from the next epoch at the new batch)"]
    for kept in (["--procs", "2", *resume], ["--procs", "1", *resume,
                                             "train.per_device_batch_size=32"]):
        allowed = dry_run(["--launch", "cpu", *kept], cpu_env, MTL_NUM_GPUS="0")
        assert allowed.returncode == 0 and "[train.sh] accelerate" in allowed.stderr, \
            allowed.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_cpu_multi_config_trains_with_two_real_ranks(reference_run):
    out, rc, log = reference_run
    assert rc == 0, tail(log)
    ckpts = committed(out)
    assert max(ckpts) == MAX_STEPS
    last = ckpts[MAX_STEPS]
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["run"]["distributed_type"].endswith("MULTI_CPU")
    assert manifest["run"]["global_batch_size"] == 2 * manifest["run"]["per_device_batch_size"]
    rng = [(last / f"rng_state_{r}.pth").read_bytes() for r in (0, 1)]
    # Two processes with their own seeds (seed + rank): two different RNG states.
    assert hashlib.sha256(rng[0]).digest() != hashlib.sha256(rng[1]).digest()
    summary = records(out, "summary")[-1]
    assert (summary["stop_reason"], summary["global_step"]) == ("finished", MAX_STEPS)
    assert records(out, "eval")[-1]["step"] == MAX_STEPS
    assert (out / "best" / "COMMITTED").exists()


@pytest.mark.slow
def test_train_sh_sigterm_checkpoints_one_step_and_resumes_exactly(
        reference_run, tmp_path, cache_dir, cpu_env):
    """SIGTERM to the launcher (train.sh execs accelerate): both ranks checkpoint the same step
    and stop (the ranks exit 75, the launcher 1); train.resume=auto then ends exactly like the
    uninterrupted reference."""
    ref_out, ref_rc, ref_log = reference_run
    assert ref_rc == 0, tail(ref_log)
    out, log = tmp_path / "out", tmp_path / "log.txt"
    env = {**cpu_env, "MTL_LAUNCH": "cpu", "MTL_NUM_PROCS": "2"}
    with log.open("ab") as f:
        proc = subprocess.Popen(["bash", str(TRAIN_SH), *demo_args(out, cache_dir)], env=env,
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True)
    try:
        wait_for_train_record(out, proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(180)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    # torchrun's agent forwards the TERM to both workers, waits for them, then re-raises it:
    # accelerate launch ends with status 1 (a traceback), whatever the workers returned.
    assert rc != 0, tail(log)
    summary = records(out, "summary")[-1]
    assert summary["stop_reason"] == "preempted", tail(log)
    assert summary["exit_code"] == 75  # what `mtl-dist train` returned on every rank
    assert "requeue" not in summary  # not under Slurm: a clean checkpointed stop only
    step = summary["global_step"]
    assert 0 < step < MAX_STEPS
    ckpts = committed(out)
    assert max(ckpts) == step, f"newest committed {max(ckpts)}, stopped at {step}"
    ckpt = ckpts[step]
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"]) == (step, 2)
    assert not [p for p in (out / "checkpoints").iterdir() if not (p / "COMMITTED").exists()]

    rc = run(["bash", str(TRAIN_SH), *demo_args(out, cache_dir), "train.resume=auto"], env, log)
    assert rc == 0, tail(log)
    assert f"resumed from {ckpt} at step {step}" in log.read_text()
    assert records(out, "summary")[-1]["stop_reason"] == "finished"
    assert final_eval(out) == final_eval(ref_out)


@pytest.mark.slow
def test_train_sh_zero2_on_cpu_trains_and_checkpoints(tmp_path, cache_dir, cpu_env):
    """The shipped launch/zero2.yaml + ds_zero2.json ("auto" filled from the run config) on 2 CPU
    processes: DeepSpeed's engine, one optimizer partition per rank in the checkpoint."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = [str(DEMO), f"train.output_dir={out}", f"data.cache_dir={cache_dir}",
            "train.max_steps=4", "train.log_steps=2"]
    rc = run(["bash", str(TRAIN_SH), "--launch", "zero2", *args], cpu_env, log)
    assert rc == 0, tail(log)
    ckpt = committed(out)[4]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["run"]["zero_stage"]) == (2, 2)
    parts = {p.name for p in ckpt.rglob("*_optim_states.pt")}
    assert parts == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}, parts
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()


@pytest.mark.parametrize(("args", "environ", "message"), [
    # bash arithmetic read these: a name, an octal, a $(...) it ran, a number wrapped round
    (["--num_machines=2x"], {}, "--num_machines: expected a positive integer of at most 6 "
                                "digits, got '2x'"),
    (["--num_machines=010"], {}, "--num_machines: expected a positive integer of at most 6 "
                                 "digits, got '010'"),
    (["--num_machines=HOME[$(touch PWNED)]"], {}, "--num_machines: expected a positive integer "
                                                  "of at most 6 digits, got 'HOME[$(touch PWNED)]'"),
    (["--procs", "99999999999999999999"], {}, "--procs (or MTL_NUM_PROCS, MTL_NUM_GPUS): "
     "expected a positive integer of at most 6 digits, got '99999999999999999999'"),
    (["--main_process_port=abc"], {}, "--main_process_port: expected a port number 1-65535, "
                                      "got 'abc'"),
    ([], {"MTL_DRY_RUN": "maybe"}, "MTL_DRY_RUN: expected 1/true/yes or 0/false/no, got 'maybe'"),
    (["--num_machines=0"], {"MTL_DRY_RUN": "TRUE"},  # in any case: refused as a dry run would be
     "--num_machines: expected a positive integer of at most 6 digits, got '0'"),
    ([], {"OMP_NUM_THREADS": "abc"}, "OMP_NUM_THREADS: expected a positive integer, got 'abc' "
                                     "(unset it for cores / procs)"),
    ([], {"MTL_NUM_GPUS": "abc"}, "MTL_NUM_GPUS: expected a number of GPUs, got 'abc'"),
    ([], {"MTL_MAIN_PORT": "99999"}, "MTL_MAIN_PORT: expected a port number 1-65535, got '99999'"),
    # accelerate takes `--num_machines 2`; here "2" became the config and the config an override
    (["--num_machines", "2"], {}, "'--num_machines' takes a value: write --num_machines=2 (the "
                                  "first argument that is no option is CONFIG)"),
    (["--deepspeed_config_file", str(LAUNCH / "ds_zero2.json")], {},  # an existing file
     f"'--deepspeed_config_file' takes a value: write --deepspeed_config_file="
     f"{LAUNCH / 'ds_zero2.json'} (the first argument that is no option is CONFIG)"),
    ([], {"MTL_PYTHON": "/nonexistent/python3"}, "MTL_PYTHON: '/nonexistent/python3' is not a "
                                                 "command"),  # was env's own message, exit 127
    ([], {"MTL_ACCELERATE": "no-such-accelerate"}, "MTL_ACCELERATE: 'no-such-accelerate' is not "
                                                   "a command (is accelerate installed?)"),
    # accelerate's hyphenated spelling: skipped these checks (and the world size counted 1)
    (["--num-machines=2x"], {}, "--num-machines: expected a positive integer of at most 6 "
                                "digits, got '2x'"),
    (["--main-process-port=abc"], {}, "--main-process-port: expected a port number 1-65535, "
                                      "got 'abc'"),
    (["--num-processes=3"], {}, "use --procs (per machine), not --num-processes"),
    # accelerate's own options, by its parser: a dry run passed them, the launch refused them
    (["--foo"], {}, "accelerate launch options: unrecognized arguments: --foo"),
    (["--num_proceses=2"], {}, "accelerate launch options: unrecognized arguments: "
                               "--num_proceses=2"),
    (["--mixed_precision=fp32"], {}, "accelerate launch options: argument --mixed_precision/"
     "--mixed-precision: invalid choice: 'fp32' (choose from 'no', 'fp16', 'bf16', 'fp8')"),
    # the printed line runs it through `env`, which would take it for an assignment
    ([], {"MTL_ACCELERATE": "/opt/a=b/accelerate"}, "MTL_ACCELERATE: '/opt/a=b/accelerate' holds "
     "a '=', which env (the printed line runs the command through it) would take for a "
     "variable to set: use a path without '='"),
])
def test_train_sh_refuses_bad_counts_ports_and_flags_in_one_line(tmp_path, args, environ, message):
    """A fuzzing review: `--num_machines=2x` skipped the check and printed a broken command with
    exit 0; `HOME[$(...)]` ran the command inside; MTL_DRY_RUN=true trained for real."""
    done = subprocess.run(["bash", str(TRAIN_SH), "--dry-run", *args, str(DEMO),
                           f"train.output_dir={tmp_path / 'out'}"], cwd=tmp_path,
                          env={**os.environ, **environ}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"launch/train.sh: {message}", \
        done.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_multi_node_sbatch_puts_only_checked_values_into_the_nodes_command(tmp_path):
    """MTL_HEAD_ADDR, MTL_MAIN_PORT and SLURM_NNODES went unquoted into `srun bash -c "..."`
    (a $(...) there ran on every node); a failed `scontrol` launched with an empty head."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, text in (("srun", 'echo "srun $*"'), ("scontrol", "exit 1")):
        (fake / tool).write_text(f"#!/bin/bash\n{text}\n")
        (fake / tool).chmod(0o755)
    base = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "MTL_ROOT": str(REPO_ROOT),
            "SLURM_JOB_ID": "9", "MTL_ACCELERATE": "echo", "MTL_DEVICE": "cpu"}
    for environ, message in (
            ({"SLURM_NNODES": "2x"}, "error: SLURM_NNODES: expected a number of nodes, got '2x' "
                                     "(run under sbatch, or set it)"),
            ({"SLURM_NNODES": "2", "MTL_HEAD_ADDR": "$(touch PWNED)n"},
             "error: MTL_HEAD_ADDR: expected one host name or address, got '$(touch PWNED)n'"),
            ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]"},
             "error: cannot tell the head node (scontrol show hostnames 'node[1-2]' gave ''): "
             "set MTL_HEAD_ADDR to one host name"),
            ({"SLURM_NNODES": "2", "MTL_HEAD_ADDR": "node1", "MTL_MAIN_PORT": "1;id"},
             "error: MTL_MAIN_PORT: expected a port number 1-65535, got '1;id'")):
        done = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "multi_node.sbatch"), str(DEMO)],
                              cwd=tmp_path, env={**base, **environ}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stdout.strip().splitlines()[-1].endswith(
            "] " + message), done.stdout + done.stderr
        assert "srun " not in done.stdout and not (tmp_path / "PWNED").exists()


def fake_tool(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/bash\n{text}\n")
    path.chmod(0o755)
    return path


def test_dry_run_prints_one_line_that_launches_as_train_sh_would(tmp_path, cpu_env):
    """--dry-run printed the command on stderr without the variables train.sh sets
    (CUDA_VISIBLE_DEVICES=, DS_ACCELERATOR=cpu, OMP_NUM_THREADS): run as printed, it was
    another launch (GPUs visible, DeepSpeed looking for CUDA)."""
    accelerate = fake_tool(tmp_path / "bin", "accelerate", 'echo "CUDA_VISIBLE_DEVICES='
                           '${CUDA_VISIBLE_DEVICES-unset} DS_ACCELERATOR=${DS_ACCELERATOR-unset} '
                           'OMP_NUM_THREADS=${OMP_NUM_THREADS-unset} $*"')
    env = {k: v for k, v in cpu_env.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "OMP_NUM_THREADS")}
    env.update(MTL_ACCELERATE=str(accelerate), MTL_MAIN_PORT="29555", MTL_NUM_GPUS="0",
               MTL_PYTHON=sys.executable)
    args = ["--launch", "zero2", "configs/demo.yaml", "--", f"train.output_dir={tmp_path / 'out dir'}"]

    def run(*command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(list(command), env=env, cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    launched = run("bash", str(TRAIN_SH), *args)
    printed = run("bash", str(TRAIN_SH), "--dry-run", *args)
    assert len(printed.stdout.splitlines()) == 1 and printed.stdout.startswith("env ")
    replayed = run("bash", "-c", printed.stdout)
    assert replayed.stdout == launched.stdout
    assert launched.stdout.startswith("CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu OMP_NUM_THREADS=")
    assert f"-- train.output_dir={tmp_path / 'out dir'}" in launched.stdout
    # GPUs the user chose decide the launch: the line names them, and the threads set before
    env.update(CUDA_VISIBLE_DEVICES="2,3", OMP_NUM_THREADS="3", MTL_NUM_GPUS="")
    ddp = run("bash", str(TRAIN_SH), "--dry-run", "--launch", "ddp", *args[2:])
    assert ddp.stdout.startswith("env CUDA_VISIBLE_DEVICES=2\\,3 OMP_NUM_THREADS=3 ")
    assert "--num_processes 2 " in ddp.stdout and "DS_ACCELERATOR" not in ddp.stdout


def test_tools_on_a_path_holding_an_equals_sign_check_and_launch(tmp_path, cpu_env):
    """The config check ran `env ... $MTL_PYTHON`: env took `/x/a=b/python` for a variable to
    set and ran the next argument (`-m`) as the command. A real launch (exec) takes any path;
    only the dry run's printed `env` line cannot, and is refused (above)."""
    folder = tmp_path / "a=b"
    accelerate = fake_tool(folder, "accelerate", 'echo "launched: $*"')
    python = fake_tool(folder, "python", f'exec {sys.executable} "$@"')
    env = {**cpu_env, "MTL_ACCELERATE": str(accelerate), "MTL_PYTHON": str(python),
           "MTL_NUM_GPUS": "0", "MTL_MAIN_PORT": "29556"}
    done = subprocess.run(["bash", str(TRAIN_SH), "--launch", "zero2", "configs/demo.yaml",
                           f"train.output_dir={tmp_path / 'out'}"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("launched: launch --config_file "), done.stdout
    bad = subprocess.run(["bash", str(TRAIN_SH), "--launch", "zero2", "configs/demo.yaml",
                          f"train.output_dir={tmp_path / 'out'}", "train.zero_stage=7"],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.zero_stage" in bad.stderr, bad.stderr  # checked


def test_sbatch_scripts_find_the_repository_and_read_mtl_requeue(tmp_path, cpu_env):
    """The repository is found from scontrol's `Command=PATH ARGS`, cut at the first space (a
    path with a space gave "repository not found"), a relative PATH from where sbatch ran (not
    the job's --chdir); by hand (no job) from the script itself, where `set -u` stopped at
    SLURM_JOB_ID, and inside an allocation (Command=/bin/bash); MTL_REQUEUE=no kept requeueing
    (only 0 counted)."""
    spaced = tmp_path / "my projects" / "mtl dist"
    spaced.parent.mkdir()
    spaced.symlink_to(REPO_ROOT)
    script = spaced / "slurm" / "single_node.sbatch"
    command = tmp_path / "command"  # what the stand-in scontrol says the job ran
    fake_tool(tmp_path / "bin", "scontrol", f"echo \"   Command=$(cat '{command}')\"")
    command.write_text(f"{script} {DEMO} train.lr=1")
    env = {k: v for k, v in cpu_env.items() if k != "MTL_ROOT"}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", MTL_DEVICE="cpu", MTL_DRY_RUN="1",
               MTL_PYTHON=sys.executable)
    spool_copy = tmp_path / "slurm_script"  # where slurmd runs it from
    spool_copy.write_text(script.read_text())

    def banner_and_command(script_file: Path, **environ: str) -> tuple[str, str]:
        done = subprocess.run(["bash", str(script_file), str(DEMO),
                               f"train.output_dir={tmp_path / 'out'}"], env={**env, **environ},
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        return next(s for s in lines if " repo=" in s), next(s for s in lines if s.startswith("env "))

    banner, launch = banner_and_command(spool_copy, SLURM_JOB_ID="7")
    assert f"repo={spaced} " in banner and "requeue=1" in banner
    assert "train.resume=auto" in launch and "requeue_on_preempt" not in launch
    command.write_text(f"mtl dist/slurm/single_node.sbatch {DEMO}")  # sbatch --chdir elsewhere
    banner, _ = banner_and_command(spool_copy, SLURM_JOB_ID="7",
                                   SLURM_SUBMIT_DIR=str(spaced.parent))
    assert f"repo={spaced} " in banner
    command.write_text("/bin/bash")  # by hand inside an allocation (salloc, srun --pty bash)
    banner, launch = banner_and_command(script, SLURM_JOB_ID="7", MTL_REQUEUE="No")
    assert f"repo={spaced} " in banner and "requeue=0" in banner
    assert "train.requeue_on_preempt=false" in launch
    banner, launch = banner_and_command(script, MTL_REQUEUE="no")  # by hand, no job
    assert f"repo={spaced} " in banner and "requeue=0" in banner
    refused = subprocess.run(["bash", str(script), str(DEMO)], env={**env, "MTL_REQUEUE": "2"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stdout.strip().endswith(
        "] error: MTL_REQUEUE='2'; expected 1/true/yes or 0/false/no"), refused.stdout
    by_hand = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "multi_node.sbatch"), str(DEMO)],
                             env={**env, "SLURM_NNODES": "2"}, capture_output=True, text=True,
                             timeout=60)
    assert by_hand.returncode == 2 and by_hand.stdout.strip().endswith(
        "] error: SLURM_JOB_ID is not set: submit this script with sbatch (it signals the job's "
        "steps)"), by_hand.stdout + by_hand.stderr
    # multi_node.sbatch inside an allocation finds the repository beside itself too: it gets as
    # far as its own checks (Command= is the shell there)
    in_allocation = subprocess.run(
        ["bash", str(spaced / "slurm" / "multi_node.sbatch"), str(DEMO)], cwd=tmp_path,
        env={**env, "SLURM_JOB_ID": "7", "SLURM_NNODES": "2x"}, capture_output=True, text=True,
        timeout=60)
    assert in_allocation.returncode == 2 and f"repo={spaced} " in in_allocation.stdout
    assert in_allocation.stdout.strip().endswith("] error: SLURM_NNODES: expected a number of "
                                                 "nodes, got '2x' (run under sbatch, or set it)")
