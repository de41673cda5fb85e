"""One spine scan as the library sees it: canonical orientation, isotropic grid, VerSe labels."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from healthivert.errors import InputDataError
from healthivert.io.centroids import centroids_from_labels, read_centroids
from healthivert.io.labels import TOTALSEG_TO_VERSE, VERSE_NAMES
from healthivert.io.layouts import CaseFiles
from healthivert.io.images import read_image, read_label_map
from healthivert.io.nifti import Volume, check_same_grid, load_volume
from healthivert.io.resample import to_canonical, voxel_to_world, world_to_voxel

logger = logging.getLogger(__name__)

#: Columns of a phantom's ``heights.csv`` (see docs/architecture.md).
TRUTH_COLUMNS = (
    "vertebra", "name", "grade", "fracture_type",
    "healthy_h_ant_mm", "healthy_h_mid_mm", "healthy_h_post_mm", "h_ant_mm", "h_mid_mm", "h_post_mm",
    "loss_ant", "loss_mid", "loss_post",
)


@dataclasses.dataclass(frozen=True, eq=False)
class SpineCase:
    """A spine CT (optional) and its vertebra label map on one canonical grid.

    All volumes are reoriented to ``IPL`` (axis 0 superior->inferior, axis 1 anterior->posterior,
    axis 2 right->left) and resampled to the requested isotropic spacing (or keep the stored one).

    Attributes:
        case_id: patient / scan identifier, e.g. ``"sub-verse004"``.
        labels: int32 VerSe vertebra ids (0 background), whole vertebrae (posterior elements included).
        ct: float32 HU on the same grid, or ``None`` for mask-only cases.
        centroids: VerSe id -> voxel coordinates ``(i, j, k)`` in the grid of ``labels``.
        layout: the dataset layout it was read from (``verse``, ``paper``, ``totalsegmentator``, or ``mask``
            for a single label map).
        truth: phantom ground truth (``heights.csv`` rows), or ``None`` for real data.
        healthy_ct: phantom only: the same spine without fractures.
        healthy_labels: phantom only: its labels.
        stored_affine: voxel-to-world matrix of the label map as stored (before reorienting), to write
            results back in the scan's own orientation.
    """

    case_id: str
    labels: Volume
    ct: Volume | None
    centroids: dict[int, np.ndarray]
    layout: str
    truth: pd.DataFrame | None = None
    healthy_ct: Volume | None = None
    healthy_labels: Volume | None = None
    stored_affine: np.ndarray | None = None

    @property
    def vertebrae(self) -> list[int]:
        """VerSe ids present in the label map, cranial to caudal (by centroid row)."""
        return sorted(self.centroids, key=lambda v: self.centroids[v][0])

    def __repr__(self) -> str:
        return (
            f"SpineCase({self.case_id}, layout={self.layout}, vertebrae={self.vertebrae}, "
            f"ct={'yes' if self.ct is not None else 'no'}, truth={'yes' if self.truth is not None else 'no'})"
        )


def detect_label_scheme(labels: np.ndarray) -> str:
    """Guess whether a label map uses VerSe ids or TotalSegmentator v2 ids.

    VerSe vertebra ids stop at 28 (T13) and never use 27; any id above 28, or 27, means TotalSegmentator.
    """
    ids = set(int(v) for v in np.unique(labels)) - {0}
    return "totalseg" if ids and (max(ids) > 28 or 27 in ids) else "verse"


def _to_verse_ids(mask: Volume) -> Volume:
    lookup = np.zeros(max(int(mask.array.max()), max(TOTALSEG_TO_VERSE)) + 1, dtype=np.int32)
    for ts_id, verse_id in TOTALSEG_TO_VERSE.items():
        lookup[ts_id] = verse_id
    return mask.with_array(lookup[mask.array])


def _read_truth(path: Path) -> pd.DataFrame:
    try:
        truth = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputDataError(path, "not a readable CSV file", str(exc).splitlines()[0]) from exc
    missing = [c for c in TRUTH_COLUMNS if c not in truth.columns]
    if missing:
        raise InputDataError(path, f"missing columns {missing}")
    return truth


def _prepare_mask(mask: Volume, label_scheme: str) -> Volume:
    scheme = detect_label_scheme(mask.array) if label_scheme == "auto" else label_scheme
    if scheme not in ("verse", "totalseg"):
        raise ValueError(f"unknown label scheme {label_scheme!r}")
    if scheme == "totalseg":
        mask = _to_verse_ids(mask)
    if not np.any(mask.array):
        raise InputDataError(mask.path or "<memory>", "label map contains no vertebra labels",
                             "expected VerSe ids 1-28 or TotalSegmentator vertebra ids 26-50")
    unknown = sorted(set(int(v) for v in np.unique(mask.array)) - set(VERSE_NAMES) - {0})
    if unknown:
        logger.warning("%s: labels %s are not VerSe vertebra ids", mask.path, unknown)
    return mask


def _canonical_centroids(stored: Volume, canonical: Volume, centroid_path: Path | None) -> dict[int, np.ndarray]:
    """Centroids in voxel coordinates of the canonical grid: from the file where given, else from the mask."""
    present = set(int(v) for v in np.unique(canonical.array)) - {0}
    from_mask = centroids_from_labels(canonical.array)
    if centroid_path is None:
        return from_mask
    read = read_centroids(centroid_path, stored)
    absent = sorted(set(read) - present)
    if absent:
        raise InputDataError(centroid_path, f"centroids of label(s) {', '.join(map(str, absent))} that "
                             f"{stored.path or 'the mask'} does not contain",
                             "is it this mask's centroid file? else compute the centroids from the mask: "
                             "heights without --ctd, preprocess with preprocess.centroids_from=mask")
    centroids: dict[int, np.ndarray] = {}
    for label, voxel in read.items():
        point = world_to_voxel(canonical.affine, voxel_to_world(stored.affine, voxel))[0]
        if np.any(point < -1.0) or np.any(point > np.asarray(canonical.shape)):
            raise InputDataError(centroid_path, f"centroid of label {label} lies outside the image",
                                 "are the coordinates in voxels of the mask?")
        centroids[label] = point
    for label in sorted(present - set(centroids)):
        logger.debug("%s: no centroid for label %d; using its centre of mass", centroid_path, label)
        centroids[label] = from_mask[label]
    return centroids


def load_case(files: CaseFiles, spacing_mm: float | None = 1.0) -> SpineCase:
    """Read one case onto the canonical grid: ``IPL`` orientation, isotropic ``spacing_mm`` voxels.

    With ``spacing_mm=None`` the volumes are only reoriented and keep their stored voxel size.
    The CT is resampled linearly, label maps by nearest neighbour; TotalSegmentator ids become VerSe ids;
    centroids are read and moved onto the new grid, or computed from the mask (centre of mass per label);
    phantom truth (heights table, fracture-free twin) is attached when present.

    Raises:
        InputDataError: a file is missing or unreadable, CT and mask do not share a grid, the label map
            is empty, or the centroid file lists a label the mask lacks or a point outside the image.
    """
    stored_mask = _prepare_mask(read_label_map(files.mask), files.label_scheme)
    labels = to_canonical(stored_mask, spacing_mm, label=True)
    ct = None
    if files.ct is not None:
        stored_ct = read_image(files.ct)
        check_same_grid(stored_mask, stored_ct)
        ct = to_canonical(stored_ct, spacing_mm, label=False)
    centroids = _canonical_centroids(stored_mask, labels, files.centroids)
    truth = _read_truth(files.truth_heights) if files.truth_heights is not None else None
    healthy_ct = healthy_labels = None
    if files.healthy_mask is not None:
        stored_healthy = _prepare_mask(load_volume(files.healthy_mask, label=True), files.label_scheme)
        check_same_grid(stored_mask, stored_healthy)
        healthy_labels = to_canonical(stored_healthy, spacing_mm, label=True)
    if files.healthy_ct is not None:
        stored_healthy_ct = load_volume(files.healthy_ct)
        check_same_grid(stored_mask, stored_healthy_ct)
        healthy_ct = to_canonical(stored_healthy_ct, spacing_mm, label=False)
    case = SpineCase(files.case_id, labels, ct, centroids, files.layout, truth, healthy_ct, healthy_labels,
                     stored_mask.affine)
    logger.debug("loaded %r", case)
    return case


def load_mask_case(mask_path: str | os.PathLike[str], ctd_path: str | os.PathLike[str] | None = None,
                   spacing_mm: float | None = 1.0, label_scheme: str = "auto") -> SpineCase:
    """Read a single label map (and optionally its centroid JSON) as a mask-only case on the canonical grid.

    Args:
        mask_path: vertebra label map (VerSe or TotalSegmentator ids).
        ctd_path: centroid JSON (VerSe form or the paper's), or ``None`` to compute centroids from the mask.
        spacing_mm: isotropic voxel size of the result (``None``: keep the stored one).
        label_scheme: ``verse``, ``totalseg`` or ``auto`` (detected from the ids present).
    """
    mask_path = Path(mask_path)
    name = mask_path.name
    for suffix in (".nii.gz", ".nii"):
        name = name.removesuffix(suffix)
    files = CaseFiles(
        case_id=name.removesuffix("_msk").removesuffix("_seg-vert"),
        subject=name,
        layout="mask",
        mask=mask_path,
        centroids=Path(ctd_path) if ctd_path is not None else None,
        label_scheme=label_scheme,
    )
    return load_case(files, spacing_mm)
