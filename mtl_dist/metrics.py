"""Per-task classification metrics and the run score (a weighted mean over tasks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from mtl_dist.errors import MtlDistError

METRICS = ("accuracy", "macro_f1")


def task_metrics(labels: Sequence[int], preds: Sequence[int], num_labels: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows = true, all labels of the task).

    Macro-F1 is sklearn's (and HF evaluate's) default: the mean over the labels present in
    the gold labels or the predictions. A label in neither would add a constant 0 and scale
    the task's term in the run score down by its share of missing labels."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    all_labels = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(labels, preds, labels=all_labels).tolist(),
        "num_samples": int(labels.size),
    }


def run_score(per_task: Mapping[str, Mapping[str, float]], metric_of: Mapping[str, str],
              weight_of: Mapping[str, float]) -> float:
    """Weighted mean of each task's chosen metric (the reference baseline: plain mean)."""
    total = sum(weight_of[t] for t in per_task)
    if total <= 0:  # config validation refuses this for dev; a split's labels may still
        raise MtlDistError(f"run score: no evaluated task has score_weight > 0 (evaluated: "
                           f"{', '.join(per_task) or 'none'}), so there is no score to compute")
    return float(sum(weight_of[t] * per_task[t][metric_of[t]] for t in per_task) / total)
