"""Figures of RHLV results: the cross-sectional height-loss map a reader can interpret at a glance."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

#: colour scale of height-loss maps: 0 (no loss) to 60 % (severe), values beyond are clipped.
LOSS_RANGE = (0.0, 0.6)


def draw_height_loss(axes: Axes, loss_map: np.ndarray, spacing_mm: tuple[float, float] = (1.0, 1.0),
                     crop: bool = True):
    """Draw a height-loss map on ``axes``, anterior at the top, right on the left; returns the image.

    Args:
        axes: matplotlib axes.
        loss_map: ``(AP, LR)`` per-column ``(H_syn - H_ori) / H_syn`` (row 0 anterior, column 0
            right), NaN outside the synthesised body.
        spacing_mm: ``(AP, LR)`` voxel size, for a true-to-scale aspect and mm axes.
        crop: show only the body's bounding box plus a small margin.
    """
    shown = np.asarray(loss_map, dtype=np.float64)
    ap0, lr0 = 0, 0
    inside = np.argwhere(np.isfinite(shown))
    if crop and inside.size:
        (ap0, lr0), (ap1, lr1) = inside.min(axis=0), inside.max(axis=0)
        ap0, lr0 = max(ap0 - 3, 0), max(lr0 - 3, 0)
        shown = shown[ap0:ap1 + 4, lr0:lr1 + 4]
    extent = (lr0 * spacing_mm[1], (lr0 + shown.shape[1]) * spacing_mm[1],
              (ap0 + shown.shape[0]) * spacing_mm[0], ap0 * spacing_mm[0])
    image = axes.imshow(np.ma.masked_invalid(shown), cmap="magma_r", vmin=LOSS_RANGE[0], vmax=LOSS_RANGE[1],
                        extent=extent, interpolation="nearest")
    axes.set_facecolor("#dddddd")
    axes.set_xlabel("LR (mm), patient's right on the left")
    axes.set_ylabel("AP (mm)")
    for text, y, va in (("anterior", 0.98, "top"), ("posterior", 0.02, "bottom")):
        axes.text(0.02, y, text, transform=axes.transAxes, va=va, ha="left", fontsize=8,
                  bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    return image


def height_loss_figure(loss_map: np.ndarray, spacing_mm: tuple[float, float] = (1.0, 1.0),
                       title: str = "", crop: bool = True) -> Figure:
    """Colour-mapped height-loss map over the axial plane with a colour bar (see :func:`draw_height_loss`)."""
    figure = Figure(figsize=(4.6, 4.0), dpi=90)
    axes = figure.add_axes((0.15, 0.12, 0.56, 0.78))  # fixed layout: tight_layout costs more than the drawing
    colour_axes = figure.add_axes((0.76, 0.12, 0.04, 0.78))
    image = draw_height_loss(axes, loss_map, spacing_mm, crop)
    figure.colorbar(image, cax=colour_axes, extend="max").set_label("height loss (H_syn - H_ori) / H_syn")
    if title:
        axes.set_title(title, fontsize=10)
    return figure
