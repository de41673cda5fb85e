"""``healthivert preprocess`` on a small phantom: crops, manifest, truth, grades, splits, atomic failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from healthivert.cli import main
from healthivert.data.manifest import read_manifest, resolve
from healthivert.geometry.morphometry import heights_on, select_columns

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CROP = (96, 96, 40)


def _preprocess(*args: str) -> int:
    return main(["preprocess", *args, "--params", str(PARAMS), "--set", "tracking.enabled=false",
                 "--set", f"preprocess.crop_shape=[{CROP[0]}, {CROP[1]}, {CROP[2]}]"])


@pytest.fixture(scope="module")
def preprocessed(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("pre") / "preprocessed"
    metrics = out.parent / "metrics.json"
    assert _preprocess("--input", str(phantom_root), "--grades", str(phantom_root / "grades.csv"),
                       "--out", str(out), "--metrics", str(metrics)) == 0
    return out, json.loads(metrics.read_text())


def test_manifest_lists_every_phantom_vertebra_with_truth_and_grades(phantom_root: Path, preprocessed) -> None:
    out, metrics = preprocessed
    manifest = read_manifest(out)
    grades = pd.read_csv(phantom_root / "grades.csv")
    assert len(manifest) == len(grades) == metrics["vertebrae"]
    assert metrics["vertebrae_skipped"] == 0
    merged = manifest.merge(grades, on=["case", "vertebra"], suffixes=("", "_file"))
    assert (merged["grade"] == merged["grade_file"]).all()
    assert set(manifest["split"]) <= {"train", "val", "test"}
    assert manifest.groupby("case")["split"].nunique().max() == 1  # split by patient
    assert manifest["truth_loss_ant"].notna().all() and manifest["healthy_label_path"].notna().all()
    assert (out / "params.yaml").is_file() and (out / "skipped.csv").is_file()
    assert metrics["truth_height_mae_mm"] < 1.0


def test_crops_are_centred_windowed_and_consistent_with_the_manifest(preprocessed) -> None:
    out, _ = preprocessed
    manifest = read_manifest(out)
    for row in manifest.itertuples():
        images = {c: nib.load(str(resolve(out, getattr(row, c)))) for c in
                  ("ct_path", "label_path", "mask_path", "healthy_ct_path", "healthy_label_path")}
        arrays = {c: np.asarray(img.dataobj) for c, img in images.items()}
        for column, array in arrays.items():
            assert array.shape == CROP and array.dtype == np.uint8, column
            assert nib.aff2axcodes(images[column].affine) == ("I", "P", "L")
        labels, band = arrays["label_path"], arrays["mask_path"]
        target_rows = np.flatnonzero((labels == row.vertebra).any(axis=(1, 2)))
        assert (target_rows[0], target_rows[-1]) == (row.top_row, row.bottom_row)
        assert abs(row.center_row - CROP[0] // 2) <= 2  # the crop is centred on the target body
        band_rows = np.flatnonzero(band.any(axis=(1, 2)))
        assert len(band_rows) == 40 and band_rows[0] <= row.top_row and band_rows[-1] >= row.bottom_row
        assert band[band_rows].all()  # full width
        present = set(np.unique(labels)) - {0}
        for neighbour in (row.above, row.below):
            assert pd.isna(neighbour) or int(neighbour) in present
        # the body sits in the bone window: brighter than the soft tissue around it
        ct = arrays["ct_path"].astype(float)
        assert ct[labels == row.vertebra].mean() > ct[labels == 0].mean() + 20
        if row.grade == 0:  # fracture-free vertebrae are (nearly) their own healthy twin
            same = np.count_nonzero((labels == row.vertebra) == (arrays["healthy_label_path"] == row.vertebra))
            assert same / labels.size > 0.995


def test_fractured_heights_on_healthy_columns_match_the_truth(preprocessed) -> None:
    out, _ = preprocessed
    manifest = read_manifest(out)
    fractured = manifest[manifest["grade"] >= 1]
    assert len(fractured) >= 2
    errors = []
    for row in fractured.itertuples():
        labels = np.asarray(nib.load(str(resolve(out, row.label_path))).dataobj) == row.vertebra
        healthy = np.asarray(nib.load(str(resolve(out, row.healthy_label_path))).dataobj) == row.vertebra
        selection = select_columns(healthy)
        measured = heights_on(labels, selection).as_tuple() + heights_on(healthy, selection).as_tuple()
        truth = (row.truth_h_ant_mm, row.truth_h_mid_mm, row.truth_h_post_mm,
                 row.truth_healthy_h_ant_mm, row.truth_healthy_h_mid_mm, row.truth_healthy_h_post_mm)
        errors += [abs(m - t) for m, t in zip(measured, truth)]
    # phantom voxels of up to 1.5 mm, resampled once: each endplate within about a voxel
    assert max(errors) < 2.0 and np.mean(errors) < 0.75


def test_paper_json_split_is_used(phantom_root: Path, tmp_path: Path) -> None:
    case = sorted(p.name for p in (phantom_root / "derivatives").iterdir())[0]
    source = tmp_path / "raw"
    for part in ("rawdata", "derivatives", "truth"):
        shutil.copytree(phantom_root / part / case, source / part / case)
    truth = pd.read_csv(source / "truth" / case / f"{case}_heights.csv")
    grades = {"test": {f"{case}_{v}": 0 for v in truth["vertebra"]}}
    (tmp_path / "grades.json").write_text(json.dumps(grades))
    out = tmp_path / "out"
    assert _preprocess("--input", str(source), "--grades", str(tmp_path / "grades.json"), "--out", str(out)) == 0
    manifest = read_manifest(out)
    assert set(manifest["split"]) == {"test"} and (manifest["grade"] == 0).all()


def test_mask_only_case_fails_naming_it_and_leaves_the_old_output(phantom_root: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "raw"
    shutil.copytree(phantom_root / "derivatives", source / "derivatives")
    shutil.copytree(phantom_root / "rawdata", source / "rawdata")
    cases = sorted(p.name for p in (source / "rawdata").iterdir())
    for ct in (source / "rawdata" / cases[-1]).iterdir():
        ct.unlink()  # the last case loses its CT: the others are processed first, then the run fails
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    assert _preprocess("--input", str(source), "--out", str(out)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and cases[-1] in error and "no CT" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


def test_crop_near_the_edge_is_padded_with_air_and_background() -> None:
    from healthivert.geometry.crops import crop_vertebra, extract, window_ct

    assert window_ct(np.array([-1024.0, -300.0, 450.0, 1200.0, 3000.0]), (-300.0, 1200.0)).tolist() == [0, 0, 128, 255, 255]
    volume = np.arange(27).reshape(3, 3, 3)
    padded = extract(volume, (-1, 1, 0), (3, 3, 3), fill=-5)
    assert (padded[0] == -5).all() and padded[1, 0].tolist() == volume[0, 1].tolist() and (padded[1:, 2] == -5).all()

    bodies = np.zeros((60, 40, 30), dtype=np.int32)
    bodies[2:22, 5:35, 5:25] = 20  # the target, near the top of the volume
    bodies[30:50, 5:35, 5:25] = 21
    ct = np.where(bodies > 0, 700.0, 0.0).astype(np.float32)
    crop = crop_vertebra(bodies, 20, [19, 20, 21], (48, 32, 24), max_height_mm=16.0, ct_hu=ct)
    assert crop.origin[0] == 12 - 24
    assert (crop.top_row, crop.bottom_row) == (14, 33) and crop.center_row == 24
    assert np.flatnonzero(crop.mask.any(axis=(1, 2))).tolist() == list(range(16, 32))
    assert crop.above is None and crop.below == 21
    assert (crop.ct[:12] == 0).all() and (crop.labels[:14] == 0).all()  # outside the volume: air, background
    assert (crop.ct[12:14] == 51).all()  # inside the volume: 0 HU
    assert crop.ct[24, 16, 12] == window_ct(np.array([700.0]), (-300.0, 1200.0))[0]


def test_manifest_schema_is_checked_on_read_and_write(preprocessed, tmp_path: Path) -> None:
    from healthivert.data.manifest import COLUMNS, crop_name, write_manifest
    from healthivert.errors import InputDataError

    out, _ = preprocessed
    manifest = read_manifest(out / "manifest.parquet")
    assert list(manifest.columns) == list(COLUMNS)
    assert crop_name("sub-verse004", 20) == "sub-verse004_20"
    assert resolve(out / "manifest.parquet", manifest["ct_path"].iloc[0]).is_file()
    assert resolve(out, pd.NA) is None

    with pytest.raises(InputDataError, match=r"missing\.parquet: manifest not found"):
        read_manifest(tmp_path / "missing.parquet")
    broken = tmp_path / "broken.parquet"
    manifest.drop(columns=["split", "top_row"]).to_parquet(broken)
    with pytest.raises(InputDataError, match=r"broken\.parquet: manifest lacks column\(s\) split, top_row"):
        read_manifest(broken)
    bad_split = manifest.assign(split="training")
    with pytest.raises(InputDataError, match="unknown split 'training'"):
        write_manifest(bad_split, tmp_path)
    assert not (tmp_path / "manifest.parquet").exists()
    (tmp_path / "garbage.parquet").write_text("not parquet")
    with pytest.raises(InputDataError, match="not a readable Parquet file"):
        read_manifest(tmp_path / "garbage.parquet")


def test_overview_figure_shows_the_most_fractured_crops_and_their_twins(preprocessed) -> None:
    from healthivert.stages.preprocess import overview_figure

    out, _ = preprocessed
    figure = overview_figure(out, count=3)
    axes = figure.get_axes()
    assert len(axes) == 6  # crop and healthy twin of 3 vertebrae
    worst = read_manifest(out)["grade"].max()
    assert f"grade {worst}" in axes[0].get_title() and "healthy" in axes[3].get_title()
