"""Properties of the multi-task batch plan, its per-rank views, the cursor and the task guard."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtl_dist import collectives
from mtl_dist.errors import CheckpointError, ConfigError
from mtl_dist.sampler import (
    STRATEGIES,
    MultiTaskBatchPlan,
    RankBatchSampler,
    SamplerStateError,
    check_task_agreement,
    eval_shard,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes_st = st.lists(st.integers(0, 60), min_size=1, max_size=4).filter(lambda s: sum(s) > 0)
seed_st = st.integers(0, 2**32 - 1)


def offsets_of(sizes: list[int]) -> list[int]:
    return [0, *np.cumsum(sizes)[:-1].tolist()]


def task_sequences(plan: MultiTaskBatchPlan, epoch: int = 0) -> dict[int, list[int]]:
    """Each task's within-task indices over the epoch, in step order."""
    seqs: dict[int, list[int]] = {t: [] for t in range(len(plan.task_sizes))}
    for step in range(plan.num_steps(epoch)):
        task, idx = plan.batch(epoch, step)
        assert len(idx) == plan.global_batch_size
        seqs[task].extend(idx.tolist())
    return seqs


def assert_stream_counts(seq: list[int], population: set[int]) -> None:
    """Successive full reshuffles: each sample q or q+1 times, exactly len % e of them q+1."""
    e = len(population)
    counts = Counter(seq)
    assert set(counts) <= population
    q, extra = divmod(len(seq), e)
    assert sorted(counts.get(i, 0) for i in population) == [q] * (e - extra) + [q + 1] * extra


def rank_batches(plan: MultiTaskBatchPlan, world: int, epoch: int = 0) -> list[list[list[int]]]:
    """Per rank, the list of its batches (flat indices) over one epoch."""
    out = []
    for rank in range(world):
        s = RankBatchSampler(plan, offsets_of(list(plan.task_sizes)), rank, world)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


# ----- coverage and counts -------------------------------------------------------------


@FAST
@given(sizes=sizes_st, g=st.integers(1, 24), seed=seed_st, group=st.booleans())
def test_proportional_every_sample_once_plus_wrap_fill(sizes, g, seed, group):
    """Proportional, drop_last=False: a task's first n indices of the epoch (step order) are a
    permutation of range(n); the k*G - n after them (< G) are the wrap fill, the head of the next
    reshuffle. With grouping (batches in random order) the multiset is the same."""
    lengths = [np.random.default_rng(n).integers(1, 50, n) for n in sizes]
    plan = MultiTaskBatchPlan(
        sizes, global_batch_size=g, seed=seed, lengths=lengths, group_by_length=group
    )
    seqs = task_sequences(plan)
    for t, n in enumerate(sizes):
        seq = seqs[t]
        assert len(seq) == -(-n // g) * g
        if n == 0:
            continue
        assert_stream_counts(seq, set(range(n)))
        if not group:
            assert sorted(seq[:n]) == list(range(n))
            assert len(set(seq[n:])) == len(seq[n:]) or n < g


@FAST
@given(sizes=sizes_st, g=st.integers(1, 24), seed=seed_st)
def test_drop_last_drops_only_the_partial_batch(sizes, g, seed):
    """drop_last: floor(n/G) batches of distinct samples; a task with 0 < n < G keeps one wrapped batch."""
    plan = MultiTaskBatchPlan(sizes, global_batch_size=g, seed=seed, drop_last=True)
    for t, seq in task_sequences(plan).items():
        n = sizes[t]
        if n == 0:
            assert seq == []
        elif n < g:
            assert len(seq) == g
            assert_stream_counts(seq, set(range(n)))
        else:
            assert len(seq) == (n // g) * g == len(set(seq))


@FAST
@given(
    sizes=sizes_st,
    g=st.integers(1, 16),
    seed=seed_st,
    strategy=st.sampled_from(STRATEGIES),
    caps=st.lists(st.one_of(st.none(), st.integers(1, 40)), min_size=4, max_size=4),
)
def test_every_strategy_cycles_through_full_reshuffles(sizes, g, seed, strategy, caps):
    """Any strategy/cap: a task's epoch indices are successive reshuffles of one usable subset."""
    caps = caps[: len(sizes)]
    plan = MultiTaskBatchPlan(
        sizes, global_batch_size=g, seed=seed, strategy=strategy, task_caps=caps
    )
    for t, seq in task_sequences(plan).items():
        if not seq:
            continue
        usable = min(sizes[t], caps[t] or sizes[t])
        subset = set(seq) if len(seq) >= usable else set(range(sizes[t]))
        if len(seq) >= usable:
            assert len(subset) == usable
            assert_stream_counts(seq, subset)
        else:
            assert len(set(seq)) == len(seq) and subset >= set(seq)


def test_cap_takes_a_fresh_subset_each_epoch():
    plan = MultiTaskBatchPlan([1000], global_batch_size=10, seed=3, task_caps=[100])
    assert plan.num_steps(0) == 10
    first = {i for s in range(10) for i in plan.batch(0, s)[1].tolist()}
    second = {i for s in range(10) for i in plan.batch(1, s)[1].tolist()}
    assert len(first) == len(second) == 100 and first != second


# ----- ranks: agreement, no hangs, elasticity --------------------------------------------


@FAST
@given(
    sizes=sizes_st,
    per_device=st.integers(1, 4),
    world=st.integers(1, 8),
    seed=seed_st,
    strategy=st.sampled_from(STRATEGIES),
    drop_last=st.booleans(),
)
def test_ranks_agree_on_task_and_slice_the_global_batch(
    sizes, per_device, world, seed, strategy, drop_last
):
    g = per_device * world
    plan = MultiTaskBatchPlan(
        sizes, global_batch_size=g, seed=seed, strategy=strategy, drop_last=drop_last
    )
    per_rank = rank_batches(plan, world)
    bounds = np.cumsum(sizes)
    assert all(len(b) == plan.num_steps(0) for b in per_rank)  # every rank the same number of steps
    for step in range(plan.num_steps(0)):
        task, idx = plan.batch(0, step)
        slices = [per_rank[r][step] for r in range(world)]
        assert all(len(s) == per_device for s in slices)
        tasks = {int(np.searchsorted(bounds, i, side="right")) for s in slices for i in s}
        assert tasks == {task}
        assert sum(slices, []) == (idx + offsets_of(sizes)[task]).tolist()


@FAST
@given(sizes=sizes_st, g=st.integers(1, 8), seed=seed_st, strategy=st.sampled_from(STRATEGIES),
       epoch=st.integers(0, 2), cut=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_a_range_of_steps_at_once_is_those_steps_one_by_one(sizes, g, seed, strategy, epoch, cut):
    plan = MultiTaskBatchPlan(sizes, global_batch_size=g, seed=seed, strategy=strategy)
    n = plan.num_steps(epoch)
    start, stop = sorted(int(c * n) for c in cut)
    tasks, idx = plan.batches(epoch, start, stop)
    assert tasks.shape == (stop - start,) and idx.shape == (stop - start, g)
    for i, step in enumerate(range(start, stop)):
        task, expected = plan.batch(epoch, step)
        assert tasks[i] == task and idx[i].tolist() == expected.tolist()
    with pytest.raises(IndexError, match="outside epoch"):
        plan.batches(epoch, 0, n + 1)


@FAST
@given(
    sizes=sizes_st,
    b=st.integers(1, 3),
    seed=seed_st,
    strategy=st.sampled_from(STRATEGIES),
    epoch=st.integers(0, 3),
)
def test_union_over_ranks_is_the_same_for_1_2_4_8_ranks(sizes, b, seed, strategy, epoch):
    g = 8 * b
    plan = MultiTaskBatchPlan(sizes, global_batch_size=g, seed=seed, strategy=strategy)
    joined = {}
    for world in (1, 2, 4, 8):
        per_rank = rank_batches(plan, world, epoch)
        joined[world] = [
            sum((per_rank[r][s] for r in range(world)), []) for s in range(len(per_rank[0]))
        ]
    assert joined[1] == joined[2] == joined[4] == joined[8]


# ----- resume ----------------------------------------------------------------------------


@FAST
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    per_device=st.integers(1, 3),
    world=st.sampled_from([1, 2, 3, 4]),
    seed=seed_st,
    strategy=st.sampled_from(STRATEGIES),
    epoch=st.integers(0, 2),
    group=st.booleans(),
)
def test_resume_from_every_cursor_yields_the_rest(
    sizes, per_device, world, seed, strategy, epoch, group
):
    kwargs = dict(
        global_batch_size=per_device * world,
        seed=seed,
        strategy=strategy,
        lengths=[np.arange(n) % 7 for n in sizes],
        group_by_length=group,
    )
    offsets = offsets_of(sizes)
    rank = world - 1
    ref = RankBatchSampler(MultiTaskBatchPlan(sizes, **kwargs), offsets, rank, world)
    ref.set_epoch(epoch)
    full = list(ref)
    for cursor in range(len(full) + 1):
        ref.set_epoch(epoch)
        ref.advance(cursor)
        state = ref.state_dict()
        fresh = RankBatchSampler(MultiTaskBatchPlan(sizes, **kwargs), offsets, rank, world)
        fresh.load_state_dict(state)
        fresh.set_epoch(epoch)  # the usual loop's call right after resume keeps the cursor
        assert (fresh.epoch, fresh.position, len(fresh)) == (epoch, cursor, len(full) - cursor)
        assert list(fresh) == full[cursor:]
        assert fresh.state_dict() == state


def test_cursor_moves_only_by_advance_and_set_epoch_resets():
    plan = MultiTaskBatchPlan([10, 7], global_batch_size=4, seed=0)
    s = RankBatchSampler(plan, [0, 10], 0, 2)
    it = iter(s)
    next(it), next(it)
    assert s.position == 0
    s.advance(2)
    assert s.position == 2 and len(s) == plan.num_steps(0) - 2
    s.set_epoch(0)
    assert s.position == 0
    with pytest.raises(ValueError, match="cannot advance"):
        s.advance(plan.num_steps(0) + 1)


def test_load_state_dict_builds_no_plan():
    """The jump is O(1): no epoch arrays are computed until a batch is asked for."""
    plan = MultiTaskBatchPlan([50_000, 30_000], global_batch_size=64, seed=1)
    src = RankBatchSampler(plan, [0, 50_000], 0, 1)
    src.advance(1000)
    state = src.state_dict()
    fresh_plan = MultiTaskBatchPlan([50_000, 30_000], global_batch_size=64, seed=1)
    dst = RankBatchSampler(fresh_plan, [0, 50_000], 0, 1)
    dst.load_state_dict(state)
    assert fresh_plan.cached_nbytes == 0
    assert next(iter(dst)) == next(iter(src))
    assert fresh_plan.cached_nbytes > 0


# ----- strategies: frequencies match their definitions ------------------------------------


@FAST
@given(
    sizes=sizes_st, g=st.integers(1, 16), seed=seed_st, rr=st.booleans(), drop_last=st.booleans()
)
def test_uniform_and_round_robin_give_every_task_max_batches(sizes, g, seed, rr, drop_last):
    strategy = "round_robin" if rr else "uniform"
    plan = MultiTaskBatchPlan(
        sizes, global_batch_size=g, seed=seed, strategy=strategy, drop_last=drop_last
    )
    active = [t for t, n in enumerate(sizes) if n > 0]
    k = max(max(1, n // g) if drop_last else -(-n // g) for n in sizes if n > 0)
    order = plan.task_order(0).tolist()
    assert Counter(order) == {t: k for t in active}
    assert plan.num_steps(0) == len(active) * k
    if rr:
        assert order == active * k


def test_task_order_and_samples_are_reshuffled_every_epoch():
    plan = MultiTaskBatchPlan([400, 300, 200], global_batch_size=8, seed=2)
    orders = [plan.task_order(e).tolist() for e in range(3)]
    assert orders[0] != sorted(orders[0]) and len({tuple(o) for o in orders}) == 3
    assert all(Counter(o) == {0: 50, 1: 38, 2: 25} for o in orders)
    assert task_sequences(plan, 0)[0] != task_sequences(plan, 1)[0]
    other_seed = MultiTaskBatchPlan([400, 300, 200], global_batch_size=8, seed=3)
    assert other_seed.task_order(0).tolist() != orders[0]


def test_weights_scale_counts():
    prop = MultiTaskBatchPlan([100, 100], global_batch_size=10, seed=0, task_weights=[2.0, 0.5])
    assert Counter(prop.task_order(0).tolist()) == {0: 20, 1: 5}
    uni = MultiTaskBatchPlan(
        [100, 30], global_batch_size=10, seed=0, strategy="uniform", task_weights=[1.0, 0.5]
    )
    assert Counter(uni.task_order(0).tolist()) == {0: 10, 1: 5}
    off = MultiTaskBatchPlan([100, 30], global_batch_size=10, seed=0, task_weights=[1.0, 0.0])
    assert set(off.task_order(0).tolist()) == {0}


@pytest.mark.parametrize(
    "sizes,weights,temperature",
    [([1000, 100, 10], None, 2.0), ([500, 500, 40], [1.0, 0.2, 3.0], 1.0), ([300, 30], None, 5.0)],
)
def test_temperature_frequencies_match_definition(sizes, weights, temperature):
    plan = MultiTaskBatchPlan(
        sizes,
        global_batch_size=4,
        seed=11,
        strategy="temperature",
        temperature=temperature,
        task_weights=weights,
    )
    w = np.ones(len(sizes)) if weights is None else np.asarray(weights)
    p = (np.asarray(sizes) * w) ** (1 / temperature)
    p /= p.sum()
    proportional = MultiTaskBatchPlan(sizes, global_batch_size=4, seed=11, task_weights=weights)
    assert plan.num_steps(0) == proportional.num_steps(0)
    draws = np.concatenate([plan.task_order(e) for e in range(200)])
    freq = np.bincount(draws, minlength=len(sizes)) / len(draws)
    sigma = np.sqrt(p * (1 - p) / len(draws))
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-12), (freq, p)


@pytest.mark.parametrize(("sizes", "weights", "temperature"),
                         [([50000, 20000], None, 0.005), ([5, 3], [0.01, 0.005], 0.001),
                          ([50000, 20000], None, 1e-310)])  # 1/T itself overflows
def test_a_tiny_temperature_gives_the_limit_not_nan(sizes, weights, temperature):
    """(e*w) ** (1/T) overflows (or underflows) for a small T: the same ratios in log space,
    i.e. the largest task almost surely, instead of NaN probabilities and a crash."""
    plan = MultiTaskBatchPlan(sizes, global_batch_size=4, seed=0, strategy="temperature",
                              temperature=temperature, task_weights=weights)
    p = plan.temperature_probs()
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(1.0) and p[1] < 1e-60
    assert set(plan.task_order(0).tolist()) == {0}


def test_a_moderate_temperature_keeps_its_direct_probabilities():
    """The log-space path is a fallback only: ordinary temperatures keep their exact values."""
    plan = MultiTaskBatchPlan([50000, 20000], global_batch_size=4, seed=0,
                              strategy="temperature", temperature=0.5)
    direct = np.array([50000.0, 20000.0]) ** 2
    assert plan.temperature_probs().tolist() == (direct / direct.sum()).tolist()


# ----- group_by_length ------------------------------------------------------------------


@FAST
@given(
    sizes=st.lists(st.integers(8, 80), min_size=1, max_size=3),
    world=st.sampled_from([1, 2, 4]),
    seed=seed_st,
    mult=st.integers(1, 4),
)
def test_group_by_length_sorts_batches_and_rank_slices(sizes, world, seed, mult):
    g = 2 * world
    lengths = [np.random.default_rng(seed + n).integers(1, 300, n) for n in sizes]
    plan = MultiTaskBatchPlan(
        sizes,
        global_batch_size=g,
        seed=seed,
        drop_last=True,
        lengths=lengths,
        group_by_length=True,
        mega_batch_mult=mult,
    )
    for step in range(plan.num_steps(0)):  # drop_last, n >= G: all batches lie inside pass 0
        task, idx = plan.batch(0, step)
        lens = lengths[task][idx]
        assert np.all(np.diff(lens) <= 0)  # longest first: rank r's slice >= rank r+1's
    for t, seq in task_sequences(plan).items():
        assert len(seq) == len(set(seq)) == (sizes[t] // g) * g


# ----- state errors ---------------------------------------------------------------------


def _state(sizes=(40, 20), g=16, seed=1, epoch=2, step=3, **kw):
    plan = MultiTaskBatchPlan(list(sizes), global_batch_size=g, seed=seed, **kw)
    s = RankBatchSampler(plan, offsets_of(list(sizes)), 0, 1)
    s.set_epoch(epoch)
    s.advance(step)
    return s.state_dict()


def test_global_batch_change_is_refused_with_a_clear_message():
    plan = MultiTaskBatchPlan([40, 20], global_batch_size=32, seed=1)
    s = RankBatchSampler(plan, [0, 40], 1, 4)
    with pytest.raises(SamplerStateError, match=r"global batch size 16 -> 32") as err:
        s.load_state_dict(_state())
    assert isinstance(err.value, CheckpointError) and "\n" not in str(err.value)
    assert "on_global_batch_change=replan" in str(err.value)


def test_replan_is_opt_in_and_starts_the_next_epoch():
    plan = MultiTaskBatchPlan([40, 20], global_batch_size=32, seed=1)
    s = RankBatchSampler(plan, [0, 40], 0, 2, on_global_batch_change="replan")
    s.load_state_dict(_state(epoch=2, step=3))
    assert (s.epoch, s.position) == (3, 0)
    s.load_state_dict(_state(epoch=2, step=0))  # nothing of epoch 2 consumed: start it afresh
    assert (s.epoch, s.position) == (2, 0)
    with pytest.raises(SamplerStateError, match=r"seed \(train.seed\) 7 -> 1"):
        s.load_state_dict(_state(seed=7))  # replan covers the global batch only


@pytest.mark.parametrize(
    "saved,now,expected",
    [
        (dict(seed=7), dict(seed=1), r"seed \(train.seed\) 7 -> 1: they decide the order of "
         r"every epoch's batches; resume with the checkpoint's, or start a new run$"),
        (dict(sizes=(40, 21)), dict(sizes=(40, 20)),
         r"task sizes \(the train files\) \[40, 21\] -> \[40, 20\]"),
        (
            dict(strategy="uniform"),
            dict(strategy="proportional"),
            r"strategy \(sampler.strategy\) uniform -> proportional",
        ),
        (dict(drop_last=True), dict(drop_last=False),
         r"drop_last \(sampler.drop_last\) True -> False"),
        # the global batch and the seed: replan would refuse the seed too, so not offered
        (dict(seed=7, g=32), dict(), r"global batch size 32 -> 16, seed \(train.seed\) 7 -> 1: "
         r"they decide the order of every epoch's batches; resume with the checkpoint's, or "
         r"start a new run$"),
    ],
)
def test_other_plan_changes_are_named(saved, now, expected):
    kw_now = {"sizes": (40, 20), "seed": 1, **now}
    plan = MultiTaskBatchPlan(list(kw_now.pop("sizes")), global_batch_size=16, **kw_now)
    s = RankBatchSampler(plan, [0, 40], 0, 1)
    with pytest.raises(SamplerStateError, match=expected):
        s.load_state_dict(_state(**saved))


def test_minimal_state_and_bad_cursor():
    plan = MultiTaskBatchPlan([40, 20], global_batch_size=16, seed=1)
    s = RankBatchSampler(plan, [0, 40], 0, 1)
    state = {k: v for k, v in _state().items() if k != "plan_params"}  # the four contract keys
    s.load_state_dict(state)
    assert (s.epoch, s.position) == (2, 3)
    with pytest.raises(SamplerStateError, match="missing key"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(SamplerStateError, match="outside the plan"):
        s.load_state_dict({**state, "step": 999})
    with pytest.raises(SamplerStateError, match="plan parameters differ"):
        s.load_state_dict({**state, "plan_hash": "0" * 64})


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="sampler.strategy"):
        MultiTaskBatchPlan([5], global_batch_size=4, seed=0, strategy="random")
    with pytest.raises(ConfigError, match="not a multiple of world size 3"):
        RankBatchSampler(MultiTaskBatchPlan([5], global_batch_size=4, seed=0), [0], 0, 3)
    with pytest.raises(ConfigError, match="group_by_length"):
        MultiTaskBatchPlan([5], global_batch_size=4, seed=0, group_by_length=True)
    with pytest.raises(ConfigError, match="temperature"):
        MultiTaskBatchPlan([5], global_batch_size=4, seed=0, temperature=0)


# ----- no global RNG --------------------------------------------------------------------


def _all_batches(strategy: str) -> list:
    plan = MultiTaskBatchPlan(
        [37, 11, 5],
        global_batch_size=6,
        seed=5,
        strategy=strategy,
        lengths=[np.arange(n) for n in (37, 11, 5)],
        group_by_length=True,
    )
    return [rank_batches(plan, 2, epoch) for epoch in range(2)]


def test_global_rng_is_untouched_and_irrelevant():
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    first = {s: _all_batches(s) for s in STRATEGIES}
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert (
        before[0] == after[0]
        and np.array_equal(before[1], after[1])
        and torch.equal(before[2], after[2])
    )
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert {s: _all_batches(s) for s in STRATEGIES} == first


# ----- eval sharding --------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 3000), world=st.integers(1, 8))
def test_eval_shard_partitions_range(n, world):
    shards = [eval_shard(n, r, world) for r in range(world)]
    assert np.array_equal(np.concatenate(shards), np.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ----- task agreement guard: 2 real gloo processes --------------------------------------


def test_check_task_agreement_is_a_noop_without_distributed():
    assert not dist.is_initialized()
    check_task_agreement(3, 0)


def _agreement_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sizes = [23, 9, 14]
        plan = MultiTaskBatchPlan(sizes, global_batch_size=4, seed=3, strategy="temperature")
        sampler = RankBatchSampler(plan, offsets_of(sizes), rank, world)
        bounds = np.cumsum(sizes)
        steps = 0
        for step, batch in enumerate(sampler):
            check_task_agreement(int(np.searchsorted(bounds, batch[0], side="right")), step)
            sampler.advance()
            steps += 1
        try:
            check_task_agreement(task_id=10 + rank, step=7)
            msg = "no error"
        except RuntimeError as e:
            msg = str(e)
        group = collectives.host_group()
        collectives.release_host_group()  # what Trainer.close() does before the default group
        released = group not in dist.distributed_c10d._world.pg_map and not collectives._GROUP
        Path(out_dir, f"rank{rank}.txt").write_text(f"{steps}\n{released}\n{msg}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_check_task_agreement_two_gloo_ranks(tmp_path):
    mp.spawn(
        _agreement_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    expected_steps = MultiTaskBatchPlan([23, 9, 14], global_batch_size=4, seed=3).num_steps(0)
    for rank in range(2):
        steps, released, msg = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 2)
        assert int(steps) == expected_steps
        assert released == "True"  # no gloo group left to be freed at interpreter exit
        assert "step 7" in msg and "rank 0 task 10" in msg and "rank 1 task 11" in msg, msg


def _host_group_worker(rank: int, init_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_dir}/a", rank=rank, world_size=2)
    first = collectives.host_group()
    assert collectives.host_group() is first  # one group per world, not one per call
    assert collectives._registered(first)
    dist.destroy_process_group()
    assert not collectives._registered(first)
    dist.init_process_group("gloo", init_method=f"file://{init_dir}/b", rank=rank, world_size=2)
    try:
        second = collectives.host_group()
        assert second is not first  # the old one went with its world
        flag = torch.ones(1)
        dist.all_reduce(flag, group=second)
        assert flag.item() == 2
        collectives.release_host_group()
        assert not collectives._GROUP and second not in dist.distributed_c10d._world.pg_map
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_host_group_follows_a_new_world(tmp_path):
    mp.spawn(_host_group_worker, args=(str(tmp_path),), nprocs=2, join=True)
