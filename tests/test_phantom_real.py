"""Real-shape phantom cases: a real label map's spine, drawn fractures as deformations of its bodies, known truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthivert.config import PhantomParams, RealShapeSource
from healthivert.data.splits import patient_of
from healthivert.errors import InputDataError
from healthivert.io.case import TRUTH_COLUMNS, load_case
from healthivert.io.grades import read_grades
from healthivert.io.layouts import discover_cases
from healthivert.phantom.anatomy import genant_grade
from healthivert.phantom.generator import real_shape_case, write_dataset
from healthivert.geometry.morphometry import NeighbourBaseline, ThirdHeights
from healthivert.phantom.real import compress_columns, deformation_columns, deformed_source, jitter_labels, load_real_spine

TPTBOX_MASK = Path("tptbox-sample") / "sub-ct_seg-vert_label-22_msk.nii.gz"


def _box_body(height: int = 24) -> np.ndarray:
    body = np.zeros((40, 30, 30), dtype=bool)
    body[8:8 + height, 5:25, 5:25] = True
    return body


def test_compression_shortens_each_column_by_its_loss_and_keeps_the_inferior_endplate() -> None:
    body = _box_body()
    loss = np.where(body.any(axis=0), 0.25, 0.0)
    squeezed = compress_columns(body, loss, top_share=1.0)
    counts = np.count_nonzero(squeezed, axis=0)[5:25, 5:25]
    assert np.all(np.abs(counts - 18) <= 1)
    assert squeezed[31, 5:25, 5:25].all() and not squeezed[32].any()  # inferior endplate in place
    assert not (squeezed & ~body).any()


def test_deformation_shapes_follow_the_fracture_type() -> None:
    body = _box_body()
    wedge = deformation_columns(body, "wedge", 0.1)
    assert wedge[5, 15] == pytest.approx(1.0) and wedge[24, 15] == pytest.approx(0.1)
    biconcave = deformation_columns(body, "biconcave", 0.0)
    assert biconcave[15, 15] > 0.9 > 0.1 > biconcave[5, 5]
    assert not deformation_columns(body, "none", 0.0).any()


@pytest.mark.parametrize(("own", "losses", "deformed"), [
    ((24.0, 25.0, 25.5), (0.02, 0.0, -0.01), False),  # a healthy box
    ((20.0, 22.0, 25.0), (0.05, 0.0, 0.0), False),  # a wedge normal at the thoracolumbar junction (0.8)
    ((17.2, 14.5, 20.1), (0.07, 0.0, -0.11), True),  # VerSe'19 0007 L2: biconcave, neighbours short too
    ((20.0, 20.0, 20.0), (0.25, 0.22, 0.2), True),  # low against its neighbours
])
def test_a_source_vertebra_deformed_in_shape_or_against_neighbours_is_not_taken_for_healthy(
        own: tuple[float, float, float], losses: tuple[float, float, float], deformed: bool) -> None:
    heights = ThirdHeights(*own, float(np.mean(own)))
    baseline = NeighbourBaseline(21, heights, heights, (20, 22), *losses)
    assert deformed_source(baseline) is deformed


def test_jitter_keeps_labels_in_place_and_scales_volumes() -> None:
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[10:20, 10:30, 10:30] = 20
    labels[22:32, 10:30, 10:30] = 21
    same = jitter_labels(labels, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), np.eye(3), 1.0)
    assert np.mean(same == labels) > 0.99
    larger = jitter_labels(labels, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), np.eye(3), 1.1)
    ratio = np.count_nonzero(larger == 20) * 0.125 / np.count_nonzero(labels == 20)
    assert ratio == pytest.approx(1.1**3, rel=0.08)


def test_real_shape_case_deforms_the_real_body_to_its_truth(shared_data: Path) -> None:
    source = RealShapeSource(name="tptbox", mask=shared_data / TPTBOX_MASK)
    params = PhantomParams(fracture_share=1.0, grade_weights=(0.0, 1.0, 0.0), spacing_mm_range=(1.0, 1.0))
    case = real_shape_case(np.random.default_rng(4), params, source, load_real_spine(source), "sub-tptbox_run-000")
    assert case.source == "real-shape" and list(case.truth.columns) == list(TRUTH_COLUMNS)
    row = case.truth.iloc[0]
    assert list(case.truth["vertebra"]) == [22]  # L2 and L4 are cut by the crop: labelled, not graded
    assert set(np.unique(case.labels.array)) == {0, 21, 22, 23} == set(np.unique(case.healthy_labels.array))
    loss = row[["loss_ant", "loss_mid", "loss_post"]].to_numpy(dtype=float)
    assert 0.25 <= loss.max() <= 0.40 and row["grade"] == genant_grade(loss.max()) == 2
    fractured, healthy = case.labels.array == 22, case.healthy_labels.array == 22
    assert fractured.sum() < 0.9 * healthy.sum() and (fractured & ~healthy).sum() < 0.03 * healthy.sum()
    # CT: bone inside the body, the lost height filled with softer tissue
    ct, healthy_ct = case.ct.array, case.healthy_ct.array
    assert 80.0 < float(np.median(ct[fractured])) < 600.0
    collapsed = healthy & ~fractured
    assert float(np.median(ct[collapsed])) < float(np.median(healthy_ct[collapsed])) - 50.0


def test_dataset_mixes_drawn_and_real_shape_cases_one_patient_per_spine(shared_data: Path, tmp_path: Path) -> None:
    source = RealShapeSource(name="tptbox", mask=shared_data / TPTBOX_MASK, cases=2, split="train")
    params = PhantomParams(cases=1, vertebrae_per_case=(3, 3), spacing_mm_range=(1.5, 1.5), real_shapes=(source,))
    metrics = write_dataset(tmp_path / "raw", params)
    assert (metrics["drawn_cases"], metrics["real_shape_cases"], metrics["real_shape_vertebrae"]) == (1, 2, 2)
    grades = read_grades(tmp_path / "raw" / "grades.csv")
    real = grades[grades["case"].str.startswith("sub-tptbox")]
    assert set(real["case"]) == {"sub-tptbox_run-000", "sub-tptbox_run-001"} and set(real["split"]) == {"train"}
    assert grades.loc[grades["case"] == "sub-phantom000", "split"].isna().all()
    assert {patient_of(case) for case in real["case"]} == {"sub-tptbox"}
    cases = {files.case_id: load_case(files) for files in discover_cases(tmp_path / "raw")}
    assert set(cases) == {"sub-phantom000", "sub-tptbox_run-000", "sub-tptbox_run-001"}
    sources = {cid: set(case.truth["source"]) for cid, case in cases.items()}
    assert sources["sub-phantom000"] == {"drawn"} and sources["sub-tptbox_run-001"] == {"real-shape"}
    first, second = (cases[f"sub-tptbox_run-00{n}"].labels.array for n in (0, 1))
    assert first.shape != second.shape or not np.array_equal(first, second)  # jittered apart


def test_missing_real_shape_source_fails_in_one_line_before_writing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "spine_msk.nii.gz"
    params = PhantomParams(cases=1, real_shapes=(RealShapeSource(name="lost", mask=missing),))
    with pytest.raises(InputDataError) as error:
        write_dataset(tmp_path / "raw", params)
    assert str(error.value).startswith(f"{missing}: real-shape label map not found")
    assert "\n" not in str(error.value) and "phantom.real_shapes 'lost'" in str(error.value)
    assert not (tmp_path / "raw").exists()


def test_real_shape_truth_flows_into_the_manifest(shared_data: Path, tmp_path: Path) -> None:
    from healthivert.config import Params
    from healthivert.data.manifest import read_manifest
    from healthivert.stages import preprocess

    source = RealShapeSource(name="tptbox", mask=shared_data / TPTBOX_MASK, cases=1, split="test")
    write_dataset(tmp_path / "raw", PhantomParams(cases=1, vertebrae_per_case=(3, 3), spacing_mm_range=(1.5, 1.5),
                                                  real_shapes=(source,)))
    params = Params.model_validate({"preprocess": {"crop_shape": [64, 64, 16]}})
    metrics = preprocess.run(params, tmp_path / "raw", tmp_path / "pre", tmp_path / "raw" / "grades.csv")
    manifest = read_manifest(tmp_path / "pre")
    real = manifest[(manifest["case"] == "sub-tptbox_run-000") & (manifest["vertebra"] == 22)]
    assert list(real["source"]) == ["real-shape"] and set(manifest.loc[manifest["case"] == "sub-tptbox_run-000", "split"]) == {"test"}
    assert set(manifest.loc[manifest["case"] == "sub-phantom000", "source"]) == {"drawn"}
    assert real["truth_loss_ant"].notna().all() and pd.api.types.is_string_dtype(manifest["source"])
    # the truth heights are those preprocess measures on the straightened healthy twin
    assert metrics["truth_height_mae_mm"] < 1.0


def test_straight_coordinates_agree_with_the_nearest_point_search(shared_data: Path) -> None:
    from healthivert.geometry.spine import prepare_spine
    from healthivert.io.centroids import centroids_from_labels
    from healthivert.phantom.real import straight_coordinates

    labels = load_real_spine(RealShapeSource(name="v", mask=shared_data / "verse19-sample" / "0007_msk.nii.gz"))
    spine = prepare_spine(labels.array, labels.spacing_mm, centroids_from_labels(labels.array))
    lo, hi = np.array([60, 40, 60]), np.array([200, 120, 120])
    fast = straight_coordinates(spine.map, lo, hi)[:, ::7, ::7, ::7]
    voxels = np.stack(np.meshgrid(*(np.arange(a, b)[::7] for a, b in zip(lo, hi)), indexing="ij"), axis=-1)
    exact = spine.map.to_straight(voxels.reshape(-1, 3)).T.reshape(fast.shape)
    assert np.percentile(np.abs(fast - exact), 99) < 0.5


@pytest.mark.parametrize("sources, problem", [
    ([{"name": "a", "mask": "a.nii.gz"}, {"name": "a", "mask": "b.nii.gz"}], "names must be distinct"),
    ([{"name": "no_underscores", "mask": "a.nii.gz"}], "should match pattern"),
    ([{"name": "a", "mask": "a.nii.gz", "split": "holdout"}], "'train', 'val' or 'test'"),
])
def test_bad_real_shape_sources_are_refused(sources: list[dict[str, str]], problem: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=problem):
        PhantomParams.model_validate({"real_shapes": sources})
