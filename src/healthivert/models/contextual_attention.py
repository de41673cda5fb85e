"""Contextual attention (DeepFill v1): the masked region borrows features from similar patches outside it.

Feature maps are ``(B, C, H, W)`` with rows cranio-caudal; the mask is ``(B, 1, H', W')`` (any size,
resized to the features), 1 on the region to fill (foreground), 0 on the known background.
Everything runs on whole batches: patch matching is one grouped convolution, re-assembly one grouped
transposed convolution, so there is no Python loop over samples or patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContextualAttention(nn.Module):
    """Fill foreground features with a softmax-weighted mix of background patches.

    Matching is done at ``1 / rate`` resolution with ``patch_size`` patches compared by cosine
    similarity (background patches normalised), scores are propagated along the diagonal over
    ``fuse_k`` neighbours (neighbouring positions prefer neighbouring sources, which keeps copied
    structures coherent), only background patches that lie entirely outside the mask are candidates,
    and the softmax over candidates (sharpened by ``softmax_scale``) weights full-resolution
    ``2 * rate`` patches pasted back with a transposed convolution.

    Args:
        patch_size: matching patch size (3).
        rate: downscaling of the matching (2).
        fuse_k: diagonal fusion width (3); 1 switches fusion off.
        softmax_scale: sharpness of the softmax over candidates (10).
    """

    def __init__(self, patch_size: int = 3, rate: int = 2, fuse_k: int = 3, softmax_scale: float = 10.0) -> None:
        super().__init__()
        if patch_size % 2 != 1 or fuse_k % 2 != 1:
            raise ValueError("patch_size and fuse_k must be odd")
        self.patch_size = patch_size
        self.rate = rate
        self.fuse_k = fuse_k
        self.softmax_scale = softmax_scale

    def _diagonal_sum(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(B, N, N)`` -> ``out[i, j] = sum_d matrix[i + d, j + d]`` for ``|d| <= fuse_k // 2``.

        Zero beyond the edges. The same as a convolution with an identity ``fuse_k x fuse_k`` kernel, as shifted adds: a
        single-channel convolution of the ``N x N`` matrix ran at a few GFLOP/s on a CPU.
        """
        total = matrix.clone()
        for shift in range(1, self.fuse_k // 2 + 1):
            total[:, shift:, shift:] += matrix[:, :-shift, :-shift]
            total[:, :-shift, :-shift] += matrix[:, shift:, shift:]
        return total

    def _fuse(self, scores: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Propagate ``(B, L, h, w)`` scores (L = h*w sources) along both diagonals of the score matrix."""
        batch = scores.shape[0]
        # rows: sources, columns: target positions, both in row-major order; the diagonal sum
        # shifts both together, so neighbouring targets reinforce neighbouring sources
        matrix = self._diagonal_sum(scores.reshape(batch, height * width, height * width))
        # the same in column-major order, so vertical neighbours are fused too
        matrix = matrix.reshape(batch, height, width, height, width).permute(0, 2, 1, 4, 3)
        matrix = self._diagonal_sum(matrix.reshape(batch, height * width, height * width))
        matrix = matrix.reshape(batch, width, height, width, height).permute(0, 2, 1, 4, 3)
        # back to (B, sources, h, w)
        return matrix.reshape(batch, height * width, height, width)

    def forward(self, foreground: torch.Tensor, background: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attend from every position of ``foreground`` to the background patches.

        Args:
            foreground: ``(B, C, H, W)`` features whose masked region is to be filled.
            background: ``(B, C, H, W)`` features the patches are borrowed from.
            mask: ``(B, 1, h, w)``, 1 inside the region to fill.

        Returns:
            ``(B, C, H, W)`` reconstructed features (every position, from background patches only).
        """
        batch, channels, height, width = foreground.shape
        rate, k = self.rate, self.patch_size
        if height % rate or width % rate:
            raise ValueError(f"feature size {height}x{width} must be a multiple of rate {rate}")
        raw_k = 2 * rate
        # full-resolution source patches (raw_k x raw_k, stride rate) used to paste back
        raw_pad = (raw_k - rate) // 2
        raw = F.unfold(background, raw_k, stride=rate, padding=raw_pad)
        small_fg = F.interpolate(foreground, scale_factor=1 / rate, mode="nearest")
        small_bg = F.interpolate(background, scale_factor=1 / rate, mode="nearest")
        h, w = small_bg.shape[-2:]
        n_src = h * w
        raw = raw.transpose(1, 2).reshape(batch * n_src, channels, raw_k, raw_k)

        # matching patches, L2-normalised, as a grouped convolution over the batch
        patches = F.unfold(small_bg, k, padding=k // 2).transpose(1, 2)  # (B, L, C*k*k)
        patches = patches / patches.norm(dim=2, keepdim=True).clamp(min=1e-4)
        weight = patches.reshape(batch * n_src, channels, k, k)
        scores = F.conv2d(small_fg.reshape(1, batch * channels, h, w), weight, padding=k // 2, groups=batch)
        scores = scores.reshape(batch, n_src, h, w)
        if self.fuse_k > 1:
            scores = self._fuse(scores, h, w)

        # candidates: source patches entirely in the background
        small_mask = F.interpolate(mask.to(foreground.dtype), size=(h, w), mode="nearest")
        inside = F.avg_pool2d(small_mask, k, stride=1, padding=k // 2, count_include_pad=False)
        valid = (inside.reshape(batch, n_src, 1, 1) == 0).to(scores.dtype)
        logits = (scores * self.softmax_scale).masked_fill(valid == 0, -1e4)
        attention = torch.softmax(logits, dim=1) * valid

        out = F.conv_transpose2d(attention.reshape(1, batch * n_src, h, w), raw, stride=rate,
                                 padding=raw_pad, groups=batch)
        out = out.reshape(batch, channels, *out.shape[-2:])[..., :height, :width]
        return out / (raw_k // rate) ** 2
