"""Grad-CAM++ attention maps of the fracture classifier (healthivert.models.gradcam)."""

from __future__ import annotations

import torch

from healthivert.config import ModelParams
from healthivert.models import FractureClassifier, attention_maps
from healthivert.models.gradcam import normalise_per_slice

SIZE, SQUARE = 48, 10


def toy_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise slices; the positive half holds a bright square at a random place (the 'fracture')."""
    x = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator) - 0.5
    y = torch.zeros(n, 1)
    where = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    corners = torch.randint(0, SIZE - SQUARE, (n, 2), generator=generator)
    for i in range(n // 2):
        r, c = corners[i].tolist()
        where[i, :, r:r + SQUARE, c:c + SQUARE] = True
        y[i] = 1.0
    return torch.where(where, torch.ones_like(x), x), y, where


def test_map_highlights_the_discriminative_region() -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    classifier = FractureClassifier(ModelParams())
    optimiser = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    for _ in range(40):
        x, y, _ = toy_batch(16, generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(classifier(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    classifier.eval()
    x, y, where = toy_batch(8, generator)
    with torch.no_grad():
        accuracy = ((classifier(x) > 0).float() == y).float().mean()
    assert accuracy >= 0.85
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in classifier.modules())
    maps = attention_maps(classifier, x[:4], batch_size=3)
    assert maps.shape == (4, 1, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in classifier.modules()) == hooks_before
    for i in range(4):
        inside, outside = maps[i][where[i]].mean(), maps[i][~where[i]].mean()
        assert inside > 2 * outside, (i, inside, outside)


def test_normalise_per_slice() -> None:
    maps = torch.stack([torch.linspace(2, 6, 16).view(1, 4, 4), torch.full((1, 4, 4), 3.0)])
    out = normalise_per_slice(maps)
    assert out[0].min() == 0 and out[0].max() == 1
    assert torch.all(out[1] == 0)
