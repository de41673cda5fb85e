"""HGAM attention maps: Grad-CAM++ of the fracture classifier (MONAI's implementation).

Maps are ``(N, 1, H, W)`` on the input grid, rows cranio-caudal (row 0 cranial), each normalised to
[0, 1] per slice (1 = the most "fractured-looking" place; all zeros when the map is flat).
"""

from __future__ import annotations

import copy

import torch
from monai.visualize import GradCAMpp

from healthivert.models.classifier import FractureClassifier


def normalise_per_slice(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each ``(1, H, W)`` map of an ``(N, 1, H, W)`` batch to [0, 1] (flat maps -> 0)."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), 0.0)
    return scaled.reshape(maps.shape)


def _batched_score(logits: torch.Tensor, class_idx: int) -> torch.Tensor:
    """Class score of every sample shaped ``(N, 1, 1, 1)`` (broadcasts against 2D feature maps)."""
    return logits[:, class_idx].reshape(-1, 1, 1, 1)


def attention_maps(classifier: FractureClassifier, slices: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Grad-CAM++ maps of the "fractured" logit for a batch of slices.

    Args:
        classifier: a trained :class:`FractureClassifier` (left unchanged: hooks go on a copy).
        slices: ``(N, 1, H, W)`` windowed slice crops in [-1, 1], on the classifier's device.
        batch_size: slices per backward pass.

    Returns:
        ``(N, 1, H, W)`` float maps in [0, 1] on the device of ``slices``.
    """
    # MONAI registers hooks it never removes: give it a private copy of the network
    network = copy.deepcopy(classifier)
    cam = GradCAMpp(nn_module=network, target_layers=network.cam_layer, postprocessing=normalise_per_slice)
    # MONAI's Grad-CAM++ multiplies the per-sample score (N,) with gradients (N, C, h, w), which only
    # broadcasts for N = 1; a score shaped (N, 1, 1, 1) keeps the whole batch in one backward pass
    cam.nn_module.class_score = _batched_score
    maps = []
    with torch.enable_grad():
        for start in range(0, slices.shape[0], batch_size):
            chunk = slices[start:start + batch_size]
            maps.append(cam(chunk, class_idx=0).detach())
            network.zero_grad(set_to_none=True)
    return torch.cat(maps).to(slices.dtype).clamp(0.0, 1.0)
