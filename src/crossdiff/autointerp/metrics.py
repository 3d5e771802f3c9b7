"""Detection scores: accuracy, balanced accuracy, F1 and ROC AUC of binary answers."""

from __future__ import annotations

import math

import numpy as np


def detection_scores(labels: list[int], predicted: list[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean of the two class recalls) and F1 of class 1.
    A recall of a class with no examples is NaN, and so is the balanced accuracy then."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
    if y.size == 0:
        return {"accuracy": math.nan, "balanced_accuracy": math.nan, "f1": math.nan}
    tp, tn = int((y & p).sum()), int((~y & ~p).sum())
    fp, fn = int((~y & p).sum()), int((y & ~p).sum())
    tpr = tp / (tp + fn) if tp + fn else math.nan
    tnr = tn / (tn + fp) if tn + fp else math.nan
    return {
        "accuracy": (tp + tn) / y.size,
        "balanced_accuracy": (tpr + tnr) / 2,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
    }


def roc_auc(labels: list[int], scores: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2):
    the Mann-Whitney form of the ROC AUC, from average ranks. NaN without both classes."""
    y, s = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    start = 0
    while start < s.size:  # average rank over each run of ties
        end = start
        while end + 1 < s.size and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
