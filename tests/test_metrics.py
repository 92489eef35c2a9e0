"""Metrics against hand-computed values."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from mtl_dist.metrics import run_score, task_metrics


def test_accuracy_macro_f1_and_confusion_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = task_metrics(labels, preds, num_labels=4)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 p=1 r=1/2 -> 2/3; c3 is in
    # neither the gold labels nor the predictions: left out, as sklearn's default does
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert m["num_samples"] == 6


def test_macro_f1_is_sklearns_default_also_when_a_split_lacks_labels():
    """A perfect classifier on a split holding one of three labels scores 1.0 (it scored
    1/3); a label predicted but absent from the gold labels counts, as in sklearn."""
    assert task_metrics([2, 2, 2], [2, 2, 2], num_labels=3)["macro_f1"] == 1.0
    assert task_metrics([2, 2, 2], [2, 2, 0], num_labels=3)["macro_f1"] == pytest.approx(0.4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        gold, pred = rng.integers(0, 3, 30), rng.integers(0, 5, 30)
        assert task_metrics(gold, pred, num_labels=6)["macro_f1"] == pytest.approx(
            f1_score(gold, pred, average="macro", zero_division=0), abs=1e-15)


def test_run_score_is_the_weighted_mean_of_chosen_metrics():
    per_task = {"a": {"accuracy": 0.9, "macro_f1": 0.5}, "b": {"accuracy": 0.6, "macro_f1": 0.3}}
    assert run_score(per_task, {"a": "accuracy", "b": "macro_f1"}, {"a": 1, "b": 1}) == \
        pytest.approx(0.6)
    assert run_score(per_task, {"a": "accuracy", "b": "accuracy"}, {"a": 3, "b": 1}) == \
        pytest.approx((3 * 0.9 + 0.6) / 4)


def test_a_run_score_over_zero_weight_tasks_is_one_line():
    """`evaluate --split test` where only zero-weight tasks have labels: a ZeroDivisionError."""
    from mtl_dist.errors import MtlDistError

    with pytest.raises(MtlDistError, match=r"run score: no evaluated task has score_weight > 0 "
                       r"\(evaluated: news\)"):
        run_score({"news": {"accuracy": 0.5}}, {"news": "accuracy"}, {"news": 0.0})


@pytest.mark.parametrize("greater", [True, False])
def test_a_nan_evaluation_is_never_a_best_and_a_nan_best_is_beaten(greater, tmp_path):
    """A diverged first evaluation (NaN) became the best: every later one compared False
    against it, early stopping fired after `patience` evaluations, and best/ kept the NaN
    model for good, also across resumes."""
    from mtl_dist.checkpoint import CheckpointManager, improves_on
    from mtl_dist.trainer import EarlyStopping

    nan, good, better = float("nan"), (0.5 if greater else 2.0), (0.6 if greater else 1.5)
    early = EarlyStopping(patience=2, greater_is_better=greater)
    assert early.update(nan, 8) is False and early.best_score is None and early.bad_evals == 1
    assert early.update(good, 16) is True and (early.best_score, early.best_step) == (good, 16)
    assert early.update(nan, 24) is False and early.best_score == good
    assert early.update(better, 32) is True and not early.should_stop
    assert improves_on(good, nan, greater)  # a NaN best saved by an older version
    assert not improves_on(nan, None, greater)
    mgr = CheckpointManager(tmp_path, save_total_limit=None, greater_is_better=greater)
    mgr.save_best(8, nan, {"w": torch.zeros(1)}, extra_files={}, metadata={})
    assert mgr.improves(good) and not mgr.improves(nan)
