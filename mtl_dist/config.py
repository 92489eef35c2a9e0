"""Run configuration: dataclass schema, YAML + dotted overrides, validation with one-line errors.

The YAML file and the `key=value` overrides are merged onto the schema with OmegaConf
(structured configs); every problem becomes a single-line `ConfigError` naming the dotted
key, the bad value and what was expected. `load_config` returns plain dataclasses.
"""

import dataclasses
import difflib
import errno
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from mtl_dist.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "ArchConfig",
    "CheckpointConfig",
    "DataConfig",
    "HASH_EXCLUDED_KEYS",
    "ModelConfig",
    "RunConfig",
    "SamplerConfig",
    "TaskConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_files",
    "config_hash",
    "config_to_yaml",
    "load_config",
    "save_dict",
    "saved_config_yaml",
]

DEMO_PREFIX = "demo:"
# train.attention_kernel: the CUDA kernel of packed rows' attention (model.varlen_attention)
ATTENTION_KERNELS = ("flash", "triton")

# train.compile_tuning -> Inductor options for the compiled layers. Measured on an H200
# (benchmarks/README.md, run G): coordinate descent +1.5-2.7 % samples/s; max-autotune left out:
# its GEMM templates made the BERT-large step 8 % slower and start-up 425 s longer (run L3).
COMPILE_TUNING: dict[str, dict[str, bool]] = {
    "none": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
}

# ---------------------------------------------------------------------------------------------
# Schema


@dataclass
class ArchConfig:
    """Encoder shape used when `model.pretrained` is null (random initialisation)."""

    model_type: str = "bert"
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1


@dataclass
class ModelConfig:
    """Shared encoder (local `from_pretrained` dir or random init) and the per-task head type."""

    pretrained: str | None = None
    tokenizer: str | None = None
    arch: ArchConfig = field(default_factory=ArchConfig)
    head: str = "attention"
    dropout: float = 0.1

    def effective_tokenizer(self) -> str | None:
        """The tokenizer location: `tokenizer` if set, else the pretrained model's directory."""
        return self.tokenizer if self.tokenizer is not None else self.pretrained


@dataclass
class TaskConfig:
    """One classification task: its files, columns, labels, metric and weights."""

    name: str
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    extra_train: list[str] = field(default_factory=list)
    pair: bool = False
    labels: list[str] | None = None
    format: str = "auto"
    id_field: str = "id"
    text_field: str = "text"
    text_b_field: str = "text_b"
    label_field: str = "label"
    metric: str = "accuracy"
    score_weight: float = 1.0
    sample_weight: float = 1.0
    max_samples: int | None = None


@dataclass
class DataConfig:
    """Tokenization and reading options shared by all tasks."""

    max_length: int = 128
    pad_to_multiple_of: int | None = None
    packing: bool = False
    pack_multiple: int = 256
    cache_dir: str | None = None
    on_bad_row: str = "error"
    num_workers: int = 0
    tokenize_batch_size: int = 1000


@dataclass
class SamplerConfig:
    """How the global multi-task batch plan picks a task for each step."""

    strategy: str = "proportional"
    temperature: float = 2.0
    drop_last: bool = False
    group_by_length: bool = False
    mega_batch_mult: int = 50
    check_task_agreement: bool = False
    on_global_batch_change: str = "error"


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, evaluation and distribution settings."""

    output_dir: str = "runs/default"
    seed: int = 42
    per_device_batch_size: int = 32
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5
    head_lr: float | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    lr_scheduler: str = "linear"
    max_grad_norm: float | None = 1.0
    num_epochs: int = 3
    max_steps: int | None = None
    mixed_precision: str = "no"
    ema_decay: float | None = None
    eval_steps: int | None = None
    eval_at_epoch_end: bool = True
    metric_for_best: str = "score"
    early_stopping_patience: int | None = None
    log_steps: int = 10
    async_log: bool = True  # a train record's losses read one micro-step later: no GPU drain
    resume: str | None = None
    overwrite_output_dir: bool = False  # a fresh run may delete the run saved in output_dir
    device: str = "auto"
    collective_timeout_s: int = 600
    zero_stage: int = 0
    deepspeed_config: str | None = None
    fused_optimizer: bool = True
    fused_clipping: bool = False  # clipping folded into the fused AdamW pass (grad_scale)
    triton_clip_norm: bool = False  # fused_clipping: the flat buffers' norm by a Triton kernel
    compile: bool = False
    compile_tuning: str = "none"  # "coordinate_descent": Inductor tunes its fused kernels
    compile_mix_order_reduction: bool = True  # false: LayerNorm backward without that kernel
    compile_pdl: bool = False  # compiled layers' kernels: Programmatic Dependent Launch (Hopper+)
    compile_heads: bool = False  # each task's dropout + head + loss compiled as one graph
    cuda_graphs: bool = False
    precapture_graphs: bool = True  # cuda_graphs: every (task, shape) captured before step one
    bf16_weights: bool = False  # the model in bf16, fp32 master weights in the optimizer
    flat_masters: bool = False  # bf16_weights: encoder masters/moments/grads flat, one-kernel AdamW
    direct_weight_grads: bool = False  # graphs + flat masters: Linear weight grads into the flat buffer
    fused_qkv: bool = False  # query, key and value projected by one GEMM (same parameters)
    gemm_embedding_grads: bool = False  # small embedding tables' gradients by one GEMM
    triton_embedding_grads: bool = False  # gemm_embedding_grads: the vocabulary's by Triton
    direct_embedding_grads: bool = False  # gemm_embedding_grads + direct_weight_grads: tables too
    gelu_epilogue: bool = False  # intermediate GEMM + GELU (tanh) as one cuBLASLt GEMM
    cublaslt_gemms: bool = False  # direct_weight_grads' GEMMs by cuBLASLt, without a workspace
    gather_unpack_backward: bool = False  # packing: the heads' gather's backward as a gather
    overlap_optimizer: bool = False  # flat masters: AdamW per layer, overlapping the next forward
    attention_kernel: str = "flash"  # packed rows on CUDA: "flash" (FlashAttention 2) or "triton"
    stop_after_steps: int | None = None
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    preemption_check_steps: int = 1
    requeue_on_preempt: bool = True

    def effective_eval_batch_size(self) -> int:
        """Per-device evaluation batch size: `eval_batch_size`, else the training one."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return self.per_device_batch_size


@dataclass
class CheckpointConfig:
    """When periodic checkpoints are written, how many are kept, and whether best/ is kept."""

    save_steps: int | None = None
    save_at_epoch_end: bool = True
    save_total_limit: int | None = 3
    save_best: bool = True
    async_save: bool = False  # periodic saves written + committed by a background thread


@dataclass
class TrackingConfig:
    """Experiment trackers (wandb, TensorBoard) and the run's labels there."""

    backends: list[str] = field(default_factory=list)
    project: str = "mtl_dist"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None


@dataclass
class RunConfig:
    """A whole run: model, tasks, data, sampler, training, checkpointing and tracking."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def task_names(self) -> list[str]:
        """Task names in config order (task id i is `tasks[i]`)."""
        return [task.name for task in self.tasks]


# Keys (dotted; a section name covers the whole section) left out of `config_hash`:
# they change where or how a run is stored, logged or scheduled, not its results.
HASH_EXCLUDED_KEYS: tuple[str, ...] = (
    "train.output_dir",
    "train.resume",
    "train.overwrite_output_dir",
    "train.log_steps",
    "train.async_log",
    "train.collective_timeout_s",
    "tracking",
    "checkpoint",
    "data.cache_dir",
    "data.num_workers",
    "data.tokenize_batch_size",
    "train.stop_after_steps",
    "train.preemption_signals",
    "train.preemption_check_steps",
    "train.requeue_on_preempt",
)

_TASK_PATH_FIELDS = ("train", "dev", "test")
_TASK_NAME_RE = re.compile(r"[^\s/.=\[\]]+")

# ---------------------------------------------------------------------------------------------
# Public API


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    check_files: bool = True,
) -> RunConfig:
    """Merge the YAML file (or the schema defaults when `path` is None) and the dotted
    overrides, validate, resolve relative data/model paths, and return plain dataclasses."""
    sources = _Sources(path)
    try:
        cfg = _build(path, overrides, sources)
        run = _to_object(cfg, sources)
        _resolve_paths(run, sources)
        _adopt_deepspeed_stage(run, sources)
        _validate(run, sources)
        if check_files:
            _check_files(run, sources)
    except _Problem as problem:
        raise ConfigError(str(problem), located=True) from None
    run._sources = sources  # not a field: where_set names a key's line after loading
    return run


def where_set(err: ConfigError | CheckpointError, cfg: RunConfig | None) -> str:
    """`err`'s message led by where its key was set in `cfg`'s file or overrides, as a
    load-time error is ('run.yaml:12: config key ...'): for errors found after loading (a
    file output_dir, a DeepSpeed JSON against the run, cuda asked on CPU)."""
    sources = getattr(cfg, "_sources", None)
    key = None if err.located or not err.key or sources is None else _config_key(err.key, cfg)
    return str(err) if key is None else sources.prefix(key) + str(err)


def with_where_written(err: DataError, cfg: RunConfig | None) -> str:
    """`err`'s message, then where the config wrote the key it turns on ("; tasks.nli.labels
    set at run.yaml:12", "... set by override 'tasks.nli.labels=[a,b]'"): a data file that
    disagrees with the config names both. As is when the key keeps its default (labels read
    from the train files, say)."""
    sources = getattr(cfg, "_sources", None)
    key = None if err.key is None or sources is None else _config_key(err.key, cfg)
    if key is None:
        return str(err)
    override = sources.override_for(key)
    if key in sources.elsewhere:
        where = f"set by {sources.elsewhere[key]}"
    elif override is not None:
        where = f"set by override '{override}'"
    elif key in sources.lines and sources.path is not None:
        where = f"set at {sources.path}:{sources.lines[key]}"
    else:
        return str(err)
    return f"{err}; {err.key} {where}"


def set_elsewhere(cfg: RunConfig, key: str, where: str) -> None:
    """Note that `key` was set by `where` (a launcher's option), not by the file or an
    override: an error about it names that."""
    sources = getattr(cfg, "_sources", None)
    if sources is not None:
        sources.elsewhere[key] = where


def _config_key(key: str, cfg: RunConfig) -> str | None:
    """`key` as a display key of `cfg` ('tasks.nli.dev' -> 'tasks[0].dev'); None when it
    names no config section (a file name, say)."""
    segments = _split_key(key)
    if segments[0] not in {field.name for field in dataclasses.fields(RunConfig)}:
        return None
    if segments[0] == "tasks" and len(segments) > 1 and isinstance(segments[1], str):
        names = [task.name for task in cfg.tasks]
        segments = [*segments[:1], names.index(segments[1]), *segments[2:]] \
            if segments[1] in names else segments[:1]
    return _display(segments)


def check_files(cfg: RunConfig) -> None:
    """Raise ConfigError for the first data/model path that does not exist (demo: skipped)."""
    try:
        _check_files(cfg, _Sources(None))
    except _Problem as problem:
        raise ConfigError(str(problem)) from None


def save_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a plain nested dict (lists and scalars only), e.g. for trackers."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, in schema order; `load_config` reads it back unchanged."""
    return yaml.safe_dump(save_dict(cfg), sort_keys=False, allow_unicode=True)


# What one invocation asked for, not what the run is: OUTPUT/config.yaml saves them unset, so
# running that file again cannot delete the run it describes or pin an old checkpoint.
PER_INVOCATION_KEYS = {"resume": None, "overwrite_output_dir": False}


def saved_config_yaml(cfg: RunConfig) -> str:
    """The text of OUTPUT/config.yaml: the resolved config, per-invocation keys unset."""
    # absolute, as the data paths are: the file also works from another directory
    train = dataclasses.replace(cfg.train, **PER_INVOCATION_KEYS,
                                output_dir=os.path.abspath(cfg.train.output_dir))
    data = cfg.data
    if data.cache_dir:
        data = dataclasses.replace(data, cache_dir=os.path.abspath(
            os.path.expanduser(data.cache_dir)))
    saved = dataclasses.replace(cfg, train=train, data=data)
    return (SAVED_CONFIG_HEADER + "train.resume and train.overwrite_output_dir are\n"
            "# per invocation and saved unset: resume with train.resume=auto.\n"
            + config_to_yaml(saved))


SAVED_CONFIG_HEADER = "# The resolved config of this run. "  # how a run's own config.yaml starts


def is_saved_config(path: Path) -> bool:
    """Whether the file `path` starts with SAVED_CONFIG_HEADER (a run wrote it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(len(SAVED_CONFIG_HEADER)) == SAVED_CONFIG_HEADER
    except OSError:
        return False


# Keys added after runs were saved, with the value every earlier run had: left out of
# `config_hash` at that value, so a best/ saved before the key existed is the same config.
HASH_ADDED_LATER: dict[str, Any] = {"train.lr_scheduler": "linear"}


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the canonical YAML, leaving out keys that do not change results (and keys
    added later, at the value runs before them had)."""
    data = save_dict(cfg)
    for key, before in HASH_ADDED_LATER.items():
        section, _, name = key.partition(".")
        if data[section].get(name) == before:
            data[section].pop(name)
    for key in HASH_EXCLUDED_KEYS:
        section, _, name = key.partition(".")
        if name:
            data[section].pop(name, None)
        else:
            data.pop(section, None)
    text = yaml.safe_dump(data, sort_keys=True, allow_unicode=True, default_flow_style=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Problems and where they came from


class _Problem(ConfigError):
    """An internal one-line problem about dotted `key`; the source prefix is added later."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message, key or None)
        self.key = key


class _Sources:
    """Remembers which keys came from which override, to name the source of a problem."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else str(path)
        self.file_dir = None if path is None else os.path.dirname(os.path.abspath(path))
        # (display key, override text, the keys a mapping value merges in; None: all of them)
        self.overrides: list[tuple[str, str, set[str] | None]] = []
        self.lines: dict[str, int] = {}  # display key -> its line in the file
        self.elsewhere: dict[str, str] = {}  # display key -> what set it after loading

    def override_for(self, key: str) -> str | None:
        """The last override that set `key` or one of its parents, if any."""
        for okey, text, merged in reversed(self.overrides):
            if _is_under(key, okey) and (merged is None or key == okey
                                         or any(_is_under(key, m) for m in merged)):
                return text
        return None

    def prefix(self, key: str) -> str:
        """'override ...: ' or 'file.yaml:LINE: ' (or nothing) for a problem about `key`."""
        if key in self.elsewhere:
            return f"{self.elsewhere[key]}: "
        text = self.override_for(key)
        if text is not None:
            return f"override '{text}': "
        return self.file_prefix(key) if self.path is not None else ""

    def file_prefix(self, key: str) -> str:
        """'file.yaml:LINE: ' with the line of `key` or its nearest parent in the file
        ('file.yaml: ' when neither is written there, e.g. a default)."""
        segments = _split_key(key) if key else []
        for end in range(len(segments), 0, -1):
            line = self.lines.get(_display(segments[:end]))
            if line is not None:
                return f"{self.path}:{line}: "
        return f"{self.path}: "

    def base_dir(self, key: str) -> str:
        """Directory a relative path at `key` is resolved against (the file's, or the CWD)."""
        if self.override_for(key) is None and self.file_dir is not None:
            return self.file_dir
        return os.getcwd()

    def error(self, problem: _Problem) -> _Problem:
        """`problem` with its source prefix."""
        return _Problem(problem.key, self.prefix(problem.key) + str(problem))


@contextmanager
def _prefixed(prefix: str | Callable[[str], str]) -> Iterator[None]:
    """Prefix every _Problem raised inside with `prefix` (an override, or a function of the
    problem's key: the file and the key's line)."""
    try:
        yield
    except _Problem as problem:
        text = prefix(problem.key) if callable(prefix) else prefix
        raise _Problem(problem.key, text + str(problem)) from None


# ---------------------------------------------------------------------------------------------
# Keys, types and values


def _join(parent: str, name: str | int) -> str:
    """Dotted display key: 'train' + 'lr' -> 'train.lr', 'tasks' + 0 -> 'tasks[0]'."""
    if isinstance(name, int):
        return f"{parent}[{name}]"
    return f"{parent}.{name}" if parent else name


def _display(segments: Sequence[str | int]) -> str:
    """Display key of a segment path."""
    key = ""
    for segment in segments:
        key = _join(key, segment)
    return key


def _split_key(key: str) -> list[str | int]:
    """Segments of a dotted key; 'tasks[0].train' and 'tasks.0.train' give ['tasks', 0, 'train']."""
    tokens = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
    return [int(token) if token.isdigit() else token for token in tokens]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is optional) of `X | None`; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a schema dataclass."""
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def _type_at(key: str) -> Any | None:
    """Schema type of a display key, or None when the key is not in the schema."""
    tp: Any = RunConfig
    for segment in _split_key(key):
        tp, _ = _unwrap_optional(tp)
        if _is_section(tp) and isinstance(segment, str) and segment in _fields(tp):
            tp = _fields(tp)[segment]
        elif _is_list(tp) and isinstance(segment, int):
            tp = typing.get_args(tp)[0]
        else:
            return None
    return tp


def _describe(tp: Any) -> str:
    """Human name of a schema type: 'float', 'int or null', 'list of str', 'mapping'."""
    inner, optional = _unwrap_optional(tp)
    if _is_section(inner):
        text = "mapping"
    elif _is_list(inner):
        element = typing.get_args(inner)[0]
        text = "list of mappings" if _is_section(element) else f"list of {_describe(element)}"
    else:
        text = getattr(inner, "__name__", str(inner))
    return f"{text} or null" if optional else text


def _show(value: Any) -> str:
    """A value as it appears in messages: null, true, 3, 'abc', [1, 2] (shortened)."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown_key(parent: str, name: Any, cls: type) -> _Problem:
    """'config key ... is unknown; did you mean ...?' over the fields of section `cls`."""
    key = _join(parent, str(name))
    valid = list(_fields(cls))
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{_join(parent, close[0])}'?"
    else:
        where = f"'{parent}'" if parent else "the top level"
        hint = f"valid keys in {where}: {', '.join(valid)}"
    return _Problem(key, f"config key '{key}' is unknown; {hint}")


def _wrong_type(key: str, value: Any, tp: Any | None = None) -> _Problem:
    """'config key K: expected T, got V' with T taken from the schema."""
    tp = _type_at(key) if tp is None else tp
    expected = _describe(tp) if tp is not None else "a valid value"
    return _Problem(key, f"config key '{key}': expected {expected}, got {_show(value)}")


# ---------------------------------------------------------------------------------------------
# Shape check: containers and keys, before OmegaConf converts scalars


def _check_shape(value: Any, tp: Any, key: str) -> None:
    """Unknown keys, mappings vs lists vs scalars, and nulls, checked against the schema."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if not optional:
            raise _wrong_type(key, value, tp)
    elif _is_section(inner):
        _check_section(value, inner, key, tp)
    elif _is_list(inner):
        if not isinstance(value, list):
            raise _wrong_type(key, value, tp)
        element = typing.get_args(inner)[0]
        for index, item in enumerate(value):
            _check_shape(item, element, _join(key, index))
    elif isinstance(value, dict | list):
        raise _wrong_type(key, value, tp)
    elif inner is bool and isinstance(value, int | float) and not isinstance(value, bool) \
            and value not in (0, 1):  # OmegaConf reads any other number as true
        raise _wrong_type(key, value, tp)


def _check_section(value: Any, cls: type, key: str, tp: Any) -> None:
    """A mapping whose keys are fields of `cls`, each of the right shape."""
    if not isinstance(value, dict):
        raise _wrong_type(key, value, tp)
    hints = _fields(cls)
    for name, item in value.items():
        if name not in hints:
            raise _unknown_key(key, name, cls)
        _check_shape(item, hints[name], _join(key, name))


# ---------------------------------------------------------------------------------------------
# Merging with OmegaConf


@contextmanager
def _translated(root: str, fallback: str) -> Iterator[None]:
    """Turn OmegaConf exceptions into _Problem; keys are relative to `root`."""
    try:
        yield
    except oc_errors.OmegaConfBaseException as exc:
        full_key = str(exc.full_key) if getattr(exc, "full_key", None) else ""
        if root and full_key and not full_key.startswith((root + ".", root + "[")):
            key = f"{root}{full_key}" if full_key.startswith("[") else f"{root}.{full_key}"
        else:
            key = full_key or root or fallback
        raise _from_omegaconf(exc, key) from None


def _from_omegaconf(exc: Exception, key: str) -> _Problem:
    """One-line problem for an OmegaConf exception about display key `key`."""
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, oc_errors.MissingMandatoryValue):
        expected = _describe(_type_at(key)) if _type_at(key) is not None else "a value"
        return _Problem(key, f"config key '{key}': expected {expected}, got nothing (required)")
    if isinstance(exc, oc_errors.InterpolationResolutionError):
        return _Problem(key, f"config key '{key}': cannot resolve interpolation: {first_line}")
    if isinstance(exc, oc_errors.ConfigKeyError | oc_errors.ConfigAttributeError):
        segments = _split_key(key)
        parent = _display(segments[:-1])
        cls, _ = _unwrap_optional(_type_at(parent) if parent else RunConfig)
        if _is_section(cls):
            return _unknown_key(parent, segments[-1], cls)
    if isinstance(exc, oc_errors.ValidationError) and _type_at(key) is not None:
        return _wrong_type(key, getattr(exc, "value", None))
    return _Problem(key, f"config key '{key}': {first_line}")


def _build(path: str | Path | None, overrides: Sequence[str], sources: _Sources) -> DictConfig:
    """The schema, then the file, then each override, merged as an OmegaConf config."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        text = _read_text(path)
        raw = _parse_yaml(text, str(path))
        # the text already parsed, so composing it cannot fail: one node tree for both
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = _written_text_in_str_slots(raw, node, "")
        sources.lines = _key_lines(node)
        with _prefixed(sources.file_prefix):
            _check_shape(raw, RunConfig, "")
            _merge_file(cfg, raw)
    for text in overrides:
        with _prefixed(f"override '{text}': "):
            key = _apply_override(cfg, text)
        sources.overrides.append((key, text, _merged_keys(key, _parse_override(text)[1])))
    return cfg


def _written_text_in_str_slots(value: Any, node: yaml.Node | None, key: str) -> Any:
    """`value` (loaded from the YAML composed as `node`, at display key `key`) with each plain
    scalar that YAML read as a number or boolean, where the schema wants a str (a label, a
    name, a tag), put back as written: `labels: [01, 02]` became ['1', '2'] (a data file's '01' was then "not
    one of the task's labels"), `1e3` '1000.0', `true` 'True'; an override kept the text."""
    def walk(node: yaml.Node, loaded: Any, at: str) -> Any:
        if isinstance(node, yaml.MappingNode) and isinstance(loaded, dict):
            for key_node, child in node.value:
                if isinstance(key_node.value, str) and key_node.value in loaded:
                    name = key_node.value
                    loaded[name] = walk(child, loaded[name], _join(at, name))
        elif isinstance(node, yaml.SequenceNode) and isinstance(loaded, list):
            for index, child in enumerate(node.value[:len(loaded)]):
                loaded[index] = walk(child, loaded[index], _join(at, index))
        elif isinstance(node, yaml.ScalarNode) and node.style is None and \
                isinstance(loaded, (bool, int, float)) and \
                _unwrap_optional(_type_at(at))[0] is str:
            return node.value
        return loaded

    return value if node is None else walk(node, value, key)


def _is_under(key: str, parent: str) -> bool:
    """`key` is `parent` or lies under it."""
    return key == parent or key.startswith((parent + ".", parent + "["))


def _merged_keys(key: str, value: Any) -> set[str] | None:
    """The keys a mapping override (`train={seed: 1}`) merges in: the others under `key`
    keep where they were set. None for any other value, which replaces all under `key`."""
    if not isinstance(value, dict):
        return None
    merged: set[str] = set()

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for name, child in node.items():
                walk(_join(prefix, str(name)), child)
        else:
            merged.add(prefix)

    walk(key, value)
    return merged


def _read_text(path: str | Path) -> str:
    """The config file's text; errors name the file."""
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise _Problem("", f"{path}: config file not found{where}")
    if os.path.isdir(path):
        raise _Problem("", f"{path}: expected a YAML config file, got a directory")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise _Problem("", f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _Problem("", f"{path}: cannot read config file: {exc.strerror}") from None


def _key_lines(root: yaml.Node | None) -> dict[str, int]:
    """Display key ('train.lr', 'tasks[0].train') -> 1-based line where the file writes it
    (`root`: the file's composed YAML)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, key: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                child = _join(key, str(key_node.value))
                lines.setdefault(child, key_node.start_mark.line + 1)
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = _join(key, index)
                lines.setdefault(child, item.start_mark.line + 1)
                walk(item, child)

    if root is not None:
        walk(root, "")
    return lines


def _yaml12_loader() -> type:
    """OmegaConf's YAML loader, with booleans as YAML 1.2 has them: true/false only. YAML
    1.1 also reads yes/no/on/off as booleans, so `labels: [yes, no]` became 'True'/'False'
    and `name: on` a task named 'True'; a boolean key still takes yes/no (OmegaConf
    converts the string)."""
    try:
        from omegaconf._yaml import get_yaml_loader  # omegaconf 2.4
    except ImportError:  # omegaconf 2.3
        from omegaconf._utils import get_yaml_loader

    class Loader(get_yaml_loader()):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in Loader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return Loader


_YAML12 = _yaml12_loader()


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAML12)  # noqa: S506 (OmegaConf's safe loader)


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    """Parse YAML text with OmegaConf's loader; errors name `where` and the line."""
    try:
        data = _load_yaml(text)
        loaded = OmegaConf.create({} if data is None else data) \
            if isinstance(data, (dict, list, type(None))) else None  # a bare scalar
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        raise _Problem("", f"{at}: invalid YAML: {exc.problem or exc.context}") from None
    except oc_errors.OmegaConfBaseException as exc:  # a null key, a broken '${'
        # the text already parsed, so composing it cannot fail
        found = _refused_by_omegaconf(yaml.compose(text, Loader=yaml.SafeLoader), "")
        if found is None:
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _Problem("", f"{where}: {problem}") from None
        key, line, problem = found
        raise _Problem(key, f"{where}:{line}: config key '{key}': {problem}") from None
    except (yaml.YAMLError, OSError):
        loaded = None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, ListConfig) else "a scalar"
        raise _Problem(
            "", f"{where}: expected a mapping of config sections at top level, got {kind}"
        )
    return typing.cast(dict[str, Any], OmegaConf.to_container(loaded, resolve=False))


def _refused_by_omegaconf(node: yaml.Node | None, key: str) -> tuple[str, int, str] | None:
    """(display key, 1-based line, problem) of the first thing OmegaConf cannot hold in the
    composed YAML `node` at display key `key`: a null key (`~: 42`), or a string that opens
    an interpolation and is no valid one (`"${x"`); None when neither is there."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            child = _join(key, str(key_node.value))
            if key_node.tag == "tag:yaml.org,2002:null":
                return child, key_node.start_mark.line + 1, "expected a key name, got null"
            found = _refused_by_omegaconf(value, child)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found = _refused_by_omegaconf(item, _join(key, index))
            if found is not None:
                return found
    elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str" \
            and "${" in node.value:
        try:
            OmegaConf.create({"value": node.value})
        except oc_errors.GrammarParseError as exc:
            return key, node.start_mark.line + 1, (
                f"invalid interpolation in {_show(node.value)}: {str(exc).splitlines()[0]} "
                "(write \\${ for a literal '${')")
    return None


def _merge_file(cfg: DictConfig, raw: dict[str, Any]) -> None:
    """Merge the file's sections into `cfg` in place; tasks one by one (for exact keys)."""
    sections = {name: value for name, value in raw.items() if name != "tasks"}
    with _translated("", ""):
        cfg.merge_with(sections)
    if "tasks" in raw:
        cfg.tasks = [_task_node(item, index) for index, item in enumerate(raw["tasks"])]


def _task_node(item: dict[str, Any], index: int, base: DictConfig | None = None) -> DictConfig:
    """One task merged onto the TaskConfig schema (or onto `base`, an existing task)."""
    node = OmegaConf.structured(TaskConfig) if base is None else base
    with _translated(f"tasks[{index}]", f"tasks[{index}]"):
        return typing.cast(DictConfig, OmegaConf.merge(node, item))


def _parse_override(text: str) -> tuple[str, Any]:
    """Split 'key=value' and parse the value as YAML (OmegaConf's dotlist rules)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _Problem("", "expected key=value (e.g. train.lr=2e-5)")
    try:
        parsed = OmegaConf.create({"value": _load_yaml(raw)})
    except (yaml.YAMLError, oc_errors.OmegaConfBaseException) as exc:
        # OmegaConf refused YAML that parsed (a null key, a broken '${'): composing it cannot fail
        found = None if isinstance(exc, yaml.YAMLError) else _refused_by_omegaconf(
            yaml.compose(raw, Loader=yaml.SafeLoader), _display(_split_key(key)))
        if found is not None:
            raise _Problem(found[0], f"config key '{found[0]}': {found[2]}") from None
        problem = str(exc).splitlines()[0]
        raise _Problem(key, f"cannot parse value {raw!r} as YAML: {problem}") from None
    container = typing.cast(dict[str, Any], OmegaConf.to_container(parsed, resolve=False))
    return key, container["value"]


def _apply_override(cfg: DictConfig, text: str) -> str:
    """Apply one 'key=value' override to `cfg`; returns its display key."""
    key, value = _parse_override(text)
    segments = _override_segments(cfg, key)
    display = _display(segments)
    raw = text.partition("=")[2].strip()
    # A string key takes `no`, `off`, `1e3` literally, and `demo:` (YAML: a one-key mapping).
    if _unwrap_optional(_type_at(display))[0] is str and (
            isinstance(value, (bool, int, float)) or (isinstance(value, dict) and
                                                      raw.endswith(":"))):
        value = raw
    elif isinstance(value, (list, dict)):  # ...and so do the str slots inside a list or mapping
        # the text already parsed (_parse_override), so composing it cannot fail
        value = _written_text_in_str_slots(value, yaml.compose(raw, Loader=yaml.SafeLoader),
                                           display)
    _check_shape(value, _type_at(display), display)
    if segments == ["tasks"]:
        cfg.tasks = [_task_node(item, index) for index, item in enumerate(value)]
    elif len(segments) == 2 and segments[0] == "tasks":
        index = typing.cast(int, segments[1])
        cfg.tasks[index] = _task_node(value, index, base=cfg.tasks[index])
    else:
        dotted = ".".join(str(segment) for segment in segments)
        with _translated("", display):
            OmegaConf.update(cfg, dotted, value, merge=True)
    return display


def _override_segments(cfg: DictConfig, key: str) -> list[str | int]:
    """Walk an override key through the schema; tasks may be named by index or by name."""
    segments: list[str | int] = []
    tp: Any = RunConfig
    node: Any = cfg
    for token in re.sub(r"\[(\d+)\]", r".\1", key).split("."):
        tp, _ = _unwrap_optional(tp)
        parent = _display(segments)
        if _is_section(tp):
            if token not in _fields(tp):
                raise _unknown_key(parent, token, tp)
            segment: str | int = token
            tp = _fields(tp)[token]
        elif _is_list(tp):
            segment = _list_index(node, token, parent)
            tp = typing.get_args(tp)[0]
        else:
            child = _join(parent, token)
            raise _Problem(child, f"config key '{child}' is unknown; '{parent}' has no sub-keys")
        segments.append(segment)
        inner, _ = _unwrap_optional(tp)
        container = _is_section(inner) or _is_list(inner)
        node = node[segment] if container and node is not None else None
    return segments


def _list_index(node: Any, token: str, parent: str) -> int:
    """Index into an existing list: a number, or a task's name under 'tasks'."""
    items = [] if node is None else list(node)
    if token.isdigit():
        index = int(token)
    elif parent == "tasks":
        names = [_node_name(item) for item in items]
        if token not in names:
            close = difflib.get_close_matches(token, [n for n in names if n], n=1)
            hint = f"did you mean 'tasks.{close[0]}'?" if close else f"tasks are: {names}"
            raise _Problem(parent, f"config key 'tasks.{token}' names no task; {hint}")
        index = names.index(token)
    else:
        key = _join(parent, token)
        raise _Problem(key, f"config key '{key}' is unknown; expected a list index")
    if index >= len(items):
        key = _join(parent, index)
        raise _Problem(
            key, f"config key '{key}' is out of range: '{parent}' has {len(items)} items"
        )
    return index


def _node_name(item: Any) -> str:
    """The `name` of a task node, or '' while it is still missing."""
    return "" if OmegaConf.is_missing(item, "name") else str(item.name)


def _to_object(cfg: DictConfig, sources: _Sources) -> RunConfig:
    """Resolve interpolations and convert to plain dataclasses."""
    try:
        with _translated("", ""):
            return typing.cast(RunConfig, OmegaConf.to_object(cfg))
    except _Problem as problem:
        raise sources.error(problem) from None


# ---------------------------------------------------------------------------------------------
# Paths


def _resolve_paths(run: RunConfig, sources: _Sources) -> None:
    """Make relative task and model paths absolute against the config file's directory
    (overrides and file-less configs: the CWD); 'demo:' values are left alone."""
    for index, task in enumerate(run.tasks):
        for name in _TASK_PATH_FIELDS:
            key = f"tasks[{index}].{name}"
            setattr(task, name, _resolve(getattr(task, name), sources.base_dir(key)))
        task.extra_train = [
            _resolve(item, sources.base_dir(f"tasks[{index}].extra_train[{j}]"))
            for j, item in enumerate(task.extra_train)
        ]
    for name in ("pretrained", "tokenizer"):
        value = getattr(run.model, name)
        setattr(run.model, name, _resolve(value, sources.base_dir(f"model.{name}")))
    run.train.deepspeed_config = _resolve(run.train.deepspeed_config,
                                          sources.base_dir("train.deepspeed_config"))
    # Output and cache dirs stay relative to the CWD, as documented, but take `~` like the
    # others: `~/x` made a directory named '~' in the CWD.
    run.train.output_dir = os.path.expanduser(run.train.output_dir)
    if run.data.cache_dir:
        run.data.cache_dir = os.path.expanduser(run.data.cache_dir)


def _adopt_deepspeed_stage(run: RunConfig, sources: _Sources) -> None:
    """`train.deepspeed_config` with ZeRO off (`train.zero_stage` 0, the default) was ignored:
    plain DDP, a full model copy per rank. The JSON's stage is the run's."""
    path = run.train.deepspeed_config
    if not path or run.train.zero_stage != 0 or not os.path.isfile(path):
        return  # a missing file is named by the file check
    try:
        run.train.zero_stage = deepspeed_json_stage(path)
    except ConfigError as err:
        raise sources.error(_Problem("train.deepspeed_config", str(err))) from None


def read_deepspeed_json(path: str) -> Any:
    """The parsed DeepSpeed JSON; a one-line ConfigError when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"train.deepspeed_config: cannot read {path}: {err}") from None


def deepspeed_json_stage(path: str) -> int:
    """The ZeRO stage a DeepSpeed JSON asks for: its zero_optimization.stage (1, 2 or 3), or 2
    when it leaves it "auto", as `accelerate launch --deepspeed_config_file` does; a stage 0
    (or another value) is a one-line ConfigError."""
    ds = read_deepspeed_json(path)
    zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
    stage = zero.get("stage", "auto") if isinstance(zero, dict) else "auto"
    if stage in (None, "auto"):
        return 2
    if stage in (1, 2, 3) and not isinstance(stage, bool):
        return int(stage)
    raise ConfigError(f"config key 'train.deepspeed_config': {path} states "
                      f"zero_optimization.stage {_show(stage)}: expected 1, 2, 3 or \"auto\" "
                      "(without ZeRO, drop train.deepspeed_config)")


def _resolve(value: Any, base: str) -> Any:
    """An absolute, normalised path (`~` expanded); None, '' and 'demo:...' unchanged."""
    if not value or str(value).startswith(DEMO_PREFIX):
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _check_files(run: RunConfig, sources: _Sources) -> None:
    """Every non-demo task file and model path must exist."""
    for index, task in enumerate(run.tasks):
        for name in _TASK_PATH_FIELDS:
            _check_path(getattr(task, name), f"tasks[{index}].{name}", "file", sources)
        for j, item in enumerate(task.extra_train):
            _check_path(item, f"tasks[{index}].extra_train[{j}]", "file", sources)
    _check_path(run.model.pretrained, "model.pretrained", "directory", sources)
    _check_path(run.model.tokenizer, "model.tokenizer", "any", sources)
    _check_path(run.train.deepspeed_config, "train.deepspeed_config", "file", sources)
    _check_pretrained_positions(run, sources)


# RoBERTa-style embeddings start positions after the padding index: 514 entries, 512 usable.
# (model.position_offset reads the same fact from a built encoder; a test keeps them agreed)
_PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet",
                         "longformer", "data2vec-text", "roberta-prelayernorm", "luke", "ibert",
                         "markuplm"}


def _check_pretrained_positions(run: RunConfig, sources: _Sources) -> None:
    """data.max_length must fit the pretrained model's position embeddings: longer inputs
    pass the tokenizer and crash in the embedding at the first long batch."""
    if run.model.pretrained is None or run.model.pretrained.startswith(DEMO_PREFIX):
        return
    config_json = os.path.join(run.model.pretrained, "config.json")
    try:
        with open(config_json, encoding="utf-8") as f:
            model_config = json.load(f)
        positions = int(model_config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no position table to check against (from_pretrained names any problem)
    if model_config.get("model_type") in _PADDING_OFFSET_TYPES:
        pad = model_config.get("pad_token_id")
        positions -= (1 if pad is None else int(pad)) + 1
    if run.data.max_length > positions:
        raise sources.error(_Problem(
            "data.max_length", f"config key 'data.max_length': expected <= {positions} (the "
            f"positions of model.pretrained, {config_json}), got {run.data.max_length}"))


def _check_path(value: str | None, key: str, kind: str, sources: _Sources) -> None:
    """`value` exists and is a file / a directory (kind 'file' / 'directory' / 'any'); a
    built-in `demo:` name is one that exists (a typo named no key or line, at read time)."""
    if value is not None and value.startswith(DEMO_PREFIX):
        message = _demo_name_problem(value, key)
        if message:
            raise sources.error(_Problem(key, f"config key '{key}': {message}"))
        return
    if value is None:
        return
    path = os.path.abspath(value)
    if not os.path.exists(path):
        message = _missing_path_message(path, key, kind)
        if key == "model.pretrained" and not os.path.islink(path):  # a Trainer user's habit
            message += (" (model hub names such as bert-base-uncased are never downloaded: give "
                        "a local from_pretrained directory, e.g. one that `huggingface-cli "
                        "download NAME --local-dir DIR` wrote)")
    elif kind == "file" and not os.path.isfile(path):
        message = f"{key}: expected a file, got {_kind_of(path)}: {path}"
    elif kind == "directory" and not os.path.isdir(path):
        message = f"{key}: expected a directory (for from_pretrained), got {_kind_of(path)}: {path}"
    elif key.startswith("tasks") and os.path.getsize(path) == 0:  # as training would refuse it
        message = f"{key}: file is empty: {path}"
    elif key == "model.pretrained" and not os.path.isfile(os.path.join(path, "config.json")):
        message = f"{key}: {path} has no config.json (expected a from_pretrained model dir)"
    elif key == "model.pretrained" and (problem := pretrained_weights_problem(path)):
        message = f"{key}: cannot load an encoder from {path}: {problem}"
    else:
        return
    raise sources.error(_Problem(key, message))


def _kind_of(path: str) -> str:
    """'a directory', 'a file', or what else `path` is (a FIFO would block the read)."""
    if os.path.isdir(path):
        return "a directory"
    return "a file" if os.path.isfile(path) else "a FIFO, socket or device (not a regular file)"


def _missing_path_message(path: str, key: str, kind: str) -> str:
    """Not found, or a symbolic link that leads nowhere (dangling, or a loop)."""
    noun = "directory" if kind == "directory" else "file"
    if not os.path.islink(path):
        return f"{key}: {noun} not found: {path}"
    try:
        os.stat(path)
        why = "its target cannot be reached"
    except OSError as e:
        why = "a loop of links" if e.errno == errno.ELOOP else \
            f"its target {os.path.realpath(path)} {'does not exist' if e.errno == errno.ENOENT else e.strerror}"
    return f"{key}: {path} is a symbolic link that leads to no {noun} ({why})"


def pretrained_weights_problem(directory: str) -> str | None:
    """What makes a safetensors weight file of the from_pretrained dir `directory` unloadable
    (cut short by a copy: training's traceback came after tokenizing), read from each file's
    header alone; None when every one is whole."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(directory)):
        if name.startswith("model") and name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            try:
                with safe_open(path, framework="numpy"):
                    pass
            except (SafetensorError, OSError) as exc:
                return f"{path}: {exc}"
    return None


def _demo_name_problem(value: str, key: str) -> str | None:
    """What is wrong with a `demo:` value of a task file or the tokenizer, if anything."""
    if key == "model.tokenizer":  # `demo:xyz` quietly meant `demo:`
        return None if value == DEMO_PREFIX else f"expected 'demo:' (the built-in tokenizer), got {value!r}"
    if key == "model.pretrained":  # it went to the hub's repo-id rules
        return (f"the built-in demo has no pretrained model, got {value!r} (random init: "
                "model.pretrained null, model.arch, model.tokenizer 'demo:')")
    if not key.startswith("tasks"):
        return None
    from mtl_dist.demo_data import parse_demo_path

    try:
        parse_demo_path(value)
    except ValueError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# Validation of values


_Check = Callable[[Any], bool]


def _gt(bound: float) -> tuple[_Check, str]:
    return (lambda v: v > bound), f"> {bound}"


def _ge(bound: float) -> tuple[_Check, str]:
    return (lambda v: v >= bound), f">= {bound}"


def _within(low: float, high: float) -> tuple[_Check, str]:
    """Bounded above too: far beyond any real use, a value overflowed or hung later
    (a timedelta, numpy's int64 widths, an epoch loop), past every check."""
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


def _one_of(*choices: Any) -> tuple[_Check, str]:
    return (lambda v: v in choices), "one of " + ", ".join(str(c) for c in choices)


def _unit(low_open: bool, high_open: bool) -> tuple[_Check, str]:
    def check(v: Any) -> bool:
        return (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)

    return check, f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"


def _or_null(rule: tuple[_Check, str]) -> tuple[_Check, str]:
    check, expected = rule
    return (lambda v: v is None or check(v)), f"{expected} or null"


def _non_empty() -> tuple[_Check, str]:
    return (lambda v: bool(v)), "a non-empty string"


_RULES: dict[str, tuple[_Check, str]] = {
    "model.head": _one_of("attention", "cls"),
    "model.dropout": _unit(False, True),
    "model.arch.model_type": _non_empty(),
    "model.arch.hidden_size": _ge(1),
    "model.arch.num_hidden_layers": _ge(1),
    "model.arch.num_attention_heads": _ge(1),
    "model.arch.intermediate_size": _ge(1),
    "model.arch.max_position_embeddings": _ge(8),
    "model.arch.hidden_dropout_prob": _unit(False, True),
    "model.arch.attention_probs_dropout_prob": _unit(False, True),
    "data.max_length": _ge(8),
    "data.pad_to_multiple_of": _or_null(_within(1, 65536)),
    "data.pack_multiple": _ge(8),
    "data.on_bad_row": _one_of("error", "skip"),
    "data.num_workers": _within(0, 256),
    "data.tokenize_batch_size": _ge(1),
    "sampler.strategy": _one_of("proportional", "uniform", "temperature", "round_robin"),
    "sampler.temperature": _gt(0),
    "sampler.mega_batch_mult": _ge(1),
    "sampler.on_global_batch_change": _one_of("error", "replan"),
    "train.output_dir": _non_empty(),
    "train.seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    "train.per_device_batch_size": _ge(1),
    "train.eval_batch_size": _or_null(_ge(1)),
    "train.gradient_accumulation_steps": _ge(1),
    "train.lr": _gt(0),
    "train.head_lr": _or_null(_gt(0)),
    "train.weight_decay": _ge(0),
    "train.adam_beta1": _unit(False, True),
    "train.adam_beta2": _unit(False, True),
    "train.adam_eps": _gt(0),
    "train.warmup_ratio": _unit(False, False),
    "train.warmup_steps": _or_null(_ge(0)),
    "train.lr_scheduler": _one_of("linear", "cosine", "constant_with_warmup"),
    "train.max_grad_norm": _or_null(_gt(0)),
    "train.num_epochs": _within(1, 1_000_000),
    "train.max_steps": _or_null(_ge(1)),
    "train.mixed_precision": _one_of("no", "bf16", "fp16"),
    "train.ema_decay": _or_null(_unit(True, True)),
    "train.eval_steps": _or_null(_ge(1)),
    "train.metric_for_best": _one_of("score", "loss"),
    "train.early_stopping_patience": _or_null(_ge(1)),
    "train.log_steps": _ge(1),
    "train.device": _one_of("auto", "cpu", "cuda"),
    "train.collective_timeout_s": _within(1, 7 * 24 * 3600),
    "train.zero_stage": _one_of(0, 1, 2, 3),
    "train.compile_tuning": _one_of(*COMPILE_TUNING),
    "train.attention_kernel": _one_of(*ATTENTION_KERNELS),
    "train.stop_after_steps": _or_null(_ge(1)),
    "train.preemption_check_steps": _ge(1),
    "train.preemption_signals": ((lambda v: all(x in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
                                                for x in v)),
                                 "a list of SIGUSR1, SIGUSR2, SIGTERM, SIGINT"),
    "checkpoint.save_steps": _or_null(_ge(1)),
    "checkpoint.save_total_limit": _or_null(_ge(1)),
}

_TASK_RULES: dict[str, tuple[_Check, str]] = {
    "name": (
        # file names: the token cache, predictions/<task>.jsonl (255 bytes at most)
        (lambda v: bool(_TASK_NAME_RE.fullmatch(v)) and len(v.encode()) <= 128),
        "a name of at most 128 bytes without spaces, '/', '.', '=' or brackets",
    ),
    "format": _one_of("auto", "tsv", "csv", "jsonl"),
    "metric": _one_of("accuracy", "macro_f1"),
    "score_weight": _ge(0),
    "sample_weight": _gt(0),
    "max_samples": _or_null(_ge(1)),
    "dev": ((lambda v: v is None or bool(v)), "a path or null"),
    "test": ((lambda v: v is None or bool(v)), "a path or null"),
}


def _validate(run: RunConfig, sources: _Sources) -> None:
    """Ranges, choices and cross-field rules; the first problem is raised."""
    if run.train.mixed_precision in ("false", "False"):  # `mixed_precision: false`, as written
        run.train.mixed_precision = "no"
    try:
        for key, (check, expected) in _RULES.items():
            _require(check, _get(run, key), key, expected)
        _validate_model_shape(run)
        _validate_tasks(run.tasks)
        _validate_tracking(run.tracking)
        _validate_combinations(run.train)
        _validate_packing(run.data, run.train)
        _validate_attention_kernel(run)
        _validate_evaluation(run)
    except _Problem as problem:
        raise sources.error(problem) from None


def _validate_evaluation(run: RunConfig) -> None:
    """Evaluation keys without a dev file: no evaluation would ever run, so say so. With dev
    files, one of their tasks must count in the run score (a weighted mean over them)."""
    evaluated = [t for t in run.tasks if t.dev]
    if evaluated and not any(t.score_weight > 0 for t in evaluated):
        key = f"tasks[{run.tasks.index(evaluated[-1])}].score_weight"  # set: 1.0 is the default
        raise _Problem(key, f"config key '{key}': expected a task with a dev file and "
                            "score_weight > 0 (the run score is a weighted mean over the "
                            "evaluated tasks), got dev files only for "
                            f"{', '.join(t.name for t in evaluated)} (score_weight 0)")
    if evaluated:
        return
    for key in ("train.eval_steps", "train.early_stopping_patience"):
        if _get(run, key):
            raise _Problem(key, f"config key '{key}': expected null when no task has a dev "
                                f"file (no evaluation would ever run), got {_get(run, key)}")


def _get(run: RunConfig, key: str) -> Any:
    value: Any = run
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _require(check: _Check, value: Any, key: str, expected: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # inf passes every bound
        raise _Problem(key, f"config key '{key}': expected a finite number "
                            f"({expected}), got {_show(value)}")
    if not check(value):
        raise _Problem(key, f"config key '{key}': expected {expected}, got {_show(value)}")


def _validate_model_shape(run: RunConfig) -> None:
    """Random-init encoder: heads divide the width; positions cover data.max_length."""
    arch = run.model.arch
    if run.model.pretrained is not None:
        return
    heads = arch.num_attention_heads
    _require(
        lambda v: v % heads == 0,
        arch.hidden_size,
        "model.arch.hidden_size",
        f"a multiple of model.arch.num_attention_heads ({heads})",
    )
    limit = arch.max_position_embeddings
    _require(
        lambda v: v <= limit,
        run.data.max_length,
        "data.max_length",
        f"<= model.arch.max_position_embeddings ({limit})",
    )


def _validate_tasks(tasks: list[TaskConfig]) -> None:
    """At least one task; each task valid; names unique; some task counts in the score."""
    if not tasks:
        raise _Problem("tasks", "config key 'tasks': expected at least one task, got none")
    seen: dict[str, int] = {}
    for index, task in enumerate(tasks):
        _validate_task(task, f"tasks[{index}]")
        if task.name in seen:
            key = f"tasks[{index}].name"
            raise _Problem(
                key,
                f"config key '{key}': duplicate task name {task.name!r} "
                f"(already used by tasks[{seen[task.name]}])",
            )
        seen[task.name] = index
    if not any(task.score_weight > 0 for task in tasks):
        # named by the last one, which was set (1.0 is the default): its line or override
        key = f"tasks[{len(tasks) - 1}].score_weight"
        raise _Problem(key, f"config key '{key}': expected at least one task with "
                            "score_weight > 0, got 0 for every task")


def _validate_task(task: TaskConfig, prefix: str) -> None:
    """One task's fields: choices, ranges, a train file, labels."""
    for name, (check, expected) in _TASK_RULES.items():
        _require(check, getattr(task, name), f"{prefix}.{name}", expected)
    if not task.train:
        key = f"{prefix}.train"
        raise _Problem(
            key,
            f"config key '{key}': task {task.name!r} has no train file; "
            f"expected a path or 'demo:<task>/train', got {_show(task.train)}",
        )
    for j, item in enumerate(task.extra_train):
        _require(bool, item, f"{prefix}.extra_train[{j}]", "a path")
    if task.labels is not None:
        _validate_labels(task.labels, f"{prefix}.labels")


def _validate_labels(labels: list[str], key: str) -> None:
    """An explicit label list has 2 or more labels and no repeats."""
    if not labels:
        raise _Problem(
            key, f"config key '{key}': expected a non-empty list of labels or null, got []"
        )
    if len(labels) == 1:
        raise _Problem(key, f"config key '{key}': expected 2 or more labels (a classifier over "
                            f"one label always predicts it), got {_show(labels)}")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise _Problem(key, f"config key '{key}': duplicate label {label!r}")
        seen.add(label)


# Options of the compiled layers (train.compile): their defaults and what they do, for the
# one-line error when one is changed without compiled layers.
COMPILED_LAYER_OPTIONS = (
    ("compile_tuning", "none", "it tunes the compiled layers"),
    ("compile_mix_order_reduction", True, "it picks the compiled layers' kernels"),
    ("compile_pdl", False, "it picks how the compiled layers' kernels are launched"),
)


def _validate_combinations(train: TrainConfig) -> None:
    """Settings that contradict each other on any machine (the trainer would only notice on a
    GPU, after loading data and building the model, or silently ignore one on a CPU)."""
    if train.fused_clipping and (train.zero_stage or train.mixed_precision == "fp16"
                                 or not train.fused_optimizer):
        why = "DeepSpeed clips in its engine" if train.zero_stage else \
            "fp16's grad scaler owns the fused optimizer's grad_scale" \
            if train.mixed_precision == "fp16" else "it needs train.fused_optimizer=true"
        raise _Problem(
            "train.fused_clipping",
            f"config key 'train.fused_clipping': expected false with train.zero_stage="
            f"{train.zero_stage}, train.mixed_precision={train.mixed_precision}, "
            f"train.fused_optimizer={str(train.fused_optimizer).lower()} ({why}), got true",
        )
    if train.triton_clip_norm and not (train.fused_clipping and train.flat_masters):
        raise _Problem(
            "train.triton_clip_norm",
            f"config key 'train.triton_clip_norm': expected false with train.fused_clipping="
            f"{str(train.fused_clipping).lower()}, train.flat_masters="
            f"{str(train.flat_masters).lower()} (it reads the flat buffers for the fused "
            "clipping's norm), got true",
        )
    for key, default, why in COMPILED_LAYER_OPTIONS:
        value = getattr(train, key)
        if value != default and not train.compile:
            raise _Problem(
                f"train.{key}",
                f"config key 'train.{key}': expected {_show(default)} with "
                f"train.compile=false ({why}), got {_show(value)}",
            )
    if train.bf16_weights and (train.mixed_precision != "bf16" or train.zero_stage):
        why = "DeepSpeed's bf16 mode keeps fp32 masters itself" if train.zero_stage else \
            "it replaces bf16 autocast"
        raise _Problem(
            "train.bf16_weights",
            f"config key 'train.bf16_weights': expected false with train.mixed_precision="
            f"{train.mixed_precision}, train.zero_stage={train.zero_stage} (it needs "
            f"mixed_precision=bf16 and no ZeRO: {why}), got true",
        )
    if train.flat_masters and not train.bf16_weights:
        raise _Problem(
            "train.flat_masters",
            "config key 'train.flat_masters': expected false with train.bf16_weights=false "
            "(it lays out the fp32 master weights that bf16_weights keeps), got true",
        )
    if train.overlap_optimizer and not train.flat_masters:
        raise _Problem(
            "train.overlap_optimizer",
            "config key 'train.overlap_optimizer': expected false with train.flat_masters=false "
            "(it splits the flat AdamW step of flat_masters by layer), got true",
        )
    if train.direct_weight_grads and not (train.flat_masters and train.cuda_graphs
                                          and train.gradient_accumulation_steps == 1):
        raise _Problem(
            "train.direct_weight_grads",
            f"config key 'train.direct_weight_grads': expected false with train.flat_masters="
            f"{str(train.flat_masters).lower()}, train.cuda_graphs="
            f"{str(train.cuda_graphs).lower()}, train.gradient_accumulation_steps="
            f"{train.gradient_accumulation_steps} (it needs flat masters, CUDA graphs and one "
            "micro-step per accumulation group), got true",
        )
    if train.cublaslt_gemms and not train.direct_weight_grads:
        raise _Problem(
            "train.cublaslt_gemms",
            "config key 'train.cublaslt_gemms': expected false with train.direct_weight_grads="
            "false (it runs the GEMMs of the Linears that direct_weight_grads routes), got true",
        )
    if train.overwrite_output_dir and train.resume:
        raise _Problem(
            "train.overwrite_output_dir",
            f"config key 'train.overwrite_output_dir': expected false with train.resume="
            f"{train.resume} (a resumed run keeps the saved one; overwriting deletes it), got true",
        )
    if train.fused_qkv and train.zero_stage == 3:
        raise _Problem(
            "train.fused_qkv",
            "config key 'train.fused_qkv': expected false with train.zero_stage=3 (ZeRO-3 "
            "gathers a Linear's weight when that Linear runs; the fused GEMM runs none of the "
            "three), got true",
        )
    if train.triton_embedding_grads and not train.gemm_embedding_grads:
        raise _Problem(
            "train.triton_embedding_grads",
            "config key 'train.triton_embedding_grads': expected false without "
            "train.gemm_embedding_grads=true (it computes the tables too large for that "
            "switch's GEMM), got true",
        )
    if train.direct_embedding_grads and not (train.gemm_embedding_grads
                                             and train.direct_weight_grads):
        raise _Problem(
            "train.direct_embedding_grads",
            f"config key 'train.direct_embedding_grads': expected false with "
            f"train.gemm_embedding_grads={str(train.gemm_embedding_grads).lower()}, "
            f"train.direct_weight_grads={str(train.direct_weight_grads).lower()} (it has the "
            "tables of gemm_embedding_grads write their gradients into the flat buffer, as "
            "direct_weight_grads does for the Linears), got true",
        )
    if train.compile_heads and train.zero_stage == 3:
        raise _Problem(
            "train.compile_heads",
            "config key 'train.compile_heads': expected false with train.zero_stage=3 (ZeRO-3 "
            "gathers each module's parameters in hooks that Dynamo cannot trace: the compiled "
            "heads break into ~40 graphs and run slower than eager), got true",
        )
    if train.gelu_epilogue and train.zero_stage == 3:
        raise _Problem(
            "train.gelu_epilogue",
            "config key 'train.gelu_epilogue': expected false with train.zero_stage=3 (ZeRO-3 "
            "gathers a Linear's weight when that Linear runs; the epilogue GEMM bypasses it), "
            "got true",
        )
    if train.cuda_graphs and train.zero_stage:
        raise _Problem(
            "train.cuda_graphs",
            f"config key 'train.cuda_graphs': expected false with train.zero_stage="
            f"{train.zero_stage} (CUDA graphs run on one GPU without DeepSpeed), got true",
        )


def _validate_packing(data: DataConfig, train: TrainConfig) -> None:
    """A packed row's pad tail is a sequence of its own: it must fit in max_length. The
    gather of packed rows for the heads exists only with packing."""
    if train.gather_unpack_backward and not data.packing:
        raise _Problem(
            "train.gather_unpack_backward",
            "config key 'train.gather_unpack_backward': expected false with data.packing=false "
            "(it changes how packed rows reach the heads), got true",
        )
    if data.packing and data.pack_multiple > data.max_length:
        raise _Problem(
            "data.pack_multiple",
            f"config key 'data.pack_multiple': expected <= data.max_length ({data.max_length}) "
            f"with data.packing=true, got {data.pack_multiple}",
        )


def _validate_attention_kernel(run: RunConfig) -> None:
    """The kernel choice is for packed rows only: padded batches go through SDPA."""
    if run.train.attention_kernel != "flash" and not run.data.packing:
        raise _Problem(
            "train.attention_kernel",
            f"config key 'train.attention_kernel': expected 'flash' with data.packing=false "
            f"(it picks the kernel of packed rows), got '{run.train.attention_kernel}'",
        )


def _validate_tracking(tracking: TrackingConfig) -> None:
    """Known backends; what a tracker would refuse at its start, after an overwrite_output_dir
    had already deleted the old run: wandb's 1-64 characters per tag. The project names
    TensorBoard's subdir of OUTPUT: a path there wrote the events outside OUTPUT."""
    _validate_backends(tracking.backends)
    for index, tag in enumerate(tracking.tags):
        _require(lambda v: 1 <= len(v) <= 64, tag, f"tracking.tags[{index}]",
                 "1 to 64 characters (wandb's limit)")
    _require(lambda v: bool(v) and not any(c in v for c in "/\\#?%:") and v not in (".", ".."),
             tracking.project, "tracking.project",
             "a non-empty name other than '.' or '..', without '/', '\\', '#', '?', '%' or ':' "
             "(it names TensorBoard's subdir of the output dir and the wandb project)")


def _validate_backends(backends: list[str]) -> None:
    """Known tracker names, each at most once."""
    check, expected = _one_of("wandb", "tensorboard")
    for index, name in enumerate(backends):
        _require(check, name, f"tracking.backends[{index}]", expected)
        if name in backends[:index]:
            key = f"tracking.backends[{index}]"
            raise _Problem(key, f"config key '{key}': duplicate backend {name!r}")
