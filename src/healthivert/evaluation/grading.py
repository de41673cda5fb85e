"""Grading quality with uncertainty: macro scores from confusion matrices, bootstrapped by patient.

Vertebrae of one patient are not independent, so confidence intervals resample patients (with
replacement) and pool their vertebrae. Everything is computed from per-patient confusion matrices,
so a thousand resamples cost one matrix product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from healthivert.grading.metrics import GRADES


def confusion_stack(cases: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per-patient confusion matrices over grades 0..3.

    Returns:
        the patients (sorted) and an int array ``(n_patients, 4, 4)``: rows true grade, columns predicted.
    """
    patients = sorted(set(cases))
    position = {case: i for i, case in enumerate(patients)}
    stack = np.zeros((len(patients), len(GRADES), len(GRADES)), dtype=np.int64)
    np.add.at(stack, ([position[c] for c in cases], np.asarray(y_true, dtype=np.int64),
                      np.asarray(y_pred, dtype=np.int64)), 1)
    return patients, stack


def macro_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Macro precision, recall, F1 and accuracy of confusion matrices ``(..., 4, 4)``.

    Averages run over the grades present (as true or predicted) in each matrix; a grade that is
    predicted but never true scores 0, like scikit-learn with ``zero_division=0``.

    Returns:
        arrays of shape ``confusion.shape[:-2]``.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diagonal(confusion, axis1=-2, axis2=-1)
    true_count = confusion.sum(axis=-1)
    predicted_count = confusion.sum(axis=-2)
    present = (true_count + predicted_count) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted_count > 0, hits / predicted_count, 0.0)
        recall = np.where(true_count > 0, hits / true_count, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        n_present = present.sum(axis=-1)
        total = confusion.sum(axis=(-2, -1))
        return {
            "macro_precision": np.where(present, precision, 0).sum(-1) / n_present,
            "macro_recall": np.where(present, recall, 0).sum(-1) / n_present,
            "macro_f1": np.where(present, f1, 0).sum(-1) / n_present,
            "accuracy": hits.sum(-1) / total,
        }


@dataclasses.dataclass(frozen=True)
class ScoreWithInterval:
    """A score and its bootstrap 95 % interval (NaN without resamples)."""

    value: float
    low: float
    high: float


def bootstrap_scores(cases: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray, resamples: int = 1000,
                     seed: int = 0) -> dict[str, ScoreWithInterval]:
    """Macro scores and their patient-level bootstrap 95 % intervals (2.5th and 97.5th percentiles).

    Args:
        cases: patient id of each vertebra, shape ``(n,)``.
        y_true, y_pred: grades, shape ``(n,)``.
        resamples: bootstrap resamples (0: no intervals).
        seed: random seed.
    """
    _, stack = confusion_stack(cases, y_true, y_pred)
    point = macro_scores(stack.sum(axis=0))
    if resamples == 0 or len(stack) == 0:
        return {key: ScoreWithInterval(float(v), float("nan"), float("nan")) for key, v in point.items()}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(stack), np.full(len(stack), 1.0 / len(stack)), size=resamples)  # (R, patients)
    resampled = macro_scores(np.einsum("rp,pij->rij", counts, stack))
    return {
        key: ScoreWithInterval(float(point[key]), float(np.nanpercentile(resampled[key], 2.5)),
                               float(np.nanpercentile(resampled[key], 97.5)))
        for key in point
    }


def paired_bootstrap_difference(cases: Sequence[str], y_true: np.ndarray, y_pred_a: np.ndarray, y_pred_b: np.ndarray,
                                resamples: int = 1000, seed: int = 0, score: str = "macro_f1") -> ScoreWithInterval:
    """A macro score of method A minus that of method B, with a paired patient-level bootstrap 95 % interval.

    Both methods are scored on the same resampled patients in every resample, so what the patients
    share (how hard their vertebrae are) cancels in the difference: the interval is that of the
    difference itself, narrower than the two methods' own intervals side by side.

    Args:
        cases: patient id of each vertebra, shape ``(n,)``.
        y_true: grades, shape ``(n,)``.
        y_pred_a, y_pred_b: the two methods' predicted grades, shape ``(n,)``.
        resamples: bootstrap resamples (0: no interval).
        seed: random seed.
        score: a key of :func:`macro_scores`.
    """
    _, stack_a = confusion_stack(cases, y_true, y_pred_a)
    _, stack_b = confusion_stack(cases, y_true, y_pred_b)
    point = float(macro_scores(stack_a.sum(axis=0))[score] - macro_scores(stack_b.sum(axis=0))[score])
    if resamples == 0 or len(stack_a) == 0:
        return ScoreWithInterval(point, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(stack_a), np.full(len(stack_a), 1.0 / len(stack_a)), size=resamples)
    difference = (macro_scores(np.einsum("rp,pij->rij", counts, stack_a))[score]
                  - macro_scores(np.einsum("rp,pij->rij", counts, stack_b))[score])
    return ScoreWithInterval(point, float(np.nanpercentile(difference, 2.5)), float(np.nanpercentile(difference, 97.5)))
