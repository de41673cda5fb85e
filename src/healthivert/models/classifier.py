"""Fracture classifier behind the HealthiVert-Guided Attention Module (HGAM).

A small 2D CNN deciding fractured vs not from a windowed slice crop around a vertebra; its
Grad-CAM++ maps (:mod:`healthivert.models.gradcam`) show where a vertebra looks fractured.
Input ``(N, 1, H, W)`` in [-1, 1], rows cranio-caudal (row 0 cranial); output ``(N, 1)`` logits.
"""

from __future__ import annotations

import torch
from torch import nn

from healthivert.config import ModelParams


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + batch norm + ReLU layers (ReLU not in place, so backward hooks work)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class FractureClassifier(nn.Module):
    """Binary fracture classifier: three conv blocks (two 2x max-pools), global average pool, linear.

    The last block works at 1/4 resolution with a receptive field of ~40 px, so its Grad-CAM++ map
    stays local (a fourth block at 1/8 made the maps spread over the whole slice in our tests).

    Args:
        model_params: ``network.classifier_channels`` is the first block's width (doubling per block).
    """

    #: name of the layer whose activations and gradients Grad-CAM++ uses (the last conv block)
    cam_layer = "features.4"

    def __init__(self, model_params: ModelParams) -> None:
        super().__init__()
        c = model_params.network.classifier_channels
        self.features = nn.Sequential(
            _block(1, c), nn.MaxPool2d(2), _block(c, 2 * c), nn.MaxPool2d(2), _block(2 * c, 4 * c))
        self.head = nn.Linear(4 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` -> ``(N, 1)`` logit of "fractured"."""
        return self.head(self.features(x).mean(dim=(2, 3)))
