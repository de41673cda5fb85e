"""One spine scan as the library sees it: canonical orientation, isotropic grid, VerSe labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from healthivert.io.nifti import Volume


@dataclasses.dataclass(frozen=True, eq=False)
class SpineCase:
    """A spine CT (optional) and its vertebra label map on one canonical grid.

    All volumes are reoriented to ``IPL`` (axis 0 superior->inferior, axis 1 anterior->posterior,
    axis 2 right->left) and resampled to the requested isotropic spacing.

    Attributes:
        case_id: patient / scan identifier, e.g. ``"sub-verse004"``.
        labels: int32 VerSe vertebra ids (0 background), whole vertebrae (posterior elements included).
        ct: float32 HU on the same grid, or ``None`` for mask-only cases.
        centroids: VerSe id -> voxel coordinates ``(i, j, k)`` in the grid of ``labels``.
        layout: the dataset layout it was read from (``verse``, ``paper``, ``totalsegmentator``).
        truth: phantom ground truth (``heights.csv`` rows), or ``None`` for real data.
        healthy_ct: phantom only: the same spine without fractures.
        healthy_labels: phantom only: its labels.
    """

    case_id: str
    labels: Volume
    ct: Volume | None
    centroids: dict[int, np.ndarray]
    layout: str
    truth: pd.DataFrame | None = None
    healthy_ct: Volume | None = None
    healthy_labels: Volume | None = None

    @property
    def vertebrae(self) -> list[int]:
        """VerSe ids present in the label map, cranial to caudal (by centroid row)."""
        return sorted(self.centroids, key=lambda v: self.centroids[v][0])

    def __repr__(self) -> str:
        return (
            f"SpineCase({self.case_id}, layout={self.layout}, vertebrae={self.vertebrae}, "
            f"ct={'yes' if self.ct is not None else 'no'}, truth={'yes' if self.truth is not None else 'no'})"
        )
