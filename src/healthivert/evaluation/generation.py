"""Generation quality of a synthesised vertebra against a reference (healthy truth or a real healthy one).

Arrays are straightened crops ``(CC, AP, LR)``: axis 0 cranio-caudal (row 0 cranial), axis 1
antero-posterior (column 0 anterior), axis 2 right -> left; CT windowed to 0..255.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from healthivert.geometry.morphometry import heights_on, select_columns

DATA_RANGE = 255.0
#: PSNR reported for identical images (finite, so averages and JSON stay valid).
MAX_PSNR_DB = 100.0


@dataclasses.dataclass(frozen=True)
class GenerationScores:
    """How close a synthesised vertebra is to its reference.

    Attributes:
        psnr_db: PSNR of the CT over the evaluated region (dB, data range 255; at most 100).
        ssim: SSIM of the CT over the evaluated region.
        dice: Dice of the target's label over the whole crop.
        height_error_mm: synthesised minus reference body height, on the reference's columns.
    """

    psnr_db: float
    ssim: float
    dice: float
    height_error_mm: float


def evaluation_region(band: np.ndarray, reference_label: np.ndarray) -> tuple[slice, slice, slice]:
    """The synthesised region: the rows of the fixed-height band over the reference body's LR extent.

    Args:
        band: ``(CC, AP, LR)`` mask of the band that the generator fills (non-zero inside).
        reference_label: ``(CC, AP, LR)`` boolean mask of the reference target.
    """
    rows = np.flatnonzero(np.asarray(band).any(axis=(1, 2)))
    lr = np.flatnonzero(reference_label.any(axis=(0, 1)))
    if rows.size == 0 or lr.size == 0:
        raise ValueError("empty band or reference label")
    return slice(rows[0], rows[-1] + 1), slice(None), slice(lr[0], lr[-1] + 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def generation_scores(syn_ct: np.ndarray, ref_ct: np.ndarray, syn_label: np.ndarray, ref_label: np.ndarray,
                      band: np.ndarray, spacing_mm: tuple[float, float, float]) -> GenerationScores:
    """PSNR, SSIM, Dice and height error of one synthesised vertebra.

    Args:
        syn_ct, ref_ct: windowed CT ``(CC, AP, LR)`` in 0..255.
        syn_label, ref_label: boolean target masks on the same grid.
        band: the generator's fixed-height band, ``(CC, AP, LR)``.
        spacing_mm: voxel size ``(CC, AP, LR)``.
    """
    region = evaluation_region(band, ref_label)
    syn_part = np.asarray(syn_ct, dtype=np.float64)[region]
    ref_part = np.asarray(ref_ct, dtype=np.float64)[region]
    if np.array_equal(syn_part, ref_part):
        psnr = MAX_PSNR_DB
    else:
        psnr = min(float(peak_signal_noise_ratio(ref_part, syn_part, data_range=DATA_RANGE)), MAX_PSNR_DB)
    window = min(7, *(s if s % 2 else s - 1 for s in syn_part.shape))
    ssim = float(structural_similarity(ref_part, syn_part, data_range=DATA_RANGE, win_size=max(window, 3)))
    columns = select_columns(ref_label, spacing_mm=spacing_mm)
    error = heights_on(syn_label, columns, spacing_mm).body_mm - heights_on(ref_label, columns, spacing_mm).body_mm
    return GenerationScores(psnr, ssim, dice(syn_label, ref_label), float(error))
