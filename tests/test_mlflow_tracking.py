"""MLflow tracking: nested stage runs under one parent per pipeline execution, statuses, lineage, models."""

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from healthivert.config import Params, load_params
from healthivert.errors import ConfigError
from healthivert.tracking import stage_run
from healthivert.tracking.pipeline import GROUP_FILE, PIPELINE_GROUP_ENV, PIPELINE_RUN_ENV


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its tables costs seconds); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture()
def workdir(tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)
    monkeypatch.delenv(PIPELINE_GROUP_ENV, raising=False)
    return tmp_path


def _params(experiment: str, *overrides: str) -> Params:
    return load_params([], [f"tracking.experiment={experiment}", *overrides])


def _runs(store: str, experiment: str) -> tuple[list, list]:
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("healthivert.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("healthivert.kind") == "stage"]
    return parents, stages


def test_disabled_tracking_touches_nothing(workdir: Path) -> None:
    params = load_params([], ["tracking.enabled=false"])
    with stage_run("rhlv", params, ("rhlv",)) as tracker:
        tracker.log_metrics({"x": 1.0})
        tracker.log_artifact(workdir / "absent.txt")  # would fail if anything were logged
        tracker.log_model_files(workdir / "absent", "svm")
    assert not tracker.active
    assert list(workdir.iterdir()) == []


def test_one_parent_per_execution(workdir: Path, store: str) -> None:
    params = _params("grouping")
    for stage in ("svm-fit", "evaluate"):  # one execution, ended by the final stage
        with stage_run(stage, params, ("svm_fit",)) as tracker:
            tracker.log_metrics({"accuracy": 0.5})
    for stage in ("rhlv", "svm-fit"):  # the next one: rhlv was not seen by the finished parent
        with stage_run(stage, params, ("rhlv",)):
            pass
    with stage_run("svm-fit", _params("grouping", "svm_fit.seed=4"), ("svm_fit",)):
        pass  # a changed parameter starts a third execution and closes the second

    parents, stages = _runs(store, "grouping")
    assert [r.info.status for r in parents] == ["FINISHED", "FINISHED", "RUNNING"]
    ids = [r.info.run_id for r in parents]
    assert [r.data.tags["mlflow.parentRunId"] for r in stages] == [ids[0], ids[0], ids[1], ids[1], ids[2]]
    assert [r.data.tags["healthivert.stage"] for r in stages] == ["svm-fit", "evaluate", "rhlv", "svm-fit", "svm-fit"]
    assert stages[0].data.metrics == {"accuracy": 0.5}
    assert stages[0].data.params["svm_fit.c_grid"] == "[0.1, 1.0, 10.0, 100.0]"
    assert "rhlv.central_fraction" not in stages[0].data.params
    assert parents[0].data.params["train_coarse.losses.edge"] == "800.0"  # the parent holds every setting
    assert parents[2].data.tags["params.digest"] != parents[1].data.tags["params.digest"]
    assert json.loads((workdir / GROUP_FILE).read_text())["stages"] == ["svm-fit"]


def test_failed_stage_fails_its_run_and_the_parent(workdir: Path, store: str) -> None:
    params = _params("failure")
    with stage_run("rhlv", params, ("rhlv",)):
        pass
    with pytest.raises(RuntimeError, match="broken"), stage_run("svm-fit", params, ("svm_fit",)):
        raise RuntimeError("broken")
    with stage_run("svm-fit", params, ("svm_fit",)):  # the rerun is a new execution
        pass
    parents, stages = _runs(store, "failure")
    assert [r.info.status for r in stages] == ["FINISHED", "FAILED", "FINISHED"]
    assert [r.info.status for r in parents] == ["FAILED", "RUNNING"]
    assert stages[2].data.tags["mlflow.parentRunId"] == parents[1].info.run_id


def test_group_id_and_explicit_parent(workdir: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params("kubeflow")
    monkeypatch.setenv(PIPELINE_GROUP_ENV, "job-1")
    for stage in ("phantom", "phantom"):  # a group id keeps even a repeated stage together
        with stage_run(stage, params, ("phantom",)):
            pass
    monkeypatch.setenv(PIPELINE_GROUP_ENV, "job-2")
    with stage_run("phantom", params, ("phantom",)):
        pass
    wrapper = MlflowClient(store).create_run(MlflowClient(store).get_experiment_by_name("kubeflow").experiment_id)
    monkeypatch.setenv(PIPELINE_RUN_ENV, wrapper.info.run_id)
    with stage_run("evaluate", params, ("evaluate",)):
        pass
    parents, stages = _runs(store, "kubeflow")
    assert [r.data.tags["healthivert.group"] for r in parents] == ["job-1", "job-2"]
    assert [r.data.tags["mlflow.parentRunId"] for r in stages] == [
        parents[0].info.run_id, parents[0].info.run_id, parents[1].info.run_id, wrapper.info.run_id]
    assert MlflowClient(store).get_run(wrapper.info.run_id).info.status == "RUNNING"  # the wrapper owns it
    assert not (workdir / GROUP_FILE).exists()


def test_stage_is_tagged_with_dvc_data_hashes(workdir: Path, store: str) -> None:
    (workdir / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "phantom": {"cmd": "healthivert phantom", "deps": ["src/healthivert/phantom"]},
        "svm_fit": {"cmd": "healthivert svm-fit", "deps": ["data/rhlv/rhlv.parquet", "src/healthivert/grading"]},
        "rhlv": {"cmd": "healthivert rhlv", "deps": ["data/synthesized"]}}}))
    (workdir / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "rhlv": {"cmd": "healthivert rhlv", "outs": [{"path": "data/rhlv", "md5": "ab12cd.dir"}]},
        "svm_fit": {"cmd": "healthivert svm-fit",  # the previous run's input: stale, not to be used
                    "deps": [{"path": "data/rhlv/rhlv.parquet", "md5": "0ld0ld"}]}}}))
    listing = workdir / ".dvc" / "cache" / "files" / "md5" / "ab" / "12cd.dir"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([{"relpath": "maps/a.png", "md5": "111"}, {"relpath": "rhlv.parquet", "md5": "222"}]))
    for stage, section in (("svm-fit", "svm_fit"), ("rhlv", "rhlv"), ("phantom", "phantom")):
        with stage_run(stage, _params("lineage"), (section,)):
            pass
    _, (fit, rhlv, phantom) = _runs(store, "lineage")
    assert fit.data.tags["dvc.dep.data/rhlv/rhlv.parquet"] == "222"  # from the current folder listing
    assert "dvc.dep.src/healthivert/grading" not in fit.data.tags
    assert len(fit.data.tags["dvc.data_hash"]) == 16
    assert rhlv.data.tags["dvc.data_hash"] == "unknown"  # its input was never produced by DVC
    assert phantom.data.tags["dvc.data_hash"] == "none"  # no data inputs
    assert fit.data.tags["git.commit"] == "unknown"  # the scratch folder is no git repository


def test_models_are_logged_and_registered(workdir: Path, store: str) -> None:
    torch.manual_seed(0)
    generator = torch.nn.Conv2d(1, 1, 3)
    (workdir / "svm").mkdir()
    (workdir / "svm" / "svm.json").write_text('{"C": 1.0}')
    with stage_run("train-fine", _params("models"), ("train_fine",)) as tracker:
        tracker.log_torch_model(generator)
        tracker.log_torch_model(torch.nn.Linear(2, 1), name="coarse_generator")
        tracker.log_model_files(workdir / "svm", "svm")
    with stage_run("svm-fit", _params("models", "tracking.register_models=false"), ("svm_fit",)) as tracker:
        tracker.log_model_files(workdir / "svm", "svm")  # logged, not registered
    mlflow.set_tracking_uri(store)
    registered = {m.name: len(MlflowClient(store).search_model_versions(f"name = '{m.name}'"))
                  for m in MlflowClient(store).search_registered_models()}
    assert registered == {"healthivert-generator": 1, "healthivert-coarse-generator": 1, "healthivert-svm": 1}
    loaded = mlflow.pytorch.load_model("models:/healthivert-generator/latest")
    assert torch.equal(loaded.weight, generator.weight)
    version = MlflowClient(store).search_model_versions("name = 'healthivert-svm'")[0]
    local = mlflow.artifacts.download_artifacts(version.source, dst_path=str(workdir / "download"))
    assert json.loads((Path(local) / "svm.json").read_text()) == {"C": 1.0}


def test_unreachable_store_is_a_one_line_error(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ConfigError, match="MLflow tracking store unusable") as info, \
            stage_run("rhlv", _params("unreachable"), ("rhlv",)):
        pass
    assert "\n" not in str(info.value) and "tracking.enabled=false" in str(info.value)


def test_terminated_stage_is_marked_failed(workdir: Path, store: str) -> None:
    """SIGTERM (DVC or Kubernetes stopping a step) must not leave runs RUNNING."""
    script = ("import os, signal\n"
              "from healthivert.config import load_params\n"
              "from healthivert.tracking import stage_run\n"
              "with stage_run('train-coarse', load_params([], ['tracking.experiment=terminated']), ('train_coarse',)):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    signal.pause()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    parents, stages = _runs(store, "terminated")
    assert [r.info.status for r in stages] == ["FAILED"]
    assert [r.info.status for r in parents] == ["FAILED"]
