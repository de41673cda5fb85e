"""Isolate the vertebral bodies: remove pedicles, arches and processes from whole-vertebra labels.

Works in straightened space, axes ``(CC, AP, LR)``: axis 0 cranio-caudal, axis 1 anterior ->
posterior (column 0 anterior), axis 2 right -> left. In the mid-sagittal slab of a vertebra the
body, the spinal canal (empty) and the posterior arch follow each other from anterior to
posterior; the canal's anterior edge is the body's posterior wall. Everything posterior to that
wall is cut away, so is anything wider than the front two thirds of the body (transverse
processes), and of the rest only the largest connected part is kept (stray fragments). A label
without a canal gap (already a body, or a segmentation without the arch) is left whole.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BodyCut:
    """Where the body of one vertebra ends posteriorly.

    Attributes:
        vertebra: label id.
        wall_column: last AP column (axis 1) kept as body, or ``None`` if no canal was found.
        depth_mm: AP depth of the body in its mid-sagittal slab.
        kept_fraction: body voxels / whole-vertebra voxels.
    """

    vertebra: int
    wall_column: int | None
    depth_mm: float
    kept_fraction: float


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``(first, last)`` index of every run of true values in a 1D boolean array."""
    padded = np.concatenate([[False], flags, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def posterior_wall(vertebra_mask: np.ndarray, spacing_mm: float = 1.0, slab_mm: float = 3.0,
                   min_gap_mm: float = 2.5) -> int | None:
    """The AP column of a vertebra's posterior body wall, from its mid-sagittal profile.

    Args:
        vertebra_mask: boolean ``(CC, AP, LR)`` mask of one whole vertebra (straightened).
        spacing_mm: isotropic voxel size.
        slab_mm: half-width of the mid-sagittal slab around the vertebra's LR centre of mass.
        min_gap_mm: narrowest AP gap that counts as the spinal canal (smaller gaps are mask noise).

    Returns:
        the last AP column of the body, or ``None`` when no canal separates body and arch.
    """
    coords_lr = np.flatnonzero(vertebra_mask.any(axis=(0, 1)))
    if coords_lr.size == 0:
        return None
    lr_weights = np.count_nonzero(vertebra_mask, axis=(0, 1))[coords_lr]
    centre = float(np.average(coords_lr, weights=lr_weights))
    half = max(1, int(round(slab_mm / spacing_mm)))
    lo, hi = max(0, int(round(centre)) - half), min(vertebra_mask.shape[2], int(round(centre)) + half + 1)
    profile = np.count_nonzero(vertebra_mask[:, :, lo:hi], axis=(0, 2))
    if profile.max() == 0:
        return None
    occupied = profile > 0.05 * profile.max()
    runs = _runs(occupied)
    min_gap = max(1, int(np.ceil(min_gap_mm / spacing_mm)))
    merged = [runs[0]]
    for first, last in runs[1:]:
        if first - merged[-1][1] - 1 < min_gap:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    if len(merged) < 2:
        return None
    return merged[0][1]


def _trim_sides(body: np.ndarray, wall: int) -> None:
    """Cut, in place, what sticks out sideways beyond the body's width in its anterior two thirds.

    Transverse processes (large at L5) can reach in front of the posterior wall's plane where the
    spine bends; the front of the body never carries them, so its left-right extent bounds the body.
    """
    columns = np.flatnonzero(body.any(axis=(0, 2)))
    if columns.size == 0:
        return
    front = columns[0] + int(np.ceil((wall - columns[0] + 1) * 2.0 / 3.0))
    sides = np.flatnonzero(body[:, :front, :].any(axis=(0, 1)))
    body[:, :, :max(sides[0] - 1, 0)] = False
    body[:, :, sides[-1] + 2:] = False


def depedicle(labels: np.ndarray, spacing_mm: float = 1.0, vertebrae: list[int] | None = None,
              slab_mm: float = 3.0) -> tuple[np.ndarray, list[BodyCut]]:
    """Body-only labels: each vertebra cut at its posterior wall, largest connected part kept.

    Args:
        labels: straightened ``(CC, AP, LR)`` label volume (VerSe ids, 0 background), isotropic voxels.
        spacing_mm: voxel size.
        vertebrae: the ids to process (default: all non-zero labels); other labels are dropped.
        slab_mm: half-width of the mid-sagittal slab (see :func:`posterior_wall`).

    Returns:
        body labels (same dtype and shape) and one :class:`BodyCut` per vertebra.
    """
    ids = [int(v) for v in (np.unique(labels[labels > 0]) if vertebrae is None else vertebrae)]
    bodies = np.zeros_like(labels)
    boxes = ndimage.find_objects(labels)
    cuts = []
    for vid in ids:
        box = boxes[vid - 1] if vid - 1 < len(boxes) else None
        if box is None:
            continue
        whole = labels[box] == vid
        wall = posterior_wall(whole, spacing_mm, slab_mm)
        body = whole.copy()
        if wall is not None:
            body[:, wall + 1:, :] = False
            _trim_sides(body, wall)
        components, count = ndimage.label(body)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            body = components == int(np.argmax(sizes))
        bodies[box][body] = vid
        lr_centre = int(round(np.average(np.arange(body.shape[2]), weights=np.count_nonzero(body, axis=(0, 1)))))
        ap_extent = np.flatnonzero(body[:, :, lr_centre].any(axis=0))
        depth = (ap_extent[-1] - ap_extent[0] + 1) * spacing_mm if ap_extent.size else 0.0
        cut = BodyCut(vid, None if wall is None else wall + box[1].start, float(depth),
                      float(np.count_nonzero(body) / max(1, np.count_nonzero(whole))))
        if wall is None:
            log.debug("vertebra %d: no spinal canal in the mid-sagittal slab, label kept whole", vid)
        cuts.append(cut)
    return bodies, cuts
