"""Generator and discriminator losses (healthivert.losses)."""

from __future__ import annotations

import pytest
import torch

from healthivert.config import LossWeights, ModelParams
from healthivert.losses import (DiscriminatorLoss, GeneratorLoss, dice_loss, edge_loss, segmentation_bce, masked_l1, real_seg,
                                relative_height_loss, sobel_edges)
from healthivert.models.generator import GeneratorOutput


def truth_batch() -> dict[str, torch.Tensor]:
    """Two 32x32 samples: a target body in the band, neighbours above and below."""
    real_ct = torch.linspace(-1, 1, 32).view(1, 1, 32, 1).expand(2, 1, 32, 32).clone()
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 13:19, 8:24] = 1.0
    neighbours = torch.zeros(2, 1, 32, 32)
    neighbours[:, :, 2:10, 8:24] = 1.0
    neighbours[:, :, 22:30, 8:24] = 1.0
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24] = 1.0
    return {"real_ct": real_ct, "real_target": target, "real_neighbours": neighbours, "mask": mask,
            "height": torch.tensor([6.0, 6.0])}


def perfect_output(batch: dict[str, torch.Tensor]) -> GeneratorOutput:
    return GeneratorOutput(coarse_ct=batch["real_ct"], coarse_seg=batch["real_neighbours"],
                           fine_ct=batch["real_ct"], fine_seg=batch["real_target"],
                           coarse_height=batch["height"], fine_height=batch["height"],
                           coarse_ct_assembled=batch["real_ct"], coarse_seg_assembled=batch["real_neighbours"],
                           ct=batch["real_ct"], seg=batch["real_target"], height=batch["height"],
                           kept_rows=batch["height"].long())


def test_terms_are_zero_at_the_truth_and_positive_otherwise() -> None:
    b = truth_batch()
    assert masked_l1(b["real_ct"], b["real_ct"], b["mask"]) == 0
    assert dice_loss(b["real_target"], b["real_target"]) == 0
    assert edge_loss(b["real_target"], b["real_target"]) == 0
    assert relative_height_loss(b["height"], b["height"]) == 0
    shifted = torch.roll(b["real_target"], 2, dims=2)
    assert dice_loss(shifted, b["real_target"]) > 0.2
    assert edge_loss(shifted, b["real_target"]) > 0
    assert relative_height_loss(b["height"] * 0.5, b["height"]) == pytest.approx(0.5)


def test_masked_l1_is_normalised_by_the_mask_area() -> None:
    b = truth_batch()
    for rows in (slice(8, 24), slice(14, 16)):
        mask = torch.zeros_like(b["mask"])
        mask[:, :, rows] = 1.0
        assert masked_l1(b["real_ct"] + 0.5, b["real_ct"], mask).item() == pytest.approx(0.5)
    # errors outside the mask do not count
    off_mask = b["real_ct"].clone()
    off_mask[:, :, :8] += 1.0
    assert masked_l1(off_mask, b["real_ct"], b["mask"]) == 0


def test_sobel_edges_of_a_square() -> None:
    label = torch.zeros(1, 1, 16, 16)
    label[:, :, 4:12, 4:12] = 1.0
    edges = sobel_edges(label)[0, 0]
    ring = torch.zeros(16, 16, dtype=torch.bool)
    ring[3:13, 3:13] = True
    ring[5:11, 5:11] = False
    assert torch.all(edges[ring] > 0.5) and edges.max() == 1.0
    assert torch.all(edges[~ring] < 1e-5)
    assert sobel_edges(torch.ones(1, 1, 8, 8)).max() < 1e-5


def test_generator_loss_at_the_truth_and_away_from_it() -> None:
    b = truth_batch()
    params = ModelParams()
    loss = GeneratorLoss(LossWeights(gan=0.0), params)
    total, terms = loss(perfect_output(b), b, stage="fine")
    assert set(terms) == {"l1", "dice_coarse", "dice_fine", "seg_bce", "edge", "height"}
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    worse = perfect_output(b)
    worse.ct = b["real_ct"] + 0.1 * b["mask"]
    worse.seg = torch.roll(b["real_target"], 1, dims=2)
    worse.fine_height = b["height"] + 3
    total, terms = loss(worse, b, stage="fine")
    assert terms["l1"].item() == pytest.approx(200 * 0.1 / 2, rel=1e-4)     # averaged with the exact coarse
    assert terms["height"].item() == pytest.approx(40 * 0.5)
    assert terms["dice_fine"] > 0 and terms["edge"] > 0 and terms["dice_coarse"] == 0
    assert total == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-5)


def test_switches_remove_terms() -> None:
    b = truth_batch()
    out = perfect_output(b)
    _, coarse_terms = GeneratorLoss(LossWeights(gan=0.0), ModelParams())(out, b, stage="coarse")
    assert set(coarse_terms) == {"l1", "dice_coarse", "seg_bce", "height"}
    _, terms = GeneratorLoss(LossWeights(gan=0.0, dice_fine=0.0, seg_bce=0.0),
                             ModelParams(edge_module=False, height_module=False))(out, b, stage="fine")
    assert set(terms) == {"l1", "dice_coarse"}
    with pytest.raises(ValueError, match="fake_logits"):
        GeneratorLoss(LossWeights(), ModelParams())(out, b, stage="fine")
    assert real_seg(b, "coarse") is b["real_neighbours"] and real_seg(b, "fine") is b["real_target"]


def test_gan_terms() -> None:
    b = truth_batch()
    confident_real = {name: torch.full((2, 1, 3, 3), 20.0) for name in ("ct", "seg", "strip")}
    confident_fake = {name: -v for name, v in confident_real.items()}
    loss = GeneratorLoss(LossWeights(l1=0, dice_coarse=0, dice_fine=0, edge=0, height=0), ModelParams())
    fooled, _ = loss(perfect_output(b), b, confident_real, stage="fine")
    caught, terms = loss(perfect_output(b), b, confident_fake, stage="fine")
    assert fooled.item() < 1e-6 and caught.item() == pytest.approx(3 * 20 / 6, rel=1e-3)
    d_total, d_terms = DiscriminatorLoss()(confident_real, confident_fake)
    assert set(d_terms) == {"d_ct", "d_seg", "d_strip"} and d_total.item() < 1e-6
    d_wrong, _ = DiscriminatorLoss()(confident_fake, confident_real)
    assert d_wrong.item() == pytest.approx(3 * 20, rel=1e-3)


def test_segmentation_bce_is_zero_at_the_truth_and_keeps_a_gradient_when_saturated() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    assert float(segmentation_bce(target, target)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.full_like(target, 6.0, requires_grad=True)  # saturated "all ones"
    soft_dice = dice_loss(torch.sigmoid(logits), target)
    (dice_grad,) = torch.autograd.grad(soft_dice, logits)
    (bce_grad,) = torch.autograd.grad(segmentation_bce(torch.sigmoid(logits), target), logits)
    background = target == 0
    assert bce_grad[background].mean() > 20 * dice_grad[background].mean()
