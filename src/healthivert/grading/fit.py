"""Fitting the Genant-grade SVM under the two evaluation protocols.

- ``holdout`` (default, no leakage): fit on the ``train`` split, choose ``C`` on ``val`` by macro-F1,
  report on ``test``; the splits are by patient (from the preprocessing manifest). Where some train
  vertebrae were the generator's training targets (``learnt``), their RHLV is in-sample (the generator
  restores the shapes it learnt better than unseen ones) and would teach the grader a healthy RHLV
  lower than the test split's: the RHLV grader is then fitted on the vertebrae the generator did not
  learn, the other train ones and ``val``, with ``C`` chosen by patient-grouped cross-validation
  over them (:func:`fit_unseen`); ``test`` stays untouched.
- ``reference_cv`` (the paper's protocol, for comparison): stratified k-fold by vertebra over
  ``train`` + ``test``; every fold's model predicts the ``val`` split, and macro scores are averaged
  over the folds. ``C`` is scikit-learn's default 1.0, as in the reference.

Both fit a standardiser and a linear SVM with balanced class weights (one-vs-one over the grades).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from healthivert.config import SvmFitParams
from healthivert.grading.metrics import grade_metrics
from healthivert.grading.model import GradingModel

log = logging.getLogger(__name__)

#: The reference fits ``SVC(kernel="linear")`` with scikit-learn's default regularisation.
REFERENCE_C = 1.0


@dataclasses.dataclass(frozen=True)
class GradingResult:
    """A fitted grader, its predictions for every row and its metrics.

    Attributes:
        model: the final model (``holdout``: fitted on train with the chosen C; ``reference_cv``:
            fitted on train + test).
        predictions: ``case, vertebra, split, grade, predicted`` for every input row.
        metrics: flat scores (``test_macro_f1``..., or ``cv_macro_f1``... for ``reference_cv``).
    """

    model: GradingModel
    predictions: pd.DataFrame
    metrics: dict[str, float]


def fit_model(x: np.ndarray, y: np.ndarray, features: Sequence[str], c: float) -> GradingModel:
    """Standardise ``x`` and fit a linear SVM with balanced class weights.

    Args:
        x: features, shape ``(n_samples, n_features)``, columns named by ``features``.
        y: grades, shape ``(n_samples,)``; at least two distinct grades.
        features: column names.
        c: SVM regularisation constant.

    Raises:
        ValueError: fewer than two grades among ``y``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if np.unique(y).size < 2:
        raise ValueError(f"need at least two grades to fit, got {np.unique(y).tolist()}")
    scaler = StandardScaler().fit(x)
    svm = SVC(kernel="linear", C=c, class_weight="balanced", decision_function_shape="ovo")
    svm.fit(scaler.transform(x), y)
    return GradingModel(
        features=tuple(features),
        classes=tuple(int(k) for k in svm.classes_),
        means=scaler.mean_.astype(np.float64),
        scales=scaler.scale_.astype(np.float64),
        coef=np.asarray(svm.coef_, dtype=np.float64),
        intercept=np.asarray(svm.intercept_, dtype=np.float64),
        c=float(c),
    )


def _graded(table: pd.DataFrame, splits: Sequence[str]) -> pd.DataFrame:
    return table[table["split"].isin(list(splits)) & table["grade"].notna()]


def _xy(rows: pd.DataFrame, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return rows[list(features)].to_numpy(dtype=np.float64), rows["grade"].to_numpy(dtype=np.int64)


def _predictions(table: pd.DataFrame, model: GradingModel) -> pd.DataFrame:
    out = table[["case", "vertebra", "split", "grade"]].copy()
    out["predicted"] = model.predict(table[list(model.features)].to_numpy(dtype=np.float64))
    return out.reset_index(drop=True)


def _split_metrics(table: pd.DataFrame, model: GradingModel, features: Sequence[str]) -> dict[str, float]:
    """``<split>_<score>`` of ``model`` on the graded vertebrae of each split."""
    metrics: dict[str, float] = {}
    for split in ("train", "val", "test"):
        x_split, y_split = _xy(_graded(table, [split]), features)
        for key, value in grade_metrics(y_split, model.predict(x_split) if y_split.size else y_split).items():
            metrics[f"{split}_{key}"] = value
    return metrics


def fit_holdout(table: pd.DataFrame, features: Sequence[str], c_grid: Sequence[float]) -> GradingResult:
    """Fit on ``train``, choose ``C`` on ``val`` (macro-F1, ties to the smaller C), report on ``test``.

    Args:
        table: one row per vertebra with ``case, vertebra, split, grade`` and the feature columns;
            rows with an unknown (NA) grade are predicted but neither fitted nor scored.
        features: feature columns.
        c_grid: candidate C values; with a single value the ``val`` split is not needed.

    Raises:
        ValueError: fewer than two grades in ``train``, or several C values and no graded ``val`` rows.
    """
    x_train, y_train = _xy(_graded(table, ["train"]), features)
    x_val, y_val = _xy(_graded(table, ["val"]), features)
    candidates = sorted(set(float(c) for c in c_grid))
    if len(candidates) > 1 and y_val.size == 0:
        raise ValueError("choosing C needs graded vertebrae in the val split")
    metrics: dict[str, float] = {}
    fitted = [(c, fit_model(x_train, y_train, features, c)) for c in candidates]
    scores = []
    for c, model in fitted:
        f1 = grade_metrics(y_val, model.predict(x_val))["macro_f1"] if y_val.size else 0.0
        scores.append(f1)
        if y_val.size:
            metrics[f"val_macro_f1_c{c:g}"] = f1
            log.info("C=%g: val macro-F1 %.3f", c, f1)
    best_c, best_model = fitted[int(np.argmax(scores))]  # first maximum: the smallest C among ties
    metrics["c"] = best_c
    metrics |= _split_metrics(table, best_model, features)
    model = dataclasses.replace(best_model, info={"protocol": "holdout", "c_grid": candidates,
                                                  "test_macro_f1": metrics["test_macro_f1"]})
    return GradingResult(model, _predictions(table, model), metrics)


def _grouped_cv_f1(rows: pd.DataFrame, features: Sequence[str], c: float, folds: int) -> float:
    """Mean macro-F1 of ``C = c`` over patient-grouped folds of ``rows`` (folds left with one grade skipped)."""
    x, y = _xy(rows, features)
    scores = []
    splitter = GroupKFold(n_splits=min(folds, rows["case"].nunique()))
    for fit_index, held_index in splitter.split(x, y, groups=rows["case"].to_numpy()):
        if np.unique(y[fit_index]).size < 2:
            continue
        model = fit_model(x[fit_index], y[fit_index], features, c)
        scores.append(grade_metrics(y[held_index], model.predict(x[held_index]))["macro_f1"])
    return float(np.mean(scores)) if scores else 0.0


def fit_unseen(table: pd.DataFrame, features: Sequence[str], c_grid: Sequence[float], learnt: pd.Series,
               folds: int) -> GradingResult:
    """Fit on the train and val vertebrae not ``learnt``, ``C`` by patient-grouped CV over them; report on ``test``.

    Args:
        table: as :func:`fit_holdout`.
        learnt: bool per row of ``table``: the vertebrae whose features are in-sample (the generator's
            training targets); they are predicted but neither fitted nor scored in the choice of C.
        folds: number of patient-grouped folds (fewer when there are fewer patients).

    Raises:
        ValueError: fewer than two grades among the vertebrae to fit.
    """
    unseen = _graded(table[~learnt.to_numpy(dtype=bool)], ["train", "val"])
    x_fit, y_fit = _xy(unseen, features)
    if np.unique(y_fit).size < 2:
        raise ValueError(f"the train and val vertebrae the generator did not learn have {np.unique(y_fit).size} "
                         "distinct grade(s); fitting needs two (svm_fit.fit_on: train fits on all of train)")
    candidates = sorted(set(float(c) for c in c_grid))
    metrics: dict[str, float] = {}
    scores = []
    for c in candidates:
        scores.append(_grouped_cv_f1(unseen, features, c, folds) if len(candidates) > 1 else 0.0)
        metrics[f"cv_macro_f1_c{c:g}"] = scores[-1]
        log.info("C=%g: patient-grouped CV macro-F1 %.3f", c, scores[-1])
    best_c = candidates[int(np.argmax(scores))]  # first maximum: the smallest C among ties
    model = fit_model(x_fit, y_fit, features, best_c)
    metrics["c"] = best_c
    metrics["fitted_vertebrae"] = float(len(unseen))
    metrics |= _split_metrics(table, model, features)
    model = dataclasses.replace(model, info={"protocol": "holdout", "fit_on": "unseen", "c_grid": candidates,
                                             "test_macro_f1": metrics["test_macro_f1"]})
    return GradingResult(model, _predictions(table, model), metrics)


def fit_reference_cv(table: pd.DataFrame, features: Sequence[str], folds: int, seed: int) -> GradingResult:
    """The reference protocol: stratified k-fold by vertebra over train + test, each fold scored on ``val``.

    Folds are shuffled with ``seed`` (the reference keeps file order, which groups one patient's
    vertebrae). The returned model is fitted on all of train + test.

    Raises:
        ValueError: a grade has fewer vertebrae than ``folds``, or no graded ``val`` rows.
    """
    pool = _graded(table, ["train", "test"])
    x_pool, y_pool = _xy(pool, features)
    x_val, y_val = _xy(_graded(table, ["val"]), features)
    if y_val.size == 0:
        raise ValueError("the reference protocol scores every fold on the val split, which has no graded vertebrae")
    counts = np.bincount(y_pool)
    if counts[counts > 0].min() < folds:
        raise ValueError(f"a grade has {int(counts[counts > 0].min())} vertebrae in train+test, fewer than {folds} folds")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    per_fold: list[dict[str, float]] = []
    for fold, (fit_index, _) in enumerate(splitter.split(x_pool, y_pool)):
        model = fit_model(x_pool[fit_index], y_pool[fit_index], features, REFERENCE_C)
        per_fold.append(grade_metrics(y_val, model.predict(x_val)))
        log.info("fold %d: val macro-F1 %.3f", fold, per_fold[-1]["macro_f1"])
    metrics = {f"cv_{key}": float(np.nanmean([m[key] for m in per_fold])) for key in per_fold[0]}
    metrics["cv_macro_f1_std"] = float(np.std([m["macro_f1"] for m in per_fold]))
    metrics["c"] = REFERENCE_C
    final = fit_model(x_pool, y_pool, features, REFERENCE_C)
    final = dataclasses.replace(final, info={"protocol": "reference_cv", "folds": folds, "seed": seed,
                                             "cv_macro_f1": metrics["cv_macro_f1"]})
    return GradingResult(final, _predictions(table, final), metrics)


def fit_grader(table: pd.DataFrame, params: SvmFitParams, features: Sequence[str] | None = None,
               learnt: pd.Series | None = None) -> GradingResult:
    """Fit under ``params.protocol`` on ``features`` (default ``params.features``).

    ``learnt`` (bool per row, the generator's training targets) switches the holdout protocol to
    :func:`fit_unseen` when ``params.fit_on`` is ``unseen`` and some row is learnt.
    """
    features = tuple(features or params.features)
    if params.protocol == "holdout":
        if params.fit_on == "unseen" and learnt is not None and bool(learnt.any()):
            return fit_unseen(table, features, params.c_grid, learnt, params.folds)
        return fit_holdout(table, features, params.c_grid)
    return fit_reference_cv(table, features, params.folds, params.seed)
