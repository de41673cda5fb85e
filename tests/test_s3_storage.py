"""S3 storage against a local moto server: the DVC remote, and MLflow artifacts (server-proxied and direct).

Everything listens on 127.0.0.1 and is stopped at the end of the module. Endpoints and credentials
come from the environment exactly as documented in docs/orchestration.md: ``AWS_ENDPOINT_URL`` for
DVC and boto3, ``MLFLOW_S3_ENDPOINT_URL`` for MLflow.
"""

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml

from conftest import BUCKET, free_port, wait_until_answering

from healthivert.cli import main
from healthivert.config import load_params
from healthivert.tracking import stage_run

pytest.importorskip("moto.server", reason="moto[server] is not installed")

REPO = Path(__file__).resolve().parents[1]


def _keys(prefix: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", [])]


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_dvc_remote_round_trip(s3: str, tmp_path: Path) -> None:
    """``dvc push`` a stage output to s3://BUCKET/dvc, lose it and the cache, ``dvc pull`` it back."""
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "remote", "add", "--local", "-d", "storage", f"s3://{BUCKET}/dvc"],
                ["dvc", "stage", "add", "-q", "-n", "make", "-o", "out",
                 "mkdir -p out && echo vertebra > out/a.txt && echo fracture > out/b.txt"],
                ["dvc", "repro", "-q"]):
        _run(cmd, tmp_path)
    assert "3 files pushed" in _run(["dvc", "push"], tmp_path)  # two files and the folder listing
    assert len(_keys("dvc/files/md5/")) == 3
    for path in (tmp_path / "out", tmp_path / ".dvc" / "cache"):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    _run(["dvc", "pull"], tmp_path)
    assert (tmp_path / "out" / "a.txt").read_text() == "vertebra\n"
    assert (tmp_path / "out" / "b.txt").read_text() == "fracture\n"
    assert "up to date" in _run(["dvc", "status"], tmp_path)


def test_mlflow_artifacts_written_directly_to_s3(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local SQLite store, artifacts in S3 through ``HEALTHIVERT_ARTIFACT_LOCATION``."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("HEALTHIVERT_ARTIFACT_LOCATION", f"s3://{BUCKET}/direct")
    (tmp_path / "report.html").write_text("<p>grade 2</p>")
    with stage_run("evaluate", load_params([]), ("evaluate",)) as tracker:
        tracker.log_artifact(tmp_path / "report.html", "report")
    assert any(key.endswith(f"{tracker.run_id}/artifacts/report/report.html") for key in _keys("direct/"))
    local = mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path="report/report.html",
                                                dst_path=str(tmp_path / "back"))
    assert Path(local).read_text() == "<p>grade 2</p>"
    assert not (tmp_path / "mlartifacts").exists()


@pytest.fixture()
def mlflow_server(s3: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and artifacts proxied to s3://BUCKET/server."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", f"s3://{BUCKET}/server"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", process, tmp_path / "mlflow-server.log")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage_logs_to_a_tracking_server(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real stages through the CLI against the server; read back with MlflowClient and from the bucket."""
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    tiny = ["--set", "phantom.cases=2", "--set", "phantom.vertebrae_per_case=[3, 3]",
            "--set", "preprocess.crop_shape=[64, 64, 16]", "--set", "tracking.experiment=server"]
    params = ["--params", str(REPO / "params.yaml")]
    assert main(["phantom", "--out", "raw", *params, *tiny]) == 0
    assert main(["preprocess", "--input", "raw", "--grades", "raw/grades.csv", "--out", "pre",
                 "--metrics", "preprocess.json", *params, *tiny]) == 0

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("server")
    runs = client.search_runs([experiment.experiment_id])
    (stage,) = [r for r in runs if r.data.tags.get("healthivert.stage") == "preprocess"]
    (parent,) = [r for r in runs if r.info.run_id == stage.data.tags["mlflow.parentRunId"]]
    assert stage.info.status == "FINISHED"
    written = json.loads((work / "preprocess.json").read_text())
    assert stage.data.metrics == pytest.approx({k: v for k, v in written.items() if math.isfinite(v)})
    assert stage.data.params["preprocess.crop_shape"] == "[64, 64, 16]"

    params_key = f"{parent.info.run_id}/artifacts/params.yaml"
    assert any(key.endswith(params_key) for key in _keys("server/"))
    text = client.download_artifacts(parent.info.run_id, "params.yaml", str(tmp_path))
    assert yaml.safe_load(Path(text).read_text())["preprocess"]["crop_shape"] == [64, 64, 16]
