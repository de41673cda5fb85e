"""Vertebra centroid files (VerSe and the paper's JSON) and centroids computed from label maps.

Two JSON forms are read:

- VerSe'19/'20 (``*_seg-subreg_ctd.json``): a list whose first entry is ``{"direction": ["P", "I", "R"]}``
  and the rest ``{"label", "X", "Y", "Z"}`` in voxel units of the scan reoriented to that direction;
- the paper's raw layout (``<id>.json`` / ``<id>_ctd.json``): the same entries without a direction
  entry, in voxel coordinates of the mask as stored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

from healthivert.errors import InputDataError
from healthivert.io.atomic import write_text_atomic
from healthivert.io.nifti import Volume

_AXIS_CODES = set("LRAPSI")


def read_centroids(path: str | os.PathLike[str], reference: Volume) -> dict[int, np.ndarray]:
    """Read a centroid JSON file and express it in voxel coordinates of ``reference`` as stored.

    Args:
        path: centroid file (VerSe form with a direction entry, or the paper's plain list).
        reference: the label map (or CT) the centroids belong to, in its stored orientation.

    Returns:
        label -> ``(i, j, k)`` float voxel coordinates in ``reference``'s array.

    Raises:
        InputDataError: missing file, not JSON, malformed entries, or a direction that is not 3 axis codes.
    """
    path = Path(path)
    if not path.exists():
        raise InputDataError(path, "centroid file not found")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputDataError(path, "not valid JSON", str(exc)) from exc
    if not isinstance(entries, list):
        raise InputDataError(path, "expected a list of centroid entries", 'e.g. [{"label": 20, "X": .., "Y": .., "Z": ..}]')
    direction: tuple[str, ...] | None = None
    points: dict[int, np.ndarray] = {}
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputDataError(path, f"entry {number} is not an object")
        if "direction" in entry:
            codes = tuple(str(c).upper() for c in entry["direction"])
            if len(codes) != 3 or not set(codes) <= _AXIS_CODES:
                raise InputDataError(path, f"invalid direction {entry['direction']!r}", "expected three axis codes like P, I, R")
            direction = codes
            continue
        try:
            label = int(entry["label"])
            point = np.array([float(entry["X"]), float(entry["Y"]), float(entry["Z"])])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputDataError(path, f"entry {number} lacks a numeric label, X, Y or Z") from exc
        if not np.all(np.isfinite(point)):
            raise InputDataError(path, f"centroid of label {label} is not finite")
        points[label] = point
    if direction is not None and points:
        current = ornt.io_orientation(reference.affine)
        transform = ornt.ornt_transform(current, ornt.axcodes2ornt(direction))
        back = ornt.inv_ornt_aff(transform, reference.shape)  # reoriented voxel -> stored voxel
        points = {label: (back @ np.r_[p, 1.0])[:3] for label, p in points.items()}
    return points


def centroids_from_labels(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Centre of mass ``(i, j, k)`` (voxel units, array order) of every non-zero label of a label map."""
    ids = [int(v) for v in np.unique(labels) if v != 0]
    if not ids:
        return {}
    centres = ndimage.center_of_mass(np.ones(labels.shape, dtype=np.uint8), labels, ids)
    return {vid: np.asarray(c, dtype=np.float64) for vid, c in zip(ids, centres)}


def write_centroids(path: str | os.PathLike[str], centroids: dict[int, np.ndarray], reference: Volume,
                    direction: tuple[str, str, str] = ("P", "I", "R")) -> Path:
    """Write centroids in the VerSe form (atomically).

    Args:
        path: target ``*_ctd.json``.
        centroids: label -> ``(i, j, k)`` voxel coordinates in ``reference``'s stored array.
        reference: the volume the coordinates refer to.
        direction: axis codes of the reoriented grid the file's coordinates are given in (VerSe: PIR).
    """
    transform = ornt.ornt_transform(ornt.io_orientation(reference.affine), ornt.axcodes2ornt(direction))
    forward = np.linalg.inv(ornt.inv_ornt_aff(transform, reference.shape))  # stored voxel -> reoriented voxel
    entries: list[dict[str, object]] = [{"direction": list(direction)}]
    for label in sorted(centroids):
        x, y, z = (forward @ np.r_[np.asarray(centroids[label], dtype=np.float64), 1.0])[:3]
        entries.append({"label": int(label), "X": round(float(x), 3), "Y": round(float(y), 3), "Z": round(float(z), 3)})
    path = Path(path)
    write_text_atomic(path, json.dumps(entries, indent=1) + "\n")
    return path
