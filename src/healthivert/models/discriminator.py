"""PatchGAN discriminators: whole CT, label, and a central strip of the synthesised band.

Inputs are ``(B, 1, H, W)`` slices, rows cranio-caudal (row 0 cranial); outputs are patch logits
``(B, 1, h, w)`` (one per overlapping ~70x70 receptive field for 3 layers).
"""

from __future__ import annotations

import torch
from torch import nn

from healthivert.config import ModelParams

# the reference's strip is 70 columns of a 256-column slice; other widths keep the proportion
STRIP_FRACTION = 70 / 256


class PatchDiscriminator(nn.Module):
    """pix2pix-style N-layer PatchGAN: 4x4 convs, stride 2 then 1, batch norm, LeakyReLU 0.2.

    Args:
        in_channels: input channels.
        channels: width of the first layer (doubling per layer, at most 8x).
        layers: number of stride-2 layers (3 gives 70x70 receptive fields).
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.min_size = min_input_size(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, 1, h, w)`` patch logits."""
        return self.net(x)


def min_input_size(layers: int) -> int:
    """The smallest height and width a :class:`PatchDiscriminator` of ``layers`` layers takes (24 for 3).

    Walks back from one output patch through the 4x4 convolutions (padding 1): the final and the
    last layer's stride 1, the others' stride 2.
    """
    size = 2  # the final convolution's input for one output
    size += 1  # the last layer (stride 1)
    for _ in range(layers):  # the first convolution and the layers before the last (stride 2)
        size = 2 * size
    return size


def band_strip(image: torch.Tensor, band: torch.Tensor, width: int) -> torch.Tensor:
    """The band rows and the central ``width`` columns of each slice.

    Args:
        image: ``(B, C, H, W)``.
        band: ``(B, 2)`` ``(b0, b1)``; all bands must have the same height.
        width: number of central columns kept.

    Returns:
        ``(B, C, b1 - b0, width)``.
    """
    band = band.to(device=image.device, dtype=torch.long)
    heights = band[:, 1] - band[:, 0]
    if not bool((heights == heights[0]).all()):
        raise ValueError("all bands of a batch must have the same height")
    batch, channels, _, n_cols = image.shape
    rows = band[:, :1] + torch.arange(int(heights[0]), device=image.device)
    index = rows[:, None, :, None].expand(batch, channels, rows.shape[1], n_cols)
    start = (n_cols - width) // 2
    return torch.gather(image, 2, index)[..., start:start + width]


class Discriminators(nn.Module):
    """The three discriminators of HealthiVert-GAN (whole CT, label, central strip of the band's CT).

    Args:
        model_params: ``network.disc_channels`` and ``network.disc_layers`` set their size.
    """

    names = ("ct", "seg", "strip")

    def __init__(self, model_params: ModelParams) -> None:
        super().__init__()
        net = model_params.network
        self.ct = PatchDiscriminator(1, net.disc_channels, net.disc_layers)
        self.seg = PatchDiscriminator(1, net.disc_channels, net.disc_layers)
        self.strip = PatchDiscriminator(1, net.disc_channels, net.disc_layers)
        self.band_rows = model_params.max_height_px

    def forward(self, ct: torch.Tensor, seg: torch.Tensor, band: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patch logits of each discriminator.

        Args:
            ct: ``(B, 1, H, W)`` CT in [-1, 1].
            seg: ``(B, 1, H, W)`` label probability in [0, 1].
            band: ``(B, 2)`` rows ``(b0, b1)`` of the synthesised band.

        Returns:
            ``{"ct", "seg", "strip"}`` -> ``(B, 1, h, w)`` logits.
        """
        # a coronal slice of a narrow crop (48 columns: 13) would give the strip PatchGAN less than it takes
        width = min(ct.shape[-1], max(round(ct.shape[-1] * STRIP_FRACTION), self.strip.min_size))
        return {"ct": self.ct(ct), "seg": self.seg(seg), "strip": self.strip(band_strip(ct, band, width))}
