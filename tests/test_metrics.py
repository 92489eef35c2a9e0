"""Metrics against hand-computed values."""

import pytest

from mtl_dist.metrics import run_score, task_metrics


def test_accuracy_macro_f1_and_confusion_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = task_metrics(labels, preds, num_labels=4)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 p=1 r=1/2 -> 2/3; c3 absent -> 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3 + 0.0) / 4)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert m["num_samples"] == 6


def test_run_score_is_the_weighted_mean_of_chosen_metrics():
    per_task = {"a": {"accuracy": 0.9, "macro_f1": 0.5}, "b": {"accuracy": 0.6, "macro_f1": 0.3}}
    assert run_score(per_task, {"a": "accuracy", "b": "macro_f1"}, {"a": 1, "b": 1}) == \
        pytest.approx(0.6)
    assert run_score(per_task, {"a": "accuracy", "b": "accuracy"}, {"a": 3, "b": 1}) == \
        pytest.approx((3 * 0.9 + 0.6) / 4)
