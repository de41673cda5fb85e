"""Losses of HealthiVert-GAN: small term functions and the generator / discriminator totals."""

from healthivert.losses.generator import DiscriminatorLoss, GeneratorLoss, real_seg
from healthivert.losses.terms import (dice_loss, edge_loss, gan_loss, masked_l1, relative_height_loss,
                                      segmentation_bce, sobel_edges)

__all__ = ["DiscriminatorLoss", "GeneratorLoss", "dice_loss", "edge_loss", "gan_loss", "masked_l1", "real_seg",
           "relative_height_loss", "segmentation_bce", "sobel_edges"]
