"""The generator's loss terms, one small function each. Images are ``(B, 1, H, W)``, heights ``(B,)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Vanilla GAN loss: binary cross-entropy of patch logits against all-real or all-fake."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def masked_l1(prediction: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 inside the mask, normalised by the mask's area per sample (mean L1 x image area / mask area)."""
    area = mask.sum(dim=(1, 2, 3)).clamp(min=1.0)
    return ((prediction - real).abs() * mask).sum(dim=(1, 2, 3)).div(area).mean()


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2|P.T| + s) / (|P| + |T| + s)`` per sample, averaged (0 at the truth)."""
    dims = tuple(range(1, probability.dim()))
    overlap = (probability * target).sum(dim=dims)
    total = probability.sum(dim=dims) + target.sum(dim=dims)
    return (1.0 - (2.0 * overlap + smooth) / (total + smooth)).mean()


def segmentation_bce(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise binary cross-entropy of a sigmoid segmentation (its logit gradient is ``p - y``).

    Written out rather than ``F.binary_cross_entropy``, which autocast refuses.
    """
    p, y = probability.float(), target.float()
    eps = 1e-7
    return -(y * p.clamp_min(eps).log() + (1 - y) * (1 - p).clamp_min(eps).log()).mean()


def sobel_edges(label: torch.Tensor) -> torch.Tensor:
    """Edge map of a ``(B, 1, H, W)`` label: fixed Sobel gradient magnitude, clipped to 1 (edge padding)."""
    kernel_x = _SOBEL_X.to(label)
    kernels = torch.stack([kernel_x, kernel_x.T]).unsqueeze(1)
    gradients = F.conv2d(F.pad(label, (1, 1, 1, 1), mode="replicate"), kernels)
    return torch.sqrt(gradients.pow(2).sum(dim=1, keepdim=True) + 1e-12).clamp(max=1.0)


def edge_loss(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Edge-Enhancing Module: MSE between the Sobel edge maps of the synthesised and real labels."""
    return F.mse_loss(sobel_edges(probability), sobel_edges(target))


def relative_height_loss(predicted: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean relative height error ``|h_pred - h| / h`` (heights in rows; ``h`` floored at 1 row)."""
    return ((predicted - real).abs() / real.clamp(min=1.0)).mean()
