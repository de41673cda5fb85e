"""NIfTI volumes as small typed objects, read with checks and written atomically.

Arrays are indexed in voxel order ``(i, j, k)`` of the file; :func:`orientation` gives the anatomical
direction of each axis (nibabel's axis codes, e.g. ``("I", "P", "L")``).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from healthivert.errors import InputDataError
from healthivert.io.atomic import atomic_path


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image and its voxel-to-world (RAS+, mm) affine.

    Attributes:
        array: voxel data, axis order as stored in the file.
        affine: 4x4 voxel-to-world matrix.
        path: where it was read from, for error messages (``None`` for in-memory volumes).
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along each array axis, in mm."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Anatomical direction each array axis increases towards, e.g. ``("I", "P", "L")``."""
        return orientation(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, other voxels (shapes must match)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from {self.array.shape}")
        return Volume(array, self.affine, self.path)

    def __repr__(self) -> str:
        name = self.path.name if self.path else "<memory>"
        return (
            f"Volume({name}, shape={self.shape}, dtype={self.array.dtype}, "
            f"orientation={''.join(self.orientation)}, spacing_mm={tuple(round(s, 3) for s in self.spacing_mm)})"
        )


def orientation(affine: np.ndarray) -> tuple[str, str, str]:
    """Axis codes of an affine (nibabel convention: the direction each axis increases towards)."""
    return tuple(nib.aff2axcodes(affine))  # type: ignore[return-value]


def load_volume(path: str | os.PathLike[str], *, label: bool = False) -> Volume:
    """Read a 3D NIfTI file, checking everything a user could get wrong.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        label: if true, the voxels must be whole non-negative numbers and are returned as ``int32``;
            otherwise they are returned as ``float32``.

    Raises:
        InputDataError: missing, unreadable, truncated, not 3D, not finite, or (labels) not integral.
    """
    path = Path(path)
    if not path.exists():
        raise InputDataError(path, "file not found")
    if path.is_dir():
        raise InputDataError(path, "is a folder, expected a NIfTI file")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for foreign files
        raise InputDataError(path, "not a readable NIfTI file", type(exc).__name__ + ": " + str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputDataError(path, f"not a NIfTI image ({type(image).__name__})")
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InputDataError(path, "truncated or corrupt image data", str(exc).splitlines()[0] if str(exc) else None) from exc
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise InputDataError(path, f"expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputDataError(path, "invalid affine (not finite or singular)")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InputDataError(path, f"contains {int(np.count_nonzero(~np.isfinite(data)))} NaN or infinite voxels")
    if label:
        if data.dtype.kind == "f":
            rounded = np.rint(data)
            if not np.allclose(rounded, data, atol=1e-3):
                raise InputDataError(path, "label map has non-integer values", "is this an image rather than a mask?")
            data = rounded
        if data.size and data.min() < 0:
            raise InputDataError(path, "label map has negative labels")
        return Volume(data.astype(np.int32), affine, path)
    return Volume(data.astype(np.float32), affine, path)


def save_volume(path: str | os.PathLike[str], volume: Volume | np.ndarray, affine: np.ndarray | None = None,
                *, stored_dtype: type[np.generic] | None = None) -> Path:
    """Write a volume atomically; the dtype of the array is kept (labels stay integers) unless ``stored_dtype``.

    Args:
        path: target ``.nii.gz`` file.
        volume: a :class:`Volume`, or an array together with ``affine``.
        affine: voxel-to-world matrix when ``volume`` is an array.
        stored_dtype: type on disk, e.g. ``np.uint8`` for a float map: nibabel quantises it over its
            range (256 levels) with the header's slope and intercept, which :func:`load_volume` applies.
    """
    if isinstance(volume, Volume):
        array, affine = volume.array, volume.affine
    else:
        if affine is None:
            raise ValueError("an affine is needed to save an array")
        array = volume
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    image = nib.Nifti1Image(array, affine)
    if stored_dtype is not None:
        image.set_data_dtype(stored_dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def check_same_grid(a: Volume, b: Volume) -> None:
    """Raise if two volumes do not share shape and affine (e.g. a CT and its mask)."""
    if a.shape != b.shape:
        raise InputDataError(b.path or "<memory>", f"shape {b.shape} differs from {a.shape} of {a.path.name if a.path else 'the image'}")
    if not np.allclose(a.affine, b.affine, atol=1e-3):
        raise InputDataError(
            b.path or "<memory>",
            f"affine differs from that of {a.path.name if a.path else 'the image'}",
            "CT and mask must share one voxel grid",
        )
