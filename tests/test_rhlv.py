"""RHLV against known height losses: real straightened VerSe labels with built anterior wedges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from healthivert.config import RhlvParams
from healthivert.io.nifti import load_volume
from healthivert.rhlv import compute_rhlv, compute_rhlv_coronal, height_loss_map, rhlv_with_params

STRAIGHTENED = Path(__file__).resolve().parents[2] / "shared" / "data" / "verse19-sample" / "straightened" / "label"
LABEL_FILES = sorted(STRAIGHTENED.glob("0007_*.nii.gz"))
FACTORS = (0.9, 0.75, 0.6, 0.5)


def target_mask(path: Path) -> np.ndarray:
    """The target body of a straightened crop ``(CC, AP, LR)``, its id taken from the file name."""
    vertebra = int(path.name.split("_")[1].split(".")[0])
    return load_volume(path, label=True).array == vertebra


def compress_anterior(mask: np.ndarray, factor: float) -> np.ndarray:
    """Shrink every anterior-third column of ``mask`` to ``factor`` of its height, keeping its lowest voxels.

    The anterior third is the first third of the body's AP extent in each LR slice; the inferior
    endplate stays in place, so the result is an anterior wedge (axes CC, AP, LR; row 0 cranial).
    """
    heights = mask.sum(axis=0)
    occupied = heights > 0
    n_ap = mask.shape[1]
    first = np.argmax(occupied, axis=0)
    last = n_ap - 1 - np.argmax(occupied[::-1], axis=0)
    third = np.floor(3 * (np.arange(n_ap)[:, None] - first) / (last - first + 1))
    anterior = (third == 0) & occupied
    keep = np.rint(factor * heights)
    from_bottom = np.cumsum(mask[::-1], axis=0)[::-1]  # voxels at or below each row, per column
    return mask & ((from_bottom <= keep[None]) | ~anterior[None])


@pytest.fixture(scope="module", params=LABEL_FILES or [None], ids=lambda p: p.name if p else "missing")
def real_body(request: pytest.FixtureRequest) -> np.ndarray:
    if request.param is None:
        pytest.skip(f"sample data not found at {STRAIGHTENED}")
    return target_mask(request.param)


def test_a_vertebra_against_itself_has_no_loss(real_body: np.ndarray) -> None:
    for mode in ("healthy", "reference"):
        result = compute_rhlv(real_body, real_body, (1.0, 1.0, 1.0), column_selection=mode)
        assert result.as_tuple() == (0.0, 0.0, 0.0)
        assert result.body == 0.0
    coronal = compute_rhlv_coronal(real_body, real_body, (1.0, 1.0, 1.0))
    assert coronal.as_tuple() == (0.0, 0.0, 0.0)


def test_anterior_wedge_of_known_size_is_measured(real_body: np.ndarray) -> None:
    shape_ratios = []
    for factor in FACTORS:
        result = compute_rhlv(real_body, compress_anterior(real_body, factor), (1.0, 1.0, 1.0))
        assert result.ant == pytest.approx(1 - factor, abs=0.03)
        assert result.mid == pytest.approx(0.0, abs=1e-9)
        assert result.post == pytest.approx(0.0, abs=1e-9)
        assert 0 < result.body < result.ant
        shape_ratios.append(result.shape_ratio)
    assert np.all(np.diff(shape_ratios) < 0), "the wedge shape ratio falls as the wedge grows"
    # a severe wedge: the anterior third is the shortest, so the ratio is anterior over the tallest
    assert shape_ratios[-1] == pytest.approx(result.ori.ant_mm / max(result.ori.mid_mm, result.ori.post_mm))


def test_anterior_rhlv_is_continuous_in_the_wedge_size(real_body: np.ndarray) -> None:
    factors = np.linspace(1.0, 0.45, 23)  # steps of 0.025
    ant = np.array([compute_rhlv(real_body, compress_anterior(real_body, f), (1.0, 1.0, 1.0)).ant for f in factors])
    steps = np.diff(ant)
    assert np.all(steps > -1e-9), "anterior RHLV must grow with the wedge"
    # voxel rounding moves single steps by about 0.01-0.03; the reference's jumps are about 0.5
    assert np.max(np.abs(steps - 0.025)) < 0.05, "no jumps between neighbouring wedge sizes"


def test_reference_columns_jump_for_severe_wedges() -> None:
    """The reference's per-label threshold drops the shortened columns: the documented failure."""
    if not LABEL_FILES:
        pytest.skip(f"sample data not found at {STRAIGHTENED}")
    errors = []
    for path in LABEL_FILES:
        body = target_mask(path)
        wedge = compress_anterior(body, 0.5)
        errors.append(abs(compute_rhlv(body, wedge, (1.0, 1.0, 1.0), column_selection="reference").ant - 0.5))
    assert max(errors) > 0.3  # 1.0 instead of 0.5 on at least one vertebra
    assert np.mean(errors) > 0.1


def box(shape: tuple[int, int, int], rows: tuple[int, int], ap: tuple[int, int], lr: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1], ap[0]:ap[1], lr[0]:lr[1]] = True
    return mask


def test_spacing_scales_heights_but_not_rhlv() -> None:
    healthy = box((40, 30, 20), (5, 35), (3, 27), (2, 18))
    crushed = box((40, 30, 20), (14, 35), (3, 27), (2, 18))  # 21 of 30 rows: 30 % loss everywhere
    result = compute_rhlv(healthy, crushed, (0.5, 1.0, 1.0))
    assert result.as_tuple() == pytest.approx((0.3, 0.3, 0.3))
    assert result.syn.body_mm == pytest.approx(15.0)
    assert result.ori.body_mm == pytest.approx(10.5)
    assert result.shape_ratio == pytest.approx(1.0)


def test_taller_original_scales_the_synthesis_up() -> None:
    short_synthesis = box((40, 30, 20), (10, 30), (3, 27), (2, 18))
    original = box((40, 30, 20), (5, 30), (3, 27), (2, 18))
    result = compute_rhlv(short_synthesis, original, (1.0, 1.0, 1.0))
    assert result.as_tuple() == pytest.approx((0.0, 0.0, 0.0))
    assert result.syn.ant_mm == pytest.approx(25.0)


def test_coronal_view_sees_a_lateral_wedge() -> None:
    healthy = box((40, 30, 30), (5, 35), (3, 27), (3, 27))
    lateral = healthy.copy()
    lateral[5:20, :, 3:11] = False  # right third (LR 3..10) loses 15 of 30 rows
    sagittal = compute_rhlv(healthy, lateral, (1.0, 1.0, 1.0), central_fraction=0.5)
    coronal = compute_rhlv_coronal(healthy, lateral, (1.0, 1.0, 1.0), central_fraction=0.5)
    assert coronal.ant == pytest.approx(0.5)  # right third
    assert coronal.mid == pytest.approx(0.0) and coronal.post == pytest.approx(0.0)
    assert sagittal.ant == pytest.approx(sagittal.post)  # symmetric in AP


def test_params_select_the_view_and_columns() -> None:
    healthy = box((40, 30, 30), (5, 35), (3, 27), (3, 27))
    params = RhlvParams(column_selection="reference", central_fraction=0.5)
    assert rhlv_with_params(healthy, healthy, (1.0, 1.0, 1.0), params, "coronal").body == 0.0


def test_height_loss_map_marks_the_lost_columns() -> None:
    healthy = box((40, 30, 20), (5, 35), (3, 27), (2, 18))
    wedge = healthy.copy()
    wedge[5:20, 3:11, :] = False  # anterior columns lose half
    loss = height_loss_map(healthy, wedge, (1.0, 1.0, 1.0))
    assert loss.shape == (30, 20)
    assert np.allclose(loss[3:11, 2:18], 0.5) and np.allclose(loss[11:27, 2:18], 0.0)
    assert np.isnan(loss[0, 0]) and np.isnan(loss[28, 10])


def test_mismatched_or_empty_masks_are_refused() -> None:
    healthy = box((40, 30, 20), (5, 35), (3, 27), (2, 18))
    with pytest.raises(ValueError, match="differ in shape"):
        compute_rhlv(healthy, healthy[:, :, :10], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="empty"):
        compute_rhlv(healthy, np.zeros_like(healthy), (1.0, 1.0, 1.0))
