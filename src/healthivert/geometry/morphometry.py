"""Vertebral body heights per antero-posterior third: the one place of the column logic.

Everything here works on a straightened (or locally aligned) body mask with axes ``(CC, AP, LR)``:
axis 0 cranio-caudal (row 0 cranial), axis 1 antero-posterior (column 0 anterior), axis 2 left-right.
A *column* is one ``(AP, LR)`` position; its *height* is the number of mask voxels along CC there
(a voxel count, so holes and clefts count as lost height) times the CC voxel size.

The columns are chosen once (:func:`select_columns`) and any label can then be measured on them
(:func:`heights_on`): RHLV measures the synthesised and the original vertebra on the same columns,
so a fracture that shortens a third below the threshold still counts in full.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: third index -> name, anterior first (AP axis runs anterior -> posterior).
THIRDS: tuple[str, str, str] = ("ant", "mid", "post")


@dataclasses.dataclass(frozen=True, eq=False)
class ColumnSelection:
    """The columns of a body on which heights are measured, each assigned to an AP third.

    Attributes:
        thirds: int8 array of shape ``(AP, LR)``: ``0`` anterior, ``1`` middle, ``2`` posterior third,
            ``-1`` where the column is not used (outside the central LR slices, outside the body, or
            below the column threshold).
        lr_slices: the LR indices (axis 2) that were considered (the central part of the body).
        reference_mm: per considered LR slice, the height of the body's central AP column, in mm.
    """

    thirds: np.ndarray
    lr_slices: np.ndarray
    reference_mm: np.ndarray

    @property
    def kept(self) -> np.ndarray:
        """Boolean ``(AP, LR)`` map of the kept columns."""
        return self.thirds >= 0

    @property
    def counts(self) -> tuple[int, int, int]:
        """Number of kept columns in the anterior, middle and posterior third."""
        counts = np.bincount(self.thirds[self.thirds >= 0].ravel(), minlength=3)
        return int(counts[0]), int(counts[1]), int(counts[2])


@dataclasses.dataclass(frozen=True)
class ThirdHeights:
    """Mean column heights of a vertebral body in mm (NaN where a third has no kept column)."""

    ant_mm: float
    mid_mm: float
    post_mm: float
    body_mm: float

    def as_tuple(self) -> tuple[float, float, float]:
        """``(ant, mid, post)`` in mm."""
        return self.ant_mm, self.mid_mm, self.post_mm


def _cc_spacing(spacing_mm: float | tuple[float, float, float]) -> float:
    """The cranio-caudal voxel size of a scalar or ``(CC, AP, LR)`` spacing."""
    if isinstance(spacing_mm, (int, float)):
        return float(spacing_mm)
    return float(spacing_mm[0])


def column_heights(mask: np.ndarray, spacing_mm: float | tuple[float, float, float] = 1.0) -> np.ndarray:
    """Height of every ``(AP, LR)`` column of a mask in mm (voxel count along CC x CC spacing).

    Args:
        mask: array ``(CC, AP, LR)``; any non-zero voxel counts.
        spacing_mm: voxel size, a scalar or ``(CC, AP, LR)``; only the CC size is used.

    Returns:
        float array ``(AP, LR)``.
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a (CC, AP, LR) volume, got shape {mask.shape}")
    return np.count_nonzero(mask, axis=0).astype(np.float64) * _cc_spacing(spacing_mm)


def select_columns(body_mask: np.ndarray, central_fraction: float = 0.2, column_threshold: float = 0.7,
                   spacing_mm: float | tuple[float, float, float] = 1.0) -> ColumnSelection:
    """Choose the columns of a vertebral body on which its heights are measured.

    The LR slices within ``+-(LR extent x central_fraction)`` of the body's LR centre are kept. In each,
    the body's AP extent is split in thirds (anterior, middle, posterior), and columns lower than
    ``column_threshold`` x the height of that slice's central AP column are dropped (rounded body
    edges).

    Args:
        body_mask: ``(CC, AP, LR)`` mask of one vertebral body (any non-zero voxel counts).
        central_fraction: half-width of the kept LR band as a fraction of the body's LR extent.
        column_threshold: relative height below which a column is dropped (0 keeps every column).
        spacing_mm: voxel size (scalar or ``(CC, AP, LR)``), only for ``reference_mm``.

    Raises:
        ValueError: the mask is empty.
    """
    heights = np.count_nonzero(body_mask, axis=0)  # (AP, LR) voxel counts
    occupied = heights > 0
    lr_any = np.flatnonzero(occupied.any(axis=0))
    if lr_any.size == 0:
        raise ValueError("empty body mask: no columns to select")
    lr_lo, lr_hi = lr_any[0], lr_any[-1]
    extent = lr_hi - lr_lo + 1
    centre = (lr_lo + lr_hi) / 2.0
    half = extent * central_fraction
    n_ap, n_lr = heights.shape
    lr_index = np.arange(n_lr)
    lr_slices = lr_index[(np.abs(lr_index - centre) <= half + 1e-9) & occupied.any(axis=0)]

    sub = occupied[:, lr_slices]  # (AP, S)
    ap_index = np.arange(n_ap)[:, None]
    first = np.argmax(sub, axis=0)  # anterior-most occupied column per slice
    last = n_ap - 1 - np.argmax(sub[::-1], axis=0)  # posterior-most
    depth = last - first + 1
    third = np.floor(3.0 * (ap_index - first) / depth).astype(np.int64)
    inside = (ap_index >= first) & (ap_index <= last)
    central = np.clip((first + last) // 2, 0, n_ap - 1)
    reference = heights[central, lr_slices].astype(np.float64)  # (S,)
    tall_enough = heights[:, lr_slices] >= column_threshold * reference[None, :]
    keep = inside & sub & tall_enough

    thirds = np.full((n_ap, n_lr), -1, dtype=np.int8)
    thirds[:, lr_slices] = np.where(keep, third, -1).astype(np.int8)
    return ColumnSelection(thirds=thirds, lr_slices=lr_slices, reference_mm=reference * _cc_spacing(spacing_mm))


def heights_on(mask: np.ndarray, selection: ColumnSelection,
               spacing_mm: float | tuple[float, float, float] = 1.0) -> ThirdHeights:
    """Mean height of ``mask`` over the selected columns, per third and over the whole body.

    Args:
        mask: ``(CC, AP, LR)`` mask on the grid the selection was made on (any non-zero voxel counts,
            e.g. the original or the synthesised label of the same vertebra).
        selection: from :func:`select_columns`.
        spacing_mm: voxel size, scalar or ``(CC, AP, LR)``.

    Returns:
        heights in mm; a third without kept columns gives NaN.
    """
    if mask.shape[1:] != selection.thirds.shape:
        raise ValueError(f"mask columns {mask.shape[1:]} differ from the selection's {selection.thirds.shape}")
    heights = column_heights(mask, spacing_mm)
    kept = selection.kept
    labels = selection.thirds[kept].astype(np.int64)
    values = heights[kept]
    sums = np.bincount(labels, weights=values, minlength=3)
    counts = np.bincount(labels, minlength=3)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    body = float(values.mean()) if values.size else float("nan")
    return ThirdHeights(float(means[0]), float(means[1]), float(means[2]), body)


def body_heights(mask: np.ndarray, spacing_mm: float | tuple[float, float, float] = 1.0,
                 central_fraction: float = 0.2, column_threshold: float = 0.7) -> ThirdHeights:
    """Heights of a body measured on its own columns: ``heights_on(mask, select_columns(mask))``.

    Args:
        mask: ``(CC, AP, LR)`` mask of one vertebral body.
        spacing_mm: voxel size, scalar or ``(CC, AP, LR)``.
        central_fraction: see :func:`select_columns`.
        column_threshold: see :func:`select_columns`.
    """
    selection = select_columns(mask, central_fraction, column_threshold, spacing_mm)
    return heights_on(mask, selection, spacing_mm)


@dataclasses.dataclass(frozen=True)
class NeighbourBaseline:
    """A vertebra's heights against the healthy heights expected from its neighbours (mask-only).

    Attributes:
        vertebra: VerSe id.
        heights: its own heights.
        expected: mean heights of the adjacent vertebrae (one neighbour at the ends), or ``None``
            when no neighbour was measured.
        neighbours: the ids the expectation was taken from.
        loss_ant, loss_mid, loss_post: ``1 - h / expected`` per third (NaN without an expectation).
    """

    vertebra: int
    heights: ThirdHeights
    expected: ThirdHeights | None
    neighbours: tuple[int, ...]
    loss_ant: float
    loss_mid: float
    loss_post: float


def vertebra_heights(bodies: np.ndarray, spacing_mm: float | tuple[float, float, float] = 1.0,
                     central_fraction: float = 0.2, column_threshold: float = 0.7) -> dict[int, ThirdHeights]:
    """Heights of every complete body of a ``(CC, AP, LR)`` body-label volume, cranial first.

    Bodies touching the first or last row are cut off by the volume (e.g. neighbours at the edge of a
    crop) and are left out.

    Args:
        bodies: straightened body labels (VerSe ids, 0 background).
        spacing_mm: voxel size, scalar or ``(CC, AP, LR)``.
        central_fraction, column_threshold: see :func:`select_columns`.

    Returns:
        VerSe id -> heights, ordered by the body's mean row (cranial first).
    """
    ids = np.unique(bodies)
    ids = ids[ids > 0]
    rows = np.arange(bodies.shape[0])
    found = []
    for vid in ids:
        body = bodies == vid
        counts = np.count_nonzero(body, axis=(1, 2))
        if counts[0] or counts[-1]:
            continue
        found.append((float(np.average(rows, weights=counts)), int(vid), body))
    found.sort()
    return {vid: body_heights(body, spacing_mm, central_fraction, column_threshold) for _, vid, body in found}


def neighbour_baseline(heights: dict[int, ThirdHeights]) -> dict[int, NeighbourBaseline]:
    """Expected healthy heights of each vertebra from its neighbours, and the resulting losses.

    The expectation is the mean of the adjacent vertebrae's heights per third (a single neighbour at
    the ends of the measured run). A fractured neighbour lowers the expectation: this is the
    mask-only baseline that RHLV improves on.

    Args:
        heights: VerSe id -> heights, ordered cranial first (as :func:`vertebra_heights` returns).
    """
    ids = list(heights)
    result = {}
    for index, vid in enumerate(ids):
        neighbours = tuple(ids[i] for i in (index - 1, index + 1) if 0 <= i < len(ids))
        own = heights[vid]
        if not neighbours:
            result[vid] = NeighbourBaseline(vid, own, None, (), float("nan"), float("nan"), float("nan"))
            continue
        stacked = np.array([dataclasses.astuple(heights[n]) for n in neighbours], dtype=np.float64)
        valid = ~np.isnan(stacked)
        measured = valid.sum(axis=0)
        mean = np.where(measured > 0, np.where(valid, stacked, 0.0).sum(axis=0) / np.maximum(measured, 1), np.nan)
        expected = ThirdHeights(*(float(v) for v in mean))
        with np.errstate(invalid="ignore", divide="ignore"):
            losses = 1.0 - np.asarray(own.as_tuple()) / np.asarray(expected.as_tuple())
        result[vid] = NeighbourBaseline(vid, own, expected, neighbours, *(float(x) for x in losses))
    return result
