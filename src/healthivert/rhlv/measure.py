"""Relative Height Loss of Vertebrae (RHLV): synthesised healthy vs original height, per AP third.

All arrays are straightened crops with axes ``(CC, AP, LR)``: axis 0 cranio-caudal (row 0 cranial),
axis 1 antero-posterior (column 0 anterior), axis 2 right -> left. ``syn`` is the target's
synthesised (pseudo-healthy) body mask, ``ori`` its original body mask, on the same grid.

``RHLV = (H_syn - H_ori) / H_syn`` for the anterior, middle and posterior thirds and the whole body,
``H`` being the mean column height (mm) over the measured columns (see
:mod:`healthivert.geometry.morphometry`). Two ways of choosing the columns:

- ``healthy`` (default): the columns are chosen once, from the synthesised body, and both labels are
  measured on them, so RHLV is continuous in the size of a fracture;
- ``reference``: as the reference implementation, the thirds come from the synthesised body but each
  label keeps only its own columns at least ``column_threshold`` x its own central column, so the
  shortened columns of a severe wedge drop out of the original's heights (an empty third counts as
  height 0, RHLV 1).

In both, where the original is taller than the synthesised body in a third (tallest measured
column against tallest), the synthesised heights of that third are scaled up to match, so synthesis
error alone does not make RHLV negative.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from healthivert.config import RhlvParams
from healthivert.geometry.morphometry import (
    ColumnSelection,
    ThirdHeights,
    column_heights,
    heights_on,
    select_columns,
)

ColumnMode = Literal["healthy", "reference"]


@dataclasses.dataclass(frozen=True)
class RhlvResult:
    """RHLV of one vertebra in one view.

    Attributes:
        ant, mid, post: RHLV of the three thirds (sagittal view: anterior, middle, posterior; coronal
            view: right, middle, left).
        body: RHLV of the whole body.
        shape_ratio: min / max of the original's three third heights (1 for a box, small for a wedge).
        syn: synthesised heights in mm after the scale-up.
        ori: original heights in mm.
    """

    ant: float
    mid: float
    post: float
    body: float
    shape_ratio: float
    syn: ThirdHeights
    ori: ThirdHeights

    def as_tuple(self) -> tuple[float, float, float]:
        """``(ant, mid, post)`` RHLV."""
        return self.ant, self.mid, self.post


def _tallest(heights: np.ndarray, selection: ColumnSelection) -> np.ndarray:
    """Tallest measured column per third and over the body, shape ``(4,)`` (0 where none)."""
    tallest = np.zeros(4)
    kept = selection.kept
    for index in range(3):
        chosen = heights[selection.thirds == index]
        tallest[index] = chosen.max() if chosen.size else 0.0
    tallest[3] = heights[kept].max() if kept.any() else 0.0
    return tallest


def _bounding_box(syn: np.ndarray, ori: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of both masks: everything measured is inside, and measuring it there is much faster."""
    union = np.logical_or(syn, ori)
    box = []
    for axis in range(3):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1) if present.size else slice(0, 0))
    return box[0], box[1], box[2]


def _relative_loss(h_syn: float, h_ori: float) -> float:
    if not np.isfinite(h_syn) or h_syn <= 0:
        return float("nan")
    return float((h_syn - h_ori) / h_syn)


def _reference_selections(syn: np.ndarray, ori: np.ndarray, central_fraction: float, column_threshold: float,
                          spacing_mm: tuple[float, float, float]) -> tuple[ColumnSelection, ColumnSelection]:
    """The reference's columns: thirds from ``syn``, each label thresholded against its own central column."""
    syn_selection = select_columns(syn, central_fraction, column_threshold, spacing_mm)
    syn_thirds = select_columns(syn, central_fraction, 0.0, spacing_mm).thirds
    own = select_columns(ori, central_fraction, column_threshold, spacing_mm)
    ori_thirds = np.where(own.kept & (syn_thirds >= 0), syn_thirds, -1).astype(np.int8)
    return syn_selection, ColumnSelection(ori_thirds, own.lr_slices, own.reference_mm)


def compute_rhlv(syn: np.ndarray, ori: np.ndarray, spacing_mm: tuple[float, float, float],
                 central_fraction: float = 0.2, column_threshold: float = 0.7,
                 column_selection: ColumnMode = "healthy") -> RhlvResult:
    """RHLV of one vertebra in the sagittal view (thirds along AP).

    Args:
        syn: synthesised body mask ``(CC, AP, LR)`` (non-zero = vertebra).
        ori: original body mask on the same grid.
        spacing_mm: voxel size ``(CC, AP, LR)`` in mm.
        central_fraction: half-width of the measured LR band, as a fraction of the body's LR extent.
        column_threshold: columns lower than this x the central column are not measured.
        column_selection: ``healthy`` (columns of the synthesised body for both) or ``reference``.

    Raises:
        ValueError: the masks differ in shape, or either is empty.
    """
    if syn.shape != ori.shape:
        raise ValueError(f"synthesised mask {syn.shape} and original {ori.shape} differ in shape")
    if not np.any(syn) or not np.any(ori):
        raise ValueError("the synthesised or the original mask is empty")
    box = _bounding_box(syn, ori)
    syn, ori = syn[box], ori[box]
    syn_h = column_heights(syn, spacing_mm)
    ori_h = column_heights(ori, spacing_mm)
    if column_selection == "healthy":
        syn_selection = ori_selection = select_columns(syn, central_fraction, column_threshold, spacing_mm)
    else:
        syn_selection, ori_selection = _reference_selections(syn, ori, central_fraction, column_threshold, spacing_mm)
    syn_mean = np.asarray(dataclasses.astuple(heights_on(syn, syn_selection, spacing_mm)))
    ori_mean = np.asarray(dataclasses.astuple(heights_on(ori, ori_selection, spacing_mm)))
    if column_selection == "reference":
        # the reference counts a third left without columns as height 0
        ori_mean = np.where(np.isnan(ori_mean) & ~np.isnan(syn_mean), 0.0, ori_mean)
    tallest_syn = _tallest(syn_h, syn_selection)
    tallest_ori = _tallest(ori_h, ori_selection)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where((tallest_syn > 0) & (tallest_ori > tallest_syn), tallest_ori / tallest_syn, 1.0)
    syn_mean = syn_mean * scale
    losses = [_relative_loss(s, o) for s, o in zip(syn_mean, ori_mean)]
    thirds_ori = ori_mean[:3]
    measurable = np.all(np.isfinite(thirds_ori)) and np.max(thirds_ori) > 0
    shape_ratio = float(np.min(thirds_ori) / np.max(thirds_ori)) if measurable else float("nan")
    return RhlvResult(
        ant=losses[0], mid=losses[1], post=losses[2], body=losses[3], shape_ratio=shape_ratio,
        syn=ThirdHeights(*(float(v) for v in syn_mean)), ori=ThirdHeights(*(float(v) for v in ori_mean)),
    )


def compute_rhlv_coronal(syn: np.ndarray, ori: np.ndarray, spacing_mm: tuple[float, float, float],
                         central_fraction: float = 0.2, column_threshold: float = 0.7,
                         column_selection: ColumnMode = "healthy") -> RhlvResult:
    """RHLV in the coronal view: the same measure with AP and LR swapped (thirds right, middle, left).

    Args:
        syn, ori: masks ``(CC, AP, LR)``; see :func:`compute_rhlv`.
        spacing_mm: voxel size ``(CC, AP, LR)``.

    Returns:
        a :class:`RhlvResult` whose ``ant, mid, post`` are the right, middle and left thirds.
    """
    swap = (0, 2, 1)
    return compute_rhlv(np.transpose(syn, swap), np.transpose(ori, swap),
                        (spacing_mm[0], spacing_mm[2], spacing_mm[1]),
                        central_fraction, column_threshold, column_selection)


def rhlv_with_params(syn: np.ndarray, ori: np.ndarray, spacing_mm: tuple[float, float, float],
                     params: RhlvParams, view: Literal["sagittal", "coronal"] = "sagittal") -> RhlvResult:
    """:func:`compute_rhlv` (or its coronal variant) with the settings of ``params``."""
    measure = compute_rhlv if view == "sagittal" else compute_rhlv_coronal
    return measure(syn, ori, spacing_mm, params.central_fraction, params.column_threshold, params.column_selection)


def height_loss_map(syn: np.ndarray, ori: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Cross-sectional height-loss map ``(H_syn - H_ori) / H_syn`` of every column.

    Args:
        syn, ori: body masks ``(CC, AP, LR)`` on one grid.
        spacing_mm: voxel size ``(CC, AP, LR)``.

    Returns:
        float32 array ``(AP, LR)`` (row 0 anterior, column 0 right); NaN where the synthesised body
        has no voxel.
    """
    loss = np.full(syn.shape[1:], np.nan, dtype=np.float32)
    _, ap, lr = box = _bounding_box(syn, ori)
    h_syn = column_heights(syn[box], spacing_mm)
    h_ori = column_heights(ori[box], spacing_mm)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss[ap, lr] = np.where(h_syn > 0, (h_syn - h_ori) / h_syn, np.nan)
    return loss

