"""Checkpoint manager on 2 CPU processes (gloo): commit protocol, per-rank RNG, ZeRO-2 round trip.

Two launches in all (start-up dominates): one 2-rank launch checks the plain (DDP-style) protocol
and DeepSpeed ZeRO-2 save/load and converts the ZeRO checkpoint to the universal format; one
1-rank launch resumes that universal checkpoint at the new world size.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_checkpoint import MANIFEST, make_objects, save, state_equal, train_step

from mtl_dist import checkpoint as ck
from mtl_dist.checkpoint import CheckpointManager
from mtl_dist.errors import CheckpointError
from mtl_dist.zero import free_port

pytestmark = pytest.mark.slow

MANIFEST2 = {**MANIFEST, "world_size": 2}


def _init(rank: int, world: int, port: int) -> None:
    """torch.distributed on gloo, with the variables DeepSpeed expects from a launcher."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def _draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(2).tolist()]


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- plain protocol


class _Boom:
    def state_dict(self) -> dict:
        raise RuntimeError("boom")

    def load_state_dict(self, state: dict) -> None:
        pass


def _plain_checks(rank: int, out: Path) -> None:
    objs = make_objects(0)  # same weights on both ranks, as after DDP's broadcast
    train_step(objs)
    random.seed(10 + rank)
    np.random.seed(10 + rank)
    torch.manual_seed(10 + rank)
    mgr = CheckpointManager(out, save_total_limit=2)
    path = save(mgr, 1, objs, manifest=MANIFEST2)

    # Both ranks wrote their RNG file; one manifest, one marker, nothing temporary left.
    names = sorted(os.listdir(path))
    assert {"rng_state_0.pth", "rng_state_1.pth", "manifest.json", "COMMITTED"} <= set(names)
    assert ck.read_manifest(path)["world_size"] == 2
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-1"]
    expected = _draws()
    mgr.restore_rng(path)
    assert _draws() == expected
    first, second = _gather(expected)
    assert first != second  # each rank has its own streams

    fresh = make_objects(5)
    assert mgr.load(path, fresh, expected_manifest=MANIFEST2)["global_step"] == 1
    assert all(state_equal(fresh[k].state_dict(), objs[k].state_dict()) for k in objs)

    # A failure on one rank fails the save on every rank (no hang) and leaves nothing behind.
    with pytest.raises(
        CheckpointError, match="saving checkpoint-2 failed on rank 0: RuntimeError: boom"
    ):
        save(mgr, 2, {**objs, "bad": _Boom()}, manifest=MANIFEST2)
    dist.barrier()
    left = sorted(os.listdir(out / "checkpoints"))
    dist.barrier()  # (rank 0 must not start the next save before rank 1 has looked)
    assert left == ["checkpoint-1"], left

    # A damaged file is reported on every rank, whichever rank verified it.
    bad = save(mgr, 3, objs, manifest=MANIFEST2)
    if rank == 1:
        data = bytearray((bad / "rng_state_0.pth").read_bytes())
        data[100] ^= 1
        (bad / "rng_state_0.pth").write_bytes(bytes(data))
    dist.barrier()
    with pytest.raises(CheckpointError, match="file 'rng_state_0.pth' is corrupt"):
        mgr.load(bad, make_objects(5))

    train_step(objs)
    save(mgr, 4, objs, manifest=MANIFEST2)
    dist.barrier()  # rotation runs on rank 0 after the others were released
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-3", "checkpoint-4"]
    model_state = objs["model"].state_dict() if rank == 0 else None
    mgr.save_best(4, 0.5, model_state, extra_files={"labels.json": "{}"}, metadata={})
    assert ck.is_committed(out / "best")
    if rank == 0:
        torch.save(objs["model"].state_dict(), out / "ref_model.pt")


# --------------------------------------------------------------------------- ZeRO-2


def _engine(seed: int, world: int):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    loss = engine(torch.randn(2, 8, generator=g)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def _full_state(engine) -> dict:
    """Parameters and AdamW moments per parameter, gathered whole (collective; after a step)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = {
            "fp32": safe_get_full_fp32_param(p).clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
        }
    return out


def _partition(engine) -> dict:
    """This rank's ZeRO partition: fp32 master weights and the AdamW state over it."""
    zero = engine.optimizer
    state = zero.optimizer.state_dict()["state"]
    return {
        "fp32": [t.detach().clone() for t in zero.single_partition_of_fp32_groups],
        "exp_avg": [state[i]["exp_avg"].clone() for i in sorted(state)],
        "exp_avg_sq": [state[i]["exp_avg_sq"].clone() for i in sorted(state)],
        "step": [state[i]["step"].clone() for i in sorted(state)],
    }


def _whole(partitions: list[dict], numel: int) -> dict:
    """Rank partitions of one param group joined and cut to the real element count."""
    return {
        key: torch.cat([p[key][0].flatten() for p in partitions])[:numel]
        for key in ("fp32", "exp_avg", "exp_avg_sq")
    }


def _zero_checks(rank: int, out: Path) -> None:
    import deepspeed

    from mtl_dist.zero import skip_cpu_shm_build

    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    engine = _engine(0, 2)
    for i in range(2):
        _step(engine, 100 * rank + i)
    mgr = CheckpointManager(out, save_total_limit=2)
    manifest = {**MANIFEST2, "zero_stage": 2}
    path = mgr.save(
        2,
        {"model": engine.module, "optimizer": engine.optimizer},
        {"global_step": 2},
        manifest=manifest,
        engine=engine,
    )
    files = ck.read_manifest(path)["files"]
    assert {
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_state_0.pth",
        "rng_state_1.pth",
    } <= set(files)
    assert "model.safetensors" not in files  # DeepSpeed owns model + optimizer
    reference = _partition(engine)
    partitions = _gather(reference)

    other = _engine(1, 2)
    assert not state_equal(other.module.state_dict(), engine.module.state_dict())
    mgr.load(
        path,
        {"model": other.module, "optimizer": other.optimizer},
        engine=other,
        expected_manifest=manifest,
    )
    assert state_equal(_partition(other), reference)
    assert state_equal(other.module.state_dict(), engine.module.state_dict())
    # Training continues identically from the restored engine.
    assert _step(engine, 7 + rank) == _step(other, 7 + rank)
    assert state_equal(_full_state(other), _full_state(engine))

    if rank == 0:
        numel = sum(p.numel() for p in engine.module.parameters())
        torch.save(_whole(partitions, numel), out / "ref_zero.pt")
        ck.convert_zero_to_universal(path, out / "universal")
    dist.barrier()


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    _init(rank, 2, port)
    try:
        _plain_checks(rank, Path(out) / "plain")
        _zero_checks(rank, Path(out) / "zero")
    finally:
        dist.destroy_process_group()


def _one_rank_worker(rank: int, port: int, out: str) -> None:
    _init(0, 1, port)
    try:
        import deepspeed

        from mtl_dist.zero import skip_cpu_shm_build

        skip_cpu_shm_build()
        deepspeed.init_distributed(dist_backend="gloo")
        engine = _engine(3, 1)
        universal = Path(out) / "zero" / "universal"
        mgr = CheckpointManager(Path(out) / "zero", save_total_limit=2)
        mgr.load(
            universal,
            {"model": engine.module, "optimizer": engine.optimizer},
            engine=engine,
            expected_manifest={**MANIFEST, "zero_stage": 2, "world_size": 1},
        )
        mgr.restore_rng(universal)
        reference = torch.load(Path(out) / "zero" / "ref_zero.pt", weights_only=True)
        numel = sum(p.numel() for p in engine.module.parameters())
        assert state_equal(_whole([_partition(engine)], numel), reference)
        _step(engine, 11)  # and it trains on
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mp.spawn(_two_rank_worker, args=(free_port(), str(out)), nprocs=2)
    return out


def test_two_ranks_commit_once_and_zero2_round_trip(two_rank_run: Path) -> None:
    plain = two_rank_run / "plain" / "checkpoints" / "checkpoint-4"
    # World size 2 -> 1 without ZeRO (DDP): loads, and rank 0 gets rank 0's RNG stream.
    mgr = CheckpointManager(two_rank_run / "plain", save_total_limit=2)
    objs = make_objects(9)
    mgr.load(plain, objs, expected_manifest={**MANIFEST, "world_size": 1})
    reference = torch.load(two_rank_run / "plain" / "ref_model.pt", weights_only=True)
    assert state_equal(objs["model"].state_dict(), reference)
    mgr.restore_rng(plain)
    # With ZeRO partitions a new world size is refused, naming the conversion command.
    zero = two_rank_run / "zero" / "checkpoints" / "checkpoint-2"
    with pytest.raises(CheckpointError, match="mtl-dist ckpt convert"):
        ck.check_manifest(zero, ck.read_manifest(zero), {"world_size": 1})
    assert ck.read_manifest(two_rank_run / "zero" / "universal")["engine"]["universal"] is True
    # Export / evaluate paths get whole fp32 weights from the ZeRO partitions.
    state = ck.load_model_state(zero)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "0.weight": (16, 8),
        "0.bias": (16,),
        "2.weight": (4, 16),
        "2.bias": (4,),
    }


def test_universal_checkpoint_resumes_on_one_rank(two_rank_run: Path) -> None:
    mp.spawn(_one_rank_worker, args=(free_port(), str(two_rank_run)), nprocs=1)


def test_a_universal_checkpoint_is_refused_for_weights_in_one_line(two_rank_run: Path) -> None:
    """evaluate/predict/export of a `ckpt convert` output died in zero_to_fp32 with a
    FileNotFoundError traceback (no *_optim_states.pt in a universal checkpoint)."""
    universal = two_rank_run / "zero" / "universal"
    with pytest.raises(CheckpointError, match=r"a universal checkpoint \(from `ckpt convert`\) "
                       r"is for resuming at another world size; evaluate, predict or export "
                       r"the checkpoint it was converted from"):
        ck.load_model_state(universal)
    # converting it again died in DeepSpeed (no *_optim_states.pt) with a traceback
    with pytest.raises(CheckpointError, match=rf"^checkpoint {universal}: is already a universal "
                       r"checkpoint \(converted from .*checkpoint-2\); it loads at any world"):
        ck.convert_zero_to_universal(universal, two_rank_run / "again")


def test_convert_refuses_a_target_the_runs_saves_manage(two_rank_run: Path) -> None:
    """`ckpt convert ... checkpoints/checkpoint-99` made a 'newest' checkpoint of step 2's
    state: resume=auto went back to it and the next saves replaced the run's own."""
    zero = two_rank_run / "zero"
    for target in (zero / "checkpoints" / "checkpoint-99", zero / "best" / "universal"):
        with pytest.raises(CheckpointError, match=r"^convert: .* is inside .*pick a folder "):
            ck.convert_zero_to_universal(zero / "checkpoints" / "checkpoint-2", target)
        assert not target.exists()
