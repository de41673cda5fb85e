"""Model size and cost: parameter counts and forward FLOPs per slice (``torch.utils.flop_counter``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from healthivert.models.discriminator import Discriminators
from healthivert.models.generator import HealthiVertGenerator


def param_count(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_sample(model: nn.Module, image_size: tuple[int, int]) -> float:
    """Forward FLOPs (multiply and add counted separately) of one ``(1, 1, H, W)`` slice.

    Generators run stage ``"fine"`` (coarse + fine) and :class:`Discriminators` all three networks,
    both with a centred band of ``max_height_px`` rows; any other module gets a plain
    ``(1, 1, H, W)`` input.

    Args:
        model: the network (its device is used).
        image_size: ``(H, W)`` rows cranio-caudal.
    """
    height, width = image_size
    parameter = next(model.parameters())
    image = torch.zeros(1, 1, height, width, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if isinstance(model, HealthiVertGenerator):
                band = model.params.max_height_px
                mask = torch.zeros_like(image)
                start = (height - band) // 2
                mask[:, :, start:start + band] = 1.0
                model(image, mask, torch.zeros(1, device=image.device), torch.ones_like(image), stage="fine")
            elif isinstance(model, Discriminators):
                start = (height - model.band_rows) // 2
                band = torch.tensor([[start, start + model.band_rows]], device=image.device)
                model(image, image, band)
            else:
                model(image)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())

