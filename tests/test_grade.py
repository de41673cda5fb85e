"""``healthivert grade``: un-straightening on real anatomy, one code path with the DAG on phantoms, bad inputs.

The phantom test runs the DAG's per-vertebra stages (preprocess -> attention maps -> synthesize ->
rhlv -> svm-fit, which writes the grader bundle) with untrained tiny networks, then grades a raw scan
with ``grade`` and compares its grades and RHLV with the stages' own. The networks are not trained:
the comparison is of two code paths on the same weights, and training them (the DAG's job, tested in
test_training_stages.py) took most of this file's time. The generator's segmentation head is set to
keep every restored row, so the synthesised bodies are measurable and the SVM grades them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from healthivert.cli import main
from healthivert.config import load_params
from healthivert.data.manifest import read_manifest
from healthivert.geometry.straighten import straighten, unstraighten
from healthivert.grading.model import load_model
from healthivert.inference.bundle import MANIFEST_NAME, load_bundle
from healthivert.io.case import load_mask_case
from healthivert.io.images import load_dicom_series
from healthivert.io.nifti import load_volume
from healthivert.models import HealthiVertGenerator
from healthivert.models.classifier import FractureClassifier
from healthivert.models.io import save_classifier, save_generator
from healthivert.stages.train_coarse import write_attention_maps
from healthivert.training.runtime import Runtime
from test_training_stages import PARAMS

TINY = ["tracking.enabled=false", "model.sizes.cpu.cnum=4", "model.sizes.cpu.disc_channels=4",
        "model.sizes.cpu.disc_layers=1", "model.sizes.cpu.classifier_channels=4",
        "synthesize.device=cpu", "synthesize.precision=fp32", "synthesize.iterative=false"]
GRADED_CASE = "sub-phantom000"


def _params() -> list[str]:
    args = ["--params", str(PARAMS)]
    for setting in TINY:
        args += ["--set", setting]
    return args


def _untrained_models(root: Path) -> None:
    """What train-coarse and train-fine write (classifier, attention maps, generator and card), untrained."""
    params = load_params([PARAMS], TINY)
    torch.manual_seed(0)
    classifier = FractureClassifier(params.model)
    save_classifier(root / "coarse" / "classifier.pt", classifier, params.model)
    write_attention_maps(read_manifest(root / "pre"), root / "pre", classifier, Runtime(torch.device("cpu")),
                         root / "attention", params.train_coarse.classifier.cam_slice_step)
    generator = HealthiVertGenerator(params.model)
    with torch.no_grad():  # segment every restored row: a measurable body without training
        generator.fine.seg_head.weight.zero_()
        generator.fine.seg_head.bias.fill_(8.0)
    save_generator(root / "fine" / "generator.pt", generator, params.model, extra={"stage": "fine", "view": "sagittal"})
    (root / "fine" / "model_card.json").write_text(json.dumps({"name": "untrained test generator"}))


@pytest.fixture(scope="module")
def dag(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dag")
    p = _params()
    assert main(["preprocess", "--input", str(phantom_root), "--out", str(root / "pre"), *p]) == 0
    _untrained_models(root)
    assert main(["synthesize", "--data", str(root / "pre"), "--attention", str(root / "attention"), "--model",
                 str(root / "fine"), "--out", str(root / "synth"), *p]) == 0
    assert main(["rhlv", "--data", str(root / "pre"), "--synth", str(root / "synth"), "--out", str(root / "rhlv"), *p]) == 0
    # the SVM is fitted on the phantoms' healthy truth (what an untrained generator gives grades nothing)
    assert main(["rhlv", "--data", str(root / "pre"), "--healthy-truth", "--out", str(root / "truth"), *p]) == 0
    assert main(["svm-fit", "--rhlv", str(root / "truth" / "rhlv.parquet"), "--out", str(root / "svm"), "--coarse",
                 str(root / "coarse"), "--fine", str(root / "fine"), "--grader-out", str(root / "grader"), *p]) == 0
    return root


def test_unstraightening_the_real_verse_labels_gives_them_back(shared_data: Path) -> None:
    case = load_mask_case(shared_data / "verse19-sample" / "0007_msk.nii.gz",
                          shared_data / "verse19-sample" / "0007_ctd.json", spacing_mm=None)
    labels = case.labels.array
    straight = straighten(labels, case.labels.spacing_mm, case.centroids, width=(192, 144))
    box, values, inside = unstraighten(straight.labels, straight.map, (0, 0, 0), labels.shape, label=True)
    back = np.zeros_like(labels)
    back[box] = np.where(inside, values, 0)
    spacing = np.asarray(case.labels.spacing_mm)
    for vertebra in case.vertebrae:
        original, mapped = labels == vertebra, back == vertebra
        dice = 2.0 * np.count_nonzero(original & mapped) / (np.count_nonzero(original) + np.count_nonzero(mapped))
        error_mm = np.linalg.norm((np.argwhere(original).mean(0) - np.argwhere(mapped).mean(0)) * spacing)
        assert dice >= 0.95, f"vertebra {vertebra}: Dice {dice:.3f}"
        assert error_mm <= 1.0, f"vertebra {vertebra}: centroid moved {error_mm:.2f} mm"


def test_grade_gives_the_dag_grades_and_rhlv_on_its_phantoms(dag: Path, phantom_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ct = phantom_root / "rawdata" / GRADED_CASE / f"{GRADED_CASE}_ct.nii.gz"
    derivatives = phantom_root / "derivatives" / GRADED_CASE
    assert main(["grade", "--ct", str(ct), "--labels", str(derivatives / f"{GRADED_CASE}_seg-vert_msk.nii.gz"),
                 "--ctd", str(derivatives / f"{GRADED_CASE}_seg-subreg_ctd.json"), "--model", str(dag / "grader"),
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    expected = pd.read_parquet(dag / "rhlv" / "rhlv.parquet")
    expected = expected[expected["case"] == GRADED_CASE].copy()
    svm = load_model(dag / "svm" / "svm.json")
    features = expected[list(svm.features)].to_numpy()
    measured = np.isfinite(features).all(axis=1)
    expected["predicted"] = pd.array([pd.NA] * len(expected), dtype="Int64")
    expected.loc[measured, "predicted"] = svm.predict(features[measured])
    graded = pd.concat([pd.read_csv(path, na_values=["not measured"]) for path in sorted(tmp_path.glob("*/grades.csv"))])
    merged = expected.merge(graded, on=["case", "vertebra"], suffixes=("_dag", ""), validate="one_to_one")
    assert len(merged) == len(expected) > 0 and merged["graded"].any()
    for column in ("rhlv_ant", "rhlv_mid", "rhlv_post", "baseline_loss_max", "h_syn_body_mm"):
        assert np.allclose(merged[column], merged[f"{column}_dag"], atol=1e-4, equal_nan=True), column
    with_grade = merged[merged["predicted"].notna()]
    assert (with_grade["grade"].astype(int) == with_grade["predicted"].astype(int)).all()
    case = sorted(tmp_path.iterdir())[0]
    document = json.loads((case / "grades.json").read_text())
    assert "phantom" in document["model"]["training_data"]["source"]
    report = (case / "report.html").read_text()
    assert "data:image/png;base64," in report and "not for diagnosis" in report
    scan = load_volume(phantom_root / "rawdata" / case.name / f"{case.name}_ct.nii.gz")
    for name in ("pseudo_healthy_ct", "pseudo_healthy_label"):
        volume = load_volume(case / f"{name}.nii.gz")
        assert volume.shape == scan.shape and np.allclose(volume.affine, scan.affine, atol=1e-3)
    healthy_labels = load_volume(case / "pseudo_healthy_label.nii.gz", label=True).array
    assert set(np.unique(healthy_labels)) - {0} <= set(merged.loc[merged["case"] == case.name, "vertebra"])
    assert "fractured" in capsys.readouterr().out


def test_grade_reads_the_bundle_from_an_mlflow_run(dag: Path, phantom_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("grader", artifact_location=(tmp_path / "artifacts").as_uri()))
    client.log_artifacts(run.info.run_id, str(dag / "grader"), "grader")  # as svm-fit logs it
    ct = phantom_root / "rawdata" / GRADED_CASE / f"{GRADED_CASE}_ct.nii.gz"
    labels = phantom_root / "derivatives" / GRADED_CASE / f"{GRADED_CASE}_seg-vert_msk.nii.gz"
    argv = ["grade", "--ct", str(ct), "--labels", str(labels), "--device", "cpu"]
    assert main([*argv, "--model", f"runs:/{run.info.run_id}/grader", "--out", str(tmp_path / "out")]) == 0
    document = json.loads((tmp_path / "out" / GRADED_CASE / "grades.json").read_text())
    manifest = json.loads((dag / "grader" / MANIFEST_NAME).read_text())
    assert document["model"]["versions"] == manifest["versions"] and document["vertebrae"]
    capsys.readouterr()
    missing = "runs:/0123456789abcdef0123456789abcdef/grader"
    assert main([*argv, "--model", missing, "--out", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and missing in error and "MLflow could not download" in error, error
    assert not (tmp_path / "missing").exists()


def test_bundle_of_another_schema_is_refused_in_one_line(dag: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "grader"
    shutil.copytree(dag / "grader", bundle)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert load_bundle(bundle).svm.features
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest | {"schema": "healthivert-grader/0"}))
    scan = dag / "pre"  # any path: the bundle is checked first
    assert main(["grade", "--input", str(scan), "--model", str(bundle), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "schema 'healthivert-grader/0' is not supported" in error
    assert not (tmp_path / "out").exists()


def _bad_inputs(root: Path, phantom_root: Path) -> dict[str, tuple[list[str], str]]:
    raw = phantom_root / "rawdata" / "sub-phantom000" / "sub-phantom000_ct.nii.gz"
    mask = phantom_root / "derivatives" / "sub-phantom000" / "sub-phantom000_seg-vert_msk.nii.gz"
    ct = load_volume(raw)
    nib.save(nib.Nifti1Image(ct.array[:-3], ct.affine), root / "short_ct.nii.gz")
    labels = load_volume(mask, label=True)
    nib.save(nib.Nifti1Image(np.zeros_like(labels.array, dtype=np.uint8), labels.affine), root / "empty_msk.nii.gz")
    (root / "no_dicom").mkdir()
    (root / "no_dicom" / "notes.txt").write_text("no image here")
    (root / "broken").mkdir()
    return {
        "geometry": (["--ct", str(root / "short_ct.nii.gz"), "--labels", str(mask)], "differs from"),
        "no vertebra": (["--ct", str(raw), "--labels", str(root / "empty_msk.nii.gz")], "no vertebra labels"),
        "no dicom": (["--ct", str(root / "no_dicom"), "--labels", str(mask)], "no DICOM image"),
        "bundle": (["--ct", str(raw), "--labels", str(mask), "--model", str(root / "broken")], "bundle.json: not found"),
    }


@pytest.mark.parametrize("case", ["geometry", "no vertebra", "no dicom", "bundle"])
def test_bad_inputs_give_one_line_and_write_nothing(case: str, dag: Path, phantom_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = _bad_inputs(tmp_path, phantom_root)[case]
    if "--model" not in argv:
        argv += ["--model", str(dag / "grader")]
    assert main(["grade", *argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error, error
    assert not any((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else True


def test_dicom_series_reads_as_its_nifti_conversion(shared_data: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    folder = shared_data / "totalseg-example" / "dicom"
    volume = load_dicom_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "converted.nii.gz"))
    converted = load_volume(tmp_path / "converted.nii.gz")
    assert volume.shape == converted.shape
    assert np.allclose(volume.affine, converted.affine, atol=1e-3)
    assert np.array_equal(volume.array, converted.array)
