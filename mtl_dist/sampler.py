"""The multi-task batch plan (global, pure numpy) and its per-rank view; the sampler cursor.

One plan, many views: for (seed, epoch) `MultiTaskBatchPlan` computes a sequence of *global*
batches, each of exactly `global_batch_size` (G) within-task indices of ONE task. Rank r of W
takes slice `[r*B:(r+1)*B]` (B = G // W) of each global batch, so every rank runs the same
task at every step and the samples of step k depend on (seed, epoch, k, G) only, never on W.
The plan uses no global RNG: every generator is `np.random.default_rng([seed, epoch, task, salt])`.

Per-task quantities (n = task size, w = weight >= 0, cap = per-task cap or None):

- usable size  e = min(n, cap): each epoch uses a fresh random subset of e samples (all n
  when uncapped); a task with e == 0 or w == 0 is never scheduled.
- batch count  b(x) = ceil(x / G); with drop_last, b(x) = max(1, floor(x / G)) for x > 0.
- sample stream: the task's indices for an epoch are successive passes, each a fresh
  permutation of its e usable samples (pass 0 from the (seed, epoch, task) generator, passes
  1, 2, ... are reshuffles of the same subset, from the same generator; a last partial pass is
  drawn as a random ordered sample without replacement, i.e. the head of a reshuffle). The task
  takes the first k*G indices of that stream as its k global batches, in stream order. So a
  task needing more than e samples in an epoch cycles through reshuffles, and each of its
  samples appears floor(k*G/e) or ceil(k*G/e) times (exactly k*G mod e of them the larger).

Epoch length (global steps) and task counts k per strategy:

- proportional (default): k = b(max(1, round(e * w))); epoch = sum of k. The task order is the
  multiset of tasks shuffled by the (seed, epoch) generator. With w == 1 and no cap every sample
  appears exactly once, plus the wrap fill below.
- uniform: K = max over scheduled tasks of b(e); k = max(1, round(K * w / max w)); epoch = sum
  of k (= T * K with equal weights). Smaller tasks cycle through reshuffles. Order shuffled.
- round_robin: same k as uniform; tasks in a fixed cycle 0, 1, ..., T-1, 0, 1, ...; a task
  whose k is used up leaves the cycle. Epoch = sum of k (= T * K with equal weights).
- temperature: epoch = the proportional epoch length L; each of the L steps draws its task
  independently with p proportional to (e * w) ** (1 / temperature); a task drawn k times
  takes k*G indices from its stream.

Uneven sizes: with drop_last=False the last global batch of a task that does not fill G is
completed by wrap-around: the first samples of the task's next reshuffle in the same epoch
(pass 1). With drop_last=True that partial batch is dropped (its samples are the tail of the
epoch's random permutation, so different ones each epoch), except that a task with
0 < e < G keeps ONE global batch, wrapped through reshuffles, so it still trains. Every global
batch always holds exactly G indices, so every rank always gets B samples: no rank waits.

group_by_length: each pass is cut into mega-batches of mega_batch_mult * G consecutive
indices, each sorted by length (longest first, ties in random order); the task's batches are
then put in random order. The B-sized rank slices of a global batch thus have similar lengths.
Only a batch straddling two passes mixes lengths (and may repeat a sample).

Resume is a cursor: `RankBatchSampler.state_dict()` is (epoch, step, plan hash, G);
`load_state_dict` only checks and sets it (O(1)); the epoch's arrays are computed once, on the
first batch, at the same cost for any cursor. Only the current epoch's arrays are cached.
A cursor saved under another plan raises SamplerStateError naming what differs ("global batch
size 256 -> 512", "seed 1 -> 2", ...). Opt-in `on_global_batch_change="replan"`: when ONLY the
global batch differs, the rest of the saved epoch is skipped and training continues at step 0
of the next epoch under the new plan (of the saved epoch itself if its step was 0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mtl_dist.collectives import host_group
from mtl_dist.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("proportional", "uniform", "temperature", "round_robin")
ON_GLOBAL_BATCH_CHANGE = ("error", "replan")
STATE_KEYS = ("epoch", "step", "plan_hash", "global_batch_size")
_PLAN_VERSION = "mtl_dist.sampler/1"
_SALT_TASK = 0x5A11  # within-task streams: default_rng([seed, epoch, task, _SALT_TASK])
_SALT_ORDER = 0x0DE5  # task order: default_rng([seed, epoch, 0, _SALT_ORDER])
# As a refusal names them: the config key that sets each (the data for the sizes/lengths).
_PARAM_NAMES = {
    "version": "plan version",
    "seed": "seed (train.seed)",
    "task_sizes": "task sizes (the train files)",
    "global_batch_size": "global batch size",
    "strategy": "strategy (sampler.strategy)",
    "temperature": "temperature (sampler.temperature)",
    "task_weights": "task weights (tasks.<i>.sample_weight)",
    "task_caps": "task caps (tasks.<i>.max_samples)",
    "drop_last": "drop_last (sampler.drop_last)",
    "group_by_length": "group_by_length (sampler.group_by_length)",
    "mega_batch_mult": "mega_batch_mult (sampler.mega_batch_mult)",
    "lengths_digest": "sample lengths (the train files, data.max_length)",
}


class SamplerStateError(CheckpointError):
    """A saved sampler cursor does not fit this run's plan (global batch, seed, sizes, ...)."""


@dataclass(frozen=True)
class _EpochArrays:
    """One epoch's plan: task of each step, row of that task's batch matrix, the matrices."""

    epoch: int
    order: np.ndarray  # (L,) int32 task id per step
    rows: np.ndarray  # (L,) int32 row in batches[order[step]]
    batches: tuple[np.ndarray, ...]  # per task (k_t, G) within-task indices

    @property
    def nbytes(self) -> int:
        return self.order.nbytes + self.rows.nbytes + sum(b.nbytes for b in self.batches)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"sampler: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class MultiTaskBatchPlan:
    """The global multi-task plan: for (seed, epoch), the task and G indices of every step."""

    def __init__(
        self,
        task_sizes: Sequence[int],
        *,
        global_batch_size: int,
        seed: int,
        strategy: str = "proportional",
        temperature: float = 2.0,
        task_weights: Sequence[float] | None = None,
        task_caps: Sequence[int | None] | None = None,
        drop_last: bool = False,
        lengths: Sequence[np.ndarray] | None = None,
        group_by_length: bool = False,
        mega_batch_mult: int = 50,
    ) -> None:
        if len(task_sizes) == 0:
            raise ConfigError("sampler: at least one task is needed, got task_sizes=[]")
        self.task_sizes = tuple(
            _check_int(f"task_sizes[{i}]", n, 0) for i, n in enumerate(task_sizes)
        )
        self.global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        if strategy not in STRATEGIES:
            raise ConfigError(
                f"sampler.strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}"
            )
        self.strategy = strategy
        if not (
            isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0
        ):
            raise ConfigError(f"sampler.temperature: expected a number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.task_weights = self._weights(task_weights)
        self.task_caps = self._caps(task_caps)
        self.drop_last = bool(drop_last)
        self.group_by_length = bool(group_by_length)
        self.mega_batch_mult = _check_int("mega_batch_mult", mega_batch_mult, 1)
        self._lengths = self._check_lengths(lengths)
        self._usable = np.array(
            [
                n if c is None else min(n, c)
                for n, c in zip(self.task_sizes, self.task_caps, strict=True)
            ],
            dtype=np.int64,
        )
        self._index_dtype = np.int32 if max(self.task_sizes) < 2**31 else np.int64
        self._counts = self._task_counts()
        self._cache: _EpochArrays | None = None
        self._hash: str | None = None
        self._lengths_digest: str | None = None

    # ----- validation -------------------------------------------------------------------
    def _weights(self, weights: Sequence[float] | None) -> tuple[float, ...]:
        if weights is None:
            return (1.0,) * len(self.task_sizes)
        if len(weights) != len(self.task_sizes):
            raise ConfigError(
                f"sampler: task_weights has {len(weights)} entries for {len(self.task_sizes)} tasks"
            )
        for i, w in enumerate(weights):
            if not (isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0):
                raise ConfigError(f"tasks[{i}].sample_weight: expected a number >= 0, got {w!r}")
        return tuple(float(w) for w in weights)

    def _caps(self, caps: Sequence[int | None] | None) -> tuple[int | None, ...]:
        if caps is None:
            return (None,) * len(self.task_sizes)
        if len(caps) != len(self.task_sizes):
            raise ConfigError(
                f"sampler: task_caps has {len(caps)} entries for {len(self.task_sizes)} tasks"
            )
        return tuple(
            None if c is None else _check_int(f"tasks[{i}].max_samples", c, 1)
            for i, c in enumerate(caps)
        )

    def _check_lengths(self, lengths: Sequence[np.ndarray] | None) -> tuple[np.ndarray, ...] | None:
        if not self.group_by_length:
            return None
        if lengths is None:
            raise ConfigError(
                "sampler.group_by_length: needs the per-sample lengths of every task, got none"
            )
        if len(lengths) != len(self.task_sizes):
            raise ConfigError(
                f"sampler: lengths has {len(lengths)} arrays for {len(self.task_sizes)} tasks"
            )
        out = []
        for i, (arr, n) in enumerate(zip(lengths, self.task_sizes, strict=True)):
            a = np.asarray(arr, dtype=np.int64)
            if a.shape != (n,) or (n and a.min() < 0):
                raise ConfigError(
                    f"sampler: lengths[{i}] must be {n} non-negative ints, got shape {a.shape}"
                )
            out.append(_readonly(a))
        return tuple(out)

    # ----- counts and epoch length ------------------------------------------------------
    def _nbatches(self, x: int) -> int:
        """b(x): global batches for x samples (ceil, or floor but at least one with drop_last)."""
        if x <= 0:
            return 0
        g = self.global_batch_size
        return max(1, x // g) if self.drop_last else -(-x // g)

    def _active(self) -> list[int]:
        return [
            t
            for t, (e, w) in enumerate(zip(self._usable, self.task_weights, strict=True))
            if e > 0 and w > 0
        ]

    def _task_counts(self) -> np.ndarray:
        """Global batches per task per epoch (for temperature: the proportional counts)."""
        k = np.zeros(len(self.task_sizes), dtype=np.int64)
        active = self._active()
        if self.strategy in ("proportional", "temperature"):
            for t in active:
                k[t] = self._nbatches(max(1, round(int(self._usable[t]) * self.task_weights[t])))
        elif active:
            big_k = max(self._nbatches(int(self._usable[t])) for t in active)
            w_max = max(self.task_weights[t] for t in active)
            for t in active:
                k[t] = max(1, round(big_k * self.task_weights[t] / w_max))
        return k

    def num_steps(self, epoch: int) -> int:
        """Global steps in `epoch` (the same for every epoch; no arrays are built)."""
        _check_int("epoch", epoch, 0)
        return int(self._counts.sum())

    def temperature_probs(self) -> np.ndarray:
        """Per-step task probabilities of the temperature strategy: p ∝ (e * w) ** (1/T)."""
        mass = self._usable.astype(np.float64) * np.asarray(self.task_weights)
        live = mass > 0
        p = np.zeros_like(mass)
        with np.errstate(over="ignore", under="ignore"):
            p[live] = mass[live] ** (1.0 / self.temperature)
        total = p.sum()
        if live.any() and not 0 < total < np.inf:
            # a small temperature overflows (or underflows) the powers: the same ratios in
            # log space, scaled so the largest task's term is 1
            log_mass = np.log(mass[live])
            p[live] = np.exp((log_mass - log_mass.max()) / self.temperature)
            total = p.sum()
        return p / total if total > 0 else p

    # ----- the plan ---------------------------------------------------------------------
    def batch(self, epoch: int, step: int) -> tuple[int, np.ndarray]:
        """(task_id, read-only within-task indices of length G) of global step `step`."""
        ep = self._epoch_arrays(epoch)
        self._check_step(ep, step)
        t = int(ep.order[step])
        return t, ep.batches[t][ep.rows[step]]

    def batches(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps start..stop-1 of `epoch` at once: task ids (n,) and within-task indices (n, G)."""
        ep = self._epoch_arrays(epoch)
        if not 0 <= start <= stop <= len(ep.order):
            raise IndexError(f"sampler: steps {start}..{stop} are outside epoch {ep.epoch} "
                             f"(0..{len(ep.order)})")
        order, rows = ep.order[start:stop], ep.rows[start:stop]
        idx = np.empty((len(order), self.global_batch_size), dtype=self._index_dtype)
        for t, batches in enumerate(ep.batches):
            mine = order == t
            idx[mine] = batches[rows[mine]]
        return order, idx

    def task_of(self, epoch: int, step: int) -> int:
        """Task id of global step `step` of `epoch`."""
        ep = self._epoch_arrays(epoch)
        self._check_step(ep, step)
        return int(ep.order[step])

    def task_order(self, epoch: int) -> np.ndarray:
        """Read-only task id of every step of `epoch`."""
        return self._epoch_arrays(epoch).order

    @property
    def cached_nbytes(self) -> int:
        """Bytes held by the cached epoch's arrays (0 when nothing is cached)."""
        return 0 if self._cache is None else self._cache.nbytes

    @staticmethod
    def _check_step(ep: _EpochArrays, step: int) -> None:
        if not 0 <= step < len(ep.order):
            raise IndexError(
                f"sampler: step {step} is outside epoch {ep.epoch} (0..{len(ep.order) - 1})"
            )

    def _epoch_arrays(self, epoch: int) -> _EpochArrays:
        _check_int("epoch", epoch, 0)
        if self._cache is None or self._cache.epoch != epoch:
            self._cache = None  # free the previous epoch before building the next
            self._cache = self._build(epoch)
        return self._cache

    def _build(self, epoch: int) -> _EpochArrays:
        order = self._task_order(epoch)
        counts = np.bincount(order, minlength=len(self.task_sizes))
        rows = _occurrence_index(order, counts)
        batches = tuple(self._task_batches(epoch, t, int(k)) for t, k in enumerate(counts))
        return _EpochArrays(epoch, _readonly(order), _readonly(rows), batches)

    def _task_order(self, epoch: int) -> np.ndarray:
        """Task id per step: shuffled multiset, fixed cycle, or temperature draws."""
        n_tasks = len(self.task_sizes)
        if self.strategy == "round_robin":
            mask = np.arange(int(self._counts.max(initial=0)))[:, None] < self._counts[None, :]
            return np.nonzero(mask)[1].astype(np.int32)
        g = np.random.default_rng([self.seed, epoch, 0, _SALT_ORDER])
        if self.strategy == "temperature":
            steps = int(self._counts.sum())
            if steps == 0:
                return np.zeros(0, dtype=np.int32)
            return g.choice(n_tasks, size=steps, p=self.temperature_probs()).astype(np.int32)
        order = np.repeat(np.arange(n_tasks, dtype=np.int32), self._counts)
        g.shuffle(order)
        return order

    def _task_batches(self, epoch: int, task: int, k: int) -> np.ndarray:
        """The (k, G) within-task indices of `task` in `epoch`: its stream, grouped, cut in batches."""
        size = self.global_batch_size
        if k == 0:
            return _readonly(np.zeros((0, size), dtype=self._index_dtype))
        g = np.random.default_rng([self.seed, epoch, task, _SALT_TASK])
        usable = int(self._usable[task])
        stream = _stream(g, self.task_sizes[task], usable, k * size).astype(
            self._index_dtype, copy=False
        )
        if self.group_by_length:
            stream = _group_by_length(
                stream, self._lengths[task], usable, self.mega_batch_mult * size
            )
        batches = stream.reshape(k, size)
        if self.group_by_length:
            batches = batches[g.permutation(k)]
        return _readonly(batches)

    # ----- identity ---------------------------------------------------------------------
    @property
    def plan_params(self) -> dict[str, Any]:
        """The parameters the plan depends on (irrelevant ones as None), JSON-able."""
        return {
            "version": _PLAN_VERSION,
            "seed": self.seed,
            "task_sizes": list(self.task_sizes),
            "global_batch_size": self.global_batch_size,
            "strategy": self.strategy,
            "temperature": self.temperature if self.strategy == "temperature" else None,
            "task_weights": list(self.task_weights),
            "task_caps": list(self.task_caps),
            "drop_last": self.drop_last,
            "group_by_length": self.group_by_length,
            "mega_batch_mult": self.mega_batch_mult if self.group_by_length else None,
            "lengths_digest": self._digest_lengths() if self.group_by_length else None,
        }

    @property
    def plan_hash(self) -> str:
        """sha256 of the plan parameters: equal hashes give equal plans."""
        if self._hash is None:
            self._hash = params_hash(self.plan_params)
        return self._hash

    def _digest_lengths(self) -> str:
        if self._lengths_digest is None:
            h = hashlib.sha256()
            for a in self._lengths or ():
                h.update(np.int64(a.size).tobytes())
                h.update(a.tobytes())
            self._lengths_digest = h.hexdigest()[:16]
        return self._lengths_digest


def params_hash(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of plan parameters."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _occurrence_index(order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For each step, how many earlier steps had the same task (the row of its batch)."""
    by_task = np.argsort(order, kind="stable")
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    rows = np.empty(len(order), dtype=np.int32)
    rows[by_task] = np.arange(len(order)) - starts
    return rows


def _stream(g: np.random.Generator, n: int, usable: int, need: int) -> np.ndarray:
    """First `need` indices of a task's epoch stream: a random `usable`-subset, then reshuffles of it.

    A last, partial pass is a random ordered sample without replacement (distributed as the head
    of a reshuffle, without shuffling the whole subset for a few fill samples)."""
    first = g.permutation(n) if usable == n else g.choice(n, size=usable, replace=False)
    if need <= usable:
        return first[:need]
    full, part = divmod(need - usable, usable)
    pieces = [first]
    if full:
        pieces.append(g.permuted(np.broadcast_to(first, (full, usable)), axis=1).ravel())
    if part:
        pieces.append(first[g.choice(usable, size=part, replace=False)])
    return np.concatenate(pieces)


def _group_by_length(stream: np.ndarray, lengths: np.ndarray, usable: int, mega: int) -> np.ndarray:
    """Sort each mega-batch (within one pass) by length, longest first; ties keep random order."""
    pos = np.arange(len(stream), dtype=np.int64)
    chunk = (pos // usable) * -(-usable // mega) + (pos % usable) // mega
    lens = lengths[stream]
    top = int(lens.max()) + 1
    return stream[np.argsort(chunk * top + (top - 1 - lens), kind="stable")]


class RankBatchSampler(Sampler[list[int]]):
    """Rank r's view of the plan, as a DataLoader `batch_sampler`: flat indices of slice r."""

    def __init__(
        self,
        plan: MultiTaskBatchPlan,
        offsets: Sequence[int],
        rank: int,
        world_size: int,
        *,
        on_global_batch_change: str = "error",
    ) -> None:
        world_size = _check_int("world_size", world_size, 1)
        rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ConfigError(f"sampler: rank {rank} is not below world size {world_size}")
        if plan.global_batch_size % world_size:
            raise ConfigError(
                f"sampler: global batch size {plan.global_batch_size} is not a multiple of world size {world_size}"
            )
        if len(offsets) != len(plan.task_sizes):
            raise ConfigError(f"sampler: {len(offsets)} offsets for {len(plan.task_sizes)} tasks")
        if on_global_batch_change not in ON_GLOBAL_BATCH_CHANGE:
            raise ConfigError(
                f"sampler.on_global_batch_change: expected error or replan, got {on_global_batch_change!r}"
            )
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.per_device_batch_size = plan.global_batch_size // world_size
        self.on_global_batch_change = on_global_batch_change
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._epoch = 0
        self._position = 0
        self._resumed = False
        self.replanned_from: int | None = None  # the saved global batch, after a replan

    @property
    def epoch(self) -> int:
        """The epoch the cursor is in."""
        return self._epoch

    @property
    def position(self) -> int:
        """Global steps of this epoch already consumed (advanced)."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at step 0 — except right after `load_state_dict` into that same epoch,
        where the restored cursor is kept (so the usual loop `set_epoch(e)` is resume-safe)."""
        epoch = _check_int("epoch", epoch, 0)
        if not (self._resumed and epoch == self._epoch):
            self._position = 0
        self._epoch = epoch
        self._resumed = False

    def __len__(self) -> int:
        """Steps left in the epoch from the cursor."""
        return self.plan.num_steps(self._epoch) - self._position

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's flat indices for every step from the cursor to the epoch's end."""
        self._resumed = False
        epoch, start = self._epoch, self._position
        for step in range(start, self.plan.num_steps(epoch)):
            yield self.flat_indices(epoch, step)

    def local(self, idx: np.ndarray) -> np.ndarray:
        """This rank's slice of a step's global-batch indices (along the last axis)."""
        lo = self.rank * self.per_device_batch_size
        return idx[..., lo:lo + self.per_device_batch_size]

    def flat_indices(self, epoch: int, step: int) -> list[int]:
        """This rank's dataset (flat) indices of `step` of `epoch`, as `__iter__` yields them."""
        task, idx = self.plan.batch(epoch, step)
        return (self.local(idx).astype(np.int64) + self._offsets[task]).tolist()

    def advance(self, n: int = 1) -> None:
        """Move the cursor by n consumed global steps (the trainer calls this, not the iterator)."""
        n = _check_int("advance n", n, 0)
        end = self.plan.num_steps(self._epoch)
        if self._position + n > end:
            raise ValueError(
                f"sampler: cannot advance {n} from step {self._position}: epoch {self._epoch} has {end}"
            )
        self._position += n
        self._resumed = False

    def task_of(self, epoch: int, step: int) -> int:
        """Task id of global step `step` of `epoch` (the same on every rank)."""
        return self.plan.task_of(epoch, step)

    def state_dict(self) -> dict[str, Any]:
        """The cursor: epoch, step in epoch, plan hash, global batch size (+ plan params, for messages)."""
        return {
            "epoch": self._epoch,
            "step": self._position,
            "plan_hash": self.plan.plan_hash,
            "global_batch_size": self.plan.global_batch_size,
            "plan_params": self.plan.plan_params,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Jump to a saved cursor in O(1); SamplerStateError if it belongs to another plan."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise SamplerStateError(f"sampler state is missing key(s) {', '.join(missing)}")
        epoch, step = int(state["epoch"]), int(state["step"])
        saved_g, ours = int(state["global_batch_size"]), self.plan.plan_params
        if state["plan_hash"] != self.plan.plan_hash:
            diffs = _describe_diffs(state.get("plan_params"), ours, saved_g)
            if saved_g != self.plan.global_batch_size and self.on_global_batch_change == "replan":
                if params_hash({**ours, "global_batch_size": saved_g}) == state["plan_hash"]:
                    self._replan(epoch, step, saved_g)
                    return
                raise SamplerStateError(
                    f"sampler state does not match this run beyond the global batch: {diffs}"
                )
            # the rest of the run would follow another order than its start: not continue it
            hint = ": they decide the order of every epoch's batches; resume with the " \
                "checkpoint's, or start a new run"
            saved = state.get("plan_params")
            others = isinstance(saved, Mapping) and any(
                saved.get(k) != ours.get(k) for k in _PARAM_NAMES if k != "global_batch_size")
            if saved_g != self.plan.global_batch_size and not others:  # replan would take it
                hint = (
                    " (global batch = per_device_batch_size x world size; keep it, or set "
                    "sampler.on_global_batch_change=replan to start the next epoch re-planned)"
                )
            raise SamplerStateError(
                f"sampler state does not match this run (checkpoint -> now): {diffs}{hint}"
            )
        if epoch < 0 or not 0 <= step <= self.plan.num_steps(epoch):
            raise SamplerStateError(
                f"sampler state cursor epoch {epoch} step {step} is outside the plan "
                f"(0..{self.plan.num_steps(max(epoch, 0))} steps per epoch)"
            )
        self._epoch, self._position, self._resumed = epoch, step, True

    def _replan(self, epoch: int, step: int, saved_g: int) -> None:
        """Opt-in: the global batch changed; begin the next not-yet-started epoch at step 0."""
        next_epoch = epoch if step == 0 else epoch + 1
        (logger.warning if self.rank == 0 else logger.debug)(  # said once, not once per rank
            "sampler: global batch size %d -> %d; re-planning: epoch %d step %d is left, "
            "training continues at epoch %d step 0",
            saved_g,
            self.plan.global_batch_size,
            epoch,
            step,
            next_epoch,
        )
        self._epoch, self._position, self._resumed = next_epoch, 0, True
        self.replanned_from = saved_g


def _describe_diffs(saved: Any, ours: Mapping[str, Any], saved_g: int) -> str:
    """One line naming each plan parameter that differs, 'name old -> new'."""
    parts = []
    if saved_g != ours["global_batch_size"]:
        parts.append(f"global batch size {saved_g} -> {ours['global_batch_size']}")
    if isinstance(saved, Mapping):
        for key, name in _PARAM_NAMES.items():
            if key != "global_batch_size" and saved.get(key) != ours.get(key):
                parts.append(f"{name} {saved.get(key)} -> {ours.get(key)}")
    if not parts:
        parts.append("plan parameters differ (hash only in the checkpoint)")
    return ", ".join(parts)


def eval_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous indices rank r evaluates: the ranks' shards partition range(n) (sizes differ by <= 1)."""
    n = _check_int("eval size", n, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ConfigError(f"sampler: rank {rank} is not below world size {world_size}")
    return np.arange(n * rank // world_size, n * (rank + 1) // world_size, dtype=np.int64)


def check_task_agreement(task_id: int, step: int) -> None:
    """All-gather (task, step) across ranks and raise RuntimeError on every rank if they differ.

    A debug guard for invariant 1; a no-op unless torch.distributed is initialized. Gathered
    over gloo (`collectives.host_group`): no GPU sync, so the guard can stay on in training.
    """
    group = host_group()
    if group is None:
        return
    mine = torch.tensor([int(task_id), int(step)], dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine, group=group)
    rows = [tuple(g.tolist()) for g in gathered]
    if any(r != rows[0] for r in rows):
        ranks = ", ".join(
            f"rank {r} task {t}" + ("" if s == step else f" (at its step {s})")
            for r, (t, s) in enumerate(rows)
        )
        raise RuntimeError(f"ranks disagree on the task at step {step}: {ranks}")
