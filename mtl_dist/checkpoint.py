"""Committed checkpoints: save / commit / rotate / best / resume / inspect / convert.

The only module that writes files into OUTPUT. A checkpoint exists only once committed:
every rank writes into a temporary sibling directory, rank 0 checks the file list, writes
`manifest.json` (size + sha256 of every file) and `COMMITTED` last, fsyncs and renames the
directory atomically. Readers ignore anything else. Works with and without torch.distributed.

With `async_save=True` (and no DeepSpeed engine) a periodic save blocks only to snapshot the
state to (pinned) CPU memory; one background thread per process writes the files and, on rank
0, commits them with the same protocol (the ranks meet through marker files, not collectives).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from mtl_dist.errors import CheckpointError, MtlDistWarning
from mtl_dist.rng import capture_rng_state, derived_seed, restore_rng_state, rng_summary, seed_all

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ABANDONED_DIR = "abandoned"  # newer checkpoints of a branch a resume left (set_aside_newer)
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
BEST_JSON = "best.json"
DS_TAG = "ds"
SLEEP_ENV = "MTL_DIST_TEST_SAVE_SLEEP"
MARKER_TIMEOUT_S = 1800.0  # async saves: how long rank 0 waits for the other ranks' markers

_PERIODIC_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-checkpoint-\d+-[0-9a-f]{8}$")
_OLD_RE = re.compile(r"^\.old-checkpoint-\d+-[0-9a-f]{8}$")
_TMP_BEST_RE = re.compile(r"^\.tmp-best-[0-9a-f]{8}$")
_OLD_BEST_RE = re.compile(r"^\.old-best-[0-9a-f]{8}$")
# best/ being deleted by `clear_run`: never recovered (as an interrupted `.old-best-*` swap is)
_CLEARED_BEST_RE = re.compile(r"^\.cleared-best-[0-9a-f]{8}$")
_ENTRY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RNG_RE = re.compile(r"^rng_state_(\d+)\.pth$")
_ABANDONED_RE = re.compile(rf"^{ABANDONED_DIR}$")  # deleted whole by overwrite_output_dir
_OLD_ABANDONED_RE = re.compile(rf"^\.old-{ABANDONED_DIR}-[0-9a-f]{{8}}$")
# Leftovers directly in OUTPUT of a crashed best/ swap, clear_run or abandoned/ deletion.
_OUTPUT_LEFTOVERS = (_TMP_BEST_RE, _OLD_BEST_RE, _CLEARED_BEST_RE, _OLD_ABANDONED_RE)
_DELETABLE = (_PERIODIC_RE, _TMP_RE, _OLD_RE, _TMP_BEST_RE, _OLD_BEST_RE, _CLEARED_BEST_RE,
              _ABANDONED_RE, _OLD_ABANDONED_RE)
_WARN_ONLY_KEYS = {"versions"}
# Manifest keys added after checkpoints were first written: what their absence means.
_NOT_CHECKED = object()  # an absent key that older checkpoints are not held to
_ABSENT_MEANS = {"bf16_weights": False, "optimizer_settings": _NOT_CHECKED,
                 "metric_for_best": _NOT_CHECKED, "max_length": _NOT_CHECKED,
                 "task_scoring": _NOT_CHECKED, "tokenizer": _NOT_CHECKED}
# Earlier forms of a saved key, in today's form: optimizer_settings.head_lr was saved as set
# (null: the same as lr) before it was saved as the effective value.
_SAVED_FORMS = {
    "optimizer_settings": lambda v: {**v, "head_lr": v.get("lr")}
    if isinstance(v, dict) and v.get("head_lr") is None else v,
}
# Keys added to a saved mapping later: compared only where the checkpoint has them.
_ADDED_LATER = {"model_shape": ("head",)}
# Why a difference in these keys cannot be taken: said after the one-line error.
_WHY_REFUSED = {
    "data_fingerprints": "that task's training files (tasks.<i>.train and extra_train) are "
    "not the ones the checkpoint trained on, so the sampler's place in the epoch would point "
    "at other rows: resume with those files, or start a new run",
    "model_shape": "the checkpoint's weights are of another model: resume with its model "
    "settings (model.*), or start a new run",
    "global_batch_size": "global batch = per_device_batch_size x world size: keep it, or set "
    "sampler.on_global_batch_change=replan to go on from the next epoch at the new batch",
    "optimizer_settings": "the restored AdamW state and LR schedule keep the checkpoint's "
    "values, so the new ones would be ignored: resume with them, or start a new run",
    "metric_for_best": "early stopping's best so far was measured by the checkpoint's "
    "metric: resume with it, or start a new run",
    "task_scoring": "early stopping's best so far and best/ were scored with the "
    "checkpoint's task metrics and weights, which a new run score could not be compared "
    "with: resume with them, or start a new run",
    "max_length": "the rest of the run would train on other truncations than its start, "
    "not continue it: resume with it, or start a new run",
    "tokenizer": "the checkpoint's weights learned another tokenizer's ids (its vocabulary, "
    "special tokens or the ids of a probe text differ): resume with the model.tokenizer / "
    "model.pretrained it was trained with (OUTPUT/tokenizer/ holds a copy), or start a new run",
}
EMA_FILE = "ema.pt"  # the trainer's app_state entry "ema": the full fp32 shadow per name
_PER_RANK_KEYS = {"distributed_type", "per_device_batch_size"}
_RESERVED = {"rng_state", "trainer_state", "manifest", "COMMITTED", "best", DS_TAG}


class Stateful(Protocol):
    """Anything with `state_dict()` / `load_state_dict()` (modules, optimizers, schedulers...)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass
class CheckpointInfo:
    """One row of `mtl-dist ckpt ls`."""

    path: Path
    kind: str  # "periodic" | "best" | "incomplete" | "abandoned" (in OUTPUT/abandoned/)
    step: int | None
    complete: bool
    size_bytes: int
    is_best: bool
    score: float | None
    damage: str | None = None  # committed, but a file is missing or has another size
    metric: str = "score"  # what `score` is: best/'s is the loss under metric_for_best=loss

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# --------------------------------------------------------------------------- distributed


def _dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a no-op single-process)."""
    if _dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order; doubles as a barrier."""
    world = _dist_info()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _raise_if_any(errors: Iterable[str | None]) -> None:
    """Raise the first non-empty error on every rank (keeps ranks from hanging apart)."""
    for err in errors:
        if err:
            raise CheckpointError(err)


def _error_text(exc: BaseException) -> str:
    """One line describing `exc` (its message, else its type)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- files


def why_not_a_directory(path: str | Path, writable: bool = True) -> str | None:
    """Why a directory cannot be at `path` (a file there, or above it) or, when `writable`,
    be written in (it, or the nearest folder above that exists, read-only), said after the
    path; None when it is one or can be made. For every output dir a command is given."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link that leads nowhere ({os.readlink(path)})"
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"cannot be created: {blocking} is a file"
    nearest = next(p for p in (path, *path.parents) if p.exists())
    if writable and not os.access(nearest, os.W_OK | os.X_OK):
        where = "" if nearest == path else f"cannot be created: {nearest} "
        return where + "is not writable (permissions or a read-only mount)"
    return None


def _pause() -> None:
    """Test hook: sleep MTL_DIST_TEST_SAVE_SLEEP seconds between save phases (kill -9 tests)."""
    value = os.environ.get(SLEEP_ENV)
    if value:
        time.sleep(float(value))


def _fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_default(value: Any) -> Any:
    """Turn numpy / 0-d tensor scalars, sets and paths into JSON values."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__module__}.{type(value).__name__} is not JSON-serialisable")


def _to_json(obj: Any, what: str, sort_keys: bool = True) -> str:
    """JSON text of `obj`; a one-line CheckpointError naming `what` if it cannot be encoded."""
    try:
        return json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot write {what} as JSON: {exc}") from exc


def _write_json(path: Path, obj: Any, what: str) -> None:
    """Write `obj` as JSON and fsync."""
    _write_bytes(path, _to_json(obj, what).encode())
    _pause()


def _torch_save(obj: Any, path: Path, hasher: _Hasher | None = None) -> None:
    """torch.save into `path` and fsync (hashing it meanwhile when given a hasher)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        if hasher is not None:
            hasher.add(path)
        os.fsync(f.fileno())
    _pause()


def _file_digest(path: Path, *, fsync: bool = True) -> dict[str, Any]:
    """Size and sha256 of a file; fsyncs it on the way (it may have been written by a library)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if fsync:
            os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": digest}


def _digests(root: Path, names: list[str], *, fsync: bool = True) -> dict[str, dict[str, Any]]:
    """`_file_digest` of many files on a few threads (hashlib releases the GIL while hashing)."""
    if len(names) <= 1:
        return {n: _file_digest(root / n, fsync=fsync) for n in names}
    workers = min(len(names), os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(lambda n: _file_digest(root / n, fsync=fsync), names)
        return dict(zip(names, found, strict=True))


class _Hasher:
    """sha256 of just-written files on background threads, overlapping their fsync."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        self._jobs: dict[str, Any] = {}

    def add(self, path: Path) -> None:
        """Start hashing a file whose content is complete."""
        rel = path.relative_to(self.root).as_posix()
        self._jobs[rel] = self._pool.submit(_file_digest, path, fsync=False)

    def results(self) -> dict[str, dict[str, Any]]:
        """Wait for every hash."""
        return {name: job.result() for name, job in self._jobs.items()}

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)


def _list_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files under `root`, largest first (manifest/marker excluded)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel not in (MANIFEST, COMMITTED):
                found.append((full.stat().st_size, rel))
    return [rel for _size, rel in sorted(found, key=lambda x: (-x[0], x[1]))]


def _dir_size(root: Path) -> int:
    """Total bytes of the files under `root` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile (a live run)
                if not p.is_symlink():
                    total += p.stat().st_size
    return total


def _fsync_tree(root: Path) -> None:
    """fsync every directory under `root` (bottom-up), so renames and new entries are durable."""
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        _fsync_path(Path(dirpath))


# --------------------------------------------------------------------------- weights_only safety

_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)
_CONTAINERS = (dict, list, tuple, set)
_TORCH_SAFE = (torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_weights_only(obj: Any, where: str) -> None:
    """Refuse state that `torch.load(weights_only=True)` could not read back (at save time)."""
    stack: list[tuple[Any, str]] = [(obj, where)]
    safe = tuple(g for g in torch.serialization.get_safe_globals() if isinstance(g, type))
    while stack:
        value, path = stack.pop()
        if type(value) in _SCALARS or isinstance(value, _TORCH_SAFE + safe):
            continue
        if type(value) in _CONTAINERS or type(value).__name__ in ("OrderedDict", "Counter"):
            if isinstance(value, dict):
                stack.extend((v, f"{path}.{k}") for k, v in value.items())
                stack.extend((k, f"{path}.<key {k!r}>") for k in value)
            else:
                stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
            continue
        raise CheckpointError(
            f"{path} is a {type(value).__module__}.{type(value).__name__}, which "
            "torch.load(weights_only=True) refuses; store a tensor or python number instead"
        )


def _safetensors_dict(state: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """CPU tensors for safetensors: shared (tied) or partial-storage tensors are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}['{key}'] is a {type(value).__name__}, expected a tensor"
            )
        t = value.detach()
        if t.device.type != "cpu":
            out[key] = t.to("cpu").contiguous()
            continue
        storage = t.untyped_storage()
        whole = (
            t.is_contiguous()
            and t.storage_offset() == 0
            and storage.nbytes() == t.numel() * t.element_size()
        )
        if storage.data_ptr() in seen or not whole or t.numel() == 0:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(storage.data_ptr())
        out[key] = t
    return out


def _new_file_mode() -> int:
    """0o666 less the umask, as open() creates a file; read from /proc rather than by
    os.umask(), which would change it for every thread (async saves) while it is read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _save_safetensors(
    state: Mapping[str, Any], path: Path, where: str, hasher: _Hasher | None = None
) -> None:
    """Write a tensor dict with safetensors and fsync it (hashing it meanwhile when given a hasher)."""
    from safetensors.torch import save_file

    save_file(_safetensors_dict(state, where), str(path), metadata={"format": "pt"})
    os.chmod(path, _new_file_mode())  # safetensors creates it 0600: others on a shared disk
    if hasher is not None:
        hasher.add(path)
    _fsync_path(path)
    _pause()


def _write_entry(tmp: Path, name: str, state: Any, hasher: _Hasher) -> None:
    """One app_state entry's file: the model as safetensors, anything else with torch.save."""
    if name == "model":
        _save_safetensors(state, tmp / MODEL_FILE, "app_state['model'].state_dict()", hasher)
    else:
        _check_weights_only(state, f"app_state['{name}'].state_dict()")
        _torch_save(state, tmp / f"{name}.pt", hasher)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU."""
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


# --------------------------------------------------------------------------- snapshots (async saves)

_IMMUTABLE = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.Size,
)


class _Snapshotter:
    """CPU copies of state trees, taken on the main thread for a background write.

    Tensors are copied storage by storage, so tensors sharing a storage (tied weights, views)
    share it in the copy too, as `torch.save` would see them. Each storage is copied into a CPU
    buffer kept for the next save (keyed by the tensor's position in the tree, reallocated when
    its size changes; a fresh allocation costs page faults on every save). For a CUDA storage
    the buffer is pinned and the copy is `non_blocking=True`; one CUDA event per device is
    recorded after the copies and the writer synchronises on it. The main thread never waits:
    later in-place updates (the optimizer step) are queued after the copies on the same
    stream. Plain containers are rebuilt, other objects deep-copied. The caller must not take
    a new snapshot while the previous one is still being read (one save in flight).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, tree: Any) -> tuple[Any, list[Any]]:
        """(copy of `tree`, CUDA events to synchronise on before reading the copy)."""
        memo: dict[tuple, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        devices: dict[str, torch.device] = {}

        def tensor(t: torch.Tensor, path: str) -> torch.Tensor:
            if (
                t.layout != torch.strided
                or t.is_quantized
                or t.is_conj()
                or t.is_neg()
                or t.device.type not in ("cpu", "cuda")
                or type(t) not in (torch.Tensor, torch.nn.Parameter)
            ):  # rare kinds: a plain blocking copy (sharing is not preserved)
                return t.detach().resolve_conj().resolve_neg().to("cpu", copy=True)
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr(), storage.nbytes())
            buf = memo.get(key) if storage.nbytes() else None
            if buf is None:
                src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
                cuda = t.device.type == "cuda"
                while path in buffers:  # two keys that print alike: never share a buffer
                    path += "'"
                buf = self._buffers.get(path)
                if buf is None or buf.numel() != src.numel() or (cuda and not buf.is_pinned()):
                    buf = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=cuda)
                buffers[path] = buf
                buf.copy_(src, non_blocking=cuda)
                if cuda:
                    devices[str(t.device)] = t.device
                memo[key] = buf
            out = torch.empty(0, dtype=t.dtype).set_(
                buf.untyped_storage(), t.storage_offset(), t.size(), t.stride()
            )
            if t.requires_grad:
                out.requires_grad_(True)
            return out

        def walk(value: Any, path: str) -> Any:
            if isinstance(value, torch.Tensor):
                return tensor(value, path)
            if type(value) in _IMMUTABLE:
                return value
            if isinstance(value, dict):
                items = [(k, walk(v, f"{path}/{k}")) for k, v in value.items()]
                if type(value) is dict:
                    return dict(items)
                new = copy.copy(value)  # OrderedDict, defaultdict, ...: keep the type
                new.clear()
                new.update(items)
                return new
            if isinstance(value, (list, tuple)):
                items = [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
                if type(value) in (list, tuple):
                    return type(value)(items)
                if hasattr(value, "_fields"):  # namedtuple
                    return type(value)(*items)
                return type(value)(items)
            return copy.deepcopy(value)

        copied = walk(tree, "")
        self._buffers = buffers  # buffers of tensors no longer present are let go
        events = []
        for device in devices.values():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return copied, events


# --------------------------------------------------------------------------- safe deletion


def _check_deletable(path: Path, output_dir: Path) -> Path:
    """Refuse symlinks, foreign names and anything not directly in OUTPUT or OUTPUT/checkpoints."""
    out = Path(output_dir).resolve()
    if not any(p.match(path.name) for p in _DELETABLE):
        raise CheckpointError(f"refusing to delete {path}: not a checkpoint directory name")
    if path.is_symlink():
        raise CheckpointError(f"refusing to delete {path}: it is a symlink")
    if path.parent.resolve() not in (out, out / CHECKPOINTS_DIR):
        raise CheckpointError(
            f"refusing to delete {path}: not directly under {out} or {out / CHECKPOINTS_DIR}"
        )
    real = path.resolve()
    if not real.is_relative_to(out) or real == out:
        raise CheckpointError(f"refusing to delete {path}: it resolves to {real}, outside {out}")
    if not real.is_dir():
        raise CheckpointError(f"refusing to delete {path}: not a directory")
    return real


def _safe_rmtree(path: Path, output_dir: Path) -> None:
    """Delete one of OUR directories (see `_check_deletable`)."""
    shutil.rmtree(_check_deletable(Path(path), output_dir))


def _retire_and_delete(path: Path, output_dir: Path) -> None:
    """Rename a checkpoint aside first (atomic), then delete it: never a half dir under a final name."""
    real = _check_deletable(Path(path), output_dir)
    aside = real.parent / f".old-{real.name}-{secrets.token_hex(4)}"
    os.rename(real, aside)
    _fsync_path(real.parent)
    _safe_rmtree(aside, output_dir)


def _clean_stale(directory: Path, patterns: Iterable[re.Pattern[str]], output_dir: Path) -> None:
    """Remove leftovers of crashed saves (only names matching our temporary patterns)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if any(p.match(entry.name) for p in patterns) and not entry.is_symlink() and entry.is_dir():
            try:
                _safe_rmtree(entry, output_dir)
            except (CheckpointError, OSError) as exc:
                warnings.warn(f"could not remove stale {entry}: {exc}", MtlDistWarning,
                              stacklevel=3)


# --------------------------------------------------------------------------- reading


def was_committed(path: Path | str) -> bool:
    """True when `path` holds a COMMITTED marker, intact or damaged since: the marker is
    written last, inside the temporary dir, before the rename into place, so a checkpoint
    with one was committed. Not something to clean up or write over (its files may be fine;
    `damage` says what is wrong); `is_committed` also checks the manifest's hash."""
    return (Path(path) / COMMITTED).is_file()


def is_committed(path: Path | str) -> bool:
    """True when `path` holds a COMMITTED marker whose manifest hash matches."""
    try:
        read_manifest(path)
    except CheckpointError:
        return False
    return True


def read_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of a committed checkpoint; CheckpointError if uncommitted or tampered."""
    path = Path(path)
    marker = path / COMMITTED
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    if not marker.is_file():
        if (path / BEST_DIR).is_dir() or (path / CHECKPOINTS_DIR).is_dir():
            raise CheckpointError(
                f"checkpoint {path}: is a run's output dir, not a checkpoint: give "
                f"{path / BEST_DIR} or {path / CHECKPOINTS_DIR}/checkpoint-<step>"
            )
        if path.name == CHECKPOINTS_DIR or any(_step_of(p) is not None for p in path.iterdir()):
            raise CheckpointError(f"checkpoint {path}: is a folder of checkpoints, not one: "
                                  f"give one of them ({path}/checkpoint-<step>)")
        if (path / MODEL_FILE).is_file() and (path / "config.json").is_file():
            raise CheckpointError(
                f"checkpoint {path}: is a model dir written by `ckpt export` (load it with "
                "from_pretrained), not a checkpoint: give the checkpoint it was exported from")
        raise CheckpointError(
            f"checkpoint {path}: not committed (no {COMMITTED} marker); it is incomplete"
        )
    try:
        mark = json.loads(marker.read_text())
        raw = (path / MANIFEST).read_bytes()
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: unreadable {COMMITTED}/{MANIFEST}: {exc}"
        ) from exc
    if not isinstance(mark, dict):
        raise CheckpointError(f"checkpoint {path}: unreadable {COMMITTED}: not a JSON object")
    if hashlib.sha256(raw).hexdigest() != mark.get("manifest_sha256"):
        raise CheckpointError(
            f"checkpoint {path}: file '{MANIFEST}' does not match its hash in {COMMITTED}"
        )
    return json.loads(raw)


def _verify_files(path: Path, manifest: Mapping[str, Any], names: Iterable[str]) -> None:
    """Check size and sha256 of `names` against the manifest; the error names the file."""
    files = manifest["files"]
    names = list(names)
    _check_sizes(path, manifest, names)
    try:
        found = _digests(path, names, fsync=False)
    except OSError as exc:  # e.g. permissions: one line naming the file, not a traceback
        raise CheckpointError(f"checkpoint {path}: unreadable file: {_error_text(exc)}") from exc
    for name in names:
        if found[name]["sha256"] != files[name]["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: file '{name}' is corrupt (sha256 differs from {MANIFEST})"
            )


def _check_sizes(path: Path, manifest: Mapping[str, Any], names: Iterable[str]) -> None:
    """Each of `names` listed, present and of its manifest size (cheap: no reading)."""
    files = manifest["files"]
    for name in names:
        entry = files.get(name)
        full = path / name
        if entry is None:
            raise CheckpointError(f"checkpoint {path}: file '{name}' is not listed in {MANIFEST}")
        if not full.is_file():
            raise CheckpointError(f"checkpoint {path}: file '{name}' is missing")
        size = full.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {path}: file '{name}' has {size} bytes, {MANIFEST} says "
                f"{entry['size']} (truncated or changed)"
            )


def training_manifest(path: Path, *, named_step: bool = True) -> dict:
    """The manifest of a checkpoint to resume from: a periodic one (best/ holds no optimizer,
    sampler or RNG state) whose step is the one its name says (`named_step=False`: checked by
    the caller, after the run's settings, whose mismatch says more)."""
    manifest = read_manifest(path)
    if manifest.get("kind") != "periodic":
        raise CheckpointError(
            f"checkpoint {path}: is a '{manifest.get('kind')}' checkpoint, not a training checkpoint"
        )
    if named_step:
        check_named_step(path, manifest)
    return manifest


def check_named_step(path: Path, manifest: Mapping[str, Any]) -> None:
    """A checkpoint-N whose manifest says another step (copied, linked or converted into place
    by hand) was taken for step N: resume=auto went back to the older step, and the next
    save at the steps in between wrote over the run's own checkpoints."""
    named = _step_of(path)
    if named is not None and manifest.get("step") != named:
        raise CheckpointError(
            f"checkpoint {path}: named step {named} but its {MANIFEST} says step "
            f"{manifest.get('step')} (copied, linked or converted into place by hand?): "
            "move it out of checkpoints/")


def damage(path: Path) -> str | None:
    """Why a committed checkpoint's files do not match its manifest (a file missing or of
    another size), or None. `ckpt ls`/`inspect`: loading also checks every sha256."""
    try:
        manifest = read_manifest(path)
        _check_sizes(path, manifest, manifest["files"])
        check_named_step(path, manifest)
    except CheckpointError as exc:
        return str(exc)
    return None


def verify(path: Path) -> str | None:
    """Why a committed checkpoint would be refused at load, reading every byte (each file's
    size and sha256 against its manifest, as a resume does), or None. `damage` checks sizes
    only: a file changed in place at the same size passes it."""
    try:
        manifest = read_manifest(path)
        check_named_step(path, manifest)
        _verify_files(path, manifest, manifest["files"])
    except CheckpointError as exc:
        return str(exc)
    return None


def _verify_collective(path: Path, manifest: Mapping[str, Any]) -> None:
    """Verify every file once, the work split over ranks; all ranks raise the same error."""
    rank, world = _dist_info()
    names = sorted(manifest["files"], key=lambda n: (-manifest["files"][n]["size"], n))
    err = None
    try:
        _verify_files(path, manifest, names[rank::world])
    except CheckpointError as exc:
        err = str(exc)
    _raise_if_any(_all_gather(err))


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True onto the CPU; errors name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"cannot load {path}: {_error_text(exc)}") from exc


def _short(value: Any, limit: int = 80) -> str:
    """Compact JSON of a value, cut to `limit` characters."""
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_difference(have: Any, want: Any, key: str) -> tuple[str, Any, Any] | None:
    """The dotted key of the first difference between two JSON values, with both sides."""
    if isinstance(have, dict) and isinstance(want, dict):
        # in this run's order (lr before the head_lr that follows it), then the saved extras
        for k in [*want, *(k for k in have if k not in want)]:
            if k not in have or k not in want:
                return f"{key}.{k}", have.get(k, "<absent>"), want.get(k, "<absent>")
            diff = _first_difference(have[k], want[k], f"{key}.{k}")
            if diff:
                return diff
        return None
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
        for i, (h, w) in enumerate(zip(have, want, strict=True)):
            diff = _first_difference(h, w, f"{key}[{i}]")
            if diff:
                return diff
        return None
    return None if have == want else (key, have, want)


def _zero_stage(manifest: Mapping[str, Any]) -> int:
    """ZeRO stage a checkpoint was written with (0 = no DeepSpeed partitions)."""
    engine = manifest.get("engine") or {}
    if engine.get("zero_stage") is not None:
        return int(engine["zero_stage"])
    return int(manifest.get("run", {}).get("zero_stage") or 0)


def check_manifest(path: Path, manifest: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Compare the trainer's expected keys with the saved ones; one-line error per difference.

    `versions` only warns; per-rank keys (distributed_type, per_device_batch_size) are skipped
    when an allowed world-size change explains them.
    """
    run = manifest.get("run", {})
    # the JSON forms, in this run's key order (lr before the head_lr that follows it)
    want_all = json.loads(_to_json(dict(expected), "expected manifest", sort_keys=False))
    resized = "world_size" in want_all and int(want_all["world_size"]) != int(
        manifest["world_size"]
    )
    if "world_size" in want_all:
        _check_world_size(path, manifest, int(want_all["world_size"]))
    for key in expected:  # in the caller's order: 'tasks' is named before its consequences
        want = want_all[key]
        if key == "world_size" or (resized and key in _PER_RANK_KEYS):
            continue
        if key in run:
            saved = run[key]
        elif key in manifest:
            saved = manifest[key]
        elif key in _ABSENT_MEANS:  # a checkpoint older than the key
            saved = _ABSENT_MEANS[key]
            if saved is _NOT_CHECKED:
                continue
        else:
            raise CheckpointError(
                f"checkpoint {path}: manifest has no key '{key}' (this run has {_short(want)})"
            )
        saved = _SAVED_FORMS.get(key, lambda v: v)(saved)
        if isinstance(saved, dict) and isinstance(want, dict):
            want = {k: v for k, v in want.items()
                    if k in saved or k not in _ADDED_LATER.get(key, ())}
        diff = _first_difference(saved, want, key)
        if diff and key in _WARN_ONLY_KEYS:
            warnings.warn(
                f"checkpoint {path}: '{diff[0]}' was {_short(diff[1])}, now {_short(diff[2])}",
                MtlDistWarning,
                stacklevel=3,
            )
        elif diff:
            k, h, w = diff
            why = f" ({_WHY_REFUSED[key]})" if key in _WHY_REFUSED else ""
            raise CheckpointError(
                f"checkpoint {path}: manifest key '{k}' differs: checkpoint has {_short(h)}, "
                f"this run has {_short(w)}{why}"
            )


def _check_world_size(path: Path, manifest: Mapping[str, Any], world: int) -> None:
    """A new world size is fine without ZeRO partitions (or after universal conversion)."""
    saved = int(manifest["world_size"])
    if saved == world:
        return
    stage = _zero_stage(manifest)
    universal = bool((manifest.get("engine") or {}).get("universal"))
    if stage > 0 and not universal:
        raise CheckpointError(
            f"checkpoint {path}: manifest key 'world_size' differs: checkpoint has {saved}, this run has {world}; "
            f"ZeRO stage {stage} partitions cannot be re-sharded in place: run "
            f"`mtl-dist ckpt convert {path} OUT` and resume from OUT"
        )
    log.info("checkpoint %s was saved by %d ranks; resuming on %d", path, saved, world)


# --------------------------------------------------------------------------- manager


def _marker_name(rank: int) -> str:
    """The file a rank > 0 leaves in the temp dir when its part of an async save is done."""
    return f".rank-{rank}.done"


def _write_marker(tmp: Path, rank: int, report: dict[str, Any]) -> None:
    """Write a rank's marker atomically (temp file + rename): rank 0 never reads half of it."""
    part = tmp / f"{_marker_name(rank)}.part"
    _write_bytes(part, json.dumps(report).encode())
    os.replace(part, tmp / _marker_name(rank))
    _fsync_path(tmp)


@dataclass(eq=False)
class _PendingSave:
    """One async save in flight: what its thread reports back to the main thread."""

    step: int
    tmp: Path
    final: Path
    blocking_s: float
    thread: threading.Thread | None = None
    local_done: threading.Event = field(default_factory=threading.Event)
    abort: threading.Event = field(default_factory=threading.Event)
    local_error: str | None = None  # this rank's own files (or its snapshot)
    outcome: str | None = None  # rank 0: the whole save, commit included
    background_s: float | None = None


def improves_on(score: float, best: float | None, greater_is_better: bool) -> bool:
    """Whether `score` is a new best against `best` (None: nothing yet). A NaN (a diverged
    evaluation) is never a best, and a NaN best is beaten by any number: taken as the best
    before, every later evaluation compared False against it, early stopping fired, and best/
    kept the diverged model for good."""
    if math.isnan(score):
        return False
    if best is None or math.isnan(best):
        return True
    return score > best if greater_is_better else score < best


_HELD_LOCKS: set[int] = set()  # output-dir lock descriptors this process holds


def in_use_message(output_dir: Path) -> str:
    return (f"train.output_dir={output_dir} is in use by another run (it holds the "
            "directory's lock): wait for it to end, or pick another train.output_dir")


def _close_held_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: it would keep the
    output dir locked for a moment after a kill -9 of the run. The parent's lock stays."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def _lock_exclusively(fd: int, tries: int = 5, pause_s: float = 0.05) -> None:
    """flock(LOCK_EX) without waiting on a holder, but past a probe's moment-long shared
    lock (in_use: `mtl-dist check`, another run's start); BlockingIOError if still held."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(pause_s)


class CheckpointManager:
    """Writes and reads every file under OUTPUT: periodic checkpoints, best/, run files."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        save_total_limit: int | None,
        greater_is_better: bool = True,
        async_save: bool = False,
        recover_best: bool = True,
    ) -> None:
        """`recover_best`: rank 0 reinstalls a best/ a crash left mid-swap, now; False leaves
        OUTPUT untouched here (a reader of another run, `check`, or a training run, which
        recovers once it holds the output dir: hold_output_dir)."""
        if save_total_limit is not None and save_total_limit < 1:
            raise CheckpointError(
                f"save_total_limit: expected >= 1 or None, got {save_total_limit}"
            )
        self.output_dir = Path(output_dir).absolute()
        self.checkpoints_dir = self.output_dir / CHECKPOINTS_DIR
        self.best_dir = self.output_dir / BEST_DIR
        self.save_total_limit = save_total_limit
        self.greater_is_better = greater_is_better
        self.resumed_from: Path | None = None
        self._newer_since_resume = True
        self._branch_step: int | None = None  # checkpoints/ newer than this leave on a resume
        self._last_saved: Path | None = None
        self.async_save = async_save
        self.marker_timeout_s = MARKER_TIMEOUT_S
        self.last_save_timing: dict[str, Any] | None = None
        self._timings: list[dict[str, Any]] = []
        self._pending: _PendingSave | None = None
        self._snapshotter = _Snapshotter()
        self._told_zero_blocks = False
        self._output_lock: int | None = None  # hold_output_dir's descriptor (rank 0)
        self._recovered = not recover_best
        if recover_best and _env_rank() == 0:
            self._recover_best()

    # ------------------------------------------------------------------ one run at a time

    def hold_output_dir(self) -> None:
        """Collective. Rank 0 takes an exclusive lock (flock) on OUTPUT itself, for as long as
        the run goes on; held by another process, every rank raises one line. The lock is the
        kernel's: a killed or preempted run lets go of it with its process (a requeue is
        never locked out), and no file is left behind. A filesystem without flock (some
        network ones) gets a warning: two runs there are not stopped."""
        rank, _ = _dist_info()
        outcome = self._take_lock() if rank == 0 and self._output_lock is None else None
        if outcome is None and rank == 0 and self._recovered:  # put off until held
            self._recovered = False
            self._recover_best()
        _raise_if_any([_broadcast(outcome)])

    def _take_lock(self) -> str | None:
        """Rank 0's half of hold_output_dir: None once held (or where flock is missing)."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.output_dir, os.O_RDONLY)
        except OSError as exc:  # unusable: one line on every rank, not a hang
            return f"train.output_dir={self.output_dir}: {_error_text(exc)}"
        try:
            _lock_exclusively(fd)
        except BlockingIOError:
            os.close(fd)
            return in_use_message(self.output_dir)
        except OSError as exc:
            os.close(fd)
            warnings.warn(f"train.output_dir={self.output_dir}: cannot lock it "
                          f"({_error_text(exc)}): a second run started on it would not be "
                          "stopped", MtlDistWarning, stacklevel=4)
            return None
        self._output_lock = fd
        _HELD_LOCKS.add(fd)
        return None

    def in_use(self) -> bool:
        """Whether another process holds OUTPUT (hold_output_dir) now. The probe takes a
        shared lock for a moment: probes never see each other, only a run's exclusive one."""
        if not self.output_dir.is_dir():
            return False
        fd = os.open(self.output_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no flock here: hold_output_dir warns
            return False
        finally:
            os.close(fd)
        return False

    def refuse_if_in_use(self) -> None:
        """Collective: raise one line on every rank if a run going on holds OUTPUT. Before a
        run's set-up (model build, data), so a second run is refused at once; its own
        exclusive lock comes at fit (hold_output_dir), where a race is settled."""
        outcome = None
        if _dist_info()[0] == 0:
            try:
                outcome = in_use_message(self.output_dir) if self.in_use() else None
            except OSError as exc:  # unreadable: one line on every rank, not a hang
                outcome = f"train.output_dir={self.output_dir}: {_error_text(exc)}"
        _raise_if_any([_broadcast(outcome)])

    def let_go_of_output_dir(self) -> None:
        """Release hold_output_dir's lock (idempotent; closing the descriptor releases it)."""
        fd, self._output_lock = self._output_lock, None
        if fd is not None:
            _HELD_LOCKS.discard(fd)
            os.close(fd)

    @property
    def saving(self) -> bool:
        """An async save is in flight (wait() finishes it)."""
        return self._pending is not None

    # ------------------------------------------------------------------ periodic save

    def save(
        self,
        step: int,
        app_state: Mapping[str, Stateful],
        trainer_state: dict,
        *,
        manifest: dict,
        engine: Any = None,
    ) -> Path:
        """Collective: write and commit `checkpoints/checkpoint-{step}`, then rotate old ones.

        With `async_save` (and no DeepSpeed engine) it returns once the state is snapshotted;
        the files are written and committed in the background (`wait()` finishes that), and
        the path it returns is committed only then.
        """
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint step: expected an int >= 0, got {step!r}")
        start = time.perf_counter()
        if self.async_save and engine is None:
            return self._save_async(step, app_state, trainer_state, manifest, start)
        if self.async_save and not self._told_zero_blocks:
            self._told_zero_blocks = True
            log.warning(
                "checkpoint.async_save: DeepSpeed saves its ZeRO partitions collectively; "
                "checkpoints of this run are written while training waits"
            )
        self.wait()
        rank, world = _dist_info()
        names = self._entry_names(app_state, engine)
        tmp = self._begin(self.checkpoints_dir, f".tmp-checkpoint-{step}", (_TMP_RE, _OLD_RE))
        err, known = None, {}
        try:
            with _Hasher(tmp) as hasher:
                self._write_rank_files(tmp, app_state, names, trainer_state, engine, rank, hasher)
                known = hasher.results()
        except Exception as exc:  # noqa: BLE001 - reported on every rank, then raised
            err = f"saving checkpoint-{step} failed on rank {rank}: {_error_text(exc)}"
        parts = _all_gather((err, known))
        self._fail_together(tmp, [e for e, _ in parts])
        files = self._hash_collective(tmp, {k: v for _e, p in parts for k, v in p.items()})
        final = self.checkpoints_dir / f"checkpoint-{step}"
        outcome = None
        if rank == 0:
            try:
                full = self._manifest(
                    "periodic", step, world, files, manifest, names=names, engine=engine
                )
                self._check_complete(full, world, names, engine is not None)
                _commit(tmp, full)
                _install(tmp, final, self.output_dir, f"checkpoint-{step}")
            except Exception as exc:  # noqa: BLE001 - reported on every rank, then raised
                outcome = f"committing checkpoint-{step} failed: {_error_text(exc)}"
        self._fail_together(tmp, [_broadcast(outcome)])
        self._note_commit(final, step)
        if rank == 0:
            self.rotate()
        blocked = time.perf_counter() - start
        self._record_timing(
            {"step": step, "async": False, "blocking_s": blocked, "background_s": 0.0}
        )
        log.info("checkpoint-%d: saved in %.3f s (training waited for all of it)", step, blocked)
        return final

    # ------------------------------------------------------------------ async periodic save

    def _save_async(
        self,
        step: int,
        app_state: Mapping[str, Stateful],
        trainer_state: dict,
        run: dict,
        start: float,
    ) -> Path:
        """Main thread: finish the previous save, make the temp dir, snapshot, start the writer."""
        self.wait()  # never two in flight; a failed previous save raises here, on every rank
        rank, world = _dist_info()
        names = self._entry_names(app_state, None)
        tmp = self._begin(self.checkpoints_dir, f".tmp-checkpoint-{step}", (_TMP_RE, _OLD_RE))
        final = self.checkpoints_dir / f"checkpoint-{step}"
        snapshot, events, error = None, [], None
        try:
            tree: dict[str, Any] = {"rng": capture_rng_state()}
            if rank == 0:  # the replicated objects are written by rank 0 only
                tree["app"] = {name: app_state[name].state_dict() for name in names}
                tree["trainer_state"] = trainer_state
                tree["run"] = run
            snapshot, events = self._snapshotter.take(tree)
        except Exception as exc:  # noqa: BLE001 - reported like a failed write, at the next wait
            error = f"saving checkpoint-{step} failed on rank {rank}: {_error_text(exc)}"
        pending = _PendingSave(step, tmp, final, blocking_s=0.0)
        pending.thread = threading.Thread(
            target=self._background,
            args=(pending, snapshot, events, names, rank, world, error),
            name=f"mtl_dist-checkpoint-{step}",
            daemon=True,  # a crashing run does not wait for it; the temp dir is cleaned later
        )
        pending.blocking_s = time.perf_counter() - start
        pending.thread.start()
        self._pending = pending
        self.last_save_timing = {
            "step": step,
            "async": True,
            "blocking_s": pending.blocking_s,
            "background_s": None,
        }
        log.info(
            "checkpoint-%d: training blocked %.3f s (snapshot); writing in the background",
            step,
            pending.blocking_s,
        )
        return final

    def _background(
        self,
        p: _PendingSave,
        snapshot: Any,
        events: list[Any],
        names: list[str],
        rank: int,
        world: int,
        error: str | None,
    ) -> None:
        """The writer thread: this rank's files; then rank 0 gathers the markers and commits.

        No torch.distributed here: a collective from a second thread would race training's.
        """
        start = time.perf_counter()
        known: dict[str, dict[str, Any]] = {}
        try:
            if error is None:
                try:
                    for event in events:
                        event.synchronize()
                    with _Hasher(p.tmp) as hasher:
                        if rank == 0:
                            for name in names:
                                _write_entry(p.tmp, name, snapshot["app"][name], hasher)
                            _write_json(
                                p.tmp / TRAINER_STATE, snapshot["trainer_state"], "trainer_state"
                            )
                        _torch_save(snapshot["rng"], p.tmp / f"rng_state_{rank}.pth", hasher)
                        known = hasher.results()
                except Exception as exc:  # noqa: BLE001 - reported at the next wait, every rank
                    error = f"saving checkpoint-{p.step} failed on rank {rank}: {_error_text(exc)}"
            run = snapshot.get("run") if rank == 0 and snapshot is not None else None
            snapshot = None  # let go of the copies (the buffers stay with the snapshotter)
            if rank != 0:
                try:
                    _write_marker(p.tmp, rank, {"error": error, "files": known})
                except Exception as exc:  # noqa: BLE001 - rank 0 is told by the main thread
                    error = error or (
                        f"saving checkpoint-{p.step} failed on rank {rank}: cannot write its "
                        f"marker: {_error_text(exc)}"
                    )
                p.local_error = error
                return
            p.local_error = error
            p.local_done.set()
            p.outcome = self._commit_in_background(p, known, names, world, error, run)
        except BaseException as exc:  # noqa: BLE001 - never leave the main thread waiting
            p.local_error = p.local_error or f"checkpoint-{p.step}: {_error_text(exc)}"
            p.outcome = p.outcome or p.local_error
        finally:
            p.background_s = time.perf_counter() - start
            p.local_done.set()
            if rank == 0 and p.outcome is None:
                log.info(
                    "checkpoint-%d: written and committed in the background in %.3f s",
                    p.step,
                    p.background_s,
                )

    def _commit_in_background(
        self,
        p: _PendingSave,
        known: dict[str, dict[str, Any]],
        names: list[str],
        world: int,
        error: str | None,
        run: dict | None,
    ) -> str | None:
        """Rank 0's thread: wait for every rank's marker, then manifest, commit, install, rotate."""
        outcome = error
        try:
            reports = self._wait_for_markers(p, world)
            for r in sorted(reports):
                outcome = outcome or reports[r].get("error")
            if outcome is None:
                for r, report in reports.items():
                    known.update(report["files"])
                    (p.tmp / _marker_name(r)).unlink()
                rest = [n for n in _list_files(p.tmp) if n not in known]
                files = known | _digests(p.tmp, rest)
                full = self._manifest("periodic", p.step, world, files, run, names=names)
                self._check_complete(full, world, names, False)
                _commit(p.tmp, full)
                _install(p.tmp, p.final, self.output_dir, f"checkpoint-{p.step}")
        except Exception as exc:  # noqa: BLE001 - reported at the next wait, every rank
            outcome = outcome or f"committing checkpoint-{p.step} failed: {_error_text(exc)}"
        if outcome is not None:
            if p.tmp.exists():
                _remove_quietly(p.tmp, self.output_dir)
            return outcome
        self._note_commit(p.final, p.step)
        try:
            self.rotate()
        except Exception as exc:  # noqa: BLE001 - committed; the error still reaches the caller
            return f"rotating after checkpoint-{p.step} failed: {_error_text(exc)}"
        return None

    def _wait_for_markers(self, p: _PendingSave, world: int) -> dict[int, dict[str, Any]]:
        """Rank 0's thread: every other rank's marker (polled); the main thread may abort it."""
        want = set(range(1, world))
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + self.marker_timeout_s
        delay = 0.002
        while True:
            for r in sorted(want):
                path = p.tmp / _marker_name(r)
                if path.is_file():
                    got[r] = json.loads(path.read_text())
                    want.discard(r)
            if not want:
                return got
            if p.abort.is_set():
                raise CheckpointError(f"rank {min(want)} failed before reporting its files")
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"rank {min(want)} did not report its files within {self.marker_timeout_s:g} s"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.05)

    def wait(self) -> None:
        """Collective (main thread): finish the in-flight async save, if any.

        Every rank raises the same one-line CheckpointError if any part of it failed (the temp
        dir is then gone; nothing committed earlier was touched). A no-op without one.
        """
        p = self._pending
        if p is None:
            return
        self._pending = None
        rank, _world = _dist_info()
        p.local_done.wait()
        errors = _all_gather(p.local_error)
        if rank == 0 and any(errors):
            p.abort.set()  # a rank that could not write its marker must not be waited for
        assert p.thread is not None
        p.thread.join()
        errors.append(_broadcast(p.outcome if rank == 0 else None))
        failed = next((e for e in errors if e), None)
        if failed is None:
            self._note_commit(p.final, p.step)
        self._record_timing(
            {
                "step": p.step,
                "async": True,
                "blocking_s": p.blocking_s,
                "background_s": p.background_s,
                **({"error": failed} if failed else {}),
            }
        )
        _raise_if_any(errors)

    @property
    def save_in_flight(self) -> bool:
        """Whether an async save has been started and not yet waited for."""
        return self._pending is not None

    def _record_timing(self, timing: dict[str, Any]) -> None:
        self.last_save_timing = timing
        self._timings.append(timing)

    def take_timings(self) -> list[dict[str, Any]]:
        """Timings of the saves finished since the last call (step, async, blocking_s: how long
        the caller was blocked, background_s: the background write + commit; 0 when blocking)."""
        done, self._timings = self._timings, []
        return done

    def _fail_together(self, tmp: Path, errors: list[str | None]) -> None:
        """If any rank failed: rank 0 discards the temp dir, then every rank raises the first error."""
        if any(errors) and _dist_info()[0] == 0 and tmp.exists():
            _remove_quietly(tmp, self.output_dir)
        _raise_if_any(errors)

    def _entry_names(self, app_state: Mapping[str, Stateful], engine: Any) -> list[str]:
        """Names of the app_state entries we write ourselves (DeepSpeed owns model/optimizer)."""
        names = []
        for name in app_state:
            if not _ENTRY_RE.match(name) or name in _RESERVED or name.startswith("rng_state"):
                raise CheckpointError(
                    f"app_state key '{name}': expected a plain file-name stem, not a reserved name"
                )
            if engine is not None and name in ("model", "optimizer"):
                continue
            names.append(name)
        return names

    def _begin(self, parent: Path, prefix: str, stale: tuple[re.Pattern[str], ...]) -> Path:
        """Rank 0 removes stale temporaries and creates a fresh temp dir; all ranks get its path."""
        rank, _world = _dist_info()
        path = None
        err = None
        if rank == 0:
            try:
                parent.mkdir(parents=True, exist_ok=True)
                _clean_stale(parent, stale, self.output_dir)
                path = parent / f"{prefix}-{secrets.token_hex(4)}"
                path.mkdir()
            except OSError as exc:
                err = f"cannot create a checkpoint directory in {parent}: {_error_text(exc)}"
        err, path = _broadcast((err, None if path is None else str(path)))
        _raise_if_any([err])
        return Path(path)

    def _write_rank_files(
        self,
        tmp: Path,
        app_state: Mapping[str, Stateful],
        names: list[str],
        trainer_state: dict,
        engine: Any,
        rank: int,
        hasher: _Hasher,
    ) -> None:
        """DeepSpeed partitions (all ranks), replicated objects (rank 0), this rank's RNG."""
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False)
            _pause()
        if rank == 0:
            for name in names:
                _write_entry(tmp, name, app_state[name].state_dict(), hasher)
            _write_json(tmp / TRAINER_STATE, trainer_state, "trainer_state")
        _torch_save(capture_rng_state(), tmp / f"rng_state_{rank}.pth", hasher)

    def _hash_collective(
        self, tmp: Path, known: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Size + sha256 of every file not hashed while written (e.g. DeepSpeed's), split over ranks."""
        rank, world = _dist_info()
        names = _broadcast(_list_files(tmp) if rank == 0 else None)
        rest = [n for n in names if n not in known]
        err = None
        part: dict[str, dict[str, Any]] = dict(known) if rank == 0 else {}
        try:
            part.update(_digests(tmp, rest[rank::world]))
        except OSError as exc:
            err = f"rank {rank} could not read back {tmp}: {_error_text(exc)}"
        parts = _all_gather((err, part))
        self._fail_together(tmp, [e for e, _ in parts])
        merged: dict[str, dict[str, Any]] = {}
        for _e, p in parts:
            merged.update(p)
        return merged

    def _manifest(
        self,
        kind: str,
        step: int,
        world: int,
        files: dict[str, dict[str, Any]],
        run: dict | None,
        *,
        names: Iterable[str] = (),
        engine: Any = None,
    ) -> dict[str, Any]:
        """The manifest: the trainer's keys under 'run', plus what we know about the files."""
        now = time.time()
        engine_info = None
        if engine is not None:
            stage = (
                engine.zero_optimization_stage()
                if hasattr(engine, "zero_optimization_stage")
                else None
            )
            engine_info = {
                "type": "deepspeed",
                "tag": DS_TAG,
                "zero_stage": stage,
                "universal": False,
            }
        return {
            "format": FORMAT_VERSION,
            "kind": kind,
            "step": step,
            "world_size": world,
            "created": datetime.fromtimestamp(now, UTC).isoformat(),
            "created_unix": now,
            "app_state": sorted(names),
            "engine": engine_info,
            "rng_files": [f"rng_state_{r}.pth" for r in range(world)] if kind == "periodic" else [],
            "run": json.loads(_to_json(run or {}, "manifest")),
            "files": files,
        }

    @staticmethod
    def _check_complete(manifest: dict, world: int, names: list[str], has_engine: bool) -> None:
        """Rank 0's check that every rank's and every object's file is there before committing."""
        files = manifest["files"]
        expected = [f"rng_state_{r}.pth" for r in range(world)] + [TRAINER_STATE]
        expected += [MODEL_FILE if n == "model" else f"{n}.pt" for n in names]
        missing = [f for f in expected if f not in files]
        if has_engine and not any(f.startswith(f"{DS_TAG}/") for f in files):
            missing.append(f"{DS_TAG}/*")
        if missing:
            raise CheckpointError(f"files missing before commit: {', '.join(missing)}")

    def _note_commit(self, final: Path, step: int) -> None:
        """Remember the newest commit; a newer step lifts the protection of the resumed-from dir."""
        self._last_saved = final
        if self.resumed_from is not None:
            resumed_step = _step_of(self.resumed_from)
            if resumed_step is None or step > resumed_step:
                self._newer_since_resume = True

    # ------------------------------------------------------------------ rotation

    def rotate(self) -> list[Path]:
        """Delete the oldest periodic checkpoints beyond the limit (rank 0); returns what went."""
        if self.save_total_limit is None or _dist_info()[0] != 0:
            return []
        committed = [p for p in self._periodic(include_symlinks=False) if is_committed(p)]
        committed.sort(key=lambda p: _step_of(p) or 0)
        keep = set(committed[-self.save_total_limit :])
        protected = {self._last_saved}
        if self.resumed_from is not None and not self._newer_since_resume:
            protected.add(self.resumed_from)
        deleted = []
        for path in committed:
            if path in keep or path.absolute() in protected:
                continue
            _pause()
            try:
                _retire_and_delete(path, self.output_dir)
                deleted.append(path)
            except (CheckpointError, OSError) as exc:
                warnings.warn(f"rotation: {exc}", MtlDistWarning, stacklevel=2)
        if len(deleted) > 1:  # a lowered limit on resume (or a forgotten override): said
            warnings.warn(f"checkpoint.save_total_limit={self.save_total_limit}: deleted "
                          f"{len(deleted)} checkpoints at once ({', '.join(p.name for p in deleted)}"
                          f"), more than the limit were there; kept: "
                          f"{', '.join(p.name for p in committed if p not in deleted)}",
                          MtlDistWarning, stacklevel=2)
        return deleted

    def _periodic(self, *, include_symlinks: bool = True) -> list[Path]:
        """Directories named checkpoint-<int> directly under OUTPUT/checkpoints."""
        if not self.checkpoints_dir.is_dir():
            return []
        return [
            p
            for p in self.checkpoints_dir.iterdir()
            if _PERIODIC_RE.match(p.name)
            and p.is_dir()
            and (include_symlinks or not p.is_symlink())
        ]

    # ------------------------------------------------------------------ best

    def save_best(
        self,
        step: int,
        score: float,
        model_state: Mapping[str, torch.Tensor] | None,
        *,
        extra_files: Mapping[str, bytes | str | Path],
        metadata: dict,
        manifest: dict | None = None,
    ) -> Path:
        """Collective: rank 0 writes OUTPUT/best (model, extra files, best.json) and swaps it in atomically."""
        rank, world = _dist_info()
        outcome = None
        if rank == 0:
            try:
                self._write_best(step, score, model_state, extra_files, metadata, manifest, world)
            except Exception as exc:  # noqa: BLE001 - reported on every rank, then raised
                outcome = f"saving best (step {step}) failed: {_error_text(exc)}"
        _raise_if_any([_broadcast(outcome)])
        return self.best_dir

    def _write_best(
        self,
        step: int,
        score: float,
        model_state: Mapping[str, torch.Tensor] | None,
        extra_files: Mapping[str, bytes | str | Path],
        metadata: dict,
        manifest: dict | None,
        world: int,
    ) -> None:
        """Rank 0's half of save_best."""
        if model_state is None:
            raise CheckpointError("save_best: rank 0 got model_state=None")
        clash = {"step", "score", "greater_is_better"} & set(metadata)
        if clash:
            raise CheckpointError(f"save_best metadata key '{sorted(clash)[0]}' is reserved")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _clean_stale(self.output_dir, _OUTPUT_LEFTOVERS, self.output_dir)
        tmp = self.output_dir / f".tmp-best-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            with _Hasher(tmp) as hasher:
                _save_safetensors(model_state, tmp / MODEL_FILE, "save_best model_state", hasher)
                known = hasher.results()
            for name, content in extra_files.items():
                _write_extra(tmp, name, content)
            info = {
                "step": step,
                "score": score,
                "greater_is_better": self.greater_is_better,
                **metadata,
            }
            _write_json(tmp / BEST_JSON, info, "best.json")
            files = known | _digests(tmp, [n for n in _list_files(tmp) if n not in known])
            full = self._manifest("best", step, world, files, manifest)
            full["score"] = score
            _commit(tmp, full)
        except Exception:
            # A failed write (disk full) must not leave a model-sized half dir eating the disk.
            _remove_quietly(tmp, self.output_dir)
            raise
        try:
            self._set_aside_damaged_best()
            _install(tmp, self.best_dir, self.output_dir, "best", best=True)
        except Exception:
            if is_committed(self.best_dir):  # the old best/ stayed: its would-be successor goes
                _remove_quietly(tmp, self.output_dir)
            raise  # else best/ is mid-swap: the newest committed copy is reinstalled at start

    def _set_aside_damaged_best(self) -> None:
        """A best/ damaged after its commit (its marker, manifest, or a file missing or of
        another size) has no score to beat, so the first evaluation replaces it: it moves
        whole to OUTPUT/abandoned/ (a warning says where) instead of being deleted by the
        swap; some of its files may be fine."""
        why = self.best_damage()
        if why is None:
            return
        target = self.output_dir / ABANDONED_DIR / f"damaged-best-{secrets.token_hex(2)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.best_dir, target)
        _fsync_path(self.output_dir)
        warnings.warn(f"{why}; moved to {target}, not replaced", MtlDistWarning, stacklevel=4)

    def best_damage(self) -> str | None:
        """Why a best/ that was committed is damaged since (marker, manifest, a file missing
        or of another size: `damage`), or None (intact, or no committed best/)."""
        return damage(self.best_dir) if was_committed(self.best_dir) else None

    def best_score(self) -> float | None:
        """Score of the committed, intact OUTPUT/best (from its manifest, which COMMITTED
        vouches for), or None when there is none: a damaged best/ has no score to beat."""
        try:
            score = read_manifest(self.best_dir).get("score")
        except CheckpointError:
            return None
        return None if damage(self.best_dir) else score

    def best_info(self) -> dict:
        """best/best.json (step, score, metric_for_best, ...); {} when there is none, or it
        is damaged."""
        try:
            read_manifest(self.best_dir)
        except (CheckpointError, OSError, ValueError):
            return {}
        return {} if damage(self.best_dir) else _read_best_json(self.best_dir)

    def improves(self, score: float) -> bool:
        """Whether `score` beats the committed best (mode from greater_is_better)."""
        return improves_on(score, self.best_score(), self.greater_is_better)

    def _recover_best(self) -> None:
        """After a crash mid-swap, reinstall the newest committed `.old-best-*`/`.tmp-best-*`."""
        if self.best_dir.exists() or not self.output_dir.is_dir():
            return
        candidates = []
        for entry in self.output_dir.iterdir():
            if (
                _OLD_BEST_RE.match(entry.name) or _TMP_BEST_RE.match(entry.name)
            ) and not entry.is_symlink():
                try:
                    m = read_manifest(entry)
                except CheckpointError:
                    continue
                candidates.append(((m.get("step", -1), m.get("created_unix", 0)), entry))
        if candidates:
            newest = max(candidates, key=lambda c: c[0])[1]
            os.rename(newest, self.best_dir)
            _fsync_path(self.output_dir)
            warnings.warn(
                f"recovered {self.best_dir} from {newest.name} (a save was interrupted)",
                MtlDistWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ finding

    def latest(self) -> Path | None:
        """Newest committed periodic checkpoint; warns naming the incomplete ones it skipped.
        One whose marker or manifest was damaged after its commit counts as committed: the
        resume then refuses it in one line (naming the newest intact one), where skipping it
        would resume an older one and write over it."""
        good, skipped = [], []
        for path in self._periodic():
            (good if was_committed(path) else skipped).append(path)
        if self.checkpoints_dir.is_dir():
            skipped += [p for p in self.checkpoints_dir.iterdir() if _TMP_RE.match(p.name)]
        if skipped:
            warnings.warn(
                "skipping incomplete checkpoint(s) (no valid COMMITTED marker): "
                + ", ".join(sorted(p.name for p in skipped)), MtlDistWarning,
                stacklevel=2,
            )
        if not good:
            return None
        return max(good, key=lambda p: _step_of(p) or 0)

    def newest_intact(self, before: Path) -> Path | None:
        """The newest committed periodic checkpoint older than `before` whose files are all
        there at their manifest sizes (`damage`: no reading)."""
        before_step = _step_of(before) or 0
        older = [p for p in self._periodic() if (_step_of(p) or 0) < before_step
                 and is_committed(p) and damage(p) is None]
        return max(older, key=lambda p: _step_of(p) or 0, default=None)

    def saved_run(self) -> list[str]:
        """What an earlier run committed here (its checkpoints, oldest first, then best/):
        what a fresh run in this output dir would replace or mix with its own."""
        saved = [p.name for p in sorted(self._periodic(), key=lambda p: _step_of(p) or 0)
                 if was_committed(p)]
        return saved + ([f"{BEST_DIR}/"] if was_committed(self.best_dir) else [])

    def clear_run(self) -> None:
        """Collective. `train.overwrite_output_dir`: rank 0 deletes an earlier run's
        checkpoints and best/ before the fresh run's first save; a failure is raised on every
        rank (the others would wait for rank 0 until the collective timeout)."""
        rank, _ = _dist_info()
        outcome = None
        if rank == 0:
            try:
                self._delete_run()
            except Exception as exc:  # noqa: BLE001 - reported on every rank, then raised
                outcome = f"train.overwrite_output_dir: {_error_text(exc)}"
        _raise_if_any([_broadcast(outcome)])

    def _delete_run(self) -> None:
        entries = list(self.checkpoints_dir.iterdir()) if self.checkpoints_dir.is_dir() else []
        for path in entries:
            if _PERIODIC_RE.match(path.name) and path.is_dir():
                _retire_and_delete(path, self.output_dir)
        _clean_stale(self.checkpoints_dir, (_TMP_RE, _OLD_RE), self.output_dir)
        abandoned = self.output_dir / ABANDONED_DIR  # older branches of the run
        if abandoned.is_dir() and not abandoned.is_symlink():
            _retire_and_delete(abandoned, self.output_dir)
        if self.best_dir.is_symlink():
            raise CheckpointError(f"refusing to delete {self.best_dir}: it is a symlink")
        if self.best_dir.is_dir():  # set aside under a name no recovery brings back
            aside = self.output_dir / f".cleared-best-{secrets.token_hex(4)}"
            os.rename(self.best_dir, aside)
            _fsync_path(self.output_dir)
        _clean_stale(self.output_dir, _OUTPUT_LEFTOVERS, self.output_dir)

    def resolve(self, resume: str | Path) -> Path | None:
        """'auto' -> latest() (None if there is none); a path -> that committed checkpoint."""
        if str(resume) == "auto":
            return self.latest()
        path = Path(resume).expanduser().absolute()
        if path.name == CHECKPOINTS_DIR and path.is_dir() and not (path / COMMITTED).exists() \
                and any(_PERIODIC_RE.match(p.name) for p in path.iterdir()):
            path = path.parent  # OUTPUT/checkpoints: its run's newest
        if (path / CHECKPOINTS_DIR).is_dir() and not (path / COMMITTED).exists():
            found = CheckpointManager(path, save_total_limit=None, recover_best=False).latest()
            if found is None:
                raise CheckpointError(
                    f"train.resume: no committed checkpoint under {path / CHECKPOINTS_DIR}",
                    key="train.resume")
            return found
        try:
            read_manifest(path)
        except CheckpointError as exc:
            raise CheckpointError(f"train.resume: {exc}", key="train.resume") from None
        return path

    # ------------------------------------------------------------------ loading

    def load(
        self,
        path: str | Path,
        app_state: Mapping[str, Stateful],
        *,
        engine: Any = None,
        expected_manifest: Mapping[str, Any] | None = None,
    ) -> dict:
        """Collective: verify and restore every object from a committed checkpoint; returns trainer_state."""
        path = Path(path).absolute()
        manifest = training_manifest(path, named_step=False)
        if expected_manifest is not None:
            check_manifest(path, manifest, expected_manifest)
        check_named_step(path, manifest)
        _verify_collective(path, manifest)
        names = self._entry_names(app_state, engine)
        _check_entries(path, manifest, names, engine)
        if engine is not None:
            _load_engine(path, manifest, engine)
        for name in names:
            _load_entry(path, name, app_state[name])
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        self._note_resume(path)
        return trainer_state

    def _note_resume(self, path: Path) -> None:
        """Protect the resumed-from checkpoint from rotation until a newer one is committed,
        and note where the resumed branch leaves checkpoints/ (for set_aside_newer)."""
        if path.parent.resolve() == self.checkpoints_dir.resolve() and _PERIODIC_RE.match(
            path.name
        ):
            self.resumed_from = self.checkpoints_dir / path.name  # as rotation spells it
            self._newer_since_resume = False
            self._branch_step = _step_of(path) or 0
        else:
            self._branch_step = self.branch_of(path)  # None: another run's checkpoint

    def branch_of(self, path: str | Path) -> int | None:
        """For a checkpoint in OUTPUT/abandoned/after-checkpoint-<N>-<hex>/: N, the step
        its branch left the run's line at (its own step if the folder is named otherwise);
        None for any other path."""
        path, abandoned = Path(path).resolve(), (self.output_dir / ABANDONED_DIR).resolve()
        if abandoned not in path.parents:
            return None
        branch = path.relative_to(abandoned).parts[0]
        fork = re.fullmatch(r"after-checkpoint-(\d+)-[0-9a-f]+", branch)
        return int(fork.group(1)) if fork else (_step_of(path) or 0)

    def is_own(self, path: str | Path) -> bool:
        """`path` lies in this output dir (checkpoints/, abandoned/ or elsewhere in it)."""
        return self.output_dir.resolve() in Path(path).resolve().parents

    def set_aside_newer(self) -> tuple[list[str], Path | None]:
        """Collective, after a resume. Resuming a checkpoint older than others of this run
        starts a new branch: rotation (by step) would keep the old branch's newer checkpoints
        and delete the new one's, and `resume=auto` (a requeue) would go back to them. So
        does resuming one in abandoned/: the current line's checkpoints after that branch's
        fork would mix with, or be replaced by, its own. Rank 0 moves those committed ones to
        OUTPUT/abandoned/after-checkpoint-<step>-<hex>/ (nothing is deleted). Returns (their
        names, where they went) on rank 0; ([], None) elsewhere."""
        rank, _ = _dist_info()
        outcome, names, target = None, [], None
        if rank == 0 and self._branch_step is not None:
            step = self._branch_step
            newer = sorted((p for p in self._periodic()  # incomplete ones: auto skips them too
                            if (_step_of(p) or 0) > step and was_committed(p)), key=_step_of)
            if newer:
                target = self.output_dir / ABANDONED_DIR / \
                    f"after-checkpoint-{step}-{secrets.token_hex(2)}"
                try:
                    target.mkdir(parents=True)
                    for path in newer:
                        os.rename(path, target / path.name)
                        names.append(path.name)
                    _fsync_path(self.checkpoints_dir)
                except OSError as exc:
                    outcome = (f"setting aside the checkpoints newer than step {step}: "
                               f"{_error_text(exc)}")
        _raise_if_any([_broadcast(outcome)])
        return names, target

    def restore_rng(self, path: str | Path) -> None:
        """Restore this rank's RNG; ranks the checkpoint had no file for get a derived seed."""
        path = Path(path)
        rank, _world = _dist_info()
        manifest = read_manifest(path)
        name = f"rng_state_{rank}.pth"
        saved_by = manifest["world_size"]
        ranks = f"{saved_by} rank{'s' if saved_by != 1 else ''}"
        if name in manifest["files"]:
            _verify_files(path, manifest, [name])
            restore_rng_state(_torch_load(path / name))
            if rank == 0 and isinstance(saved_by, int) and saved_by > _world:  # said once
                unused = f"rank {_world}'s RNG state is" if saved_by == _world + 1 else \
                    f"the RNG states of ranks {_world}-{saved_by - 1} are"
                warnings.warn(f"checkpoint {path} was saved by {ranks}, this run has {_world}: "
                              f"{unused} not used (the run goes on, not bit for bit as the saved "
                              "ranks would)", MtlDistWarning, stacklevel=2)
            return
        seed = derived_seed(f"mtl_dist:{manifest['step']}", rank)
        warnings.warn(
            f"checkpoint {path} has no RNG state for rank {rank} (saved by {ranks}); "
            f"seeding it with derived seed {seed}", MtlDistWarning,
            stacklevel=2,
        )
        seed_all(seed)

    # ------------------------------------------------------------------ misc

    def write_run_file(self, name: str, content: str | bytes | dict | list) -> Path | None:
        """Rank 0 writes OUTPUT/name atomically (tmp file + rename); other ranks do nothing."""
        target = _safe_child(self.output_dir, name, "run file")
        if target.parts[len(self.output_dir.parts)] in (CHECKPOINTS_DIR, BEST_DIR):
            raise CheckpointError(
                f"run file '{name}': the names {CHECKPOINTS_DIR}/ and {BEST_DIR}/ are reserved"
            )
        if _dist_info()[0] != 0:
            return None
        tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_bytes(tmp, _content_bytes(content, name))
            os.replace(tmp, target)
            _fsync_path(target.parent)
        except OSError as exc:  # disk full, read-only: one line, the old file left as it was
            with contextlib.suppress(OSError):  # e.g. its dir could not be made either
                tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write {target}: {_error_text(exc)}") from exc
        return target

    def list_checkpoints(self, output_dir: str | Path | None = None) -> list[CheckpointInfo]:
        """See module-level `list_checkpoints` (defaults to this manager's OUTPUT)."""
        return list_checkpoints(output_dir or self.output_dir)

    def inspect(self, path: str | Path) -> dict[str, Any]:
        """See module-level `inspect`."""
        return inspect(path)

    def load_model_state(self, path: str | Path) -> dict[str, torch.Tensor]:
        """See module-level `load_model_state`."""
        return load_model_state(path)


def _env_rank() -> int:
    """Rank from torch.distributed, else from the launcher's RANK variable (before init)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _step_of(path: Path) -> int | None:
    """The <int> of a checkpoint-<int> directory name."""
    m = _PERIODIC_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _commit(tmp: Path, manifest: dict) -> None:
    """Write manifest.json, fsync everything, then COMMITTED last (it holds the manifest's hash)."""
    _pause()
    raw = _to_json(manifest, "manifest").encode()
    _write_bytes(tmp / MANIFEST, raw)
    _fsync_tree(tmp)
    _pause()
    marker = {"step": manifest["step"], "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    _write_bytes(tmp / COMMITTED, json.dumps(marker).encode())
    _fsync_path(tmp)
    _pause()


def _remove_quietly(path: Path, output_dir: Path) -> None:
    """Delete a temp dir on the way out of a failed save (whose error is the one to raise)."""
    try:
        _safe_rmtree(path, output_dir)
    except (CheckpointError, OSError) as exc:
        log.warning("could not remove %s: %s", path, exc)


def _install(tmp: Path, final: Path, output_dir: Path, label: str, *, best: bool = False) -> None:
    """Rename the committed temp dir to its final name; an existing one is moved aside, then deleted."""
    parent = final.parent
    if final.is_symlink():
        raise CheckpointError(f"refusing to replace {final}: it is a symlink")
    aside = None
    if final.exists():
        aside = parent / (
            f".old-best-{secrets.token_hex(4)}" if best else f".old-{label}-{secrets.token_hex(4)}"
        )
        os.rename(final, aside)
        _pause()
    os.rename(tmp, final)
    _fsync_path(parent)
    if aside is not None:
        try:
            _safe_rmtree(aside, output_dir)
        except (CheckpointError, OSError) as exc:  # committed already; the next save retries
            warnings.warn(f"could not remove the replaced {aside}: {exc}", MtlDistWarning,
                          stacklevel=3)


def _safe_child(root: Path, name: str, what: str) -> Path:
    """root/name, refusing absolute names and `..` escapes."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise CheckpointError(f"{what} '{name}': expected a relative path inside {root}")
    return root / rel


def _content_bytes(content: Any, name: str) -> bytes:
    """bytes as is, str as UTF-8, dict/list as JSON."""
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode()
    if isinstance(content, (dict, list)):
        return _to_json(content, name).encode()
    raise CheckpointError(
        f"file '{name}': expected bytes, str, dict or list, got {type(content).__name__}"
    )


def _write_extra(tmp: Path, name: str, content: bytes | str | Path) -> None:
    """One extra file of best/: bytes or str content, or a Path (file or directory) to copy."""
    target = _safe_child(tmp, name, "extra file")
    if target.name in (MODEL_FILE, BEST_JSON, MANIFEST, COMMITTED):
        raise CheckpointError(f"extra file '{name}': the name is reserved")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        if content.is_dir():
            shutil.copytree(content, target)
        elif content.is_file():
            shutil.copyfile(content, target)
        else:
            raise CheckpointError(f"extra file '{name}': {content} does not exist")
    else:
        _write_bytes(target, _content_bytes(content, name))
    _pause()


def _check_entries(path: Path, manifest: Mapping[str, Any], names: list[str], engine: Any) -> None:
    """Every object asked for has its file; a DeepSpeed checkpoint needs an engine and back."""
    saved = set(manifest.get("app_state", []))
    missing = [n for n in names if n not in saved]
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: has no state for '{missing[0]}' (it has: {', '.join(sorted(saved)) or 'nothing'})"
        )
    extra = sorted(saved - set(names) - ({"model", "optimizer"} if engine is not None else set()))
    if extra:
        warnings.warn(
            f"checkpoint {path}: ignoring saved state not asked for: {', '.join(extra)}",
            MtlDistWarning,
            stacklevel=3,
        )
    ds = manifest.get("engine")
    if engine is not None and not ds:
        raise CheckpointError(
            f"checkpoint {path}: was saved without DeepSpeed; this run uses a DeepSpeed engine"
        )
    if engine is None and ds:
        raise CheckpointError(
            f"checkpoint {path}: was saved by DeepSpeed (ZeRO stage {ds.get('zero_stage')}); this run has no DeepSpeed engine"
        )


def _load_engine(path: Path, manifest: Mapping[str, Any], engine: Any) -> None:
    """DeepSpeed model + optimizer partitions (universal-converted checkpoints too)."""
    universal = bool((manifest.get("engine") or {}).get("universal"))
    config = getattr(engine, "_config", None)
    before = getattr(config, "load_universal_checkpoint", False)
    if universal and config is not None:
        config.load_universal_checkpoint = True
    try:
        load_path, _client = engine.load_checkpoint(
            str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    finally:
        if config is not None:
            config.load_universal_checkpoint = before
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load tag '{DS_TAG}'")


def _load_entry(path: Path, name: str, obj: Stateful) -> None:
    """Load one app_state object; model from safetensors, the rest with weights_only=True."""
    if name == "model":
        state = _load_safetensors(path / MODEL_FILE)
        load_state_checked(obj, state, path / MODEL_FILE)
        return
    state = _torch_load(path / f"{name}.pt")
    try:
        obj.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any mismatch becomes one line naming the file
        raise CheckpointError(
            f"checkpoint {path}: '{name}.pt' does not fit this run's {name}: {_error_text(exc)}"
        ) from exc


def load_state_checked(model: Stateful, state: dict[str, torch.Tensor], file: Path) -> None:
    """load_state_dict with a one-line error naming the first missing/unexpected/mis-shaped key."""
    if not isinstance(model, torch.nn.Module):
        model.load_state_dict(state)
        return
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shaped:
        what = (
            f"missing key '{missing[0]}'"
            if missing
            else f"unexpected key '{unexpected[0]}'"
            if unexpected
            else f"key '{shaped[0]}' has shape {tuple(state[shaped[0]].shape)}, the model has {tuple(own[shaped[0]].shape)}"
        )
        counts = f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shaped)} mis-shaped)"
        raise CheckpointError(f"{file} does not fit the model: {what} {counts}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------- CLI helpers


def list_checkpoints(output_dir: str | Path) -> list[CheckpointInfo]:
    """Periodic checkpoints (complete or not), interrupted saves and best/, for `ckpt ls`."""
    out = Path(output_dir)
    best_step = None
    rows: list[CheckpointInfo] = []
    best = out / BEST_DIR
    if best.is_dir():
        try:  # the manifest (vouched for by COMMITTED) has step and score; best.json may not be
            info = read_manifest(best)
        except CheckpointError:
            info = {}
        committed = was_committed(best)
        best_step = info.get("step")
        rows.append(
            CheckpointInfo(
                best, "best", best_step, committed, _dir_size(best), True, info.get("score"),
                damage(best) if committed else None,
                _best_metric(best),
            )
        )
    ckdir = out / CHECKPOINTS_DIR
    entries = sorted(ckdir.iterdir()) if ckdir.is_dir() else []
    periodic = []
    for p in entries:
        m = _PERIODIC_RE.match(p.name)
        if m and p.is_dir():
            complete = was_committed(p)
            step = int(m.group(1))
            periodic.append(
                CheckpointInfo(
                    p,
                    "periodic",
                    step,
                    complete,
                    _dir_size(p),
                    complete and step == best_step and _same_model_score(p, best),
                    _score_of(p) if complete else None,
                    damage(p) if complete else None,
                )
            )
        elif _TMP_RE.match(p.name) and p.is_dir():
            step = int(p.name.split("-")[2])
            periodic.append(CheckpointInfo(p, "incomplete", step, False, _dir_size(p), False, None))
    periodic.sort(key=lambda r: (r.step or 0, r.kind))
    return periodic + _abandoned_rows(out) + rows


def _abandoned_rows(out: Path) -> list[CheckpointInfo]:
    """Committed checkpoints a resume set aside in OUTPUT/abandoned/<branch>/ (resumable by
    path): listed so that they are not forgotten, or taken for lost."""
    abandoned = out / ABANDONED_DIR
    branches = sorted(p for p in abandoned.iterdir() if p.is_dir()) if abandoned.is_dir() else []
    rows = []
    for branch in branches:
        if was_committed(branch):  # a damaged best/ the next best replaced
            rows.append(CheckpointInfo(branch, "abandoned", None, True, _dir_size(branch), False,
                                       None, damage(branch)))
            continue
        rows += [CheckpointInfo(p, "abandoned", _step_of(p), True, _dir_size(p), False,
                                _score_of(p), damage(p))
                 for p in sorted(branch.iterdir(), key=lambda p: _step_of(p) or 0)
                 if _step_of(p) is not None and p.is_dir() and was_committed(p)]
    return rows


def _read_best_json(best: Path) -> dict:
    """best/best.json (step, score, metric_for_best, ...); {} when absent or unreadable."""
    try:
        info = json.loads((best / BEST_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _best_metric(best: Path) -> str:
    """'loss' when best/ was chosen by metric_for_best=loss (best.json says), else 'score'."""
    return "loss" if _read_best_json(best).get("metric_for_best") == "loss" else "score"


def _same_model_score(path: Path, best: Path) -> bool:
    """Whether a checkpoint at best/'s step scored what best/ did: after a resume from an
    older checkpoint, this line's checkpoint at that step is another model than best/ (the
    line set aside), and was marked [best] by its step alone. Unknown scores, or a
    checkpoint saved before its step's evaluation (a preemption at an eval step leaves it
    pending, for the resume to run on these very weights): True."""
    try:
        best_score = json.loads((best / "metrics.json").read_text()).get("score")
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError, AttributeError):
        return True
    if not isinstance(state, dict) or state.get("last_eval_step") != state.get("global_step"):
        return True
    score = state.get("score")
    return not isinstance(best_score, (int, float)) or not isinstance(score, (int, float)) \
        or score == best_score


def _score_of(path: Path) -> float | None:
    """The 'score' key of a checkpoint's trainer_state.json, if the trainer wrote one."""
    try:
        value = json.loads((path / TRAINER_STATE).read_text()).get("score")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, (int, float)) else None


def inspect(path: str | Path) -> dict[str, Any]:
    """Manifest, per-rank RNG fingerprints and the sampler cursor of one checkpoint (for `ckpt inspect`)."""
    path = Path(path)
    manifest = read_manifest(path)
    result: dict[str, Any] = {"path": str(path), "committed": True, "damage": damage(path),
                              "manifest": manifest}
    # a damaged checkpoint is what inspect is for: what cannot be read is said in its place
    rng = {}
    for name in sorted(manifest["files"]):
        m = _RNG_RE.match(name)
        if m:
            rng[int(m.group(1))] = _readable(lambda n=name: rng_summary(_torch_load(path / n)))
    result["rng"] = rng
    trainer_state = {}
    if (path / TRAINER_STATE).is_file():
        trainer_state = _readable(lambda: _read_json_file(path, TRAINER_STATE))
    result["trainer_state"] = trainer_state
    sampler = None
    if (path / "sampler.pt").is_file():
        sampler = _readable(lambda: _torch_load(path / "sampler.pt"))
    elif isinstance(trainer_state, dict):
        sampler = trainer_state.get("sampler")
    result["sampler"] = sampler
    if (path / BEST_JSON).is_file():
        result["best"] = _readable(lambda: _read_json_file(path, BEST_JSON))
    return result


def _readable(read: Callable[[], Any]) -> Any:
    """`read()`, or {"unreadable": why} when a file is missing or damaged."""
    try:
        return read()
    except CheckpointError as exc:
        return {"unreadable": str(exc)}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # loads, but not the kind
        return {"unreadable": f"not what it should hold ({_error_text(exc)})"}


def _read_json_file(path: Path, name: str) -> Any:
    """A checkpoint's JSON file; a damaged one is one line naming it."""
    try:
        return json.loads((path / name).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: file '{name}' is unreadable or not JSON: "
                              f"{_error_text(exc)}") from exc


def check_label_maps_of(path: str | Path, label_maps: Mapping[str, list[str]]) -> None:
    """One-line error when a checkpoint (or best/) was trained with other tasks or labels
    than `label_maps`: weights of another label order load fine and predict wrong classes."""
    path = Path(path)
    saved, order = checkpoint_label_maps(path) or (None, None)
    diff = None if saved is None else _first_difference(saved, dict(label_maps), "labels")
    if diff:
        key, theirs, ours = diff
        raise CheckpointError(
            f"checkpoint {path}: '{key}' is {_short(theirs)} there and {_short(ours)} in this "
            "run: use the config (and output dir) it was trained with")
    # The heads are stored by position: the same tasks in another order would load without a
    # shape error (equal label counts) and score each task with another task's head.
    if order and list(order) != list(label_maps):
        raise CheckpointError(
            f"checkpoint {path}: its heads are for the tasks in the order {_short(list(order))}, "
            f"this run lists them as {_short(list(label_maps))}: list the tasks in the "
            "checkpoint's order")


def checkpoint_label_maps(path: str | Path) -> tuple[dict[str, list[str]], list[str]] | None:
    """(task -> labels, the tasks in the heads' order) a checkpoint or best/ was trained with:
    its manifest's `run`, else its labels.json; None when it has neither."""
    path = Path(path)
    manifest = read_manifest(path)
    saved = manifest.get("run", {}).get("labels")
    order = manifest.get("run", {}).get("tasks")  # run.labels is saved with sorted keys
    if saved is None and "labels.json" in manifest["files"]:
        _check_sizes(path, manifest, ["labels.json"])
        try:
            saved = json.loads((path / "labels.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: file 'labels.json' is unreadable: "
                                  f"{_error_text(exc)}") from None
        order = order or list(saved)  # written in the heads' order (the config's)
    return None if saved is None else (saved, list(order or saved))


def check_tokenizer_of(path: str | Path, fingerprint: str, key: str) -> None:
    """One-line error when a checkpoint (or best/) was trained with another tokenizer than
    `fingerprint` (data.tokenizer_identity): one of the same vocabulary size loaded and
    scored every id as another token's. `key`: the config key that names the tokenizer.
    Checkpoints saved before it was recorded are not held to it."""
    path = Path(path)
    trained = read_manifest(path).get("run", {}).get("tokenizer") \
        or _read_best_json(path).get("tokenizer")
    if trained and trained != fingerprint:
        run = run_holding(path.absolute())
        copies = [p for p in (path / "tokenizer", run and run / "tokenizer") if p and p.is_dir()]
        where = f" ({copies[0]} holds a copy)" if copies else ""
        raise CheckpointError(
            f"checkpoint {path}: trained with another tokenizer (vocabulary, special tokens or "
            f"the ids of a probe text differ: {trained[:12]}..., this run's "
            f"{fingerprint[:12]}...): its embeddings learned other ids; give {key} the "
            f"tokenizer it was trained with{where}", key=key)


def check_pairs_of(path: str | Path, pairs: Mapping[str, bool]) -> None:
    """One-line error when a task of the checkpoint was trained on sentence pairs and this run
    reads single texts, or the other way round: its head would score inputs it never saw
    (a pair task read as single texts scored near chance, with a warning worded for training).
    `pairs`: task name -> tasks.<name>.pair. Checkpoints that recorded no `pair` are not held
    to it."""
    path = Path(path)
    trained = trained_pairs(path)
    for name, pair in pairs.items():
        if trained is not None and name in trained and bool(trained[name]) != bool(pair):
            raise CheckpointError(
                f"checkpoint {path}: task '{name}' was trained "
                f"{'on sentence pairs' if trained[name] else 'on single texts'} (tasks.{name}.pair "
                f"{str(bool(trained[name])).lower()}), this run reads "
                f"{'sentence pairs' if pair else 'single texts'}: set tasks.{name}.pair="
                f"{str(bool(trained[name])).lower()}", key=f"tasks.{name}.pair")


def trained_pairs(path: Path) -> dict[str, bool] | None:
    """Task name -> whether the checkpoint's run read sentence pairs: its manifest's `run.pair`,
    else (best/) the config.yaml saved in it; None when neither says."""
    pairs = read_manifest(path).get("run", {}).get("pair")
    if isinstance(pairs, dict):
        return pairs
    saved = _saved_config(path)
    try:
        return None if saved is None else \
            {str(t["name"]): bool(t.get("pair", False)) for t in saved["tasks"]}
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: file 'config.yaml' holds no task list "
                              f"({_error_text(exc)})") from None


def check_head_of(path: str | Path, head: str) -> None:
    """One-line error naming both head kinds when a checkpoint's heads are of another kind
    than `head` (model.head): its weights then failed to load on 'unexpected key
    heads.0.score.weight'. Its manifest's model shape, else (best/) its saved config."""
    path = Path(path)
    trained = read_manifest(path).get("run", {}).get("model_shape", {}).get("head")
    if trained is None:
        saved = _saved_config(path)
        model = saved.get("model") if isinstance(saved, dict) else None
        trained = model.get("head", "attention") if isinstance(model, dict) else None
    if trained is not None and trained != head:
        raise CheckpointError(f"checkpoint {path}: its task heads are model.head={trained}, this "
                              f"run builds model.head={head}: set model.head={trained}",
                              key="model.head")


def _saved_config(path: Path) -> dict | None:
    """The config.yaml saved in a checkpoint (best/ holds one), parsed; None without one."""
    manifest = read_manifest(path)
    if "config.yaml" not in manifest["files"]:
        return None
    import yaml

    _check_sizes(path, manifest, ["config.yaml"])
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint {path}: file 'config.yaml' is unreadable: "
                              f"{_error_text(exc)}") from None
    return saved if isinstance(saved, dict) else None


def load_model_state(path: str | Path, *, with_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model state dict a checkpoint or best/ was evaluated with: its weights (ZeRO
    partitions consolidated to fp32) with the EMA shadow in place where the run kept one
    (`with_ema=False`: the trained weights alone, e.g. to compare two runs' training)."""
    path = Path(path)
    manifest = read_manifest(path)
    state = _trained_weights(path, manifest)
    if with_ema and EMA_FILE in manifest["files"]:  # periodic ones; best/ holds the EMA
        _apply_ema_shadow(path, manifest, state)
    return state


def weights_read_through_deepspeed(path: str | Path) -> bool:
    """Whether load_model_state reads `path`'s weights from ZeRO partitions, through DeepSpeed
    (False where its manifest cannot be read or makes no sense: loading then refuses it in its
    own words)."""
    try:
        return _weights_source(read_manifest(path)) == "zero"
    except (CheckpointError, OSError, ValueError, LookupError, TypeError, AttributeError):
        return False


def _weights_source(manifest: Mapping[str, Any]) -> str:
    """Where _trained_weights takes the weights from: "model" (model.safetensors), "zero" (the
    partitions, through DeepSpeed), "universal" or "none" (both refused). One decision, which
    the CLI also asks before the process group exists (weights_read_through_deepspeed)."""
    if MODEL_FILE in manifest["files"]:
        return "model"
    engine = manifest.get("engine")
    if engine and engine.get("universal"):
        return "universal"
    return "zero" if engine else "none"


def _trained_weights(path: Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights the optimizer trained (model.safetensors, or the ZeRO partitions)."""
    source = _weights_source(manifest)
    if source == "model":
        _verify_files(path, manifest, [MODEL_FILE])
        return _load_safetensors(path / MODEL_FILE)
    if source == "universal":
        raise CheckpointError(
            f"checkpoint {path}: a universal checkpoint (from `ckpt convert`) is for resuming "
            "at another world size; evaluate, predict or export the checkpoint it was "
            "converted from, or the run's best/")
    if source == "zero":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        _verify_files(path, manifest, [n for n in manifest["files"] if n.startswith(f"{DS_TAG}/")])
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG))
    raise CheckpointError(f"checkpoint {path}: holds no model weights")


def _apply_ema_shadow(path: Path, manifest: Mapping[str, Any],
                      state: dict[str, torch.Tensor]) -> None:
    """Put the EMA shadow in place of the trained weights, in their dtypes, as the run's
    evaluations did (a bf16 model evaluates the shadow rounded to bf16)."""
    _verify_files(path, manifest, [EMA_FILE])
    shadow = _torch_load(path / EMA_FILE).get("shadow") or {}
    unknown = sorted(set(shadow) - set(state))
    if unknown:
        raise CheckpointError(f"checkpoint {path}: {EMA_FILE} has a shadow for "
                              f"'{unknown[0]}', which its weights do not have")
    for name, value in shadow.items():
        state[name] = value.to(state[name].dtype)


def convert_zero_to_universal(path: str | Path, out: str | Path) -> Path:
    """Turn a ZeRO checkpoint into DeepSpeed's universal format, loadable at any world size."""
    from argparse import Namespace

    src = Path(path).absolute()
    dst = Path(out).absolute()
    manifest = read_manifest(src)
    if not manifest.get("engine"):
        raise CheckpointError(
            f"checkpoint {src}: has no DeepSpeed ZeRO state; it loads at any world size as is"
        )
    if manifest["engine"].get("universal"):
        raise CheckpointError(f"checkpoint {src}: is already a universal checkpoint (converted "
                              f"from {manifest.get('converted_from')}); it loads at any world "
                              "size as is")
    _refuse_inside_checkpoints(dst, src, "convert")
    if dst.exists():
        raise CheckpointError(f"convert: {dst} already exists")
    _verify_files(src, manifest, manifest["files"])
    from deepspeed.checkpoint import ds_to_universal

    tmp = dst.parent / f".tmp-convert-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        for name in manifest["files"]:
            if not name.startswith(f"{DS_TAG}/"):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / name, tmp / name)
        args = Namespace(
            input_folder=str(src / DS_TAG),
            output_folder=str(tmp / DS_TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        try:
            ds_to_universal.main(args)
        except KeyError as exc:  # its lookup of a parameter group's AdamW state
            raise CheckpointError(
                f"convert: {src.name} has no optimizer state for parameter group {exc} (a "
                "task head that has not taken an optimizer step yet), which DeepSpeed's "
                "universal conversion needs: convert a later checkpoint") from None
        files = _digests(tmp, _list_files(tmp))
        new = dict(manifest, files=files, converted_from=str(src))
        new["engine"] = dict(manifest["engine"], universal=True)
        _commit(tmp, new)
        _rename_into_place(tmp, dst, "convert")
        _fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def export_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    encoder_prefix: str = "encoder.",
    encoder_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a plain Hugging Face encoder dir (model.safetensors + config.json) plus heads.safetensors.

    config.json comes from `encoder_config`, else from an `encoder_config.json` saved in the
    checkpoint (or in OUTPUT); run files (config.yaml, labels.json, tokenizer/) are copied along.
    """
    src = Path(path).absolute()
    dst = Path(out_dir).absolute()
    if dst.is_symlink() and dst.is_dir():  # a link to an (empty) folder: fill that folder
        dst = dst.resolve()
    _refuse_inside_checkpoints(dst, src, "export")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"export: {dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"export: {dst} exists and is not empty")
    state = load_model_state(src)
    encoder = {
        k[len(encoder_prefix) :]: v for k, v in state.items() if k.startswith(encoder_prefix)
    }
    heads = {k: v for k, v in state.items() if not k.startswith(encoder_prefix)}
    if not encoder:
        raise CheckpointError(f"export: no weights under '{encoder_prefix}' in {src}")
    tmp = dst.parent / f".tmp-export-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        _save_safetensors(encoder, tmp / MODEL_FILE, "encoder")
        if heads:
            _save_safetensors(heads, tmp / "heads.safetensors", "heads")
        _copy_run_files(src, tmp, encoder_config)
        _rename_into_place(tmp, dst, "export")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _rename_into_place(tmp: Path, dst: Path, what: str) -> None:
    """The finished `tmp` dir becomes `dst`, which was absent or empty when the command began:
    something else (a second command) may have filled it since."""
    try:
        if dst.is_dir() and not dst.is_symlink():
            dst.rmdir()  # empty, as checked at the start (else: OSError)
        os.rename(tmp, dst)
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot put the result in place at {dst} "
                              f"({_error_text(exc)}; written by another command meanwhile?): "
                              "nothing there was replaced") from None


def _refuse_inside_checkpoints(dst: Path, src: Path, what: str) -> None:
    folder = managing_folder(dst, src)
    if folder is not None:
        raise CheckpointError(f"{what}: {dst} {inside_text(dst, folder)}, {MANAGED}")


MANAGED = "which the run's saves, rotation and resumes manage: pick a folder outside it"


def inside_text(dst: Path, folder: Path) -> str:
    """'is inside FOLDER', or 'is FOLDER' when `dst` is that folder."""
    return f"is {folder}" if dst.resolve() == folder else f"is inside {folder}"


def managing_folder(dst: Path, src: Path | None = None) -> Path | None:
    """The checkpoint, or a run's checkpoints/ or best/ (the run of checkpoint `src`, or any
    other), that `dst` is or lies inside: that run's next save, rotation or resume would take
    what is written there for a damaged checkpoint, or write over it; None when none."""
    real = dst.resolve()
    run = run_holding(src.resolve()) if src is not None else None
    for folder in (real, *real.parents):
        if was_committed(folder) or (folder.name in (CHECKPOINTS_DIR, BEST_DIR) and (
                folder.parent == run or holds_a_run(folder.parent))):
            return folder
    return None


def run_holding(checkpoint: Path) -> Path | None:
    """The run a checkpoint belongs to: OUTPUT of OUTPUT/best, OUTPUT/checkpoints/
    checkpoint-N or OUTPUT/abandoned/<branch>/<checkpoint> (set aside by a resume or a best/
    swap); None for one elsewhere (an exported copy, say)."""
    if checkpoint.name == BEST_DIR:
        return checkpoint.parent
    if checkpoint.parent.name == CHECKPOINTS_DIR:
        return checkpoint.parent.parent
    run = checkpoint.parent.parent.parent
    if checkpoint.parent.parent.name == ABANDONED_DIR and holds_a_run(run):
        return run
    return None


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` is a run's output dir: its config.yaml with the header every run
    writes first, or (a run of an earlier version) labels.json beside the run's log. A
    hand-written config.yaml or a label list of one's own is no run."""
    from mtl_dist.config import is_saved_config

    return is_saved_config(folder / "config.yaml") or (
        (folder / "labels.json").is_file() and (folder / "metrics.jsonl").is_file())


def _copy_run_files(src: Path, tmp: Path, encoder_config: Mapping[str, Any] | None) -> None:
    """config.json, config.yaml, labels.json and tokenizer files for an exported model dir."""
    # a checkpoint-N kept elsewhere in its run (out of rotation's way): its grandparent
    run = run_holding(src) or (src.parent.parent if _step_of(src) is not None else None)
    roots = [src] if run is None or src.name == BEST_DIR else [src, run]
    if encoder_config is not None:
        (tmp / "config.json").write_text(_to_json(dict(encoder_config), "encoder_config"))
    for root in roots:
        if not (tmp / "config.json").exists() and (root / "encoder_config.json").is_file():
            shutil.copyfile(root / "encoder_config.json", tmp / "config.json")
        for name in ("config.yaml", "labels.json"):
            if (root / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(root / name, tmp / name)
        if (root / "tokenizer").is_dir():
            shutil.copytree(root / "tokenizer", tmp, dirs_exist_ok=True)
    for copied in sorted(tmp.glob("*.json")):  # config.json and the tokenizer's, copied unchecked
        if copied.is_file():
            try:
                json.loads(copied.read_text())
            except ValueError as exc:
                raise CheckpointError(f"export: {copied.name} copied from {src} or its run is "
                                      f"not valid JSON ({_error_text(exc)}): the export would "
                                      "not load with from_pretrained") from exc
    if not (tmp / "config.json").exists():  # the export would not load with from_pretrained
        raise CheckpointError(
            f"export: no encoder_config.json in {src} or in its run's output dir (a run of an "
            "earlier version keeps it in best/ only): export best/ instead")
