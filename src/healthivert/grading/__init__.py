"""Genant grading of vertebrae from RHLV features: a standardised linear SVM saved as plain JSON."""

from healthivert.grading.fit import GradingResult, fit_grader, fit_holdout, fit_model, fit_reference_cv
from healthivert.grading.metrics import GRADES, grade_confusion, grade_metrics
from healthivert.grading.model import GradingModel, load_model

__all__ = [
    "GRADES",
    "GradingModel",
    "GradingResult",
    "fit_grader",
    "fit_holdout",
    "fit_model",
    "fit_reference_cv",
    "grade_confusion",
    "grade_metrics",
    "load_model",
]
