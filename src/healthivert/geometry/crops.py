"""Per-vertebra crops of a straightened spine: windowed CT, body labels and the fixed-height band.

All arrays have axes ``(CC, AP, LR)`` (straightened ``IPL``: row 0 cranial, column 0 anterior, slice
0 right). A crop of ``crop_shape`` is centred on the target body: its centre of mass in CC and LR,
the middle of its antero-posterior extent in AP. Whatever falls outside the straightened volume is
padded (CT with air, i.e. 0 after windowing; labels with 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class VertebraCrop:
    """One target vertebra's crop.

    Attributes:
        vertebra: VerSe id of the target.
        origin: straightened-grid index of the crop's voxel ``(0, 0, 0)`` (may be negative).
        labels: uint8 body labels (VerSe ids) in the crop.
        mask: uint8, 1 on the ``max_height_mm`` rows centred on the target body (full width).
        center_row: crop row at the centre of the band.
        top_row: first crop row of the target body.
        bottom_row: last crop row of the target body.
        above: VerSe id of the adjacent cranial vertebra if its body is in the crop, else ``None``.
        below: VerSe id of the adjacent caudal vertebra if its body is in the crop, else ``None``.
        ct: uint8 windowed CT, or ``None`` when cropping labels only.
    """

    vertebra: int
    origin: tuple[int, int, int]
    labels: np.ndarray
    mask: np.ndarray
    center_row: int
    top_row: int
    bottom_row: int
    above: int | None
    below: int | None
    ct: np.ndarray | None = None


def crop_affine(base: np.ndarray, origin: tuple[int, int, int]) -> np.ndarray:
    """Voxel-to-world matrix of a crop whose first voxel is ``origin`` of a grid with voxel-to-world ``base``."""
    shift = np.eye(4)
    shift[:3, 3] = origin
    return base @ shift


def window_ct(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Map HU linearly from ``hu_window`` to 0..255 (clipped), as ``uint8``; any shape."""
    lo, hi = hu_window
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def extract(volume: np.ndarray, origin: tuple[int, int, int], shape: tuple[int, int, int],
            fill: float | int = 0) -> np.ndarray:
    """The box ``origin .. origin + shape`` of a 3D volume, padded with ``fill`` where it leaves the volume."""
    out = np.full(shape, fill, dtype=volume.dtype)
    src, dst = [], []
    for start, size, extent in zip(origin, shape, volume.shape):
        lo, hi = max(start, 0), min(start + size, extent)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def crop_origin(bodies: np.ndarray, vertebra: int, crop_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Grid index of the first voxel of a crop centred on one body of a ``(CC, AP, LR)`` label volume.

    CC and LR centres are the body's centre of mass, AP the middle of its antero-posterior extent.

    Raises:
        ValueError: the vertebra has no body voxels.
    """
    body = bodies == vertebra
    if not body.any():
        raise ValueError(f"vertebra {vertebra} has no body voxels")
    rows = np.count_nonzero(body, axis=(1, 2))
    slices = np.count_nonzero(body, axis=(0, 1))
    row_centre = float(np.average(np.arange(len(rows)), weights=rows))
    lr_centre = float(np.average(np.arange(len(slices)), weights=slices))
    ap = np.flatnonzero(body.any(axis=(0, 2)))
    ap_centre = (ap[0] + ap[-1]) / 2.0
    centre = (row_centre, ap_centre, lr_centre)
    return tuple(int(np.floor(c + 0.5)) - s // 2 for c, s in zip(centre, crop_shape))  # type: ignore[return-value]


def crop_vertebra(bodies: np.ndarray, vertebra: int, order: list[int], crop_shape: tuple[int, int, int],
                  max_height_mm: float, spacing_mm: float = 1.0, ct_hu: np.ndarray | None = None,
                  hu_window: tuple[float, float] = (-300.0, 1200.0),
                  origin: tuple[int, int, int] | None = None) -> VertebraCrop:
    """Crop one target vertebra out of a straightened spine.

    Args:
        bodies: ``(CC, AP, LR)`` body labels (de-pedicled) of the whole straightened spine.
        vertebra: VerSe id of the target.
        order: the vertebrae of the scan, cranial first (defines ``above`` and ``below``).
        crop_shape: ``(CC, AP, LR)`` voxels.
        max_height_mm: height of the mask band.
        spacing_mm: isotropic voxel size of ``bodies``.
        ct_hu: optional ``(CC, AP, LR)`` HU on the same grid (air outside the scan).
        hu_window: HU mapped to 0 and 255.
        origin: reuse a crop position (e.g. the fractured scan's for its healthy twin); by default
            :func:`crop_origin`.

    Raises:
        ValueError: the target body is not inside the crop.
    """
    if origin is None:
        origin = crop_origin(bodies, vertebra, crop_shape)
    labels = extract(bodies, origin, crop_shape, 0).astype(np.uint8)
    target_rows = np.flatnonzero((labels == vertebra).any(axis=(1, 2)))
    if target_rows.size == 0:
        raise ValueError(f"vertebra {vertebra} is not inside its crop")
    top, bottom = int(target_rows[0]), int(target_rows[-1])
    band = max(1, int(round(max_height_mm / spacing_mm)))
    centre = (top + bottom + 1) // 2
    first = centre - band // 2
    mask = np.zeros(crop_shape, dtype=np.uint8)
    mask[max(first, 0):max(first + band, 0)] = 1
    present = set(np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).tolist()) - {0}
    position = order.index(vertebra)
    above = order[position - 1] if position > 0 and order[position - 1] in present else None
    below = order[position + 1] if position + 1 < len(order) and order[position + 1] in present else None
    ct = None
    if ct_hu is not None:
        ct = window_ct(extract(ct_hu, origin, crop_shape, hu_window[0]), hu_window)
    return VertebraCrop(vertebra, tuple(int(o) for o in origin), labels, mask, centre, top, bottom,  # type: ignore[arg-type]
                        above, below, ct)

