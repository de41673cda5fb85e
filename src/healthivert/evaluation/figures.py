"""Evaluation figures: confusion matrices, RHLV against the truth, and per-vertebra panels."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from healthivert.grading.metrics import GRADES
from healthivert.rhlv.figures import LOSS_RANGE, draw_height_loss

GRADE_NAMES = ("0 normal", "1 mild", "2 moderate", "3 severe")


def figure_png(figure: Figure) -> bytes:
    """PNG bytes of a figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def confusion_figure(confusions: dict[str, np.ndarray]) -> Figure:
    """Side-by-side confusion matrices ``(4, 4)`` (rows true grade, columns predicted), one per method."""
    figure = Figure(figsize=(4.2 * len(confusions), 3.9), dpi=100)
    for index, (method, confusion) in enumerate(confusions.items()):
        axes = figure.add_subplot(1, len(confusions), index + 1)
        axes.imshow(confusion, cmap="Blues", vmin=0)
        for (i, j), count in np.ndenumerate(confusion):
            axes.text(j, i, str(int(count)), ha="center", va="center",
                      color="white" if count > confusion.max() / 2 else "black")
        axes.set_xticks(range(len(GRADES)), [str(g) for g in GRADES])
        axes.set_yticks(range(len(GRADES)), GRADE_NAMES)
        axes.set_xlabel("predicted grade")
        axes.set_ylabel("true grade")
        axes.set_title(method)
    figure.tight_layout()
    return figure


def rhlv_truth_figure(table: pd.DataFrame) -> Figure:
    """Measured loss against the true loss per third: RHLV and, where present, the mask-only baseline.

    Args:
        table: rows with ``truth_loss_<third>``, ``rhlv_<third>`` and optionally ``baseline_loss_<third>``.
    """
    figure = Figure(figsize=(11, 3.8), dpi=100)
    for index, third in enumerate(("ant", "mid", "post")):
        axes = figure.add_subplot(1, 3, index + 1)
        truth = table[f"truth_loss_{third}"]
        axes.plot([0, 0.7], [0, 0.7], color="grey", linewidth=1, label="identity")
        for threshold in (0.2, 0.25, 0.4):
            axes.axvline(threshold, color="#cccccc", linewidth=0.8, linestyle=":")
        if f"baseline_loss_{third}" in table:
            axes.scatter(truth, table[f"baseline_loss_{third}"], s=12, marker="x", color="#d95f02",
                         label="mask-only baseline")
        axes.scatter(truth, table[f"rhlv_{third}"], s=14, color="#1b9e77", label="RHLV (GAN)")
        axes.set_xlabel(f"true height loss, {third} third")
        axes.set_ylabel("measured")
        axes.set_xlim(-0.05, 0.75)
        axes.set_ylim(-0.15, 1.05)
        if index == 0:
            axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    return figure


def vertebra_panel(original_ct: np.ndarray, synthesised_ct: np.ndarray, original_label: np.ndarray,
                   synthesised_label: np.ndarray, loss_map: np.ndarray, spacing_mm: tuple[float, float, float],
                   title: str) -> Figure:
    """Original and pseudo-healthy mid-sagittal slices with the target outlined, and the height-loss map.

    Args:
        original_ct, synthesised_ct: sagittal slices ``(CC, AP)`` (row 0 cranial, column 0 anterior), 0..255.
        original_label, synthesised_label: boolean target masks of those slices.
        loss_map: ``(AP, LR)`` height-loss map (NaN outside the body).
        spacing_mm: crop voxel size ``(CC, AP, LR)``.
        title: shown above the panels.
    """
    figure = Figure(figsize=(10.5, 3.6), dpi=90)
    rows = np.flatnonzero((original_label | synthesised_label).any(axis=1))
    cols = np.flatnonzero((original_label | synthesised_label).any(axis=0))
    r0, r1 = max(rows[0] - 25, 0), min(rows[-1] + 26, original_ct.shape[0])
    c0, c1 = max(cols[0] - 20, 0), min(cols[-1] + 21, original_ct.shape[1])
    aspect = spacing_mm[0] / spacing_mm[1]
    for index, (name, ct, label, colour) in enumerate((
            ("original", original_ct, original_label, "#ff7f00"),
            ("pseudo-healthy (synthesised)", synthesised_ct, synthesised_label, "#4daf4a"))):
        axes = figure.add_subplot(1, 3, index + 1)
        axes.imshow(ct[r0:r1, c0:c1], cmap="gray", vmin=0, vmax=255, aspect=aspect)
        axes.contour(label[r0:r1, c0:c1].astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
        axes.set_title(name, fontsize=10)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel("anterior  <->  posterior", fontsize=8)
    axes = figure.add_subplot(1, 3, 3)
    image = draw_height_loss(axes, loss_map, (spacing_mm[1], spacing_mm[2]))
    figure.colorbar(image, ax=axes, extend="max", fraction=0.046).set_label(
        f"height loss ({LOSS_RANGE[0]:.0%}-{LOSS_RANGE[1]:.0%})", fontsize=8)
    axes.set_title("height-loss map (axial)", fontsize=10)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return figure
