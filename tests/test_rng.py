"""Per-rank seeds."""

from accelerate.utils import set_seed

from mtl_dist.rng import rank_seed


def test_rank_seeds_stay_in_numpys_range_at_the_top_of_train_seed():
    """train.seed accepts [0, 2**32); rank 1 of a run with train.seed=2**32-1 seeded 2**32,
    which numpy refuses: a 102-line crash of every multi-process run."""
    top = 2**32 - 1
    assert [rank_seed(top, r) for r in range(3)] == [top, 0, 1]
    assert [rank_seed(42, r) for r in range(4)] == [42, 43, 44, 45]  # unchanged below the top
    for rank in range(8):
        set_seed(rank_seed(top, rank))  # numpy.random.seed raised ValueError for 2**32
