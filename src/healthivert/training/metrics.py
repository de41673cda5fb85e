"""Validation metrics of a synthesised slice against the real one (held-out healthy vertebrae).

Images are ``(B, 1, H, W)`` tensors in the frame of ``real_ct`` (rows cranio-caudal), CT in [-1, 1].
"""

from __future__ import annotations

import torch

from healthivert.training.baselines import Prediction

METRIC_NAMES = ("mae_hu", "dice", "height_error_mm")


def sample_metrics(prediction: Prediction, batch: dict[str, torch.Tensor], seg_key: str = "real_target"
                   ) -> dict[str, torch.Tensor]:
    """Per-sample metrics, each ``(B,)``.

    * ``mae_hu``: mean absolute CT error over the masked band, in HU (the window of the sample's crop).
    * ``dice``: Dice of the synthesised segmentation (probability > 0.5) against ``batch[seg_key]``
      (the real target; the coarse stage segments the healthy neighbours, ``real_neighbours``).
    * ``height_error_mm``: absolute error of the predicted height, mm.
    """
    mask = batch["mask"].float()
    real_ct = batch["real_ct"].float()
    hu_per_unit = (batch["hu_hi"] - batch["hu_lo"]).float() / 2.0
    abs_err = (prediction.ct.float().clamp(-1, 1) - real_ct).abs() * mask
    mae = abs_err.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1.0) * hu_per_unit
    pred = (prediction.seg.float() > 0.5).float()
    truth = (batch[seg_key].float() > 0.5).float()
    overlap = (pred * truth).sum(dim=(1, 2, 3))
    total = pred.sum(dim=(1, 2, 3)) + truth.sum(dim=(1, 2, 3))
    dice = torch.where(total > 0, 2 * overlap / total.clamp(min=1.0), torch.ones_like(total))
    height_error = (torch.round(prediction.height.float()) - batch["height"].float()).abs() * batch["spacing_mm"].float()
    return {"mae_hu": mae, "dice": dice, "height_error_mm": height_error}


class MetricAccumulator:
    """Running means of :func:`sample_metrics` over batches."""

    def __init__(self) -> None:
        self.sums = {name: 0.0 for name in METRIC_NAMES}
        self.count = 0

    def update(self, prediction: Prediction, batch: dict[str, torch.Tensor], seg_key: str = "real_target") -> None:
        """Add one batch (see :func:`sample_metrics`)."""
        for name, values in sample_metrics(prediction, batch, seg_key).items():
            self.sums[name] += float(values.sum())
        self.count += int(batch["mask"].shape[0])

    def means(self, prefix: str = "") -> dict[str, float]:
        """Mean of every metric (NaN before any update), keys prefixed."""
        return {prefix + name: (total / self.count if self.count else float("nan")) for name, total in self.sums.items()}
