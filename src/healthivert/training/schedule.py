"""Learning-rate schedule: constant, then a linear decay towards zero (the pix2pix "linear" policy)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LinearDecay:
    """Multiplier of the base learning rate at a given epoch.

    1 for the first ``constant_epochs`` epochs, then falling linearly so that the last of
    ``total_epochs`` epochs runs at ``1 / (decay_epochs + 1)`` of the base rate.

    Args:
        total_epochs: epochs of the run.
        constant_epochs: epochs at the full rate before the decay starts.
    """

    def __init__(self, total_epochs: int, constant_epochs: int) -> None:
        self.total_epochs = total_epochs
        self.constant_epochs = min(constant_epochs, total_epochs)

    def __call__(self, epoch: int) -> float:
        decay_epochs = self.total_epochs - self.constant_epochs
        if epoch < self.constant_epochs or decay_epochs == 0:
            return 1.0
        return 1.0 - (epoch - self.constant_epochs + 1) / (decay_epochs + 1)


def linear_decay(optimizer: torch.optim.Optimizer, total_epochs: int, constant_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per epoch with :class:`LinearDecay`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearDecay(total_epochs, constant_epochs))


def adam(parameters: Iterable[torch.nn.Parameter], lr: float, beta1: float) -> torch.optim.Adam:
    """Adam as in the method (beta2 0.999), over the parameters that require gradients.

    The fused implementation updates all parameters in one kernel per step instead of about ten
    element-wise passes per tensor (on CPU it took ~10 % of a full-size GAN step otherwise).
    """
    return torch.optim.Adam([p for p in parameters if p.requires_grad], lr=lr, betas=(beta1, 0.999), fused=True)
