"""Dataset layouts, case loading onto the canonical grid, label ids, centroids, and the bad-input table."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from healthivert.errors import InputDataError
from healthivert.io.case import load_case, load_mask_case
from healthivert.io.centroids import centroids_from_labels, read_centroids, write_centroids
from healthivert.io.labels import TOTALSEG_TO_VERSE, sort_cranio_caudal, vertebra_id, vertebra_name
from healthivert.io.layouts import CaseFiles, discover_cases
from healthivert.io.nifti import Volume, load_volume, save_volume
from healthivert.io.resample import reorient, resample_isotropic


def _near_label(labels: np.ndarray, point: np.ndarray, vid: int, radius: int = 3) -> bool:
    i, j, k = np.rint(point).astype(int)
    block = labels[max(i - radius, 0): i + radius + 1, max(j - radius, 0): j + radius + 1, max(k - radius, 0): k + radius + 1]
    return bool(np.any(block == vid))


# ------------------------------------------------------------------------------------------ labels
def test_verse_names_and_totalsegmentator_ids() -> None:
    assert [vertebra_name(v) for v in (1, 7, 8, 19, 20, 25, 26, 28)] == ["C1", "C7", "T1", "T12", "L1", "L6", "S", "T13"]
    assert vertebra_id("l1") == 20 and vertebra_id("T13") == 28
    assert sort_cranio_caudal([20, 28, 19, 7]) == [7, 19, 28, 20]
    assert TOTALSEG_TO_VERSE[26] == 26 and TOTALSEG_TO_VERSE[27] == 24 and TOTALSEG_TO_VERSE[31] == 20
    assert TOTALSEG_TO_VERSE[32] == 19 and TOTALSEG_TO_VERSE[43] == 8 and TOTALSEG_TO_VERSE[44] == 7 and TOTALSEG_TO_VERSE[50] == 1
    with pytest.raises(InputDataError, match="unknown vertebra name"):
        vertebra_id("X9")


# ------------------------------------------------------------------------------------- resampling
def test_reorient_and_resample_keep_world_positions() -> None:
    labels = np.zeros((20, 30, 16), dtype=np.int32)
    labels[4:9, 10:20, 3:8] = 5
    affine = np.diag([1.5, 0.8, 2.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    volume = Volume(labels, affine)
    world = affine @ np.r_[centroids_from_labels(labels)[5], 1.0]
    canonical = resample_isotropic(reorient(volume, "IPL"), 1.0, label=True)
    assert canonical.orientation == ("I", "P", "L") and np.allclose(canonical.spacing_mm, 1.0)
    moved = canonical.affine @ np.r_[centroids_from_labels(canonical.array)[5], 1.0]
    assert np.linalg.norm(moved - world) < 0.5
    assert abs(np.count_nonzero(canonical.array) - 5 * 10 * 5 * 1.5 * 0.8 * 2.0) < 0.2 * 600
    assert set(np.unique(canonical.array)) == {0, 5}, "nearest neighbour keeps label values"


def test_centroids_round_trip_through_the_verse_direction(tmp_path: Path) -> None:
    labels = np.zeros((12, 14, 16), dtype=np.int32)
    labels[2:5, 3:9, 10:13] = 20
    volume = Volume(labels, np.diag([-1.0, 2.0, 1.0, 1.0]))
    centroids = centroids_from_labels(labels)
    path = write_centroids(tmp_path / "ctd.json", centroids, volume, direction=("P", "I", "R"))
    assert json.loads(path.read_text())[0] == {"direction": ["P", "I", "R"]}
    assert np.allclose(read_centroids(path, volume)[20], centroids[20], atol=1e-3)


# -------------------------------------------------------------------------------------- layouts
def test_phantom_is_a_verse_layout(phantom_root: Path) -> None:
    cases = discover_cases(phantom_root)
    assert {c.layout for c in cases} == {"verse"}
    for case in cases:
        assert case.ct is not None and case.centroids is not None
        assert case.truth_heights is not None and case.healthy_ct is not None and case.healthy_mask is not None
        assert case.subject == case.case_id
    native = load_case(cases[0], spacing_mm=None)  # reoriented only: the stored, anisotropic voxels
    stored = load_volume(cases[0].mask, label=True)
    assert native.labels.orientation == native.ct.orientation == ("I", "P", "L")
    assert sorted(native.labels.spacing_mm) == pytest.approx(sorted(stored.spacing_mm))
    assert native.labels.array.size == stored.array.size and native.labels.spacing_mm[1] == native.labels.spacing_mm[2]
    for vid, point in native.centroids.items():
        assert native.labels.array[tuple(np.rint(point).astype(int))] == vid


def test_verse20_entities_and_mask_only_cases(phantom_root: Path, tmp_path: Path) -> None:
    source = discover_cases(phantom_root)[0]
    root = tmp_path / "verse20"
    stem = "sub-verse500_dir-ax"
    (root / "rawdata" / "sub-verse500").mkdir(parents=True)
    (root / "derivatives" / "sub-verse500").mkdir(parents=True)
    shutil.copy(source.ct, root / "rawdata" / "sub-verse500" / f"{stem}_ct.nii.gz")
    shutil.copy(source.mask, root / "derivatives" / "sub-verse500" / f"{stem}_seg-vert_msk.nii.gz")
    shutil.copy(source.centroids, root / "derivatives" / "sub-verse500" / f"{stem}_seg-subreg_ctd.json")
    (root / "derivatives" / "sub-verse501").mkdir(parents=True)
    shutil.copy(source.mask, root / "derivatives" / "sub-verse501" / "sub-verse501_seg-vert_msk.nii.gz")
    cases = discover_cases(root)
    assert [(c.case_id, c.subject, c.ct is not None, c.centroids is not None) for c in cases] == [
        ("sub-verse500_dir-ax", "sub-verse500", True, True), ("sub-verse501", "sub-verse501", False, False)]
    with_ctd, mask_only = (load_case(c) for c in cases)
    assert mask_only.ct is None and with_ctd.truth is None
    assert with_ctd.vertebrae == mask_only.vertebrae
    for vid in with_ctd.vertebrae:  # centroids from the file and from the mask agree
        assert np.linalg.norm(with_ctd.centroids[vid] - mask_only.centroids[vid]) < 0.6


def test_paper_raw_layout_with_the_verse19_sample(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "raw" / "0007"
    folder.mkdir(parents=True)
    shutil.copy(shared_data / "verse19-sample" / "0007_msk.nii.gz", folder)
    shutil.copy(shared_data / "verse19-sample" / "0007_ctd.json", folder)
    (case_files,) = discover_cases(tmp_path)
    assert (case_files.case_id, case_files.layout, case_files.ct) == ("0007", "paper", None)
    case = load_case(case_files)
    assert case.ct is None and case.labels.shape == (280, 180, 179)
    assert case.vertebrae == [16, 17, 18, 19, 20, 21, 22, 23, 24]
    ctd = {e["label"]: np.array([e["X"], e["Y"], e["Z"]]) for e in json.loads((folder / "0007_ctd.json").read_text())}
    for vid, point in ctd.items():  # already IPL at 1 mm: coordinates unchanged, and on their vertebra
        assert np.allclose(case.centroids[vid], point, atol=1e-6)
        assert _near_label(case.labels.array, point, vid)
    assert discover_cases(tmp_path / "raw")[0].case_id == "0007", "the raw folder itself is accepted"


def test_totalsegmentator_sample_loads_with_verse_ids(shared_data: Path) -> None:
    (files,) = discover_cases(shared_data / "totalseg-example")
    assert (files.case_id, files.layout, files.label_scheme) == ("example", "totalsegmentator", "totalseg")
    case = load_case(files, spacing_mm=1.5)
    assert case.labels.orientation == ("I", "P", "L") and np.allclose(case.labels.spacing_mm, 1.5)
    assert case.ct is not None and case.ct.shape == case.labels.shape
    assert case.vertebrae == [18, 19, 20, 21, 22, 23, 24, 26], "T11 .. L5 then S1, cranial to caudal"
    for vid, point in case.centroids.items():
        assert _near_label(case.labels.array, point, vid, radius=2)
    mask_case = load_mask_case(files.mask, spacing_mm=3.0)
    assert mask_case.vertebrae == case.vertebrae and mask_case.layout == "mask"


def test_mask_case_with_verse_ids_is_not_remapped(shared_data: Path) -> None:
    case = load_mask_case(shared_data / "verse19-sample" / "0007_msk.nii.gz",
                          shared_data / "verse19-sample" / "0007_ctd.json", spacing_mm=2.0)
    assert case.vertebrae == [16, 17, 18, 19, 20, 21, 22, 23, 24]
    assert case.labels.shape == (140, 90, 90)
    for vid, point in case.centroids.items():
        assert _near_label(case.labels.array, point, vid, radius=2)


# ------------------------------------------------------------------------------------ bad inputs
def _grid(tmp: Path, name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    return save_volume(tmp / name, array, np.eye(4) if affine is None else affine)


def _mask() -> np.ndarray:
    mask = np.zeros((8, 8, 8), dtype=np.uint8)
    mask[2:6, 2:6, 2:6] = 20
    return mask


def _bad_missing(tmp: Path) -> CaseFiles:
    return CaseFiles("c", "c", "verse", tmp / "missing_msk.nii.gz")


def _bad_not_nifti(tmp: Path) -> CaseFiles:
    (tmp / "text_msk.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    return CaseFiles("c", "c", "verse", tmp / "text_msk.nii.gz")


def _bad_truncated(tmp: Path) -> CaseFiles:
    path = _grid(tmp, "cut_msk.nii.gz", np.random.default_rng(0).integers(0, 30, (40, 40, 40)).astype(np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return CaseFiles("c", "c", "verse", path)


def _bad_nan(tmp: Path) -> CaseFiles:
    ct = np.zeros((8, 8, 8), dtype=np.float32)
    ct[1, 2, 3] = np.nan
    return CaseFiles("c", "c", "verse", _grid(tmp, "m_msk.nii.gz", _mask()), ct=_grid(tmp, "nan_ct.nii.gz", ct))


def _bad_empty(tmp: Path) -> CaseFiles:
    return CaseFiles("c", "c", "verse", _grid(tmp, "empty_msk.nii.gz", np.zeros((8, 8, 8), dtype=np.uint8)))


def _bad_shape(tmp: Path) -> CaseFiles:
    ct = np.zeros((8, 8, 9), dtype=np.float32)
    return CaseFiles("c", "c", "verse", _grid(tmp, "m_msk.nii.gz", _mask()), ct=_grid(tmp, "shape_ct.nii.gz", ct))


def _bad_affine(tmp: Path) -> CaseFiles:
    ct = np.zeros((8, 8, 8), dtype=np.float32)
    return CaseFiles("c", "c", "verse", _grid(tmp, "m_msk.nii.gz", _mask()),
                     ct=_grid(tmp, "affine_ct.nii.gz", ct, np.diag([2.0, 1.0, 1.0, 1.0])))


def _bad_centroid_outside(tmp: Path) -> CaseFiles:
    (tmp / "far_ctd.json").write_text(json.dumps([{"label": 20, "X": 500.0, "Y": 3.0, "Z": 3.0}]))
    return CaseFiles("c", "c", "paper", _grid(tmp, "m_msk.nii.gz", _mask()), centroids=tmp / "far_ctd.json")


def _bad_centroid_json(tmp: Path) -> CaseFiles:
    (tmp / "broken_ctd.json").write_text('[{"label": 20, "X": 1.0}]')
    return CaseFiles("c", "c", "paper", _grid(tmp, "m_msk.nii.gz", _mask()), centroids=tmp / "broken_ctd.json")


def _bad_label_values(tmp: Path) -> CaseFiles:
    image = np.full((8, 8, 8), 0.5, dtype=np.float32)
    return CaseFiles("c", "c", "verse", _grid(tmp, "float_msk.nii.gz", image))


BAD_INPUTS = [
    (_bad_missing, "missing_msk.nii.gz", "file not found"),
    (_bad_not_nifti, "text_msk.nii.gz", "not a readable NIfTI file"),
    (_bad_truncated, "cut_msk.nii.gz", "truncated or corrupt"),
    (_bad_nan, "nan_ct.nii.gz", "NaN"),
    (_bad_empty, "empty_msk.nii.gz", "no vertebra labels"),
    (_bad_shape, "shape_ct.nii.gz", "shape"),
    (_bad_affine, "affine_ct.nii.gz", "affine differs"),
    (_bad_centroid_outside, "far_ctd.json", "outside the image"),
    (_bad_centroid_json, "broken_ctd.json", "lacks a numeric label"),
    (_bad_label_values, "float_msk.nii.gz", "non-integer"),
]


@pytest.mark.parametrize(("make", "filename", "problem"), BAD_INPUTS, ids=[b[0].__name__[5:] for b in BAD_INPUTS])
def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path: Path, make, filename: str, problem: str) -> None:
    with pytest.raises(InputDataError) as caught:
        load_case(make(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / filename)), message
    assert problem in message


def test_unrecognised_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputDataError, match="no cases found"):
        discover_cases(tmp_path)
    with pytest.raises(InputDataError, match="dataset folder not found"):
        discover_cases(tmp_path / "absent")


def test_load_volume_rejects_4d_and_reads_labels_as_int(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), dtype=np.float32), np.eye(4)), tmp_path / "four.nii.gz")
    with pytest.raises(InputDataError, match="expected a 3D volume"):
        load_volume(tmp_path / "four.nii.gz")
    path = _grid(tmp_path, "m_msk.nii.gz", _mask().astype(np.float32))
    assert load_volume(path, label=True).array.dtype == np.int32


def test_paper_raw_layout_with_a_ct(phantom_root: Path, tmp_path: Path) -> None:
    source = discover_cases(phantom_root)[1]
    folder = tmp_path / "raw" / "p1"
    folder.mkdir(parents=True)
    shutil.copy(source.ct, folder / "p1.nii.gz")
    shutil.copy(source.mask, folder / "p1_msk.nii.gz")
    shutil.copy(source.centroids, folder / "p1.json")
    (files,) = discover_cases(tmp_path)
    assert (files.layout, files.ct.name, files.centroids.name) == ("paper", "p1.nii.gz", "p1.json")
    paper, verse = load_case(files), load_case(source)
    assert np.array_equal(paper.labels.array, verse.labels.array) and np.array_equal(paper.ct.array, verse.ct.array)
    assert all(np.allclose(paper.centroids[v], verse.centroids[v]) for v in verse.vertebrae)
