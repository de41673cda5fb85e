"""Close-up around a fixed-height gap and SHRM re-assembly (healthivert.data.samples)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from healthivert.data.samples import assemble, close_up, fixed_band, make_sample, neighbour_prior

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_HEIGHT = 16


def spine_slice(n_rows: int = 64, n_cols: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A sagittal slice with three vertebral bodies (ids 1, 2, 3) and a CT that encodes the row number."""
    label = np.zeros((n_rows, n_cols), np.uint8)
    label[8:18, 6:18] = 1
    label[22:31, 6:18] = 2       # target: rows 22..30, height 9
    label[36:47, 6:18] = 3
    ct = np.repeat((np.arange(n_rows) * 3).astype(np.uint8)[:, None], n_cols, axis=1)
    ct[:, :3] = 250              # a column pattern that must travel with its rows
    return ct, label


def test_fixed_band_is_centred_and_kept_inside() -> None:
    assert fixed_band((22, 31), 16, 64) == (18, 34)
    assert fixed_band((0, 6), 16, 64) == (0, 16)
    assert fixed_band((60, 64), 16, 64) == (48, 64)
    with pytest.raises(ValueError):
        fixed_band((0, 4), 80, 64)


def test_close_up_moves_context_to_meet_the_band() -> None:
    image = np.arange(20)[:, None] * np.ones((1, 3))
    out = close_up(image, (8, 12), (6, 14), fill=-1)
    np.testing.assert_array_equal(out[:6, 0], [2, 3, 4, 5, 6, 7])     # ends just above x1 = 8
    np.testing.assert_array_equal(out[6:14, 0], -1)
    np.testing.assert_array_equal(out[14:, 0], [12, 13, 14, 15, 16, 17])  # starts at x2 = 12
    # where the image runs out its edge row repeats
    edge = close_up(image, (2, 4), (1, 19))
    assert edge[0, 0] == 1 and edge[19, 0] == 4
    assert out.shape == image.shape and out.dtype == image.dtype


def test_make_sample_frames_and_targets() -> None:
    ct, label = spine_slice()
    sample = make_sample(ct, label, 2, None, 0.25, MAX_HEIGHT)
    assert sample is not None
    b0, b1 = sample["band"]
    assert (b0, b1) == (18, 34) and sample["height"] == 9.0
    assert float(sample["slice_ratio"]) == 0.25
    for key in ("ct", "mask", "attention", "real_ct", "real_target", "real_neighbours"):
        assert sample[key].shape == (1, 64, 24) and sample[key].dtype == np.float32
    mask_rows = np.flatnonzero(sample["mask"][0, :, 0])
    np.testing.assert_array_equal(mask_rows, np.arange(18, 34))
    assert np.all(sample["ct"][0, 18:34] == 0) and np.all(sample["attention"] == 1)
    # the closed-up CT hides the target: rows just above/below the band come from beside it
    rows_of = np.rint((sample["ct"][0, :, 12] + 1) * 127.5 / 3).astype(int)
    assert rows_of[17] == 21 and rows_of[34] == 31
    # the real frame: the target is centred in the band (rows 21..29) and the slice moved by -1 row
    target_rows = np.flatnonzero(sample["real_target"][0, :, 12])
    np.testing.assert_array_equal(target_rows, np.arange(21, 30))
    real_rows = np.rint((sample["real_ct"][0, :, 12] + 1) * 127.5 / 3).astype(int)
    # (away from the top and bottom rows, which only repeat what the closed-up frame still holds)
    np.testing.assert_array_equal(real_rows[4:60], np.arange(5, 61))
    assert np.all(sample["real_ct"][0, :, :3] == pytest.approx(250 / 127.5 - 1))
    neighbour_rows = np.flatnonzero(sample["real_neighbours"][0, :, 12])
    np.testing.assert_array_equal(neighbour_rows, np.r_[7:17, 35:46])


def test_assembling_the_real_slice_at_the_real_height_is_exact() -> None:
    ct, label = spine_slice()
    samples = [make_sample(ct, label, target, None, 0.0, MAX_HEIGHT) for target in (1, 2, 3)]
    batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}
    assert len(set(batch["height"].tolist())) == 3 and len(set(batch["band"][:, 0].tolist())) == 3
    rebuilt = assemble(batch["real_ct"], batch["ct"], batch["band"], batch["height"])
    assert torch.equal(rebuilt, batch["real_ct"])
    # labels: the closed-up neighbours are the context of the neighbour map
    closed = np.stack([close_up(((label != 0) & (label != t)).astype(np.float32), (x1, x2), tuple(s["band"]))
                       for t, s, (x1, x2) in zip((1, 2, 3), samples, ((8, 18), (22, 31), (36, 47)))])
    rebuilt = assemble(batch["real_neighbours"], torch.from_numpy(closed)[:, None], batch["band"], batch["height"])
    assert torch.equal(rebuilt, batch["real_neighbours"])


def test_assemble_at_another_height_keeps_that_many_generated_rows() -> None:
    ct, label = spine_slice()
    sample = make_sample(ct, label, 2, None, 0.0, MAX_HEIGHT)
    context = torch.from_numpy(sample["ct"])[None]
    generated = torch.full_like(context, 5.0)
    band = torch.from_numpy(sample["band"])[None]
    for height in (0.0, 9.0, 12.4, 16.0, 30.0):
        out = assemble(generated, context, band, torch.tensor([height]))
        kept = int((out[0, 0, :, 0] == 5.0).sum())
        assert kept == min(round(height), MAX_HEIGHT)
        # the context below the generated rows starts with the row just below the removed target
        first_below = 18 + (MAX_HEIGHT - kept) // 2 + kept
        assert out[0, 0, first_below, 12] == context[0, 0, 34, 12]
    # the height gets no gradient through the gather (it is trained by its own loss)
    height = torch.tensor([9.0], requires_grad=True)
    assert not assemble(generated, context, band, height).requires_grad


def test_neighbour_prior_ignores_cut_neighbours_and_names_its_side() -> None:
    label = np.zeros((60, 10), np.uint8)
    label[2:12], label[15:30], label[33:50] = 1, 2, 3
    assert neighbour_prior(label, 2, 40) == (13.5, 0.0)
    assert neighbour_prior(label, 2, 12) == (11.0, 0.0)  # clipped to max_height
    label[0:12] = 1  # the vertebra above touches the crop's top: not whole
    assert neighbour_prior(label, 2, 40) == (17.0, 1.0)  # from the vertebra below only
    label[0:12], label[33:60] = 1, 3
    label[0] = 0
    assert neighbour_prior(label, 2, 40) == (11.0, -1.0)
    label[0] = 1
    height, side = neighbour_prior(label, 2, 40)
    assert np.isnan(height) and side == 0.0
    sample = make_sample(np.zeros((60, 10), np.uint8), label, 2, None, 0.0, 40)
    assert sample is not None and np.isnan(sample["neighbour_height"]) and sample["neighbour_side"] == 0.0


def test_attention_is_inverted_and_closed_up() -> None:
    ct, label = spine_slice()
    cam = np.zeros(ct.shape, np.float32)
    cam[40:44] = 0.75
    sample = make_sample(ct, label, 2, cam, 0.0, MAX_HEIGHT)
    attention = sample["attention"][0, :, 0]
    assert np.all(attention[18:34] == 1.0)
    # image rows 40..43 land 3 rows higher below the band (x2 = 31 -> b1 = 34)
    np.testing.assert_allclose(attention[43:47], 0.25)
    assert np.all(np.delete(attention, np.arange(43, 47)) == 1.0)


def test_absent_target_gives_none_and_tall_target_is_clipped(caplog: pytest.LogCaptureFixture) -> None:
    ct, label = spine_slice()
    assert make_sample(ct, label, 7, None, 0.0, MAX_HEIGHT) is None
    with caplog.at_level(logging.WARNING):
        sample = make_sample(ct, label, 3, None, 0.0, 8)
    assert sample is not None and sample["height"] == 8.0
    assert "clipped" in caplog.text


def test_real_straightened_labels_round_trip() -> None:
    path = SHARED / "verse19-sample" / "straightened" / "label" / "0007_20.nii.gz"
    if not path.exists():
        pytest.skip(f"shared sample data not found at {path}")
    volume = np.asarray(nib.load(path).dataobj).astype(np.uint8)
    label = volume[:, :, volume.shape[2] // 2]
    ct = np.where(label > 0, 200, 40).astype(np.uint8)
    rows = np.flatnonzero((label == 20).any(axis=1))
    sample = make_sample(ct, label, 20, None, 0.0, 40)
    assert sample is not None and sample["height"] == rows[-1] + 1 - rows[0]
    batch = {key: torch.from_numpy(value)[None] for key, value in sample.items()}
    rebuilt = assemble(batch["real_ct"], batch["ct"], batch["band"], batch["height"])
    assert torch.equal(rebuilt, batch["real_ct"])
    # the target label in the real frame has the true height, centred in the band
    target_rows = np.flatnonzero(sample["real_target"][0].any(axis=1))
    b0, b1 = sample["band"]
    assert len(target_rows) == sample["height"]
    assert abs((target_rows[0] + target_rows[-1] + 1) / 2 - (b0 + b1) / 2) <= 1
