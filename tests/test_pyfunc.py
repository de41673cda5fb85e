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
from mlflow.tracking import MlflowClient

from healthivert.cli import main
from healthivert.data.manifest import read_manifest
from healthivert.inference.pyfunc import OUTPUT_COLUMNS, REGISTERED_NAME
from healthivert.tracking.pipeline import PIPELINE_GROUP_ENV, PIPELINE_RUN_ENV, flatten
from conftest import BUCKET, free_port, wait_until_answering
from test_grade import GRADED_CASE, _params, dag  # noqa: F401  (the module-scoped bundle fixture)


#: the tracked pipeline of the ``registered`` fixture: a gate every graded run passes (the networks are untrained)
TRACKED = ["--set", "tracking.enabled=true", "--set", "tracking.experiment=grader", "--set", "evaluate.bootstrap=50",
           "--set", "evaluate.candidate_gate.min_macro_f1=0.0", "--set", "evaluate.candidate_gate.beat_baseline=false"]


@pytest.fixture(scope="module")
def registered(dag: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    """svm-fit then evaluate with tracking on, into a sqlite store, in a git checkout: one pipeline run whose
    grader, ``healthivert-grader`` version 1, passes the gate and gets the alias ``candidate``; the store's URI."""
    root = tmp_path_factory.mktemp("mlflow")
    store = f"sqlite:///{root / 'mlflow.db'}"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], cwd=root, check=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", store)
        for name in (PIPELINE_RUN_ENV, PIPELINE_GROUP_ENV):
            patch.delenv(name, raising=False)
        assert main(["svm-fit", "--rhlv", str(dag / "truth" / "rhlv.parquet"), "--out", str(root / "svm"),
                     "--coarse", str(dag / "coarse"), "--fine", str(dag / "fine"), "--grader-out", str(root / "grader"),
                     *_params(), *TRACKED]) == 0
        assert main(["evaluate", "--data", str(dag / "pre"), "--synth", str(dag / "synth"), "--rhlv", str(dag / "truth"),
                     "--svm", str(root / "svm"), "--out", str(root / "reports"), "--metrics", str(root / "evaluate.json"),
                     *_params(), *TRACKED]) == 0
        yield store


def _case_row(phantom_root: Path) -> dict[str, str]:
    derivatives = phantom_root / "derivatives" / GRADED_CASE
    return {"ct": str(phantom_root / "rawdata" / GRADED_CASE / f"{GRADED_CASE}_ct.nii.gz"),
            "labels": str(derivatives / f"{GRADED_CASE}_seg-vert_msk.nii.gz")}


def test_registered_model_grades_as_the_grade_command(registered: str, dag: Path, phantom_root: Path,  # noqa: F811
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}@candidate")
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
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_NAME}@candidate"))
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


def _serve(model_uri: str, store: str, folder: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow models serve`` of ``model_uri`` on a free port of 127.0.0.1; the process and its base URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env={**os.environ, "MLFLOW_TRACKING_URI": store}, cwd=folder, stdout=subprocess.DEVNULL,
                              stderr=(folder / "server.log").open("w"))
    return server, f"http://127.0.0.1:{port}"


def test_served_model_answers_invocations_and_refuses_bad_rows(registered: str, phantom_root: Path, s3: str,
                                                               tmp_path: Path) -> None:
    server, base = _serve(f"models:/{REGISTERED_NAME}@candidate", registered, tmp_path)
    try:
        wait_until_answering(f"{base}/ping", server, tmp_path / "server.log")
        row = _case_row(phantom_root)
        status, answer = _post(f"{base}/invocations", json.dumps({"dataframe_records": [row]}).encode())
        assert status == 200, answer
        served = pd.DataFrame(answer["predictions"])
        assert list(served.columns) == list(OUTPUT_COLUMNS) and len(served) > 0
        assert (served["case"] == GRADED_CASE).all() and served["graded"].any()
        assert all(isinstance(grade, int) for grade in served.loc[served["graded"], "grade"])
        boto3.client("s3").put_object(Bucket=BUCKET, Key="cases/text_ct.nii.gz", Body=b"not an image")
        bad_rows = {  # a local file, an S3 object that does not exist, an S3 object that is no NIfTI
            str(phantom_root / "nowhere_ct.nii.gz"): "not found",
            f"s3://{BUCKET}/cases/absent_ct.nii.gz": "",
            f"s3://{BUCKET}/cases/text_ct.nii.gz": "",
        }
        for ct, problem in bad_rows.items():
            status, answer = _post(f"{base}/invocations", json.dumps({"dataframe_records": [row | {"ct": ct}]}).encode())
            message = answer.get("message", "")
            assert 400 <= status < 500 and "\n" not in message and message.startswith(f"{ct}: {problem}"), (status, answer)
        status, answer = _post(f"{base}/invocations", b"{not json")
        assert 400 <= status < 500, (status, answer)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_model_uri_that_does_not_exist_is_named(registered: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered)
    with pytest.raises(MlflowException, match="alias nowhere not found"):
        mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}@nowhere")
    server, _ = _serve(f"models:/{REGISTERED_NAME}/7", registered, tmp_path)
    assert server.wait(timeout=120) != 0
    last = (tmp_path / "server.log").read_text().strip().splitlines()[-1]
    assert REGISTERED_NAME in last and "7" in last, last


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


def test_the_pipeline_run_carries_what_the_runs_table_compares(registered: str, dag: Path) -> None:  # noqa: F811
    """Through the tracking API, what the MLflow UI shows: the experiment opens on training runs; the pipeline
    run holds the headline metrics, the dataset and the git source; the gate's grader is @candidate."""
    client = MlflowClient(registered)
    experiment = client.get_experiment_by_name("grader")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    (parent,) = [r for r in runs if r.data.tags.get("healthivert.kind") == "pipeline"]
    fit, evaluate = [r for r in runs if r.data.tags.get("healthivert.kind") == "stage"]
    assert [fit.data.tags["healthivert.stage"], evaluate.data.tags["healthivert.stage"]] == ["svm-fit", "evaluate"]
    assert {fit.data.tags["mlflow.parentRunId"], evaluate.data.tags["mlflow.parentRunId"]} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"

    written = flatten(json.loads(Path(registered.removeprefix("sqlite:///")).with_name("evaluate.json").read_text()))
    headline = {"grading.gan.macro_f1", "grading.gan.macro_f1_ci_low", "grading.gan.macro_f1_ci_high",
                "rhlv.mae.ant", "rhlv.mae.mid", "rhlv.mae.post", "generation.healthy.dice",
                "generation.healthy.height_error_mm", "candidate.passed"}
    assert headline <= set(parent.data.metrics)
    assert all(parent.data.metrics[key] == pytest.approx(written[key]) for key in headline)
    assert evaluate.data.metrics["grading.gan.macro_f1"] == pytest.approx(written["grading.gan.macro_f1"])
    times = {key: value for key, value in parent.data.metrics.items() if key.startswith("time.")}
    assert set(times) == {"time.svm_fit_s", "time.evaluate_s", "time.total_s"}
    assert times["time.total_s"] == pytest.approx(times["time.svm_fit_s"] + times["time.evaluate_s"])

    manifest = read_manifest(dag / "pre")[["case", "vertebra", "grade", "split"]]
    for run in (parent, evaluate):
        (dataset_input,) = run.inputs.dataset_inputs
        assert dataset_input.dataset.digest == mlflow.data.from_pandas(manifest).digest
        assert dataset_input.dataset.name == "phantom" and dataset_input.dataset.source_type == "local"
        assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "evaluate",
                                                                  "healthivert.layout": "verse"}

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(registered.removeprefix("sqlite:///")).parent,
                          capture_output=True, text=True, check=True).stdout.strip()
    for run, name in ((parent, "healthivert pipeline"), (fit, "healthivert svm-fit"), (evaluate, "healthivert evaluate")):
        tags = run.data.tags
        assert (tags["mlflow.source.git.commit"], tags["mlflow.source.type"], tags["mlflow.source.name"]) == (
            head, "LOCAL", name)

    version = client.get_model_version_by_alias(REGISTERED_NAME, "candidate")
    assert (str(version.version), version.run_id) == ("1", fit.info.run_id)
    assert version.tags["healthivert.candidate.run"] == evaluate.info.run_id
    assert parent.data.tags["healthivert.candidate"].startswith("passed: GAN macro-F1")
    assert parent.data.tags["healthivert.candidate"].endswith(f"{REGISTERED_NAME} version 1 is @candidate")
