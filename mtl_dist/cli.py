"""`mtl-dist`: train | check | evaluate | predict | pseudo-label | ckpt ... | report | demo | bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

from mtl_dist.errors import ConfigError, DataError, MtlDistError, MtlDistWarning, fresh_line

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
CPU_LAUNCH_CONFIG = REPO_ROOT / "launch" / "cpu_multi.yaml"


def _not_a_file(path: Path, what: str) -> None:
    """An output directory that cannot be made: a file there, or above it. One line, before
    any work (predict and pseudo-label failed after all the predicting, with a traceback)."""
    from mtl_dist.checkpoint import why_not_a_directory

    why = why_not_a_directory(path)
    if why is not None:
        raise MtlDistError(f"{what} {path}: {why}")


def _run_of(checkpoint: Path, cfg) -> Path:
    """The checkpoint's run, else the config's output dir."""
    from mtl_dist.checkpoint import run_holding

    return run_holding(checkpoint.resolve()) or Path(cfg.train.output_dir).resolve()


def _check_output_dir_for(out_dir: Path, cfg, checkpoint: Path, what: str, default: str,
                          targets: list[Path]) -> None:
    """Before predicting: `out_dir` can be made, is not a run's own folder (the config's or
    the checkpoint's: a task named `metrics` wrote over metrics.jsonl), and none of the files
    to write (`targets`) is one of the run's data files
    (`--output` at the data dir replaced a dev file with predictions) or cannot be written (a
    directory there: a traceback after all the predicting, with other tasks' files replaced)."""
    from mtl_dist.checkpoint import MANAGED, holds_a_run, inside_text, managing_folder
    from mtl_dist.data import SPLITS, split_files
    from mtl_dist.outputs import why_not_writable

    _not_a_file(out_dir, what)
    target = out_dir.resolve()
    run = _run_of(checkpoint, cfg)
    for own in {Path(cfg.train.output_dir).resolve(), run}:
        if target == own or (target.parent == own and target.name in ("checkpoints", "best")) \
                or any(p in (own / "checkpoints", own / "best") for p in target.parents):
            raise MtlDistError(f"{what} {out_dir}: is the run's output dir (or a folder of its "
                               "checkpoints), whose files predictions could replace: pick "
                               f"another, e.g. {own / default} (the default)")
    if holds_a_run(target):  # another run's: a task named `metrics` replaced its log
        raise MtlDistError(f"{what} {out_dir}: is a run's output dir, whose files predictions "
                           "could replace: pick another, "
                           f"e.g. {run / default} (the default)")
    inside = managing_folder(target, checkpoint)
    if inside is not None:
        raise MtlDistError(f"{what} {out_dir}: {inside_text(target, inside)}, {MANAGED}")
    data = {Path(f).resolve(): (i, split) for i, task in enumerate(cfg.tasks)
            for split in SPLITS for f in split_files(task, split)}
    for path in targets:
        if path.resolve() in data:
            i, split = data[path.resolve()]
            key = "train/extra_train" if split == "train" else split
            raise MtlDistError(f"{what} {out_dir}: {path.resolve()} is tasks.{i}.{key}; "
                               "writing there would replace it: pick another --output")
        why = why_not_writable(path)
        if why is not None:
            raise MtlDistError(f"{what} {out_dir}: {path} {why}: pick another --output")


_LOADED: list = []  # the config this command loaded: an error about a key names its line


def _load(config: str, overrides: list[str]):
    from mtl_dist.config import load_config

    cfg = load_config(config, overrides)
    _LOADED[:] = [cfg]
    return cfg


def cmd_check(args) -> int:
    """Validate a config (keys, types, values, files) and read every data file as training
    would (bad rows, unknown labels; no tokenizing), starting nothing: what launch/train.sh
    runs first, so a mistake is one line, not one per rank plus a traceback."""
    from mtl_dist import data as mdata
    from mtl_dist import zero
    from mtl_dist.checkpoint import CheckpointManager
    from mtl_dist.model import encoder_config
    from mtl_dist.trainer import check_device, check_output_dir, check_resume_settings

    cfg = _load(args.config, args.overrides)
    zero.adopt_accelerate_launch(cfg)  # launch/train.sh's ZeRO launch, as the run will see it
    check_device(cfg)
    # what the run's start would refuse: the output dir (in use, used, a file, a wrong
    # resume path)
    output = CheckpointManager(cfg.train.output_dir, save_total_limit=None, recover_best=False)
    check_output_dir(cfg, output)
    tokenizer = mdata.load_tokenizer(cfg.model)
    encoder_config(cfg.model, len(tokenizer), tokenizer.pad_token_id)
    if cfg.train.zero_stage:  # the DeepSpeed JSON against the run (the total batch needs
        zero.build_ds_config(cfg, world_size=args.world_size)  # the launch's world size)
    label_maps = mdata.frozen_label_maps(cfg)
    shape = None
    if not cfg.model.pretrained:  # the model's own refusals (MPNet's fixed padding index),
        import torch  # built without memory or weights; its shape, for a resume

        from mtl_dist.model import build_model
        from mtl_dist.trainer import model_signature
        with torch.device("meta"):
            shape = model_signature(build_model(
                cfg.model, len(tokenizer), [len(label_maps[t.name]) for t in cfg.tasks],
                pad_token_id=tokenizer.pad_token_id, max_length=cfg.data.max_length))
    check_resume_settings(cfg, output, label_maps, args.world_size, shape)
    for split in ("train", "dev", "test"):
        mdata.check_split(cfg, split, label_maps)
    print(f"config OK: {len(cfg.tasks)} task(s) ({', '.join(cfg.task_names)}), data files "
          f"read, output dir {cfg.train.output_dir}")
    return 0


def cmd_train(args) -> int:
    from mtl_dist.trainer import Trainer

    cfg = _load(args.config, args.overrides)
    trainer = Trainer(cfg)
    try:
        return trainer.fit()["exit_code"]
    finally:
        trainer.close()


def _one_checkpoint(path: Path) -> None:
    """`--checkpoint OUTPUT/checkpoints` (or OUTPUT) names a folder of checkpoints, not one:
    say which to name, rather than calling it an incomplete checkpoint."""
    from mtl_dist.checkpoint import CheckpointManager

    run = path.parent if path.name == "checkpoints" else path
    if (path / "COMMITTED").exists() or not (run / "checkpoints").is_dir():
        return
    newest = CheckpointManager(run, save_total_limit=None, recover_best=False).latest()
    if newest is not None:
        raise MtlDistError(f"--checkpoint {path}: a folder of checkpoints, not one: name one, "
                           f"e.g. {newest} (the newest), or {run / 'best'}")


@contextlib.contextmanager
def _trainer_for_inference(args, cfg=None):
    """A trainer with the checkpoint's weights, closed after use (or a failed load): its
    process group torn down before the interpreter exits, where gloo's teardown could abort
    a rank of a multi-process run."""
    from mtl_dist.checkpoint import weights_read_through_deepspeed
    from mtl_dist.collectives import import_before_the_process_group
    from mtl_dist.trainer import Trainer

    _one_checkpoint(Path(args.checkpoint))
    cfg = cfg or _load(args.config, args.overrides)
    # ZeRO partitions are read through DeepSpeed: imported after the process group is up, it
    # would hold the group to interpreter exit (see collectives.import_before_the_process_group)
    import_before_the_process_group(with_deepspeed=weights_read_through_deepspeed(args.checkpoint))
    trainer = Trainer(cfg, for_training=False, checkpoint=args.checkpoint)
    try:
        trainer.load_weights(args.checkpoint)
        yield trainer
    finally:
        trainer.close()


def cmd_evaluate(args) -> int:
    # stdout carries the JSON alone, for pipes; the evaluation line and what libraries print
    # on import (DeepSpeed's accelerator warning) go to stderr
    with contextlib.redirect_stdout(sys.stderr), _trainer_for_inference(args) as trainer:
        result = _evaluate(trainer, args.split)
        is_main = trainer.accelerator.is_main_process
    if is_main:
        print(json.dumps({"score": result["score"], "loss": result["loss"],
                          "tasks": {t: {k: v for k, v in m.items() if k != "confusion_matrix"}
                                    for t, m in result["tasks"].items()}}, indent=1))
    return 0


def _evaluate(trainer, split: str):
    """The evaluation result of `mtl-dist evaluate`."""
    from mtl_dist import data as mdata

    tasks = trainer.dev_data if split == "dev" else mdata.load_task_data(
        trainer.cfg, trainer.tokenizer, split, trainer.label_maps)
    _check_labelled(tasks, split)
    scored = [t.name for t in tasks if len(t.labels) and (t.labels >= 0).all()]
    left_out = [t.name for t in trainer.cfg.tasks if t.name not in scored]
    if left_out and trainer.accelerator.is_main_process:  # the score is over the others only
        print(f"evaluate --split {split}: {', '.join(left_out)}: no labelled "
              f"{split} file; the score covers {', '.join(scored)} only", file=sys.stderr)
    return trainer.evaluate(tasks)


def _check_labelled(tasks, split: str) -> None:
    """evaluate scores labelled rows only: a split without labels (or with some rows
    unlabelled) would score NaN or count the unlabelled rows as errors."""
    for task in tasks:
        missing = int((task.labels < 0).sum())
        if 0 < missing < len(task.labels):
            raise MtlDistError(f"evaluate --split {split}: {missing} of {len(task.labels)} "
                               f"rows of task '{task.name}' have no label")
    if not any(len(t.labels) and (t.labels >= 0).all() for t in tasks):
        raise MtlDistError(f"evaluate --split {split}: no task has a labelled {split} file "
                           f"(without labels, use `mtl-dist predict --split {split}`)")


def cmd_predict(args) -> int:
    from mtl_dist.data import split_files
    from mtl_dist.outputs import write_predictions

    cfg = _load(args.config, args.overrides)
    without = [task.name for task in cfg.tasks if not split_files(task, args.split)]
    if len(without) == len(cfg.tasks):
        raise MtlDistError(f"predict --split {args.split}: no task has a {args.split} file "
                           f"(tasks.<i>.{args.split})")
    # by default beside the checkpoint's run (the config's output dir may be another run's)
    out_dir = Path(args.output or _run_of(Path(args.checkpoint), cfg) / "predictions")
    suffix = "" if args.split == "test" else f".{args.split}"
    _check_output_dir_for(out_dir, cfg, Path(args.checkpoint), "predict --output", "predictions",
                          [out_dir / f"{task.name}{suffix}.jsonl" for task in cfg.tasks
                           if task.name not in without])
    with _trainer_for_inference(args, cfg) as trainer:
        records = trainer.predict(args.split)
        is_main = trainer.accelerator.is_main_process
    if is_main:
        for name in without:  # an empty file would replace earlier ones
            print(f"{name}: no {args.split} file configured; skipped")
            del records[name]
        for path, count in write_predictions(out_dir, records, suffix):
            print(f"wrote {count} predictions to {path}")
    return 0


def _check_pseudo_label_targets(cfg, out_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """Before predicting: a test file to label, and an output dir it can go to, holding no
    earlier round's file unless `overwrite` (a run trained on them could no longer resume:
    its data fingerprints would differ)."""
    from mtl_dist.outputs import pseudo_label_path

    if not any(task.test for task in cfg.tasks):
        raise MtlDistError("pseudo-label: no task has a test file (tasks.<i>.test)")
    targets = [pseudo_label_path(out_dir, task) for task in cfg.tasks if task.test]
    _check_output_dir_for(out_dir, cfg, checkpoint, "pseudo-label --output", "pseudo_labels",
                          targets)
    earlier = [str(p) for p in targets if p.exists()]
    if earlier and not overwrite:
        raise MtlDistError(f"pseudo-label: {', '.join(earlier)} hold(s) an earlier round's "
                           "pseudo-labels, which a run may train on (replaced, that run could no "
                           "longer resume): give --output a new folder, or --overwrite")


def cmd_pseudo_label(args) -> int:
    """Confident test predictions as new train files, one per task, in the task's own layout."""
    from mtl_dist.errors import ConfigError
    from mtl_dist.outputs import (
        confident_rows,
        is_pseudo_label_file,
        pseudo_label_path,
        write_pseudo_labels,
    )

    if not 0.0 < args.threshold <= 1.0:
        raise ConfigError(f"--threshold: expected a probability in (0, 1], got {args.threshold}")
    cfg = _load(args.config, args.overrides)
    out_dir = Path(args.output or _run_of(Path(args.checkpoint), cfg) / "pseudo_labels")
    _check_pseudo_label_targets(cfg, out_dir, Path(args.checkpoint), args.overwrite)
    with _trainer_for_inference(args, cfg) as trainer:
        records = trainer.predict("test")
        if not trainer.accelerator.is_main_process:
            return 0
    chosen = {task.name: confident_rows(task, records[task.name], args.threshold,
                                        on_bad_row=cfg.data.on_bad_row)
              for task in cfg.tasks if task.test}
    written = write_pseudo_labels(out_dir, [(task, chosen[task.name][0]) for task in cfg.tasks
                                            if task.test and chosen[task.name][0]])
    hints, replaced = [], []
    for i, task in enumerate(cfg.tasks):
        if not task.test:
            print(f"{task.name}: no test file configured; skipped")
            continue
        _, kept, total = chosen[task.name]
        path, earlier = written.get(task.name), pseudo_label_path(out_dir, task)
        where = f"-> {path}" if path else "(no file written" + (
            f"; the earlier {earlier} is left as it was)" if earlier.exists() else ")")
        print(f"{task.name}: kept {kept} of {total} test rows with top probability >= "
              f"{args.threshold} {where}")
        if path:
            # an earlier round's file labels the same test rows: this round's replaces it
            earlier_rounds = [p for p in task.extra_train if is_pseudo_label_file(p, task)]
            keep = [p for p in task.extra_train if p not in earlier_rounds]
            hints.append(f"tasks.{i}.extra_train=[{','.join([*keep, str(path)])}]")
            replaced += earlier_rounds
    if hints:
        print("train the next round on them with: " + " ".join(hints))
    if replaced:
        print("(in place of the earlier round's " + ", ".join(map(str, replaced)) + ")")
    return 0


def cmd_ckpt(args) -> int:
    from mtl_dist import checkpoint as ck

    if args.ckpt_cmd == "ls":
        rows = ck.list_checkpoints(_run_to_list(args.output_dir, "ls"))
        if not rows:  # exit 2: a script's wrong path is not a run without checkpoints yet
            raise MtlDistError(f"ckpt ls: no checkpoints under {args.output_dir}")
        for row in rows:
            print(_format_ckpt_row(row))
    elif args.ckpt_cmd == "verify":
        return _verify_checkpoints(args.path)
    elif args.ckpt_cmd == "inspect":
        print(json.dumps(ck.inspect(args.path), indent=1, default=str))
    elif args.ckpt_cmd == "export":
        _not_a_file(Path(args.out_dir), "ckpt export: DIR")
        ck.export_checkpoint(args.path, args.out_dir)
        print(f"exported {args.path} to {args.out_dir}")
    elif args.ckpt_cmd == "convert":
        _not_a_file(Path(args.out_dir), "ckpt convert: DIR")
        ck.convert_zero_to_universal(args.path, args.out_dir)
        print(f"converted {args.path} to a universal checkpoint at {args.out_dir}")
    return 0


def _run_to_list(arg: str, command: str) -> Path:
    """The run whose checkpoints `ckpt ls`/`verify` list: `arg` is its output dir, its
    checkpoints/, best/, one checkpoint or a branch a resume set aside."""
    from mtl_dist import checkpoint as ck

    if not arg:
        raise MtlDistError(f"ckpt {command}: give a run's output dir (got an empty path)")
    out = Path(arg).resolve()  # `.` inside checkpoints/ names no folder
    if not out.is_dir():
        raise MtlDistError(f"ckpt {command}: {out} is not a directory (give a run's output dir)")
    if out.name == ck.CHECKPOINTS_DIR and not (out / ck.CHECKPOINTS_DIR).is_dir():
        return out.parent  # OUTPUT/checkpoints: list its run
    if out.parent.name == ck.ABANDONED_DIR and ck.holds_a_run(out.parent.parent):
        return out.parent.parent  # a branch a resume set aside: list its run
    if not (out / ck.CHECKPOINTS_DIR).is_dir():
        return ck.run_holding(out) or out  # best/ or one checkpoint: list its run
    return out


def _verify_checkpoints(arg: str) -> int:
    """`ckpt verify`: every committed checkpoint of the run (or the one named) read whole,
    each file's sha256 against its manifest, as a resume reads it; a row each, as `ckpt ls`
    prints them. Exit 2 when one is damaged, naming the newest intact one to resume."""
    from mtl_dist import checkpoint as ck

    named = Path(arg)
    rows = [row for row in ck.list_checkpoints(_run_to_list(arg, "verify"))
            if not (named / ck.COMMITTED).exists() or row.path.resolve() == named.resolve()]
    committed = [row for row in rows if row.complete]
    for row in rows:
        if row.complete:
            row.damage = ck.verify(row.path)
        print(_format_ckpt_row(row))
    # what a resume or best/ reads: set-aside branches (a damaged best/ the run moved there
    # among them) are listed, not counted, unless named
    named_one = (named / ck.COMMITTED).exists()
    committed = [row for row in committed if row.kind != "abandoned" or named_one]
    damaged = [row for row in committed if row.damage]
    if not committed:
        raise MtlDistError(f"ckpt verify: no committed checkpoint under {arg}")
    if not damaged:
        print(f"ckpt verify: {len(committed)} committed checkpoint(s), every file as its "
              "manifest says")
        return 0
    intact = [row for row in committed if not row.damage and row.kind == "periodic"]
    newest = f"; the newest intact periodic checkpoint is {intact[-1].path}" if intact else ""
    raise MtlDistError(f"ckpt verify: {len(damaged)} of {len(committed)} committed "
                       f"checkpoint(s) damaged ({', '.join(r.path.name for r in damaged)})"
                       f"{newest}")


def _format_ckpt_row(row) -> str:
    info = row if isinstance(row, dict) else row.as_dict()
    size_mb = (info.get("size_bytes") or 0) / 2**20
    score = info.get("score")
    status = "DAMAGED" if info.get("damage") else \
        "complete" if info.get("complete") else "INCOMPLETE"
    text = (f"{str(info.get('path')):60s} step={info.get('step')!s:>7} "
            f"{status:10s} {size_mb:9.1f} MiB")
    if score is not None:
        text += f"  {info.get('metric', 'score')}={score:.4f}"
    text += "  [best]" if info.get("is_best") else ""
    text += "  (set aside by a resume)" if info.get("kind") == "abandoned" else ""
    return text + (f"  ({info['damage']})" if info.get("damage") else "")


def _launch_train(config: Path, overrides: list[str], processes: int) -> None:
    """Run `mtl-dist train` under `accelerate launch` with N CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(CPU_LAUNCH_CONFIG), "--num_processes", str(processes), "--module",
           "mtl_dist.cli", "train", str(config), *overrides]
    print("$ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise MtlDistError(f"demo training step failed with exit status {result.returncode}")


DEMO_MARKER = ".mtl_dist_demo"  # in an output dir the demo wrote: a rerun may start it over


def _demo_fresh_start(out: Path, overrides: list[str], args) -> list[str]:
    """Checks the demo's arguments here, once, before any process is launched; returns the
    overrides that let phase 1 start over in an output dir an earlier demo wrote (and only
    then: a run the demo did not write is never deleted)."""
    from mtl_dist import checkpoint as ck

    if args.processes < 1:
        raise MtlDistError(f"demo: --processes must be >= 1, got {args.processes}")
    if args.stop_after < 1:
        raise MtlDistError(f"demo: --stop-after must be >= 1, got {args.stop_after}")
    cfg = _load(str(DEMO_CONFIG), overrides)
    owned = {"train.output_dir (use --output)": Path(cfg.train.output_dir).resolve() != out,
             "train.resume": bool(cfg.train.resume),
             "train.overwrite_output_dir": cfg.train.overwrite_output_dir,
             "train.stop_after_steps (use --stop-after)": cfg.train.stop_after_steps is not None}
    taken = [key for key, changed in owned.items() if changed]
    if taken:  # phase 1 starts its output dir over: it must be the one the marker guards
        raise MtlDistError(f"demo: {taken[0]} is the demo's to set, not an override's")
    if not args.output:  # Path('') is the working dir: a later demo there clears it
        raise MtlDistError("demo: --output is empty; give a directory")
    _not_a_file(out, "demo: --output")
    inside = ck.managing_folder(out)
    if inside is not None:
        raise MtlDistError(f"demo: --output {out} {ck.inside_text(out, inside)}, {ck.MANAGED}")
    saved = ck.CheckpointManager(out, save_total_limit=None, recover_best=False).saved_run() \
        if out.is_dir() else []
    if saved and not (out / DEMO_MARKER).exists():
        raise MtlDistError(f"demo: --output {out} holds a run the demo did not write "
                           f"({', '.join(saved[-3:])}); pick another --output")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `mtl-dist demo`; a rerun starts it over\n")
    return ["train.overwrite_output_dir=true"]


def cmd_demo(args) -> int:
    """The embedded demo: train on 2 CPU processes, stop, resume, evaluate, predict, report."""
    out = Path(args.output).resolve()
    base = [f"train.output_dir={out}", *args.overrides]
    fresh = _demo_fresh_start(out, base, args)
    print(f"== demo: phase 1, {args.processes} processes, stop after {args.stop_after} steps")
    _launch_train(DEMO_CONFIG, [*base, f"train.stop_after_steps={args.stop_after}", *fresh],
                  args.processes)
    print("== demo: phase 2, resume from the newest checkpoint and finish")
    _launch_train(DEMO_CONFIG, [*base, "train.resume=auto"], args.processes)
    print("== demo: evaluate and predict with the best checkpoint")
    ns = argparse.Namespace(config=str(DEMO_CONFIG), overrides=base, checkpoint=str(out / "best"),
                            split="test", output=None)
    cmd_predict(ns)
    ns.split = "dev"
    cmd_evaluate(ns)
    report = None
    try:
        from mtl_dist.report import build_report

        report = build_report(out)
    except ImportError:
        pass
    print("\n== demo finished")
    print(f"checkpoints : {out / 'checkpoints'}  (list them: mtl-dist ckpt ls {out})")
    print(f"best model  : {out / 'best'}")
    print(f"predictions : {out / 'predictions'}")
    print(f"metrics log : {out / 'metrics.jsonl'}")
    if report:
        print(f"report      : {report}")
    return 0


def bench_schedule(warmup: int, steps: int) -> tuple[int, int, int]:
    """(log interval, untimed steps, total steps) of `bench`: warm-up and timed steps rounded up
    to whole log intervals, so that no timed interval holds a warm-up step."""
    every = max(1, steps // 4)
    untimed = -(-warmup // every) * every
    return every, untimed, untimed + -(-steps // every) * every


def bench_rates(records: list[dict], untimed: int, every: int,
                samples_per_step: float) -> tuple[int, float, float]:
    """(timed steps, samples/s, tokens/s) from the train records of a `bench` run: totals over
    the wall time from the log at the end of the warm-up to the last log (a mean of the
    intervals' rates would overweight the fast ones)."""
    start = next(r for r in records if r["step"] == untimed)
    timed = [r for r in records if r["step"] > untimed]
    seconds = timed[-1]["time"] - start["time"]
    steps = timed[-1]["step"] - untimed
    # each interval's tokens: its token rate x its own duration (its samples / its sample rate)
    tokens = sum(r["tokens_per_s"] * every * samples_per_step / r["samples_per_s"]
                 for r in timed)
    return steps, steps * samples_per_step / seconds, tokens / seconds


def cmd_bench(args) -> int:
    """Train N timed steps of a config (no checkpoints, no evaluation) and report throughput."""
    import tempfile

    from mtl_dist.tracking import read_metrics
    from mtl_dist.trainer import Trainer

    if args.warmup < 1 or args.steps < 1:
        raise MtlDistError(f"bench: --warmup and --steps must be >= 1 (the first step compiles "
                           f"and allocates), got --warmup {args.warmup} --steps {args.steps}")
    if not math.isfinite(args.peak_tflops) or args.peak_tflops <= 0:
        raise MtlDistError(f"bench: --peak-tflops must be a finite number > 0 (the GPU's dense "
                           f"bf16 peak), got {args.peak_tflops}")
    every, untimed, total = bench_schedule(args.warmup, args.steps)
    with tempfile.TemporaryDirectory(prefix="mtl_bench_") as out:
        cfg = _load(args.config, [*args.overrides, f"train.output_dir={out}",
                                  f"train.max_steps={total}",
                                  f"train.log_steps={every}", "train.eval_at_epoch_end=false",
                                  "train.eval_steps=null", "train.resume=null",
                                  "train.stop_after_steps=null", "checkpoint.save_steps=null",
                                  "checkpoint.save_at_epoch_end=false",
                                  "checkpoint.save_best=false", "tracking.backends=[]",
                                  # each record written at its own step: a window's ends alike
                                  "train.async_log=false"])
        for task in cfg.tasks:  # nothing to evaluate (the run's end evaluates otherwise)
            task.dev = None
        trainer = Trainer(cfg)
        trainer.save_on_stop = False
        trainer.tracking.point_to_outputs = False  # its directory is gone when bench returns
        try:
            trainer.fit()
            records = [r for r in read_metrics(out) if r["kind"] == "train"]
        finally:
            trainer.close()
        if not trainer.accelerator.is_main_process:
            return 0
        if not records or records[-1]["step"] <= untimed:
            raise MtlDistError(f"bench: training stopped at step {trainer.state.global_step}, "
                               f"before the timed window (steps {untimed + 1}-{total})")
        per_step = trainer.state.samples_seen / trainer.state.global_step  # all ranks
        steps, sps, tps = bench_rates(records, untimed, every, per_step)
        params = sum(p.numel() for n, p in trainer.module.named_parameters()
                     if "embeddings" not in n)
        report = {"warmup_steps": untimed, "steps_timed": steps, "samples_per_s": sps,
                  "tokens_per_s": tps,
                  "world_size": trainer.world_size, "device": str(trainer.accelerator.device),
                  "non_embedding_parameters": params}
        if trainer.accelerator.device.type == "cuda":
            # 6 FLOPs per parameter per real token (forward + backward); attention not counted.
            report["mfu"] = 6 * params * tps / (args.peak_tflops * 1e12 * trainer.world_size)
        print(json.dumps(report, indent=1))
    return 0


def cmd_report(args) -> int:
    from mtl_dist.report import build_report

    print(f"report written to {build_report(Path(args.output_dir))}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (its message is argparse's one line)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="run config YAML (see configs/)")
        p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.lr=2e-5")

    p = sub.add_parser("train", help="train a run (python, accelerate launch or srun)")
    with_config(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("check", help="validate a config and its files; start nothing")
    with_config(p)
    p.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                   help="the processes the run will start (launch/train.sh passes it): also "
                        "check the global batch, ZeRO stage and world size of a resume")
    p.set_defaults(func=cmd_check)
    for name, func, default_split in (("evaluate", cmd_evaluate, "dev"),
                                      ("predict", cmd_predict, "test")):
        p = sub.add_parser(name, help=f"{name} with a checkpoint (best/ or checkpoint-N)")
        with_config(p)
        p.add_argument("--checkpoint", required=True, help="best/ or checkpoints/checkpoint-N")
        p.add_argument("--split", default=default_split, choices=["train", "dev", "test"])
        if name == "predict":
            p.add_argument("--output", help="directory for <task>.jsonl (test) or "
                           "<task>.<split>.jsonl (default OUTPUT/predictions)")
        p.set_defaults(func=func)

    p = sub.add_parser("pseudo-label",
                       help="confident test predictions as new train files (OUTPUT/pseudo_labels)")
    with_config(p)
    p.add_argument("--checkpoint", required=True, help="best/ or checkpoints/checkpoint-N")
    p.add_argument("--threshold", type=float, default=0.99,
                   help="keep rows whose top probability is at least this (default 0.99)")
    p.add_argument("--output", help="directory for <task>.<ext> (default OUTPUT/pseudo_labels)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier round's files in that directory")
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser("ckpt", help="list, verify, inspect, export or convert checkpoints")
    csub = p.add_subparsers(dest="ckpt_cmd", required=True)
    c = csub.add_parser("ls", help="checkpoints of a run: step, score, size, complete, best")
    c.add_argument("output_dir")
    c = csub.add_parser("verify", help="read every file of a run's checkpoints (or of one) "
                        "against its manifest's sha256, as a resume does")
    c.add_argument("path")
    c = csub.add_parser("inspect", help="manifest, RNG per rank, sampler cursor")
    c.add_argument("path")
    c = csub.add_parser("export", help="a Hugging Face encoder dir + heads file")
    c.add_argument("path")
    c.add_argument("out_dir")
    c = csub.add_parser("convert", help="ZeRO checkpoint -> universal (world-size change)")
    c.add_argument("path")
    c.add_argument("out_dir")
    p.set_defaults(func=cmd_ckpt)

    p = sub.add_parser("bench", help="samples/s, tokens/s and MFU of a config, no checkpoints")
    with_config(p)
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps (default 100)")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed optimizer steps first (default 20)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU dense bf16 peak for MFU (default 989: H100/H200 SXM)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="PNG plots + one HTML page from a run's metrics log")
    p.add_argument("output_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the embedded demo on CPU processes")
    p.add_argument("--output", default="demo_output", help="output directory (default demo_output)")
    p.add_argument("--processes", type=int, default=2,
                   help="CPU processes of each training phase (default 2)")
    p.add_argument("--stop-after", type=int, default=60,
                   help="optimizer steps of phase 1 before the stop/resume (default 60)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides for configs/demo.yaml")
    p.set_defaults(func=cmd_demo)
    return parser


def _format_warning(message, category, filename, lineno, line=None, *, _python=warnings.formatwarning):
    """mtl_dist's own warnings as one line, like its errors (Python's format adds the
    file:line of our code and its source line); other libraries' keep theirs."""
    if issubclass(category, MtlDistWarning):
        return f"{fresh_line()}warning: {message}\n"
    return _python(message, category, filename, lineno, line)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll says POLLERR)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd (captured), or no poll here
        return False


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the options (`bench CONFIG --steps 50 train.lr=1e-4`).
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-")
                                                    for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:  # name only what is wrong: the overrides among them are fine
        unknown = [x for x in extra if "=" not in x or x.startswith("-")]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _LOADED.clear()
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except MtlDistError as err:
        from mtl_dist.config import where_set, with_where_written

        cfg = _LOADED[0] if _LOADED else None
        if isinstance(err, DataError):  # located in its file: the config's part said after
            message = with_where_written(err, cfg)
        elif isinstance(err, ConfigError) or getattr(err, "key", None):
            message = where_set(err, cfg)
        else:
            message = str(err)
        # a progress bar cut short leaves the cursor after it: start the error on its own line
        print(f"{fresh_line()}error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mtl-dist ckpt ls OUTPUT | head`: the reader is gone, no traceback
        if not _stdout_reader_gone():
            raise  # another pipe (a worker's, a tracker's): its traceback is the news
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except KeyboardInterrupt:  # Ctrl-C: one line (per rank), not a traceback each
        hint = ("stopped without a checkpoint; train.resume=auto continues from the newest "
                "committed one (SIGINT in train.preemption_signals stops with a checkpoint)"
                if args.command == "train" else "stopped")
        print(f"\ninterrupted (Ctrl-C): {hint}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
