"""Generator, discriminators, classifier, complexity and saved models (healthivert.models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from healthivert.config import ModelParams
from healthivert.data.samples import assemble
from healthivert.errors import CheckpointError
from healthivert.models import (Discriminators, FractureClassifier, HealthiVertGenerator, PatchDiscriminator,
                                flops_per_sample, load_classifier, load_generator, param_count,
                                save_classifier, save_generator)
from healthivert.models.discriminator import band_strip
from healthivert.models.generator import band_from_mask, upsampled_conv

REFERENCE_GENERATOR_GFLOP = 17.6   # reference generator forward, one 256 x 256 slice
REFERENCE_PATCHGAN_GFLOP = 6.2


def inputs(batch: int, size: int, band: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Closed-up-like inputs with a ``band``-row mask centred at different rows per sample."""
    g = torch.Generator().manual_seed(seed)
    ct = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    mask = torch.zeros_like(ct)
    for i in range(batch):
        start = size // 2 - band // 2 + 2 * i
        mask[i, :, start:start + band] = 1.0
    return {"ct": ct * (1 - mask), "mask": mask, "slice_ratio": torch.linspace(0, 0.8, batch),
            "attention": torch.rand(batch, 1, size, size, generator=g)}


def build(seed: int = 0, **switches: object) -> HealthiVertGenerator:
    torch.manual_seed(seed)
    return HealthiVertGenerator(ModelParams(**switches)).eval()


def test_cpu_generator_shapes_in_both_stages() -> None:
    x = inputs(2, 128)
    gen = build()
    with torch.no_grad():
        coarse = gen(**x, stage="coarse")
        fine = gen(**x, stage="fine")
    assert coarse.fine_ct is None and coarse.fine_seg is None and coarse.fine_height is None
    assert torch.equal(coarse.ct, coarse.coarse_ct_assembled)
    for out in (coarse, fine):
        for image in (out.coarse_ct, out.coarse_seg, out.ct, out.seg):
            assert image.shape == (2, 1, 128, 128) and image.dtype == torch.float32
        assert out.height.shape == (2,) and bool(((out.height > 0) & (out.height < 40)).all())
        assert out.ct.min() >= -1 and out.ct.max() <= 1 and out.seg.min() >= 0 and out.seg.max() <= 1
    assert fine.fine_ct.shape == (2, 1, 128, 128) and torch.equal(fine.height, fine.fine_height)
    torch.testing.assert_close(fine.coarse_ct, coarse.coarse_ct)


def test_full_generator_at_paper_size() -> None:
    x = inputs(1, 256)
    gen = HealthiVertGenerator(ModelParams(size="full")).eval()
    with torch.no_grad():
        out = gen(**x, stage="fine")
    assert out.ct.shape == (1, 1, 256, 256) and out.seg.shape == (1, 1, 256, 256)
    assert gen.coarse.encoder[0][0].out_channels == 16      # cnum 16 as in the paper


def test_known_context_is_kept_and_assembled_at_the_predicted_height() -> None:
    x = inputs(2, 64, band=16)
    gen = build(max_height_px=16)
    with torch.no_grad():
        out = gen(**x, stage="fine")
    band = band_from_mask(x["mask"])
    assert band.tolist() == [[24, 40], [26, 42]]
    torch.testing.assert_close(out.ct, assemble(out.fine_ct, x["ct"], band, out.fine_height))
    torch.testing.assert_close(out.coarse_ct_assembled, assemble(out.coarse_ct, x["ct"], band, out.coarse_height))
    # a given height overrides the prediction (teacher forcing)
    with torch.no_grad():
        forced = gen(**x, stage="fine", assemble_height=torch.tensor([5.0, 11.0]))
    torch.testing.assert_close(forced.ct, assemble(forced.fine_ct, x["ct"], band, torch.tensor([5.0, 11.0])))
    assert forced.kept_rows.tolist() == [5, 11]
    # as the method, a restoration keeps at least the vertebra's own height; the prediction is reported as is
    with torch.no_grad():
        floored = gen(**x, stage="fine", min_height=torch.tensor([16.0, 0.0]))
    expected = torch.stack([torch.tensor(16), torch.round(floored.fine_height[1]).long().clamp(0, 16)])
    assert floored.kept_rows.tolist() == expected.tolist()
    torch.testing.assert_close(floored.height, out.fine_height)
    torch.testing.assert_close(floored.ct, assemble(floored.fine_ct, x["ct"], band, expected.float()))


def test_attention_module_switch() -> None:
    x = inputs(1, 64, band=16)
    other = dict(x, attention=1 - x["attention"])
    with torch.no_grad():
        on = build(max_height_px=16)
        assert not torch.allclose(on(**x).ct, on(**other).ct)
        off = build(max_height_px=16, attention_module=False)
        torch.testing.assert_close(off(**x).ct, off(**other).ct)
        torch.testing.assert_close(off(**x).ct, off(**dict(x, attention=None)).ct)
    assert param_count(off) < param_count(on)


def test_height_module_switch() -> None:
    x = inputs(2, 64, band=16)
    gen = build(max_height_px=16, height_module=False)
    assert not any("height" in name for name, _ in gen.named_parameters())
    with torch.no_grad():
        out = gen(**x, stage="fine")
        assert out.coarse_height is None and out.fine_height is None
        assert out.height.tolist() == [16.0, 16.0]
        # the whole band is kept, the known context untouched
        torch.testing.assert_close(out.ct, out.fine_ct * x["mask"] + x["ct"] * (1 - x["mask"]))
        real = torch.tensor([9.0, 13.0])
        forced = gen(**x, stage="fine", assemble_height=real)
    assert torch.equal(forced.height, real)


def test_contextual_attention_switch() -> None:
    on, off = build(max_height_px=16), build(max_height_px=16, contextual_attention=False)
    assert hasattr(on.fine, "contextual_attention") and not hasattr(off.fine, "contextual_attention")
    assert param_count(off) < param_count(on)
    with torch.no_grad():
        out = off(**inputs(1, 64, band=16))
    assert out.ct.shape == (1, 1, 64, 64)


def test_deterministic_given_seed_and_gradients_reach_every_head() -> None:
    x = inputs(2, 64, band=16)
    a, b = build(seed=3, max_height_px=16), build(seed=3, max_height_px=16)
    with torch.no_grad():
        torch.testing.assert_close(a(**x).ct, b(**x).ct, rtol=0, atol=0)
    a.train()
    out = a(**x, assemble_height=torch.tensor([9.0, 12.0]))
    (out.ct.mean() + out.seg.mean() + out.coarse_height.mean() + out.fine_height.mean()
     + out.coarse_ct_assembled.mean()).backward()
    for name in ("coarse.ct_head.weight", "fine.ct_head.weight", "fine.seg_head.weight",
                 "coarse_height_head.linear.weight", "fine_height_head.linear.weight",
                 "fine.attention_encoder.0.0.weight"):
        grad = dict(a.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_height_head_starts_at_the_neighbour_prior_and_falls_back_without_one() -> None:
    x = inputs(3, 64, band=16)
    prior = torch.tensor([7.0, 12.5, float("nan")])
    with torch.no_grad():
        out = build(max_height_px=16)(**x, neighbour_height=prior)
        reference = build(max_height_px=16, height_prior=False)(**x, neighbour_height=prior)
    torch.testing.assert_close(out.coarse_height[:2], prior[:2])
    torch.testing.assert_close(out.fine_height[:2], prior[:2])
    assert out.height[2] == 8.0  # no prior: sigmoid(0) x max_height before training
    assert not torch.allclose(reference.coarse_height[:2], prior[:2], atol=0.5)


def test_without_the_correction_a_known_prior_is_the_height_and_features_fill_in_the_unknown() -> None:
    x = inputs(3, 64, band=16)
    prior = torch.tensor([7.0, 12.5, float("nan")])
    gen = build(max_height_px=16, height_correction=False)
    with torch.no_grad():
        for head in (gen.coarse_height_head, gen.fine_height_head):
            head.linear.bias.fill_(1.0)  # a learnt correction, which must not move a known prior
    out = gen(**x, neighbour_height=prior)
    torch.testing.assert_close(out.coarse_height[:2], prior[:2])
    torch.testing.assert_close(out.fine_height[:2], prior[:2])
    assert out.coarse_height[2].item() == pytest.approx(16 * torch.sigmoid(torch.tensor(1.0)).item(), abs=1e-4)
    out.coarse_height.sum().backward()  # only the sample without a prior trains the features' head
    grad = gen.coarse_height_head.linear.bias.grad
    assert grad is not None and grad.item() == pytest.approx(16 * 0.7311 * 0.2689, rel=1e-3)


def test_coarse_height_head_learns_a_correction_for_one_sided_priors() -> None:
    x = inputs(4, 64, band=16)
    prior = torch.tensor([10.0, 10.0, 10.0, float("nan")])
    side = torch.tensor([0.0, -1.0, 1.0, 1.0])
    gen = build(max_height_px=16)
    assert gen.fine_height_head.side_weight is None
    with torch.no_grad():
        gen.coarse_height_head.side_weight.fill_(0.5)
        out = gen(**x, stage="coarse", neighbour_height=prior, neighbour_side=side)
    h = out.coarse_height
    assert h[0] == pytest.approx(10.0, abs=1e-4) and h[1] < 10.0 < h[2]
    assert h[3] == pytest.approx(8.0, abs=1e-4)  # no prior: no side term either
    gen.coarse_height_head.side_weight.data.zero_()
    (gen(**x, stage="coarse", neighbour_height=prior, neighbour_side=side).coarse_height * side).sum().backward()
    assert gen.coarse_height_head.side_weight.grad.abs().item() > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampled_conv_is_the_convolution_of_the_upsampled_concatenation(channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(9, 5, 3, padding=1)
    low = torch.randn(2, 8, 6, 10, requires_grad=True)
    high = torch.randn(2, 1, 12, 20)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = upsampled_conv(conv, low.contiguous(memory_format=layout), high.contiguous(memory_format=layout))
    expected = conv(torch.cat([F.interpolate(low, scale_factor=2, mode="nearest"), high], 1))
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    gradients = torch.autograd.grad(out.square().sum(), [low, conv.weight, conv.bias])
    expected_gradients = torch.autograd.grad(expected.square().sum(), [low, conv.weight, conv.bias])
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = torch.nn.Conv2d(8, 5, 3, padding=1)  # no second part
    torch.testing.assert_close(upsampled_conv(plain, low), plain(F.interpolate(low, scale_factor=2)),
                               atol=1e-5, rtol=1e-5)


def test_discriminators_and_band_strip() -> None:
    params = ModelParams()
    discs = Discriminators(params)
    ct = torch.rand(2, 1, 128, 128)
    band = torch.tensor([[40, 80], [50, 90]])
    logits = discs(ct, ct, band)
    assert set(logits) == {"ct", "seg", "strip"}
    assert logits["ct"].shape == (2, 1, 14, 14) and logits["strip"].shape[:2] == (2, 1)
    strip = band_strip(ct, band, 35)
    assert strip.shape == (2, 1, 40, 35)
    assert torch.equal(strip[1], ct[1, :, 50:90, 46:81])
    with pytest.raises(ValueError):
        band_strip(ct, torch.tensor([[40, 80], [50, 80]]), 35)


@pytest.mark.parametrize(("size", "slice_shape"), [("cpu", (128, 48)), ("full", (256, 64))])
def test_discriminators_take_coronal_slices_of_narrow_crops(size: str, slice_shape: tuple[int, int]) -> None:
    # a coronal slice is CC x LR: its strip (70/256 of 48 or 64 columns) is narrower than a 3-layer PatchGAN takes
    discs = Discriminators(ModelParams(size=size))
    ct = torch.rand(2, 1, *slice_shape)
    logits = discs(ct, ct, torch.tensor([[40, 80], [50, 90]]))
    assert all(value.shape[:2] == (2, 1) and value.numel() >= 2 for value in logits.values())


def test_sizes_against_the_reference() -> None:
    full = ModelParams(size="full")
    gen_gflop = flops_per_sample(HealthiVertGenerator(full), (256, 256)) / 1e9
    patch_gflop = flops_per_sample(PatchDiscriminator(1, full.network.disc_channels, 3), (256, 256)) / 1e9
    assert gen_gflop == pytest.approx(REFERENCE_GENERATOR_GFLOP, rel=0.2)
    assert patch_gflop == pytest.approx(REFERENCE_PATCHGAN_GFLOP, rel=0.05)
    cpu_gflop = flops_per_sample(HealthiVertGenerator(ModelParams()), (128, 128)) / 1e9
    assert cpu_gflop < gen_gflop / 10
    assert param_count(HealthiVertGenerator(ModelParams())) < param_count(HealthiVertGenerator(full)) / 3


def test_generator_save_load_round_trip(tmp_path: Path) -> None:
    params = ModelParams(max_height_px=16)
    gen = build(seed=1, max_height_px=16)
    path = tmp_path / "generator.pt"
    save_generator(path, gen, params, {"epoch": 3, "data": "abc"})
    loaded = load_generator(path, "cpu", expected=params)
    assert not loaded.training
    x = inputs(1, 64, band=16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).ct, gen(**x).ct, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"generator\.pt.*attention_module=True \(params: False\)"):
        load_generator(path, "cpu", expected=ModelParams(max_height_px=16, attention_module=False))
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_generator(tmp_path / "junk.pt")


def test_classifier_forward_and_save_load(tmp_path: Path) -> None:
    params = ModelParams()
    torch.manual_seed(0)
    classifier = FractureClassifier(params).eval()
    x = torch.randn(3, 1, 64, 64)
    assert classifier(x).shape == (3, 1)
    save_classifier(tmp_path / "classifier.pt", classifier, params)
    loaded = load_classifier(tmp_path / "classifier.pt", expected=params)
    torch.testing.assert_close(loaded(x), classifier(x))
    wider = ModelParams(sizes={"cpu": params.network.model_copy(update={"classifier_channels": 4}),
                               "full": params.sizes["full"]})
    with pytest.raises(CheckpointError, match="classifier_channels=8 \\(params: 4\\)"):
        load_classifier(tmp_path / "classifier.pt", expected=wider)
