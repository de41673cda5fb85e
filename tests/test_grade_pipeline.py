"""Grading a cohort: ``healthivert grade-cohort`` and the Kubeflow grading pipeline, read from and written to S3.

The cohort is the session's three phantom cases uploaded to a moto S3 server, the CT of one of them
replaced by bytes that are not NIfTI; the grader is the bundle of test_grade.py (untrained tiny
networks) uploaded beside them. The compiled pipeline is compared with the reviewed
``tests/golden/grade_pipeline.yaml``; after an intended change, refresh it with
``HEALTHIVERT_UPDATE_GOLDEN=1 pytest tests/test_grade_pipeline.py -k golden`` and review the diff.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml
from conftest import BUCKET
from test_grade import dag  # noqa: F401  (the module-scoped bundle fixture)

from healthivert.cli import main
from healthivert.inference.cohort import list_cases
from healthivert.io.remote import upload_folder
from healthivert.stages.submit import load_pipeline_module

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "grade_pipeline.yaml"
PIPELINE_FILE = REPO / "pipelines" / "grade_pipeline.py"
BAD_CASE = "sub-phantom002"
#: the flags the golden file is compiled with.
GOLDEN_ARGS = ["--pipeline", "grade", "--image", "registry.example/healthivert", "--tag", "test", "--gpus", "1",
               "--parallelism", "4", "--prefix", "s3://scans/cohort", "--grader", "models:/healthivert-grader@candidate",
               "--output", "s3://results/cohort", "--mlflow-uri", "http://mlflow.example:5000"]


def _normalised(text: str) -> dict:
    """The compiled YAML without what changes with the KFP release."""
    spec = yaml.safe_load(text)
    spec.pop("sdkVersion", None)
    return spec


def test_compiled_pipeline_matches_the_golden_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # --pipeline grade names a file of the project
    target = tmp_path / "grade.yaml"
    assert main(["submit", "--compile-only", str(target), *GOLDEN_ARGS]) == 0
    if os.environ.get("HEALTHIVERT_UPDATE_GOLDEN"):
        shutil.copyfile(target, GOLDEN)
    assert _normalised(target.read_text()) == _normalised(GOLDEN.read_text()), \
        f"the compiled grade pipeline differs from {GOLDEN.name}; if intended, refresh it (see this file's docstring)"


def test_compiled_pipeline_fans_out_with_gpus_and_requests() -> None:
    spec = _normalised(GOLDEN.read_text())
    loop = spec["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--list-cases-Output"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    gather = spec["root"]["dag"]["tasks"]["gather-cohort"]
    assert gather["inputs"]["artifacts"]["graded"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-list-cases", "exec-grade-case", "exec-gather-cohort"}
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/healthivert:test"}
    for executor in executors.values():
        resources = executor["container"]["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]
        assert "pip install" not in " ".join(executor["container"]["command"])
    assert [name for name, e in executors.items() if "accelerator" in e["container"]["resources"]] == ["exec-grade-case"]
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["grader_uri"]["defaultValue"] == "models:/healthivert-grader@candidate"
    assert parameters["cases"]["parameterType"] == "LIST" and parameters["prefix"]["defaultValue"] == "s3://scans/cohort"


@pytest.fixture(scope="module")
def cohort_on_s3(s3: str, phantom_root: Path, dag: Path, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """The phantom cases under ``s3://BUCKET/cohort`` (one CT not NIfTI), the grader under ``s3://BUCKET/grader``."""
    local = tmp_path_factory.mktemp("cohort") / "cohort"
    shutil.copytree(phantom_root, local, ignore=shutil.ignore_patterns("truth", "grades.csv"))
    (local / "rawdata" / BAD_CASE / f"{BAD_CASE}_ct.nii.gz").write_bytes(b"this is not a NIfTI file\n")
    upload_folder(local, f"s3://{BUCKET}/cohort")
    upload_folder(dag / "grader", f"s3://{BUCKET}/grader")
    return f"s3://{BUCKET}"


def test_listing_an_s3_prefix_finds_the_cases_by_their_keys(cohort_on_s3: str) -> None:
    entries = list_cases([f"{cohort_on_s3}/cohort", f"{cohort_on_s3}/nowhere", {"labels": "s3://x/a_msk.nii.gz"}])
    assert [e["case"] for e in entries] == ["sub-phantom000", "sub-phantom001", BAD_CASE, "nowhere", "case"]
    first = entries[0]
    assert first["ct"] == f"{cohort_on_s3}/cohort/rawdata/sub-phantom000/sub-phantom000_ct.nii.gz"
    assert first["labels"].endswith("derivatives/sub-phantom000/sub-phantom000_seg-vert_msk.nii.gz") and not first["error"]
    assert entries[3]["error"] == f"{cohort_on_s3}/nowhere: no objects under this prefix"
    assert entries[4]["error"] == "no ct given (each scan needs ct and labels)"


def _read_s3(uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def _check_cohort(table: pd.DataFrame, summary: dict, missing: list[str]) -> None:
    """Two graded cases with their vertebrae and reports; the bad CT and ``missing`` as failure rows naming the case."""
    graded = table[table["status"] == "graded"]
    assert sorted(graded["case"].unique()) == ["sub-phantom000", "sub-phantom001"]
    assert graded["vertebra"].notna().all() and graded["graded"].any() and graded["error"].isna().all()
    failed = table[table["status"] == "failed"].set_index("case")
    assert sorted(failed.index) == sorted([BAD_CASE, *missing])
    bad = failed.loc[BAD_CASE, "error"]
    assert bad.startswith(f"{BAD_CASE}: s3://") and "not a readable NIfTI file" in bad and "\n" not in bad, bad
    assert summary["cases_graded"] == 2 and summary["cases_failed"] == 1 + len(missing)
    assert sum(summary["grade_counts"].values()) == summary["vertebrae_graded"] == int(graded["graded"].sum())
    for item in summary["fractured"]:
        assert item["grade"] >= 1 and item["report"].endswith(f"{item['case']}/report.html")


def test_grade_cohort_reads_and_writes_s3_and_lists_the_failures(cohort_on_s3: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing_ct = json.dumps({"case": "lost", "ct": f"{cohort_on_s3}/lost_ct.nii.gz",
                             "labels": f"{cohort_on_s3}/lost_msk.nii.gz"})
    out = f"{cohort_on_s3}/results"
    assert main(["grade-cohort", "--prefix", f"{cohort_on_s3}/cohort", "--cases", missing_ct,
                 "--model", f"{cohort_on_s3}/grader", "--out", out, "--device", "cpu"]) == 0
    table = pd.read_parquet(io.BytesIO(_read_s3(f"{out}/cohort.parquet")))
    summary = json.loads(_read_s3(f"{out}/summary.json"))
    _check_cohort(table, summary, ["lost"])
    lost = table.set_index("case").loc["lost", "error"]
    assert lost == f"lost: {cohort_on_s3}/lost_ct.nii.gz: bucket or object not found", lost
    report = table.loc[table["status"] == "graded", "report"].iloc[0]
    assert report.startswith(f"{out}/sub-phantom00") and b"<html" in _read_s3(report)
    assert "## Fractured vertebrae" in _read_s3(f"{out}/summary.md").decode()
    assert "2 of 4 case(s) graded" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # no image locally
@pytest.mark.filterwarnings("ignore:Task .*have no effect in the current local runner:UserWarning")  # resource requests
def test_pipeline_grades_the_cohort_locally(cohort_on_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three steps run by ``kfp.local`` (one grade-case step per case, artifacts collected), S3 in and out."""
    from kfp import local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    out = f"{cohort_on_s3}/kfp-results"
    pipeline = load_pipeline_module(PIPELINE_FILE).build_pipeline(image="unused:local", gpus=0, parallelism=2)
    pipeline(cases=[], prefix=f"{cohort_on_s3}/cohort", grader_uri=f"{cohort_on_s3}/grader", output_uri=out)

    table = pd.read_parquet(io.BytesIO(_read_s3(f"{out}/cohort.parquet")))
    _check_cohort(table, json.loads(_read_s3(f"{out}/summary.json")), [])
    (local_table,) = (tmp_path / "kfp").rglob("cohort.parquet")
    assert pd.read_parquet(local_table).equals(table)  # the gather step's artifact holds the same table
    assert len(list((tmp_path / "kfp").rglob("record.json"))) == 3  # one grade-case step per case
    assert b"<html" in _read_s3(f"{out}/sub-phantom000/report.html")
