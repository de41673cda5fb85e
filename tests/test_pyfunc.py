"""The grader as one MLflow model: logged and registered by svm-fit, loaded from the registry of a real local store,
and graded as ``healthivert grade`` grades (the bundle of test_grade.py: untrained tiny networks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from healthivert.cli import main
from healthivert.inference.pyfunc import OUTPUT_COLUMNS, REGISTERED_NAME
from healthivert.tracking.pipeline import PIPELINE_GROUP_ENV, PIPELINE_RUN_ENV
from conftest import BUCKET, free_port, wait_until_answering
from test_grade import GRADED_CASE, _params, dag  # noqa: F401  (the module-scoped bundle fixture)


@pytest.fixture(scope="module")
def registered(dag: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    """svm-fit run with tracking on into a sqlite store: ``healthivert-grader`` version 1; the store's URI."""
    root = tmp_path_factory.mktemp("mlflow")
    store = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", store)
        for name in (PIPELINE_RUN_ENV, PIPELINE_GROUP_ENV):
            patch.delenv(name, raising=False)
        assert main(["svm-fit", "--rhlv", str(dag / "truth" / "rhlv.parquet"), "--out", str(root / "svm"),
                     "--coarse", str(dag / "coarse"), "--fine", str(dag / "fine"), "--grader-out", str(root / "grader"),
                     *_params(), "--set", "tracking.enabled=true", "--set", "tracking.experiment=grader"]) == 0
        yield store


def _case_row(phantom_root: Path) -> dict[str, str]:
    derivatives = phantom_root / "derivatives" / GRADED_CASE
    return {"ct": str(phantom_root / "rawdata" / GRADED_CASE / f"{GRADED_CASE}_ct.nii.gz"),
            "labels": str(derivatives / f"{GRADED_CASE}_seg-vert_msk.nii.gz")}


def test_registered_model_grades_as_the_grade_command(registered: str, dag: Path, phantom_root: Path,  # noqa: F811
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
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


def test_a_missing_file_is_one_line_naming_it(registered: str, phantom_root: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}/1")
    row = _case_row(phantom_root) | {"labels": str(phantom_root / "nowhere_msk.nii.gz")}
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame([row]))
    message = error.value.message
    assert "\n" not in message and "nowhere_msk.nii.gz: not found" in message, message


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_served_model_answers_invocations_and_refuses_bad_rows(registered: str, phantom_root: Path,
                                                               tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED_NAME}/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{base}/ping", server, tmp_path / "server.log")
        row = _case_row(phantom_root)
        status, answer = _post(f"{base}/invocations", json.dumps({"dataframe_records": [row]}).encode())
        assert status == 200, answer
        served = pd.DataFrame(answer["predictions"])
        assert list(served.columns) == list(OUTPUT_COLUMNS) and len(served) > 0
        assert (served["case"] == GRADED_CASE).all() and served["graded"].any()
        assert all(isinstance(grade, int) for grade in served.loc[served["graded"], "grade"])
        bad = row | {"ct": str(phantom_root / "nowhere_ct.nii.gz")}
        status, answer = _post(f"{base}/invocations", json.dumps({"dataframe_records": [bad]}).encode())
        assert 400 <= status < 500 and "nowhere_ct.nii.gz: not found" in answer["message"], (status, answer)
        status, answer = _post(f"{base}/invocations", b"{not json")
        assert 400 <= status < 500, (status, answer)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_rows_read_from_s3_and_a_non_nifti_object_is_named(registered: str, phantom_root: Path, s3: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}/1")
    local = _case_row(phantom_root)
    client = boto3.client("s3")
    uris = {}
    for column, path in local.items():
        key = f"cases/{Path(path).name}"
        client.upload_file(path, BUCKET, key)
        uris[column] = f"s3://{BUCKET}/{key}"
    from_s3 = model.predict(pd.DataFrame([uris]))
    from_disk = model.predict(pd.DataFrame([local]))
    pd.testing.assert_frame_equal(from_s3, from_disk, atol=1e-4)
    client.put_object(Bucket=BUCKET, Key="cases/text_ct.nii.gz", Body=b"not an image")
    bad = uris | {"ct": f"s3://{BUCKET}/cases/text_ct.nii.gz"}
    with pytest.raises(MlflowException) as error:
        model.predict(pd.DataFrame([bad]))
    message = error.value.message
    assert "\n" not in message and message.startswith(bad["ct"]), message
