"""HGAM attention maps: Grad-CAM++ of the fracture classifier.

Maps are ``(N, 1, H, W)`` on the input grid, rows cranio-caudal (row 0 cranial), each normalised to
[0, 1] per slice (1 = the most "fractured-looking" place; all zeros when the map is flat).

Grad-CAM++ (Chattopadhyay et al. 2018, arXiv:1710.11063) weighs each channel of the CAM layer's
activations ``A`` by ``sum(alpha * relu(exp(S) * dS/dA))`` with ``alpha = g^2 / (2 g^2 + sum(A g^3))``
(``g = dS/dA``, ``S`` the "fractured" logit), sums the weighted channels, keeps the positive part and
resizes it bilinearly to the slice: the same numbers as MONAI's ``GradCAMpp``, which this module used
before. Written here because importing MONAI loads all of its sub-packages (13 s of CPU on the
2-core benchmark machine, more than grading a spine), and because only ``dS/dA`` is needed: the
gradient stops at the CAM layer instead of running back through the whole network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from healthivert.models.classifier import FractureClassifier


def normalise_per_slice(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each ``(1, H, W)`` map of an ``(N, 1, H, W)`` batch to [0, 1] (flat maps -> 0)."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), 0.0)
    return scaled.reshape(maps.shape)


def grad_cam_pp(activations: torch.Tensor, gradients: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ map ``(N, 1, h, w)`` (not resized, not normalised) of a layer's activations.

    Args:
        activations: ``(N, C, h, w)`` output of the CAM layer.
        gradients: ``(N, C, h, w)`` gradient of the class scores with respect to ``activations``.
        scores: ``(N,)`` class scores (logits) the gradients are of.
    """
    batch, channels = gradients.shape[:2]
    squared = gradients.pow(2)
    denominator = 2 * squared + (activations * gradients.pow(3)).reshape(batch, channels, -1).sum(-1)[..., None, None]
    alpha = squared / (torch.where(denominator != 0.0, denominator, torch.ones_like(denominator)) + 1e-7)
    positive = F.relu(scores.exp().reshape(batch, 1, 1, 1) * gradients)
    weights = (alpha * positive).reshape(batch, channels, -1).sum(-1)[..., None, None]
    return F.relu((weights * activations).sum(1, keepdim=True))


def attention_maps(classifier: FractureClassifier, slices: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Grad-CAM++ maps of the "fractured" logit for a batch of slices.

    Args:
        classifier: a trained :class:`FractureClassifier` (left as it was: its hook is removed and its
            training mode restored; no parameter gradient is computed).
        slices: ``(N, 1, H, W)`` windowed slice crops in [-1, 1], on the classifier's device.
        batch_size: slices per backward pass.

    Returns:
        ``(N, 1, H, W)`` float maps in [0, 1] on the device of ``slices``.
    """
    captured: list[torch.Tensor] = []

    def keep_activations(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        # the rest of the forward starts from a leaf, so the gradient stops here
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = classifier.get_submodule(classifier.cam_layer).register_forward_hook(keep_activations)
    training = classifier.training
    classifier.eval()
    maps = []
    try:
        for start in range(0, slices.shape[0], batch_size):
            chunk = slices[start:start + batch_size]
            with torch.enable_grad():
                scores = classifier(chunk)[:, 0]
                activations = captured.pop()
                (gradients,) = torch.autograd.grad(scores.sum(), activations)
            cam = grad_cam_pp(activations.detach(), gradients, scores.detach())
            maps.append(normalise_per_slice(F.interpolate(cam, size=chunk.shape[2:], mode="bilinear",
                                                          align_corners=False)))
    finally:
        handle.remove()
        classifier.train(training)
    return torch.cat(maps).to(slices.dtype).clamp(0.0, 1.0)
