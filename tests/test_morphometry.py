"""Body heights per third on synthetic bodies of known shape (axes CC, AP, LR)."""

from __future__ import annotations

import numpy as np
import pytest

from healthivert.geometry.morphometry import body_heights, column_heights, heights_on, select_columns


def wedge_body(ant_height: int, post_height: int, depth: int = 36, width: int = 40,
               shape: tuple[int, int, int] = (60, 50, 50)) -> tuple[np.ndarray, np.ndarray]:
    """A body whose height falls linearly from posterior to anterior, flat top at row 10.

    Returns the mask and the integer height of each AP column (anterior first).
    """
    mask = np.zeros(shape, dtype=np.uint8)
    profile = np.rint(np.linspace(ant_height, post_height, depth)).astype(int)
    rows = np.arange(shape[0])[:, None]
    columns = (rows >= 10) & (rows < 10 + profile[None, :])  # (CC, depth)
    mask[:, 5:5 + depth, 5:5 + width] = columns[:, :, None]
    return mask, profile


def test_box_heights_equal_its_height_in_mm() -> None:
    mask, _ = wedge_body(28, 28)
    heights = body_heights(mask, spacing_mm=(0.5, 1.0, 1.0))
    assert heights.as_tuple() == pytest.approx((14.0, 14.0, 14.0))
    assert heights.body_mm == pytest.approx(14.0)


def test_wedge_thirds_match_the_mean_of_their_columns() -> None:
    mask, profile = wedge_body(20, 30)
    heights = body_heights(mask)
    expected = [profile[0:12].mean(), profile[12:24].mean(), profile[24:36].mean()]
    assert heights.as_tuple() == pytest.approx(expected, abs=1e-9)
    assert heights.ant_mm < heights.mid_mm < heights.post_mm


def test_central_band_and_thirds_of_the_selection() -> None:
    mask, _ = wedge_body(28, 28)
    selection = select_columns(mask, central_fraction=0.2, column_threshold=0.7)
    # LR extent 40 (slices 5..44), centre 24.5, half-width 8: slices 17..32.
    assert selection.lr_slices.tolist() == list(range(17, 33))
    assert selection.counts == (12 * 16, 12 * 16, 12 * 16)
    assert np.all(selection.thirds[:5] == -1) and np.all(selection.thirds[41:] == -1)


def test_short_edge_columns_are_dropped() -> None:
    mask, _ = wedge_body(28, 28)
    mask[:, 5:8, :] = 0
    mask[10:20, 5:8, 5:45] = 1  # three anterior columns of height 10 < 0.7 x 28
    selection = select_columns(mask, column_threshold=0.7)
    assert np.all(selection.thirds[5:8, selection.lr_slices] == -1)
    assert body_heights(mask).ant_mm == pytest.approx(28.0)
    assert body_heights(mask, column_threshold=0.0).ant_mm == pytest.approx((3 * 10 + 9 * 28) / 12)


def test_measuring_a_wedge_on_healthy_columns_is_continuous_in_the_loss() -> None:
    healthy, _ = wedge_body(30, 30)
    selection = select_columns(healthy)
    previous = 0.0
    for ant in range(30, 9, -2):  # anterior loss from 0 % to 67 %
        fractured, profile = wedge_body(ant, 30)
        loss = 1 - heights_on(fractured, selection).ant_mm / heights_on(healthy, selection).ant_mm
        assert loss == pytest.approx(1 - profile[:12].mean() / 30, abs=1e-9)
        assert 0 <= loss - previous < 0.08
        previous = loss


def test_column_heights_counts_voxels_and_empty_mask_is_an_error() -> None:
    mask, profile = wedge_body(20, 30)
    assert column_heights(mask, 2.0)[5:41, 20] == pytest.approx(2.0 * profile)
    with pytest.raises(ValueError, match="empty"):
        select_columns(np.zeros((4, 4, 4)))


def test_neighbour_baseline_uses_the_adjacent_vertebrae() -> None:
    from healthivert.geometry.morphometry import ThirdHeights, neighbour_baseline, vertebra_heights

    heights = {19: ThirdHeights(24.0, 24.0, 26.0, 25.0), 20: ThirdHeights(15.0, 20.0, 25.0, 20.0),
               21: ThirdHeights(26.0, 26.0, 28.0, 27.0)}
    baseline = neighbour_baseline(heights)
    assert baseline[20].neighbours == (19, 21)
    assert baseline[20].expected.as_tuple() == pytest.approx((25.0, 25.0, 27.0))
    assert (baseline[20].loss_ant, baseline[20].loss_mid) == pytest.approx((0.4, 0.2))
    assert baseline[19].neighbours == (20,) and baseline[19].loss_ant == pytest.approx(1 - 24 / 15)
    assert np.isnan(neighbour_baseline({20: heights[20]})[20].loss_ant)

    # on a crop: three stacked bodies, the one cut by the crop's top row is left out
    crop = np.zeros((70, 50, 50), dtype=np.uint8)
    for vid, (top, height) in {18: (0, 8), 19: (10, 24), 20: (38, 16), 21: (58, 10)}.items():
        crop[top:top + height, 5:41, 5:45] = vid
    measured = vertebra_heights(crop)
    assert list(measured) == [19, 20, 21]
    assert measured[20].as_tuple() == pytest.approx((16.0, 16.0, 16.0))
    assert neighbour_baseline(measured)[20].loss_mid == pytest.approx(1 - 16 / 17)
