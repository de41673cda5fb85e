"""The grader as one MLflow model: logged, registered, loaded from the registry of a real local store,
and graded as ``healthivert grade`` grades (the bundle of test_grade.py: untrained tiny networks)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from healthivert.cli import main
from healthivert.inference.pyfunc import OUTPUT_COLUMNS, REGISTERED_NAME, log_grader_model
from test_grade import GRADED_CASE, dag  # noqa: F401  (the module-scoped bundle fixture)


@pytest.fixture(scope="module")
def registered(dag: Path, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """A sqlite store with ``healthivert-grader`` version 1 logged from the test bundle; its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow")
    store = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    experiment = mlflow.create_experiment("grader", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        log_grader_model(dag / "grader", REGISTERED_NAME)
    return store


def _case_row(phantom_root: Path) -> dict[str, str]:
    derivatives = phantom_root / "derivatives" / GRADED_CASE
    return {"ct": str(phantom_root / "rawdata" / GRADED_CASE / f"{GRADED_CASE}_ct.nii.gz"),
            "labels": str(derivatives / f"{GRADED_CASE}_seg-vert_msk.nii.gz")}


def test_registered_model_grades_as_the_grade_command(registered: str, dag: Path, phantom_root: Path,  # noqa: F811
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
    mlflow.set_tracking_uri(registered)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}/1")
    assert model.metadata.get_input_schema().input_names() == ["ct", "labels", "ctd", "case"]
    row = _case_row(phantom_root)
    table = model.predict(pd.DataFrame([row]))
    assert list(table.columns) == list(OUTPUT_COLUMNS) and (table["case"] == GRADED_CASE).all()
    assert table["graded"].any()
    assert main(["grade", "--ct", row["ct"], "--labels", row["labels"], "--model", str(dag / "grader"),
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    expected = pd.read_csv(tmp_path / GRADED_CASE / "grades.csv", na_values=["not measured"])
    merged = expected.merge(table, on=["case", "vertebra"], suffixes=("_cli", ""), validate="one_to_one")
    assert len(merged) == len(expected) == len(table)
    for column in ("grade", "rhlv_ant", "rhlv_mid", "rhlv_post", "rhlv_max"):
        assert np.allclose(merged[column].astype(float), merged[f"{column}_cli"].astype(float),
                           atol=1e-4, equal_nan=True), column
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_NAME}/1"))
    pinned = (local / "requirements.txt").read_text().split()
    assert any(line.startswith("torch==") for line in pinned) and all("==" in line for line in pinned if line[0].isalpha())
    assert (local / "code" / "healthivert" / "inference" / "pyfunc.py").is_file()
    manifests = [json.loads(path.read_text()) for path in (local / "artifacts").glob("*/bundle.json")]
    assert [manifest["schema"] for manifest in manifests] == ["healthivert-grader/1"]
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()


def test_a_missing_file_is_one_line_naming_it(registered: str, phantom_root: Path) -> None:
    mlflow.set_tracking_uri(registered)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}/1")
    row = _case_row(phantom_root) | {"labels": str(phantom_root / "nowhere_msk.nii.gz")}
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame([row]))
    message = error.value.message
    assert "\n" not in message and "nowhere_msk.nii.gz: not found" in message, message
