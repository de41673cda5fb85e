"""Acceptance: RHLV of preprocessed phantoms, with their healthy labels as the synthesis, matches the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthivert.config import Params
from healthivert.stages import preprocess, rhlv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def measured(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    params = Params.model_validate({"tracking": {"enabled": False}})
    work = tmp_path_factory.mktemp("rhlv-phantom")
    preprocess.run(params, phantom_root, work / "preprocessed", phantom_root / "grades.csv")
    metrics = rhlv.run(params, work / "preprocessed", None, work / "rhlv")
    assert metrics["rhlv_vertebrae_with_truth"] == metrics["rhlv_vertebrae"] > 0
    return pd.read_parquet(work / "rhlv" / "rhlv.parquet")


def test_rhlv_matches_the_phantom_truth_per_third(measured: pd.DataFrame) -> None:
    for third in ("ant", "mid", "post"):
        error = np.abs(measured[f"rhlv_{third}"] - measured[f"truth_loss_{third}"])
        assert error.mean() < 0.02, f"{third}: MAE {error.mean():.3f}"
    fractured = measured[measured["fracture_type"] != "none"]
    assert len(fractured) > 0
    assert np.all(fractured["rhlv_max"] > 0.15)


def test_rhlv_beats_the_mask_only_baseline(measured: pd.DataFrame) -> None:
    with_baseline = measured.dropna(subset=["baseline_loss_ant"])
    rhlv_error = np.abs(with_baseline["rhlv_ant"] - with_baseline["truth_loss_ant"]).mean()
    baseline_error = np.abs(with_baseline["baseline_loss_ant"] - with_baseline["truth_loss_ant"]).mean()
    assert rhlv_error < baseline_error
