"""The per-vertebra pictures of ``report.html``, composed as RGB arrays (no matplotlib figure).

A matplotlib figure per vertebra (layout, axes, contour, colour bar) cost 0.8 s on the 2-core
benchmark machine, more than grading the vertebra; these arrays take milliseconds and the HTML
around them carries the titles and the legend.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.image import imsave

from healthivert.rhlv.figures import LOSS_RANGE

ORIGINAL_OUTLINE = (255, 127, 0)
SYNTHESISED_OUTLINE = (77, 175, 74)
NOT_MEASURED_GREY = (221, 221, 221)
#: colour map of height-loss maps (as :func:`healthivert.rhlv.figures.draw_height_loss`).
LOSS_COLOURS = "magma_r"
#: pixels per voxel in the pictures.
ZOOM = 2
GAP_PX = 8


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG of an ``(H, W, 3)`` uint8 image."""
    buffer = io.BytesIO()
    imsave(buffer, rgb, format="png")
    return buffer.getvalue()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _grey_with_outline(ct_u8: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    rgb = np.repeat(ct_u8[:, :, None], 3, axis=2).astype(np.uint8)
    rgb[_outline(mask)] = colour
    return rgb


def loss_colours(loss_map: np.ndarray) -> np.ndarray:
    """``(AP, LR)`` height-loss map -> RGB (magma, 0 to 60 %, clipped; grey where not measured)."""
    lut = (colormaps[LOSS_COLOURS](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    finite = np.isfinite(loss_map)
    scaled = (np.nan_to_num(loss_map) - LOSS_RANGE[0]) / (LOSS_RANGE[1] - LOSS_RANGE[0])
    rgb = lut[np.clip(np.rint(scaled * 255), 0, 255).astype(np.intp)]
    rgb[~finite] = NOT_MEASURED_GREY
    return rgb


def loss_colour_bar(width: int = 240, height: int = 12) -> bytes:
    """PNG of the height-loss colour scale, ``LOSS_RANGE`` left to right."""
    ramp = np.linspace(LOSS_RANGE[0], LOSS_RANGE[1], width)[None, :].repeat(height, axis=0)
    return png_bytes(loss_colours(ramp))


def _zoom(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(rgb, ZOOM, axis=0), ZOOM, axis=1)


def vertebra_strip(original_ct: np.ndarray, synthesised_ct: np.ndarray, original_label: np.ndarray,
                   synthesised_label: np.ndarray, loss_map: np.ndarray) -> np.ndarray:
    """Original and pseudo-healthy sagittal slices with the target outlined, then the height-loss map.

    Args:
        original_ct, synthesised_ct: sagittal slices ``(CC, AP)`` (row 0 cranial, column 0 anterior), 0..255.
        original_label, synthesised_label: boolean target masks of those slices.
        loss_map: ``(AP, LR)`` height-loss map (NaN outside the body), shown anterior at the top,
            the patient's right on the left.

    Returns:
        ``(H, W, 3)`` uint8, the three pictures side by side on white, isotropic voxels zoomed x2.
    """
    both = original_label | synthesised_label
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    if rows.size == 0:
        rows = cols = np.array([0, original_ct.shape[0] - 1])
    r0, r1 = max(rows[0] - 25, 0), min(rows[-1] + 26, original_ct.shape[0])
    c0, c1 = max(cols[0] - 20, 0), min(cols[-1] + 21, original_ct.shape[1])
    window = (slice(r0, r1), slice(c0, c1))
    pictures = [_grey_with_outline(original_ct[window], original_label[window], ORIGINAL_OUTLINE),
                _grey_with_outline(synthesised_ct[window], synthesised_label[window], SYNTHESISED_OUTLINE)]
    inside = np.argwhere(np.isfinite(loss_map))
    if inside.size:
        (a0, l0), (a1, l1) = inside.min(axis=0), inside.max(axis=0)
        loss_map = loss_map[max(a0 - 3, 0):a1 + 4, max(l0 - 3, 0):l1 + 4]
    pictures.append(loss_colours(loss_map))
    pictures = [_zoom(p) for p in pictures]
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + GAP_PX * (len(pictures) - 1)
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    left = 0
    for picture in pictures:
        strip[:picture.shape[0], left:left + picture.shape[1]] = picture
        left += picture.shape[1] + GAP_PX
    return strip
