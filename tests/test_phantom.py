"""The phantom generator: anatomy, fracture grades, truth heights against the voxels, the twin, the writer, the stage."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from healthivert.config import PhantomParams, load_params
from healthivert.errors import ConfigError
from healthivert.io.case import load_case
from healthivert.io.layouts import discover_cases
from healthivert.phantom.anatomy import GRADE_LOSS_RANGES, NORMAL_MAX_LOSS, VertebraSpec, genant_grade
from healthivert.phantom.generator import PhantomCase, case_rng, generate_case, truth_table
from healthivert.phantom.preview import preview_figure
from healthivert.phantom.spine import sample_spine
from healthivert.stages import phantom as phantom_stage

from conftest import SMALL_PHANTOM

REPO = Path(__file__).resolve().parents[1]
TINY = PhantomParams(vertebrae_per_case=(4, 5), fracture_share=0.6, spacing_mm_range=(0.9, 1.2), normal_deformity_share=0.0)


def _measured_columns(labels: np.ndarray, spacing: np.ndarray, spec: VertebraSpec) -> tuple[float, dict]:
    """Column heights of a vertebra measured in a voxel label map along its own axes (test oracle).

    Each column ``(v, w)`` of the central band (0.5 mm steps in w, 0.25 mm in v) is sampled every 0.1 mm
    along the height axis (nearest voxel). Returns the central column's height and, per ``w``,
    ``(v, heights, first v of the body, last v of the body)``.
    """
    e_u, e_v, e_w = spec.axes
    u = np.arange(-0.8 * spec.height_mm, 0.8 * spec.height_mm, 0.1)
    half_band = spec.width_mm / 5
    columns = {}
    for w in np.arange(-half_band, half_band + 1e-6, 0.5):
        v = np.arange(-spec.depth_mm, spec.depth_mm / 2 + 5, 0.25)
        points = (spec.centre_mm + u[None, None, :, None] * e_u + v[None, :, None, None] * e_v + w * e_w)[0]
        index = np.clip(np.rint(points / spacing).astype(int), 0, np.array(labels.shape) - 1)
        inside = labels[index[..., 0], index[..., 1], index[..., 2]] == spec.vertebra
        heights = inside.sum(axis=1) * 0.1
        present = np.flatnonzero(heights > 0)
        first, last = v[present[0]], v[present[-1]]
        columns[w] = (v, heights, first, last)
    v0, h0, first0, last0 = columns[min(columns, key=abs)]
    central = h0[np.argmin(np.abs(v0 - (first0 + last0) / 2))]
    return central, columns


def _definition_heights(columns: dict, reference: dict, central: float) -> np.ndarray:
    """Mean height per third of ``columns``, on the columns selected from ``reference`` (healthy)."""
    sums = np.zeros(3)
    counts = np.zeros(3)
    for w, (v, _, first, last) in reference.items():
        heights = columns[w][1]
        ref_heights = reference[w][1]
        frac = (v - first) / (last - first)
        keep = (frac >= 0) & (frac <= 1) & (ref_heights >= 0.7 * central)
        third = np.minimum((frac * 3).astype(int), 2)
        for k in range(3):
            sums[k] += heights[keep & (third == k)].sum()
            counts[k] += (keep & (third == k)).sum()
    return sums / counts


@pytest.fixture(scope="module")
def tiny_case() -> PhantomCase:
    return generate_case(case_rng(3, 0), TINY)


def test_generation_is_fast_and_reproducible() -> None:
    start = time.process_time()  # CPU time: other processes sharing the machine do not count
    case = generate_case(case_rng(0, 1), PhantomParams())
    elapsed = time.process_time() - start
    assert elapsed < 3.0, f"one default case took {elapsed:.2f} s of CPU"
    again = sample_spine(case_rng(0, 1), PhantomParams())
    assert [v.vertebra for v in again.vertebrae] == case.truth["vertebra"].tolist()
    assert np.allclose([v.height_mm for v in again.vertebrae], [v.height_mm for v in case.layout.vertebrae])


def test_sizes_grades_and_fracture_shapes_follow_the_specification() -> None:
    params = PhantomParams(fracture_share=0.5)
    seen_types = set()
    for index in range(12):
        layout = sample_spine(case_rng(11, index), params)
        ids = [v.vertebra for v in layout.vertebrae]
        assert 8 <= len(ids) <= 10 and ids == list(range(ids[0], ids[0] + len(ids))) and 13 <= ids[0] <= 17 and ids[-1] <= 24
        heights = np.array([v.height_mm for v in layout.vertebrae])
        assert np.all(np.diff(heights) > -2.0), "body heights grow caudally"
        truth = truth_table(layout.vertebrae)
        for spec, row in zip(layout.vertebrae, truth.itertuples()):
            name_range = (17.0, 26.0) if spec.vertebra <= 19 else (22.5, 31.5)  # T ~18-24, L ~24-30 mm, +-patient size
            assert name_range[0] <= spec.height_mm <= name_range[1], (spec.name, spec.height_mm)
            assert 26.0 <= spec.depth_mm <= 41.0 and 33.0 <= spec.width_mm <= 52.0
            losses = np.array([row.loss_ant, row.loss_mid, row.loss_post])
            assert row.grade == genant_grade(losses.max()) == spec.fracture.grade
            if spec.fracture.kind == "none":
                assert losses.max() < NORMAL_MAX_LOSS + 1e-9
                continue
            seen_types.add(spec.fracture.kind)
            low, high = GRADE_LOSS_RANGES[spec.fracture.grade]
            assert low - 1e-6 <= losses.max() <= high + 1e-6
            if spec.fracture.kind == "wedge":
                assert losses[0] > losses[1] > losses[2]
            elif spec.fracture.kind == "biconcave":
                assert losses[1] > max(losses[0], losses[2])
            else:
                assert losses.min() > 0.6 * losses.max()
    assert seen_types == {"wedge", "biconcave", "crush"}


@pytest.mark.parametrize("concavity_range, mid_share", [((0.1, 0.28), (0.82, 0.99)), ((0.0, 0.0), (0.98, 1.06))])
def test_endplates_are_cupped_like_real_bodies(concavity_range: tuple[float, float], mid_share: tuple[float, float]) -> None:
    """Healthy drawn bodies are shorter in the middle third than at their taller wall, as real ones are
    (VerSe'19 0007's healthy thoracic bodies: 0.86-0.95); a zero range gives flat endplates."""
    params = PhantomParams(normal_deformity_share=0.0, fracture_share=0.0, endplate_concavity_range=concavity_range)
    shares = []
    for index in range(8):
        for spec in sample_spine(case_rng(3, index), params).vertebrae:
            ant, mid, post = truth_table([spec]).iloc[0][["healthy_h_ant_mm", "healthy_h_mid_mm", "healthy_h_post_mm"]]
            shares.append(mid / max(ant, post))
    assert mid_share[0] <= min(shares) and max(shares) <= mid_share[1]
    if concavity_range[1] > 0:
        assert np.median(shares) < 0.95 and max(shares) - min(shares) > 0.05, "cups of differing depth"


def test_truth_heights_match_a_voxel_measurement(tiny_case: PhantomCase) -> None:
    spacing = np.asarray(tiny_case.labels.spacing_mm)
    assert tiny_case.truth["grade"].gt(0).any(), "the tiny phantom should contain a fracture"
    for spec, row in zip(tiny_case.layout.vertebrae, tiny_case.truth.itertuples()):
        central, healthy = _measured_columns(tiny_case.healthy_labels.array, spacing, spec)
        _, fractured = _measured_columns(tiny_case.labels.array, spacing, spec)
        h_healthy = _definition_heights(healthy, healthy, central)
        h_fractured = _definition_heights(fractured, healthy, central)
        truth_healthy = np.array([row.healthy_h_ant_mm, row.healthy_h_mid_mm, row.healthy_h_post_mm])
        truth_fractured = np.array([row.h_ant_mm, row.h_mid_mm, row.h_post_mm])
        assert np.abs(h_healthy - truth_healthy).max() < 1.0, (spec.name, h_healthy, truth_healthy)
        assert np.abs(h_fractured - truth_fractured).max() < 1.0, (spec.name, h_fractured, truth_fractured)
        measured_loss = 1 - h_fractured / h_healthy
        truth_loss = np.array([row.loss_ant, row.loss_mid, row.loss_post])
        assert np.abs(measured_loss - truth_loss).max() < 0.05, (spec.name, measured_loss, truth_loss)


def test_healthy_twin_differs_only_in_deformed_bodies(tiny_case: PhantomCase) -> None:
    deformed = {s.vertebra for s in tiny_case.layout.vertebrae if s.fracture.scale > 0}
    assert deformed
    differs = tiny_case.ct.array != tiny_case.healthy_ct.array
    assert set(np.unique(tiny_case.healthy_labels.array[differs])) <= deformed
    label_differs = tiny_case.labels.array != tiny_case.healthy_labels.array
    assert set(np.unique(tiny_case.healthy_labels.array[label_differs])) <= deformed
    assert not np.any(tiny_case.labels.array[label_differs]), "a fracture only removes voxels of its own body"
    for vid in deformed:  # the collapsed space is filled with soft tissue / disc, not bone
        lost = (tiny_case.healthy_labels.array == vid) & (tiny_case.labels.array == 0)
        assert lost.sum() > 50
        assert np.median(tiny_case.ct.array[lost]) < 150.0
        assert np.median(tiny_case.healthy_ct.array[lost]) > 100.0


def test_intensities_are_ct_like(tiny_case: PhantomCase) -> None:
    ct, labels = tiny_case.healthy_ct.array, tiny_case.healthy_labels.array
    assert np.median(ct[0, :3, :3]) < -900, "air in the corners"
    bone = ct[labels > 0]
    assert 100 < np.median(bone) < 450
    assert np.percentile(bone, 99) > 550, "cortical shell"
    centre = np.rint(tiny_case.layout.vertebrae[0].centre_mm / np.asarray(tiny_case.ct.spacing_mm)).astype(int)
    body_core = ct[tuple(slice(c - 2, c + 3) for c in centre)]
    assert 60 < body_core.mean() < 320, "trabecular interior"


def test_dataset_loads_back_with_truth_and_centroids(phantom_root: Path) -> None:
    cases = discover_cases(phantom_root)
    assert [c.case_id for c in cases] == ["sub-phantom000", "sub-phantom001", "sub-phantom002"]
    grades = pd.read_csv(phantom_root / "grades.csv")
    assert list(grades.columns) == ["case", "vertebra", "grade", "split"]
    assert grades["split"].isna().all()  # drawn cases are split by patient in preprocess
    for index, files in enumerate(cases):
        loaded = load_case(files, spacing_mm=1.0)
        original = generate_case(case_rng(SMALL_PHANTOM.seed, index), SMALL_PHANTOM, case_id=files.case_id)
        assert loaded.labels.orientation == ("I", "P", "L") and np.allclose(loaded.labels.spacing_mm, 1.0)
        assert loaded.vertebrae == original.truth["vertebra"].tolist()
        assert set(loaded.truth["source"]) == {"drawn"}
        pd.testing.assert_frame_equal(loaded.truth.drop(columns="source"), original.truth, check_exact=False, atol=1e-3)
        assert grades[grades["case"] == files.case_id]["grade"].tolist() == original.truth["grade"].tolist()
        com_loaded = ndimage.center_of_mass(np.ones_like(loaded.labels.array), loaded.labels.array, loaded.vertebrae)
        com_original = ndimage.center_of_mass(np.ones_like(original.labels.array), original.labels.array, loaded.vertebrae)
        for vid, a, b in zip(loaded.vertebrae, com_loaded, com_original):
            world_a = loaded.labels.affine @ np.r_[a, 1.0]
            world_b = original.labels.affine @ np.r_[b, 1.0]
            assert np.linalg.norm(world_a - world_b) < 1.0, vid
            centroid = np.rint(loaded.centroids[vid]).astype(int)
            assert loaded.labels.array[tuple(centroid)] == vid, "centroid inside its vertebra"
            assert np.linalg.norm(loaded.centroids[vid] - a) < 1.0
        assert loaded.healthy_labels is not None and loaded.healthy_ct is not None
        assert loaded.healthy_labels.shape == loaded.labels.shape == loaded.ct.shape


def test_phantom_stage_writes_the_layout(tmp_path: Path) -> None:
    out, metrics = tmp_path / "raw", tmp_path / "phantom.json"
    parser = argparse.ArgumentParser()
    phantom_stage.add_arguments(parser)
    phantom_stage.execute(parser.parse_args([
        "--out", str(out), "--cases", "2", "--seed", "5", "--params", str(REPO / "params.yaml"),
        "--set", "phantom.vertebrae_per_case=[3, 3]", "--set", "phantom.real_shapes=[]",
        "--set", "tracking.enabled=false", "--metrics", str(metrics)]))
    for case in ("sub-phantom000", "sub-phantom001"):
        assert (out / "rawdata" / case / f"{case}_ct.nii.gz").is_file()
        assert (out / "derivatives" / case / f"{case}_seg-vert_msk.nii.gz").is_file()
        assert (out / "derivatives" / case / f"{case}_seg-subreg_ctd.json").is_file()
        for suffix in ("healthy-ct.nii.gz", "healthy-msk.nii.gz", "heights.csv"):
            assert (out / "truth" / case / f"{case}_{suffix}").is_file()
    summary = json.loads(metrics.read_text())
    assert summary["cases"] == 2 and summary["vertebrae"] == 6
    assert sum(summary[f"grade_{g}"] for g in range(4)) == 6
    assert len(pd.read_csv(out / "grades.csv")) == 6
    resolved = load_params(out / "params.yaml").phantom
    assert (resolved.cases, resolved.seed, resolved.vertebrae_per_case) == (2, 5, (3, 3))
    assert not list(tmp_path.glob(".*tmp")), "no temporary folder left behind"


def test_preview_shows_the_fractures(phantom_root: Path) -> None:
    case = load_case(discover_cases(phantom_root)[2])
    figure = preview_figure(case)
    assert len(figure.axes) == 4
    names = [text.get_text() for text in figure.axes[0].texts]
    fractured = case.truth[case.truth["grade"] > 0]
    assert len(names) == len(fractured) and all(f"G{g}" in n for n, g in zip(names, fractured["grade"]))


@pytest.mark.parametrize(("override", "problem"), [
    ("phantom.orientations=[RAS, XYZ]", "'XYZ' is not an orientation"),
    ("phantom.vertebrae_per_case=[6, 4]", "vertebrae_per_case must be (min, max)"),
    ("phantom.vertebrae_per_case=[8, 13]", "<= 12 (T6..L5)"),
    ("phantom.grade_weights=[0.5, -0.1, 0.6]", "grade_weights must be non-negative"),
    ("phantom.spacing_mm_range=[0.0, 1.0]", "spacing_mm_range must be (min, max)"),
    ("phantom.fracture_share=1.5", "phantom.fracture_share"),
])
def test_invalid_phantom_params_are_reported(override: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_params(REPO / "params.yaml", [override])
    assert problem in str(caught.value)
