"""``healthivert svm-fit`` through the CLI: models, predictions, the baseline beside it, bad tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthivert import cli
from healthivert.grading import load_model
from test_grading import rhlv_table

NO_TRACKING = ["--set", "tracking.enabled=false"]


def main(argv: list[str]) -> int:
    """``healthivert <argv>`` in-process, loading only the command under test."""
    original = cli.COMMANDS
    cli.COMMANDS = {argv[0]: original[argv[0]]}
    try:
        return cli.main(argv)
    finally:
        cli.COMMANDS = original


def table_with_baseline(seed: int = 0) -> pd.DataFrame:
    """RHLV table whose baseline losses are the RHLV ones, blurred (a weaker but informative feature)."""
    table = rhlv_table(seed=seed)
    rng = np.random.default_rng(seed + 1)
    for third in ("ant", "mid", "post"):
        table[f"baseline_loss_{third}"] = table[f"rhlv_{third}"] + rng.normal(0, 0.08, len(table))
    table["baseline_loss_max"] = table[[f"baseline_loss_{t}" for t in ("ant", "mid", "post")]].max(axis=1)
    table.loc[table.index[:3], ["baseline_loss_ant", "baseline_loss_max"]] = np.nan  # no neighbour measured
    return table


def test_svm_fit_writes_models_and_predictions(tmp_path: Path) -> None:
    path = tmp_path / "rhlv.parquet"
    table_with_baseline().to_parquet(path)
    out = tmp_path / "svm"
    assert main(["svm-fit", "--rhlv", str(path), "--out", str(out), "--metrics", str(tmp_path / "m.json"), *NO_TRACKING]) == 0
    model = load_model(out / "svm.json")
    assert model.features == ("rhlv_max",)
    assert load_model(out / "baseline_svm.json").features == ("baseline_loss_max",)
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == 320
    assert predictions["predicted_baseline"].isna().sum() == 3
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["svm_test_macro_f1"] >= 0.9
    assert metrics["baseline_test_macro_f1"] < metrics["svm_test_macro_f1"]


def test_reference_protocol_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "rhlv.parquet"
    table_with_baseline().to_parquet(path)
    assert main(["svm-fit", "--rhlv", str(path), "--out", str(tmp_path / "svm"), "--metrics", str(tmp_path / "m.json"),
                 "--set", "svm_fit.protocol=reference_cv", *NO_TRACKING]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["svm_cv_macro_f1"] > 0.85


UNSEEN = "svm_fit.fit_on=unseen"


@pytest.mark.parametrize("damage, message, setting", [
    (lambda t: t.assign(grade=t["grade"].where(t.index != 4, 7)), "unknown grade 7 for sub-000_12", UNSEEN),
    (lambda t: t.drop(columns=["rhlv_max"]), "lacks column(s) rhlv_max", UNSEEN),
    (lambda t: t.assign(split=t["split"].where(t.index != 0, "holdout")), "unknown split 'holdout'", UNSEEN),
    (lambda t: pd.concat([t, t.iloc[:1]]), "sub-000_8 listed twice", UNSEEN),
    (lambda t: t.assign(rhlv_max=t["rhlv_max"].where(t.index != 2)), "sub-000_10 has no value for a feature", UNSEEN),
    (lambda t: t.assign(grade=t["grade"].where(t["split"] != "train", 0)), "the train split has 1 distinct grade(s)", UNSEEN),
    (lambda t: t[t["split"] != "val"], "choosing C needs graded vertebrae in the val split", "svm_fit.fit_on=train"),
    # left without the generator's targets (healthy train vertebrae), train and val hold grade 2 only
    (lambda t: t.assign(grade=t["grade"].mask((t["split"] == "val") | ((t["split"] == "train") & (t["grade"] > 0)), 2)),
     "the train and val vertebrae the generator did not learn have 1 distinct grade(s)", UNSEEN),
])
def test_bad_tables_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, message: str,
                                  setting: str) -> None:
    path = tmp_path / "rhlv.parquet"
    damage(table_with_baseline()).to_parquet(path)
    assert main(["svm-fit", "--rhlv", str(path), "--out", str(tmp_path / "svm"), "--set", setting, *NO_TRACKING]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "svm").exists()
