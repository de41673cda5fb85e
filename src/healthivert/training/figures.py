"""Figures drawn during training (a grid of input | output | truth slices; matplotlib, no pyplot) and the
metric sinks that file them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

from healthivert.config import View

from healthivert.io.atomic import atomic_path
from healthivert.training.baselines import Prediction
from healthivert.training.loop import MetricSink


def sample_grid(batch: dict[str, torch.Tensor], prediction: Prediction, count: int = 4, title: str = "") -> Figure:
    """One row per sample: closed-up input (band shaded), synthesised output, real slice.

    Images are ``(B, 1, H, W)`` with rows cranio-caudal (cranial at the top); the target's outline
    (output: synthesised segmentation; truth: real label) is drawn in red.

    Args:
        batch: samples as :class:`healthivert.data.dataset.SliceDataset` gives them.
        prediction: the model's re-assembled output for ``batch``.
        count: rows drawn (at most the batch size).
        title: figure title.
    """
    count = min(count, int(batch["ct"].shape[0]))
    figure = Figure(figsize=(7.5, 2.5 * count))  # no pyplot: no GUI backend, nothing kept alive globally
    axes = figure.subplots(count, 3, squeeze=False)
    for i in range(count):
        ct_in = batch["ct"][i, 0].float().cpu()
        mask = batch["mask"][i, 0].float().cpu()
        panels = [
            (ct_in, mask, "input"),
            (prediction.ct[i, 0].float().detach().cpu(), prediction.seg[i, 0].float().detach().cpu(),
             f"output (h={float(prediction.height[i]):.0f})"),
            (batch["real_ct"][i, 0].float().cpu(), batch["real_target"][i, 0].float().cpu(),
             f"truth (h={float(batch['height'][i]):.0f})"),
        ]
        for ax, (image, overlay, label) in zip(axes[i], panels):
            ax.imshow(image.numpy(), cmap="gray", vmin=-1, vmax=1)
            if label == "input":
                ax.imshow(overlay.numpy(), cmap="Blues", alpha=0.3 * overlay.numpy(), vmin=0, vmax=1)
            else:
                ax.contour(overlay.numpy(), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(label, fontsize=8)
            ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


class FolderSink:
    """A metric sink that also keeps every figure as a PNG in a folder (atomically), then forwards it.

    Args:
        folder: where figures go (``name`` may contain sub-folders).
        inner: the sink to forward metrics and figures to (e.g. a ``StageTracker``), or ``None``.
    """

    def __init__(self, folder: str | os.PathLike[str], inner: MetricSink | None = None) -> None:
        self.folder = Path(folder)
        self.inner = inner

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Forward metrics."""
        if self.inner is not None:
            self.inner.log_metrics(metrics, step=step)

    def log_figure(self, figure: Figure, name: str) -> None:
        """Save ``figure`` as ``folder/name`` and forward it."""
        with atomic_path(self.folder / name) as tmp:
            figure.savefig(tmp, dpi=100, format="png")
        if self.inner is not None:
            self.inner.log_figure(figure, name)


def view_key(key: str, view: View) -> str:
    """The name of a metric or figure of a view that is not a stage's first: the view after the first segment.

    ``val/model/dice`` -> ``val/coronal/model/dice``, ``samples/fine_epoch_001.png`` ->
    ``samples/coronal/fine_epoch_001.png``, ``epoch`` -> ``coronal/epoch``.
    """
    head, slash, rest = key.partition("/")
    return f"{head}/{view}/{rest}" if slash else f"{view}/{key}"


class ViewSink:
    """A metric sink that forwards everything under :func:`view_key` names (the views of a stage share one MLflow run).

    Args:
        inner: the sink to forward to.
        view: the view whose training reports through this sink.
    """

    def __init__(self, inner: MetricSink, view: View) -> None:
        self.inner = inner
        self.view = view

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Forward metrics under the view's names."""
        self.inner.log_metrics({view_key(k, self.view): v for k, v in metrics.items()}, step=step)

    def log_figure(self, figure: Figure, name: str) -> None:
        """Forward a figure under the view's name."""
        self.inner.log_figure(figure, view_key(name, self.view))
