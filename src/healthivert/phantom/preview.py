"""A picture of a phantom case for a quick look: mid-sagittal CT, labels, healthy twin and their difference."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from healthivert.io.case import SpineCase


def preview_figure(case: SpineCase, hu_window: tuple[float, float] = (-300.0, 1200.0)) -> Figure:
    """Four mid-sagittal panels of a canonical (``IPL``) case: CT, labels, healthy CT, CT difference.

    The sagittal slice is ``volume[:, :, k]`` (rows superior -> inferior, columns anterior -> posterior)
    at the mean left-right position of the centroids; fractured vertebrae are named with their grade.
    """
    k = int(round(np.mean([c[2] for c in case.centroids.values()])))
    panels = [("CT", case.ct, "gray"), ("labels", case.labels, "nipy_spectral")]
    if case.healthy_ct is not None:
        panels.append(("healthy twin", case.healthy_ct, "gray"))
    count = len(panels) + (case.healthy_ct is not None and case.ct is not None)
    figure = Figure(figsize=(3.2 * count, 6))
    axes = figure.subplots(1, count, squeeze=False)
    for ax, (title, volume, cmap) in zip(axes[0], panels):
        if volume is None:
            ax.set_axis_off()
            continue
        limits = dict(vmin=hu_window[0], vmax=hu_window[1]) if cmap == "gray" else {}
        ax.imshow(volume.array[:, :, k], cmap=cmap, interpolation="nearest", **limits)
        ax.set_title(title)
    if case.healthy_ct is not None and case.ct is not None:
        ax = axes[0][-1]
        ax.imshow(case.healthy_ct.array[:, :, k] - case.ct.array[:, :, k], cmap="magma", vmin=0, vmax=800)
        ax.set_title("healthy - CT")
    if case.truth is not None:
        for row in case.truth[case.truth["grade"] > 0].itertuples():
            centre = case.centroids.get(int(row.vertebra))
            if centre is not None:
                axes[0][0].annotate(f"{row.name} G{row.grade} {row.fracture_type}", (centre[1], centre[0]),
                                    xytext=(2, 0), textcoords="offset fontsize", color="yellow", fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(f"{case.case_id}: mid-sagittal slice (rows cranial -> caudal, columns anterior -> posterior)", fontsize=9)
    figure.tight_layout()
    return figure
