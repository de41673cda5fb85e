"""Contextual attention: the hole borrows matching background patches (healthivert.models.contextual_attention)."""

from __future__ import annotations

import pytest
import torch

from healthivert.models.contextual_attention import ContextualAttention


def copied_block_example(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random background features; the foreground's hole holds a copy of another background block."""
    generator = torch.Generator().manual_seed(0)
    background = torch.randn(batch, 4, 32, 32, generator=generator)
    mask = torch.zeros(batch, 1, 32, 32)
    mask[:, :, 12:20, 12:20] = 1.0
    foreground = background.clone()
    foreground[..., 12:20, 12:20] = background[..., 2:10, 20:28]
    return foreground, background, mask


def test_hole_copies_the_matching_background_pattern() -> None:
    foreground, background, mask = copied_block_example()
    out = ContextualAttention()(foreground, background, mask)
    assert out.shape == background.shape
    # inside the hole (away from its border) the output is the source block, not what was there
    torch.testing.assert_close(out[..., 14:18, 14:18], background[..., 4:8, 22:26], atol=1e-3, rtol=0)
    assert (out[..., 14:18, 14:18] - background[..., 14:18, 14:18]).abs().mean() > 0.5


def test_sources_overlapping_the_hole_are_never_used() -> None:
    foreground, background, mask = copied_block_example()
    poisoned = background.clone()
    poisoned[..., 12:20, 12:20] = 1000.0   # only reachable through patches that touch the hole
    out = ContextualAttention()(foreground, poisoned, mask)
    assert out.abs().max() < 50


def test_batched_equals_one_sample_at_a_time() -> None:
    foreground, background, mask = copied_block_example(batch=3)
    mask[1, :, 4:12, 20:28] = 1.0           # different holes per sample
    foreground[2] = torch.randn(foreground[2].shape, generator=torch.Generator().manual_seed(1))
    attention = ContextualAttention()
    batched = attention(foreground, background, mask)
    single = torch.cat([attention(foreground[i:i + 1], background[i:i + 1], mask[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_fusion_prefers_coherent_copies() -> None:
    foreground, background, mask = copied_block_example(batch=1)
    # a noisy copy: single patches match poorly, the diagonal fusion keeps the shifted block together
    noisy = foreground.clone()
    noisy[..., 12:20, 12:20] += 0.8 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    truth = background[..., 4:8, 22:26]
    errors = {k: (ContextualAttention(fuse_k=k)(noisy, background, mask)[..., 14:18, 14:18] - truth).abs().mean()
              for k in (1, 3)}
    assert errors[3] < errors[1]


@pytest.mark.parametrize("fuse_k", [3, 5])
def test_diagonal_fusion_is_a_convolution_with_an_identity_kernel(fuse_k: int) -> None:
    matrix = torch.randn(2, 30, 30, generator=torch.Generator().manual_seed(0))
    kernel = torch.eye(fuse_k).view(1, 1, fuse_k, fuse_k)
    expected = torch.nn.functional.conv2d(matrix.unsqueeze(1), kernel, padding=fuse_k // 2).squeeze(1)
    torch.testing.assert_close(ContextualAttention(fuse_k=fuse_k)._diagonal_sum(matrix), expected)


def test_rejects_features_not_divisible_by_rate_and_even_kernels() -> None:
    with pytest.raises(ValueError):
        ContextualAttention(patch_size=4)
    x = torch.randn(1, 2, 15, 16)
    with pytest.raises(ValueError):
        ContextualAttention()(x, x, torch.zeros(1, 1, 15, 16))
