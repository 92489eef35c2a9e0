"""Metrics against hand-computed values."""

import numpy as np
import pytest
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
