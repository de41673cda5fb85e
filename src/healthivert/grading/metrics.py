"""Classification metrics of Genant grades (macro precision/recall/F1, per-grade recall, confusion)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

#: Genant grades: 0 normal, 1 mild, 2 moderate, 3 severe.
GRADES: tuple[int, ...] = (0, 1, 2, 3)


def grade_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro precision, recall and F1, accuracy and per-grade recall, as a flat dict.

    Macro averages run over the grades present in ``y_true`` or ``y_pred`` (a grade absent from
    both says nothing about the classifier); per-grade recall is NaN for a grade absent from ``y_true``.

    Args:
        y_true: true grades, shape ``(n,)``.
        y_pred: predicted grades, shape ``(n,)``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        nan = float("nan")
        return {"macro_precision": nan, "macro_recall": nan, "macro_f1": nan, "accuracy": nan, "n": 0.0,
                **{f"recall_grade{g}": nan for g in GRADES}}
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=present, average="macro", zero_division=0)
    metrics = {
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "n": float(y_true.size),
    }
    for grade in GRADES:
        actual = y_true == grade
        metrics[f"recall_grade{grade}"] = float(np.mean(y_pred[actual] == grade)) if actual.any() else float("nan")
    return metrics


def grade_confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Confusion matrix over grades 0..3, shape ``(4, 4)``: rows true grade, columns predicted grade."""
    return confusion_matrix(np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64), labels=list(GRADES))
