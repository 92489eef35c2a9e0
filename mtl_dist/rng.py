"""Per-rank RNG state (python, numpy, torch CPU, CUDA) as plain tensors and numbers.

Kept in a format that `torch.load(weights_only=True)` accepts, so a checkpoint's RNG file
can be read without unpickling arbitrary objects.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

RNG_FORMAT = 1


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global python, numpy, torch CPU and (this rank's) CUDA generators."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        "cuda": None,
        "cuda_device": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        state["cuda"] = torch.cuda.get_rng_state(device)
        state["cuda_device"] = int(device)
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put the generators back exactly as `capture_rng_state` saw them."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def derived_seed(base: str, rank: int) -> int:
    """A deterministic 63-bit seed from a base string and a rank (for ranks with no saved state)."""
    digest = hashlib.sha256(f"{base}:rank{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rank_seed(seed: int, rank: int) -> int:
    """This rank's seed for dropout and the like: `train.seed + rank`, wrapped into numpy's
    [0, 2**32) (train.seed=2**32-1 made rank 1 crash every multi-process run)."""
    return (seed + rank) % 2**32


def seed_all(seed: int) -> None:
    """Seed python, numpy, torch CPU and CUDA from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_summary(state: dict[str, Any]) -> dict[str, Any]:
    """Short fingerprints of each generator (for `ckpt inspect`): equal states give equal strings."""

    def fp(t: torch.Tensor) -> str:
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]

    py = state["python"]
    npy = state["numpy"]
    summary: dict[str, Any] = {
        "python": fp(py["state"]),
        "numpy": f"{fp(npy['keys'])}@{npy['pos']}",
        "torch_cpu": fp(state["torch_cpu"]),
        "cuda": None if state.get("cuda") is None else fp(state["cuda"]),
    }
    if state.get("cuda_device") is not None:
        summary["cuda_device"] = state["cuda_device"]
    return summary
