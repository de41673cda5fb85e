"""Bring volumes onto the canonical grid: reorient to ``IPL`` and resample to isotropic voxels.

``IPL``: axis 0 superior -> inferior, axis 1 anterior -> posterior, axis 2 right -> left.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

from healthivert.io.nifti import Volume

CANONICAL = ("I", "P", "L")
_IDENTITY = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])  # nibabel orientation transform that changes nothing


def reorient(volume: Volume, axcodes: tuple[str, str, str] | str = CANONICAL) -> Volume:
    """Permute and flip the axes of a volume (no interpolation) so they point towards ``axcodes``.

    Args:
        volume: any 3D volume.
        axcodes: target direction of each axis, e.g. ``"IPL"`` (the canonical one) or ``"RAS"``.

    Returns:
        The same voxels in the new axis order, with the affine that keeps their world positions.
    """
    current = ornt.io_orientation(volume.affine)
    target = ornt.axcodes2ornt(tuple(axcodes))
    transform = ornt.ornt_transform(current, target)
    if np.array_equal(transform, _IDENTITY):
        return volume
    array = np.ascontiguousarray(ornt.apply_orientation(volume.array, transform))
    affine = volume.affine @ ornt.inv_ornt_aff(transform, volume.array.shape)
    return Volume(array, affine, volume.path)


def resample_isotropic(volume: Volume, spacing_mm: float, *, label: bool) -> Volume:
    """Resample a volume to cubic voxels of ``spacing_mm``, keeping its axis order and field of view.

    The first voxel corner stays in place; the number of voxels along an axis is the extent divided by
    the new spacing, rounded. Labels use nearest neighbour, images linear interpolation.

    Args:
        volume: a volume with any axis order (usually already canonical).
        spacing_mm: target voxel size.
        label: nearest-neighbour interpolation (label maps) instead of linear.
    """
    old = np.asarray(volume.spacing_mm)
    if np.allclose(old, spacing_mm, rtol=0.0, atol=1e-3):
        return volume
    ratio = spacing_mm / old  # old voxels per new voxel
    shape = tuple(max(1, int(round(n / r))) for n, r in zip(volume.shape, ratio))
    offset = 0.5 * ratio - 0.5  # new voxel centre (index 0) in old voxel coordinates
    array = ndimage.affine_transform(
        volume.array, ratio, offset=offset, output_shape=shape, order=0 if label else 1, mode="nearest",
    )
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = offset
    return Volume(array, volume.affine @ step, volume.path)


def world_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` of world (RAS+, mm) points ``(N, 3)`` under ``affine``."""
    points = np.atleast_2d(np.asarray(points_mm, dtype=np.float64))
    return (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T).T[:, :3]


def voxel_to_world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """World (RAS+, mm) positions ``(N, 3)`` of voxel coordinates ``(N, 3)`` under ``affine``."""
    voxels = np.atleast_2d(np.asarray(voxels, dtype=np.float64))
    return (affine @ np.c_[voxels, np.ones(len(voxels))].T).T[:, :3]


def to_canonical(volume: Volume, spacing_mm: float | None, *, label: bool) -> Volume:
    """Reorient to ``IPL`` and, when ``spacing_mm`` is given, resample to that isotropic spacing."""
    volume = reorient(volume, CANONICAL)
    return volume if spacing_mm is None else resample_isotropic(volume, spacing_mm, label=label)
