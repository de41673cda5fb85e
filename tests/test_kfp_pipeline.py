"""The Kubeflow pipeline: compiled IR (steps, edges, artifacts, GPUs, parameters) and a local run.

The local run executes all eight components (the dataset step making the phantom) with ``kfp.local.SubprocessRunner(use_venv=False)`` in
this Python environment, passing artifacts between steps as in a cluster, on a tiny phantom (3 cases
of 5 vertebrae, 96 x 64 x 16 crops, 2 steps per training stage, a 4-channel network) with MLflow
tracking into a scratch SQLite store: one parent run keyed by the KFP job id, one nested run per step.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kfp import components
from mlflow.tracking import MlflowClient

from healthivert.cli import main
from healthivert.config import load_params
from healthivert.stages.submit import load_pipeline_module

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILE = REPO / "pipelines" / "healthivert_pipeline.py"
STEPS = ["dataset", "preprocess", "train-coarse", "train-fine", "synthesize", "rhlv", "svm-fit", "evaluate"]
UPSTREAM = {
    "dataset": set(),
    "preprocess": {"dataset"},
    "train-coarse": {"preprocess"},
    "train-fine": {"preprocess", "train-coarse"},
    "synthesize": {"preprocess", "train-coarse", "train-fine"},
    "rhlv": {"preprocess", "synthesize"},
    "svm-fit": {"rhlv", "train-coarse", "train-fine"},
    "evaluate": {"preprocess", "synthesize", "rhlv", "svm-fit"},
}


def _compile(tmp_path: Path, *extra: str) -> dict:
    target = tmp_path / "pipeline.yaml"
    argv = ["submit", "--compile-only", str(target), "--pipeline", str(PIPELINE_FILE),
            "--params", str(REPO / "params.yaml"), "--image", "registry.example/healthivert", "--tag", "test", *extra]
    assert main(argv) == 0
    components.load_component_from_file(str(target))  # KFP's own reader accepts the file
    return yaml.safe_load(target.read_text())


def test_compiled_dag(tmp_path: Path) -> None:
    spec = _compile(tmp_path, "--set", "phantom.cases=5")
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(STEPS)
    for name, task in tasks.items():
        assert set(task.get("dependentTasks", [])) == UPSTREAM[name], name
    inputs = tasks["train-fine"]["inputs"]["artifacts"]
    assert inputs["coarse"]["taskOutputArtifact"] == {"outputArtifactKey": "coarse", "producerTask": "train-coarse"}
    assert inputs["attention"]["taskOutputArtifact"]["producerTask"] == "train-coarse"
    # svm-fit assembles the grader bundle (healthivert grade --model) from both stages' models
    inputs = tasks["svm-fit"]["inputs"]["artifacts"]
    assert inputs["coarse"]["taskOutputArtifact"] == {"outputArtifactKey": "coarse", "producerTask": "train-coarse"}
    assert inputs["fine"]["taskOutputArtifact"] == {"outputArtifactKey": "fine", "producerTask": "train-fine"}
    svm_source = " ".join(spec["deploymentSpec"]["executors"]["exec-svm-fit"]["container"]["command"])
    assert '"--grader-out", grader.path' in svm_source

    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/healthivert:test"}
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())
    assert all({"resourceCpuRequest", "resourceMemoryRequest"} <= set(e["container"]["resources"]) for e in executors.values())
    gpu = {name.removeprefix("exec-") for name, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert gpu == {"train-coarse", "train-fine", "synthesize"}
    assert executors["exec-train-coarse"]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"

    components = spec["components"]
    outputs = components["comp-train-coarse"]["outputDefinitions"]["artifacts"]
    assert outputs["coarse"]["artifactType"]["schemaTitle"] == "system.Model"
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    grader = components["comp-svm-fit"]["outputDefinitions"]["artifacts"]["grader"]
    assert grader["artifactType"]["schemaTitle"] == "system.Model"
    assert components["comp-evaluate"]["outputDefinitions"]["artifacts"]["report"]["artifactType"]["schemaTitle"] == "system.HTML"

    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {"params_json", "overrides", "dataset_uri", "grades_uri", "checkpoint_uri"}
    defaults = json.loads(parameters["params_json"]["defaultValue"])
    assert defaults["phantom"]["cases"] == 5 and defaults["tracking"]["enabled"] is True
    # the phantom dataset (no URI), checkpoints inside the pod: the defaults
    assert all(parameters[name].get("defaultValue", "") == "" for name in ("dataset_uri", "grades_uri", "checkpoint_uri"))
    preprocess_inputs = tasks["preprocess"]["inputs"]["artifacts"]
    assert {key: value["taskOutputArtifact"]["outputArtifactKey"] for key, value in preprocess_inputs.items()} == \
        {"raw": "raw", "grades": "grades"}
    for step in ("train-coarse", "train-fine"):
        assert tasks[step]["inputs"]["parameters"]["checkpoint_uri"]["componentInputParameter"] == "checkpoint_uri"
        assert tasks[step]["retryPolicy"]["maxRetryCount"] == 2  # a lost pod is restarted and resumes


def test_compile_with_a_dataset_and_persistent_checkpoints(tmp_path: Path) -> None:
    """``data.source`` / ``data.grades`` become the dataset parameters' defaults, ``--checkpoints`` the checkpoints'."""
    spec = _compile(tmp_path, "--set", "data.source=s3://scans/verse19", "--set", "data.grades=s3://scans/grades.json",
                    "--checkpoints", "s3://scans/checkpoints/exp-1")
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["dataset_uri"]["defaultValue"] == "s3://scans/verse19"
    assert parameters["grades_uri"]["defaultValue"] == "s3://scans/grades.json"
    assert parameters["checkpoint_uri"]["defaultValue"] == "s3://scans/checkpoints/exp-1"
    dataset_inputs = spec["root"]["dag"]["tasks"]["dataset"]["inputs"]["parameters"]
    assert dataset_inputs["dataset_uri"]["componentInputParameter"] == "dataset_uri"


def test_compile_without_gpus_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _compile(tmp_path, "--gpus", "0")
    assert not any("accelerator" in e["container"].get("resources", {}) for e in spec["deploymentSpec"]["executors"].values())
    assert main(["submit", "--compile-only", str(tmp_path / "x.yaml"), "--pipeline", str(PIPELINE_FILE),
                 "--params", str(REPO / "params.yaml"), "--set", "phantom.casse=3"]) == 2
    assert "unknown key 'phantom.casse'" in capsys.readouterr().err
    assert main(["submit", "--compile-only", str(tmp_path / "x.yaml"), "--pipeline", str(tmp_path / "absent.py"),
                 "--params", str(REPO / "params.yaml")]) == 2
    assert "pipeline definition not found" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


class _FakeKfpApi(BaseHTTPRequestHandler):
    """The four KFP v2beta1 REST calls ``kfp.Client`` makes to submit a run, answered and recorded."""

    calls: list[tuple[str, str, dict]] = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.calls.append(("GET", self.path, {}))
        self._answer({"multi_user": False} if "healthz" in self.path else {"experiments": [], "total_size": 0})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.calls.append(("POST", self.path, body))
        if self.path.endswith("/experiments"):
            self._answer({"experiment_id": "exp-1", "display_name": body["display_name"]})
        else:
            self._answer({"run_id": "run-1", "display_name": body["display_name"], "experiment_id": body["experiment_id"]})

    def log_message(self, *args: object) -> None:
        """Keep the test output quiet."""


def test_submit_sends_the_compiled_pipeline() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfpApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _FakeKfpApi.calls = []
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["submit", "--host", host, "--experiment", "vcf", "--run-name", "nightly", "--gpus", "2",
                     "--pipeline", str(PIPELINE_FILE), "--params", str(REPO / "params.yaml"),
                     "--set", "train_fine.epochs=9"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    posts = {path.rsplit("/", 1)[-1]: body for method, path, body in _FakeKfpApi.calls if method == "POST"}
    assert posts["experiments"]["display_name"] == "vcf"
    run = posts["runs"]
    assert run["experiment_id"] == "exp-1" and run["display_name"] == "nightly"
    spec = run["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "healthivert"
    assert json.loads(spec["root"]["inputDefinitions"]["parameters"]["params_json"]["defaultValue"])["train_fine"]["epochs"] == 9
    accelerator = spec["deploymentSpec"]["executors"]["exec-train-fine"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceCount"] == "2"


TINY = {
    "phantom": {"cases": 3, "vertebrae_per_case": [5, 5], "fracture_share": 0.6, "seed": 1},
    "preprocess": {"crop_shape": [96, 64, 16]},  # 96 rows keep both neighbours (the baseline needs them)
    "model": {"sizes": {"cpu": {"cnum": 4, "disc_channels": 4, "disc_layers": 1, "classifier_channels": 4}}},
    # Enough steps (at a high learning rate) for the segmentation heads to mark the vertebrae, so that
    # the syntheses are measurable and the later steps run on real tables.
    # Grade <= 1 targets: three small cases hold too few healthy vertebrae to learn from.
    "train_coarse": {"epochs": 1, "steps_per_epoch": 40, "batch_size": 4, "lr": 0.002, "lr_constant_epochs": 1,
                     "checkpoint_every": 40, "device": "cpu", "target_max_grade": 1,
                     "classifier": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2}},
    "train_fine": {"epochs": 1, "steps_per_epoch": 80, "batch_size": 4, "lr": 0.002, "lr_constant_epochs": 1,
                   "checkpoint_every": 80, "device": "cpu", "target_max_grade": 1},
    "synthesize": {"device": "cpu"},
    "svm_fit": {"folds": 2, "c_grid": [1.0]},
    "evaluate": {"bootstrap": 20, "report_vertebrae": 2},
    "tracking": {"experiment": "kfp-local"},
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # no image locally
@pytest.mark.filterwarnings("ignore:Task .*have no effect in the current local runner:UserWarning")  # resource requests
def test_pipeline_runs_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import local

    monkeypatch.chdir(tmp_path)  # the steps run here: MLflow's local artifact folder lands in tmp_path

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section] = {**params[section], **values}
    text = json.dumps(params)
    (tmp_path / "tiny.json").write_text(text)
    load_params(tmp_path / "tiny.json")  # the tiny settings are valid

    store = f"sqlite:///{tmp_path}/mlflow.db"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    pipeline = load_pipeline_module(PIPELINE_FILE).build_pipeline(image="unused:local", gpus=0, params_json=text,
                                                                  mlflow_uri=store)
    pipeline(params_json=text, overrides="train_fine.seed=2\n")  # raises if any step fails

    root = tmp_path / "kfp"
    (report,) = root.rglob("report.html")
    assert "<html" in report.read_text().lower()
    (rhlv_table,) = root.rglob("rhlv.parquet")
    table = pd.read_parquet(rhlv_table)
    assert len(table) == 15  # 3 cases x 5 vertebrae
    assert table[["rhlv_ant", "rhlv_mid", "rhlv_post"]].notna().all().all()

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("kfp-local").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("healthivert.kind") == "pipeline"]
    stages = {r.data.tags["healthivert.stage"]: r for r in runs if r.data.tags.get("healthivert.kind") == "stage"}
    assert set(stages) >= set(STEPS) - {"dataset"}
    assert {r.data.tags["mlflow.parentRunId"] for r in stages.values()} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags["healthivert.group"]
    assert stages["train-fine"].data.params["train_fine.seed"] == "2"  # the run-time override reached the step
    assert stages["evaluate"].data.metrics
    assert (tmp_path / "mlartifacts").is_dir()
