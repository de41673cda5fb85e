"""Genant grading from RHLV features: protocols, JSON round trip, tamper detection, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from healthivert.config import SvmFitParams
from healthivert.errors import CheckpointError
from healthivert.grading import fit_grader, fit_model, grade_confusion, grade_metrics, load_model

FEATURES = ("rhlv_ant", "rhlv_mid", "rhlv_post")


def genant(loss: np.ndarray) -> np.ndarray:
    """Genant grade of a relative height loss: <20 % 0, 20-25 % 1, 25-40 % 2, >40 % 3."""
    return np.digitize(loss, [0.20, 0.25, 0.40])


def rhlv_table(cases: int = 40, per_case: int = 8, noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """Vertebrae of ``cases`` patients: anterior wedges of known loss, RHLV = loss + noise.

    Losses are drawn per grade (half normal, the rest spread over grades 1-3), so the true grade is
    known; splits are by patient 60/20/20.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(cases):
        split = "train" if case < 0.6 * cases else "val" if case < 0.8 * cases else "test"
        for vertebra in range(per_case):
            grade = int(rng.choice(4, p=[0.5, 0.2, 0.15, 0.15]))
            lo, hi = [(0.0, 0.17), (0.205, 0.245), (0.26, 0.39), (0.42, 0.6)][grade]
            loss = rng.uniform(lo, hi)
            rows.append({
                "case": f"sub-{case:03d}", "vertebra": 8 + vertebra, "split": split, "grade": grade,
                "rhlv_ant": loss + rng.normal(0, noise),
                "rhlv_mid": 0.4 * loss + rng.normal(0, noise),
                "rhlv_post": rng.normal(0, noise),
            })
    table = pd.DataFrame(rows)
    table["grade"] = table["grade"].astype("Int64")
    table["rhlv_max"] = table[list(FEATURES)].max(axis=1)
    return table


def test_holdout_grades_clean_features_on_the_test_split() -> None:
    table = rhlv_table()
    result = fit_grader(table, SvmFitParams())
    assert result.metrics["test_macro_f1"] >= 0.9
    assert result.metrics["c"] in SvmFitParams().c_grid
    assert set(result.predictions["split"]) == {"train", "val", "test"}
    assert len(result.predictions) == len(table)
    test = result.predictions[result.predictions["split"] == "test"]
    assert grade_metrics(test["grade"].to_numpy(), test["predicted"].to_numpy())["macro_f1"] == pytest.approx(
        result.metrics["test_macro_f1"])


def test_holdout_chooses_c_on_val_only() -> None:
    table = rhlv_table()
    shuffled_test = table.copy()
    test_rows = shuffled_test["split"] == "test"
    shuffled_test.loc[test_rows, "grade"] = np.random.default_rng(1).permutation(shuffled_test.loc[test_rows, "grade"].to_numpy())
    clean, noisy = fit_grader(table, SvmFitParams()), fit_grader(shuffled_test, SvmFitParams())
    assert clean.metrics["c"] == noisy.metrics["c"]  # test labels do not influence the choice
    assert noisy.metrics["test_macro_f1"] < clean.metrics["test_macro_f1"] - 0.3


def _in_sample(table: pd.DataFrame, shift: float = 0.15) -> tuple[pd.DataFrame, pd.Series]:
    """``table`` whose healthy train vertebrae (the generator's targets) measure ``shift`` lower, and those rows."""
    learnt = (table["split"] == "train") & (table["grade"] == 0)
    biased = table.copy()
    biased.loc[learnt, "rhlv_max"] -= shift
    return biased, learnt


def test_the_rhlv_grader_leaves_out_the_vertebrae_the_generator_learnt() -> None:
    table, learnt = _in_sample(rhlv_table(cases=40, noise=0.0))
    params = SvmFitParams(features=("rhlv_max",))
    unseen = fit_grader(table, params, learnt=learnt)
    on_train = fit_grader(table, params.model_copy(update={"fit_on": "train"}), learnt=learnt)
    graded = table["grade"].notna() & table["split"].isin(["train", "val"])
    assert unseen.metrics["fitted_vertebrae"] == (graded & ~learnt).sum()
    assert unseen.model.info["fit_on"] == "unseen" and "fit_on" not in on_train.model.info
    # fitted on the in-sample healthy RHLV, the threshold of grade 1 falls and healthy test vertebrae turn mild
    assert unseen.metrics["test_macro_f1"] >= 0.9
    assert unseen.metrics["test_macro_f1"] > on_train.metrics["test_macro_f1"] + 0.05
    assert fit_grader(table, params).model.info.get("fit_on") is None  # no learnt rows given: plain holdout


def test_the_unseen_fit_chooses_c_without_the_test_labels() -> None:
    table, learnt = _in_sample(rhlv_table())
    params = SvmFitParams(features=("rhlv_max",))
    shuffled = table.copy()
    test_rows = shuffled["split"] == "test"
    shuffled.loc[test_rows, "grade"] = np.random.default_rng(1).permutation(shuffled.loc[test_rows, "grade"].to_numpy())
    assert fit_grader(table, params, learnt=learnt).metrics["c"] == fit_grader(shuffled, params, learnt=learnt).metrics["c"]


def test_an_unseen_fit_without_two_grades_is_refused() -> None:
    table = rhlv_table()
    learnt = (table["split"] == "train") | ((table["split"] == "val") & (table["grade"] > 0))
    with pytest.raises(ValueError, match="did not learn have 1 distinct grade"):
        fit_grader(table, SvmFitParams(), learnt=learnt)


def test_reference_protocol_scores_folds_on_val() -> None:
    table = rhlv_table()
    result = fit_grader(table, SvmFitParams(protocol="reference_cv", folds=5))
    assert result.metrics["cv_macro_f1"] >= 0.85
    assert result.metrics["cv_macro_f1_std"] < 0.1
    assert result.model.info["protocol"] == "reference_cv"


def test_ungraded_rows_are_predicted_but_not_fitted() -> None:
    table = rhlv_table()
    table.loc[table.index[:5], "grade"] = pd.NA
    result = fit_grader(table, SvmFitParams())
    assert result.predictions["predicted"].notna().all()
    assert result.predictions["grade"].isna().sum() == 5


def test_json_model_rebuilds_the_sklearn_decisions(tmp_path: Path) -> None:
    table = rhlv_table(cases=20)
    x = table[list(FEATURES)].to_numpy()
    y = table["grade"].to_numpy(dtype=int)
    model = fit_model(x, y, FEATURES, c=10.0)
    scaler = StandardScaler().fit(x)
    svm = SVC(kernel="linear", C=10.0, class_weight="balanced").fit(scaler.transform(x), y)
    probe = np.random.default_rng(3).uniform(-0.1, 0.7, size=(500, 3))
    loaded = load_model(model.save(tmp_path / "svm.json"))
    np.testing.assert_array_equal(loaded.predict(probe), svm.predict(scaler.transform(probe)))
    assert loaded.features == FEATURES and loaded.classes == (0, 1, 2, 3)
    content = json.loads((tmp_path / "svm.json").read_text())
    assert {"features", "classes", "scaler", "svm", "sha256"} <= set(content)


def test_edited_model_file_is_refused_in_one_line(tmp_path: Path) -> None:
    table = rhlv_table(cases=20)
    path = fit_model(table[list(FEATURES)].to_numpy(), table["grade"].to_numpy(dtype=int), FEATURES, 1.0).save(
        tmp_path / "svm.json")
    content = json.loads(path.read_text())
    content["svm"]["intercept"][0] += 1.0
    path.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"svm\.json: content does not match its SHA-256") as error:
        load_model(path)
    assert "\n" not in str(error.value)
    path.write_text("not json")
    with pytest.raises(CheckpointError, match="not a JSON file"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.json")


def test_metrics_and_confusion_on_known_predictions() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 3])
    y_pred = np.array([0, 0, 1, 1, 2, 2, 3])
    metrics = grade_metrics(y_true, y_pred)
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["recall_grade0"] == pytest.approx(2 / 3)
    assert metrics["recall_grade1"] == pytest.approx(0.5)
    assert metrics["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1 + 1) / 4)
    assert metrics["macro_precision"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    confusion = grade_confusion(y_true, y_pred)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_one_grade_cannot_be_fitted() -> None:
    with pytest.raises(ValueError, match="at least two grades"):
        fit_model(np.zeros((4, 3)), np.zeros(4, dtype=int), FEATURES, 1.0)
