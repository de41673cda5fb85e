"""Total losses of the generator and the discriminators, each returning ``(total, named terms)``.

A batch is a mapping of tensors as built by :func:`healthivert.data.samples.make_sample` and stacked:
``real_ct``, ``real_target``, ``real_neighbours``, ``mask`` ``(B, 1, H, W)`` and ``height`` ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from healthivert.config import LossWeights, ModelParams
from healthivert.losses.terms import (dice_loss, edge_loss, gan_loss, masked_l1, relative_height_loss,
                                      segmentation_bce)
from healthivert.models.generator import GeneratorOutput

Stage = Literal["coarse", "fine"]


def real_seg(batch: Mapping[str, torch.Tensor], stage: Stage) -> torch.Tensor:
    """The label the stage's segmentation head is trained on (what the label discriminator sees as real).

    The coarse head segments the healthy neighbours, the fine head the target vertebra.
    """
    return batch["real_neighbours"] if stage == "coarse" else batch["real_target"]


class GeneratorLoss:
    """Weighted sum of the HealthiVert-GAN generator terms; a zero weight or a switched-off module drops one.

    Terms (stage ``"coarse"`` keeps only the coarse ones):
    ``gan``: sum over the three discriminators of the non-saturating BCE / 6;
    ``l1``: masked L1 of the assembled CT vs the real one, averaged over coarse and fine;
    ``dice_coarse``: Dice of the coarse neighbour segmentation; ``dice_fine``: Dice of the fine target
    segmentation; ``edge``: Sobel edge MSE of the fine target segmentation (``edge_module``);
    ``height``: relative height error, summed over the stages (``height_module``).

    Args:
        weights: the loss weights (``LossWeights``: gan 1, l1 200, dice 10/15, edge 800, height 40).
        model_params: module switches.
    """

    def __init__(self, weights: LossWeights, model_params: ModelParams) -> None:
        self.weights = weights
        self.model_params = model_params

    def __call__(self, output: GeneratorOutput, batch: Mapping[str, torch.Tensor],
                 fake_logits: Mapping[str, torch.Tensor] | None = None,
                 stage: Stage = "fine") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss of one generator output.

        Args:
            output: the generator's output for ``batch``.
            batch: real tensors (see the module docstring).
            fake_logits: the discriminators' logits on ``output.ct``/``output.seg`` (needed if ``gan`` > 0).
            stage: ``"coarse"`` or ``"fine"``.

        Returns:
            The weighted total and the weighted terms by name.
        """
        w = self.weights
        fine = stage == "fine"
        terms: dict[str, torch.Tensor] = {}
        if w.gan > 0:
            if fake_logits is None:
                raise ValueError("fake_logits are required when the GAN weight is positive")
            terms["gan"] = w.gan * sum(gan_loss(logits, real=True) for logits in fake_logits.values()) / 6.0
        if w.l1 > 0:
            l1_terms = [masked_l1(output.coarse_ct_assembled, batch["real_ct"], batch["mask"])]
            if fine:
                l1_terms.append(masked_l1(output.ct, batch["real_ct"], batch["mask"]))
            terms["l1"] = w.l1 * torch.stack(l1_terms).mean()
        if w.dice_coarse > 0:
            terms["dice_coarse"] = w.dice_coarse * dice_loss(output.coarse_seg_assembled, batch["real_neighbours"])
        if fine and w.dice_fine > 0:
            terms["dice_fine"] = w.dice_fine * dice_loss(output.seg, batch["real_target"])
        if w.seg_bce > 0:
            terms["seg_bce"] = w.seg_bce * segmentation_bce(output.coarse_seg_assembled, batch["real_neighbours"])
            if fine:
                terms["seg_bce"] = terms["seg_bce"] + w.seg_bce * segmentation_bce(output.seg, batch["real_target"])
        if fine and w.edge > 0 and self.model_params.edge_module:
            terms["edge"] = w.edge * edge_loss(output.seg, batch["real_target"])
        if w.height > 0 and self.model_params.height_module:
            heights = [output.coarse_height] + ([output.fine_height] if fine else [])
            terms["height"] = w.height * sum(relative_height_loss(h, batch["height"]) for h in heights)
        if not terms:
            raise ValueError("every generator loss term is switched off")
        return torch.stack(list(terms.values())).sum(), terms


class DiscriminatorLoss:
    """Vanilla GAN loss of each discriminator, ``(BCE(real, 1) + BCE(fake, 0)) / 2``, summed."""

    def __call__(self, real_logits: Mapping[str, torch.Tensor], fake_logits: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the total and one term per discriminator (``d_ct``, ``d_seg``, ``d_strip``)."""
        terms = {f"d_{name}": (gan_loss(real_logits[name], real=True) + gan_loss(fake_logits[name], real=False)) / 2
                 for name in real_logits}
        return torch.stack(list(terms.values())).sum(), terms
