"""The dataset as a setting: a VerSe-layout dataset in S3 (moto), read by preprocess, by DVC and by Kubeflow.

The bucket holds the session's phantom cases in the VerSe release layout plus one real lumbar CT from
``../shared/data`` (when present), with a grades file in the paper's JSON format (its split kept). Bad
locations and grades each fail in one line before anything is trained. (A training step whose pod is
lost resuming from the checkpoints it kept in S3: tests/test_training.py.)
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml
from conftest import BUCKET, SHARED_DATA

from healthivert.cli import main
from healthivert.data.manifest import read_manifest
from healthivert.io.remote import download_prefix

pytest.importorskip("moto.server", reason="moto[server] is not installed")

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
DATASET = f"s3://{BUCKET}/verse19"
GRADES = f"s3://{BUCKET}/grades/verse19-genant-grades.json"
TINY = ["--set", "preprocess.crop_shape=[64, 64, 16]", "--set", "tracking.enabled=false"]
#: the real CT (tptbox sample, VerSe ids 21-23; L2 and L4 are cut by the scan, L3 is whole).
REAL_CT = SHARED_DATA / "tptbox-sample" / "sub-ct_label-22_ct.nii.gz"
REAL_MASK = SHARED_DATA / "tptbox-sample" / "sub-ct_seg-vert_label-22_msk.nii.gz"
REAL_CASE = "sub-ct_label-22"


def _upload(folder: Path, prefix: str) -> None:
    client = boto3.client("s3")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def s3_dataset(s3: str, phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The VerSe-layout dataset and its paper-format grades in the moto bucket; returns case -> split."""
    staged = tmp_path_factory.mktemp("verse19")
    for folder in ("rawdata", "derivatives", "truth"):
        shutil.copytree(phantom_root / folder, staged / folder)
    table = pd.read_csv(phantom_root / "grades.csv", dtype={"case": str})
    cases = sorted(table["case"].unique())
    splits = dict(zip(cases, ("train", "val", "test")))
    tree: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for row in table.itertuples():
        tree[splits[row.case]][f"{row.case}_{row.vertebra}"] = int(row.grade)
    if REAL_CT.is_file():
        (staged / "rawdata" / "sub-ct").mkdir()
        (staged / "derivatives" / "sub-ct").mkdir()
        shutil.copy(REAL_CT, staged / "rawdata" / "sub-ct" / REAL_CT.name)
        shutil.copy(REAL_MASK, staged / "derivatives" / "sub-ct" / f"{REAL_CASE}_seg-vert_msk.nii.gz")
        tree["train"] |= {f"{REAL_CASE}_21": 0, f"{REAL_CASE}_22": 0, f"{REAL_CASE}_23": 0}
        splits[REAL_CASE] = "train"
    _upload(staged, "verse19")
    boto3.client("s3").put_object(Bucket=BUCKET, Key="grades/verse19-genant-grades.json", Body=json.dumps(tree))
    boto3.client("s3").put_object(Bucket=BUCKET, Key="empty/.keep", Body=b"")
    return splits


def test_preprocess_reads_the_dataset_from_s3_and_keeps_the_papers_split(s3_dataset: dict[str, str],
                                                                        tmp_path: Path) -> None:
    cache = tmp_path / "downloads"
    argv = ["preprocess", "--input", DATASET, "--grades", GRADES, "--download-cache", str(cache),
            "--out", str(tmp_path / "pre"), "--params", str(PARAMS), *TINY]
    assert main(argv) == 0
    manifest = read_manifest(tmp_path / "pre")
    assert dict(zip(manifest["case"], manifest["split"])) == s3_dataset
    assert manifest["grade"].notna().all()
    ct = next((cache / BUCKET / "verse19" / "rawdata").rglob("*_ct.nii.gz"))
    stamp = ct.stat().st_mtime_ns
    assert download_prefix(DATASET, cache) == cache / BUCKET / "verse19"  # again: unchanged objects not fetched
    assert ct.stat().st_mtime_ns == stamp


def _bad_grades(tmp_path: Path, phantom_root: Path, vertebra: int) -> str:
    table = pd.read_csv(phantom_root / "grades.csv", dtype={"case": str})
    extra = pd.DataFrame([{"case": table["case"].iloc[0], "vertebra": vertebra, "grade": 2}])
    path = tmp_path / "grades.csv"
    pd.concat([table, extra]).to_csv(path, index=False)
    return str(path)


BAD_INPUTS = [
    # (what, --input, --grades, expected words of the one-line error)
    ("no such folder", "{tmp}/absent", "{phantom}/grades.csv", "dataset folder not found"),
    ("empty folder", "{tmp}/empty", "{phantom}/grades.csv", "no cases found"),
    ("no such bucket", "s3://no-such-bucket/verse19", "{phantom}/grades.csv", "bucket or object not found"),
    ("empty prefix", f"s3://{BUCKET}/nothing-here", "{phantom}/grades.csv", "no objects under this prefix"),
    ("no grades file", "{phantom}", "{tmp}/absent.json", "grades file not found"),
    ("no grades object", DATASET, f"s3://{BUCKET}/grades/absent.json", "bucket or object not found"),
    ("a vertebra not in the data", "{phantom}", "{bad_vertebra}", "which its label map does not hold"),
]


@pytest.mark.parametrize(("what", "source", "grades", "expected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_dataset_or_grades_fail_in_one_line(s3_dataset: dict[str, str], phantom_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], what: str, source: str,
                                                grades: str, expected: str) -> None:
    (tmp_path / "empty").mkdir()
    names = {"tmp": tmp_path, "phantom": phantom_root}
    if "{bad_vertebra}" in grades:
        names["bad_vertebra"] = _bad_grades(tmp_path, phantom_root, vertebra=3)  # C3: phantoms span T6-L5
    argv = ["preprocess", "--input", source.format(**names), "--grades", grades.format(**names),
            "--out", str(tmp_path / "pre"), "--params", str(PARAMS), *TINY]
    assert main(argv) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # logging aside
    assert error.startswith("healthivert preprocess: error: ") and expected in error, error
    assert not (tmp_path / "pre").exists()


def test_grades_of_other_cases_are_refused_before_any_case_is_read(phantom_root: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    grades = tmp_path / "grades.json"
    grades.write_text(json.dumps({"train": {"sub-verse004_16": 2}, "test": {"sub-verse005_20": 0}}))
    assert main(["preprocess", "--input", str(phantom_root), "--grades", str(grades), "--out", str(tmp_path / "pre"),
                 "--params", str(PARAMS), *TINY]) == 2
    assert "grades none of the 3 case(s) of the dataset" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # no image locally
def test_kubeflow_dataset_and_preprocess_steps_run_on_the_s3_dataset(s3_dataset: dict[str, str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's first two components, run locally as Kubeflow would, on the dataset in the bucket."""
    from kfp import dsl, local
    from kfp.dsl import Dataset

    from healthivert.errors import HealthiVertError
    from healthivert.stages.submit import import_dataset, load_pipeline_module

    monkeypatch.chdir(tmp_path)
    load_pipeline_module(REPO / "pipelines" / "healthivert_pipeline.py")  # puts components/ on the path
    from components.stages import build_components

    steps = build_components("unused:local")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    params = yaml.safe_load(PARAMS.read_text())
    params["preprocess"]["crop_shape"] = [64, 64, 16]
    common = {"params_json": json.dumps(params), "overrides": "", "mlflow_uri": "", "pipeline_group": ""}

    @dsl.pipeline(name="dataset-preprocess")
    def first_steps(dataset_uri: str, grades_uri: str) -> Dataset:
        source = steps.dataset(dataset_uri=dataset_uri, grades_uri=grades_uri, **common)
        return steps.preprocess(raw=source.outputs["raw"], grades=source.outputs["grades"],
                                **common).outputs["preprocessed"]

    preprocessed = first_steps(dataset_uri=DATASET, grades_uri=GRADES).output
    manifest = read_manifest(Path(preprocessed.path))
    assert dict(zip(manifest["case"], manifest["split"])) == s3_dataset
    # what the dataset step refuses, in one line, before any training step starts
    for dataset_uri, grades_uri, expected in ((f"s3://{BUCKET}/nothing-here", GRADES, "no objects under this prefix"),
                                              (DATASET, "", "no grades file given"),
                                              (str(tmp_path / "absent"), GRADES, "dataset folder not found")):
        with pytest.raises(HealthiVertError, match=expected):
            import_dataset(dataset_uri, grades_uri, tmp_path / "raw", tmp_path / "grades")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_exp_run_preprocesses_the_s3_dataset_without_the_phantom(s3_dataset: dict[str, str],
                                                                     tmp_path: Path) -> None:
    """``dvc exp run -S data.source=s3://... -S data.grades=s3://...`` in a scratch copy of the project."""
    from test_dvc_pipeline import make_project

    from mlflow.tracking import MlflowClient

    root, env = make_project(tmp_path, {"preprocess": {"crop_shape": [64, 64, 16]}})
    done = subprocess.run(["dvc", "exp", "run", "preprocess", "-S", f"data.source={DATASET}", "-S",
                           f"data.grades={GRADES}"], cwd=root, env={**env, **os.environ}, capture_output=True,
                          text=True, timeout=280)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Running stage 'preprocess'" in out and "dvc.yaml:phantom" not in out  # not even considered
    manifest = read_manifest(root / "data" / "preprocessed")
    assert set(manifest["case"]) == set(s3_dataset)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["preprocess"]
    deps = {dep["path"]: dep for dep in lock["deps"]}
    assert deps[DATASET]["nfiles"] > 0 and GRADES in deps  # the data is a real dependency, hashed by DVC

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("healthivert").experiment_id])
              if r.data.tags.get("healthivert.stage") == "preprocess"]
    (used,) = run.inputs.dataset_inputs  # the MLflow dataset input names the bucket prefix
    assert json.loads(used.dataset.source) == {"uri": DATASET} and used.dataset.name == "verse19"
    assert run.data.params["data.source"] == DATASET


def test_kubeflow_checkpoint_folders_outlive_the_step(s3: str, tmp_path: Path) -> None:
    """What a training component hands its stage as ``--checkpoint-dir``, for each kind of ``checkpoint_uri``."""
    from healthivert.stages.submit import checkpoint_folder

    uri = f"s3://{BUCKET}/checkpoints/exp-1"
    with checkpoint_folder(uri, "train_fine") as folder:
        (Path(folder) / "last.pt").write_bytes(b"step 4")
    assert boto3.client("s3").get_object(Bucket=BUCKET, Key="checkpoints/exp-1/train_fine/last.pt")["Body"].read() \
        == b"step 4"
    with checkpoint_folder(uri, "train_fine") as folder:  # the restarted step, on another node
        assert (Path(folder) / "last.pt").read_bytes() == b"step 4"
    with checkpoint_folder(str(tmp_path / "volume"), "train_coarse") as folder:  # a mounted volume
        assert Path(folder) == tmp_path / "volume" / "train_coarse" and Path(folder).is_dir()
    with checkpoint_folder("", "train_coarse") as folder:  # inside the pod: gone with it
        scratch = Path(folder)
        assert scratch.is_dir()
    assert not scratch.exists()
