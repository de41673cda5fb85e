"""Iterative batched synthesis: slice choice, network calls per step, re-assembly, views, the stage."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from healthivert.config import ModelParams, SynthesizeParams
from healthivert.io.nifti import load_volume, save_volume
from healthivert.models import HealthiVertGenerator, save_generator
from healthivert.synthesis.index import read_index
from healthivert.synthesis import iterative
from healthivert.synthesis.iterative import (central_slices, fill_kept_rows, prepare_for_synthesis,
                                             synthesise_vertebra)
from test_rhlv_stage import IPL, NO_PARAMS, main, write_crops

HEIGHT = 28  # rows the generators below predict (taller than the 24-row boxes)


def fixed_height_generator(height: float = HEIGHT, seed: int = 0) -> HealthiVertGenerator:
    """A small untrained generator whose SHRM heads predict exactly ``height`` rows and whose fine
    segmentation marks every generated pixel as the vertebra (its CT stays untrained)."""
    torch.manual_seed(seed)
    generator = HealthiVertGenerator(ModelParams(size="cpu", max_height_px=40, contextual_attention=False,
                                                 height_prior=False))
    with torch.no_grad():
        for head in (generator.coarse_height_head, generator.fine_height_head):
            head.linear.weight.zero_()
            head.linear.bias.fill_(math.log(height / (40 - height)))  # sigmoid^-1(height / 40)
        generator.fine.seg_head.weight.zero_()
        generator.fine.seg_head.bias.fill_(20.0)
    return generator.eval()


def count_calls(generator: HealthiVertGenerator) -> list[int]:
    """Batch sizes of every forward call of ``generator``, appended as they happen."""
    calls: list[int] = []
    generator.register_forward_hook(lambda module, args, output: calls.append(int(args[0].shape[0])))
    return calls


SHAPE = (128, 32, 16)  # (CC, AP, LR): tall enough for 40-row gaps around each of three bodies
TOPS = (20, 52, 84)     # first rows of the bodies 20, 21 (target) and 22: 24 rows each, 8-row discs


def crop(target_rows: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """CT (bone 200 + a row ramp, so rows are distinguishable) and body labels of three box vertebrae.

    The target (21) is ``target_rows`` high, its inferior endplate in place (a crush fracture when < 24).
    """
    label = np.zeros(SHAPE, dtype=np.uint8)
    for vertebra, top in zip((20, 21, 22), TOPS):
        first = top + 24 - target_rows if vertebra == 21 else top
        label[first:top + 24, 6:27, 3:13] = vertebra
    ct = np.where(label > 0, 200, 40).astype(np.float32) + np.arange(SHAPE[0], dtype=np.float32)[:, None, None] * 0.25
    return ct, label


def test_central_slices_cover_the_central_part_of_the_extent() -> None:
    label = np.zeros((4, 4, 30), dtype=np.uint8)
    label[1, 1, 5:26] = 7  # extent 5..25, centre 15, half-width 10
    slices, ratios = central_slices(label, 7, 0.8)
    assert slices.tolist() == list(range(7, 24))
    assert ratios[slices.tolist().index(15)] == 0.0 and ratios.max() == pytest.approx(0.8)
    assert central_slices(label, 9, 0.8)[0].size == 0


def test_one_network_call_per_step_and_original_outside_the_range() -> None:
    ct, label = crop()
    generator = fixed_height_generator()
    calls = count_calls(generator)
    params = SynthesizeParams(neighbour_min_voxels=10, batch_size=64)
    result = synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20, 22), params, 1.0, torch.device("cpu"))
    slices, _ = central_slices(label, 21, 0.8)
    assert calls == [len(slices)] * 3  # above, below, target: all slices of a step in one batch
    assert result.slices == len(slices)
    assert result.predicted_height_mm == pytest.approx(HEIGHT, abs=1e-3)
    outside = np.setdiff1d(np.arange(16), slices)
    np.testing.assert_array_equal(result.ct[:, :, outside], np.rint(ct[:, :, outside]).astype(np.uint8))
    np.testing.assert_array_equal(result.label[:, :, outside], np.where(label[:, :, outside] == 21, 21, 0))
    assert set(np.unique(result.label)) <= {0, 21}
    assert result.ct.dtype == np.uint8 and result.ct.shape == ct.shape


def test_target_is_reassembled_at_the_predicted_height() -> None:
    ct, label = crop()
    params = SynthesizeParams(iterative=False)
    result = synthesise_vertebra({"sagittal": fixed_height_generator()}, ct, label, None, 21, (20, 22), params, 0.8,
                                 torch.device("cpu"))
    assert result.predicted_height_mm == pytest.approx(HEIGHT * 0.8, abs=1e-3)
    k = 8
    # target rows 52..75 -> gap 44..83; the HEIGHT generated rows are centred on it: 50..77
    synthesised_rows = np.flatnonzero((result.label[:, :, k] == 21).any(axis=1))
    assert synthesised_rows.tolist() == list(range(50, 78))
    # the context is shifted to meet them: 2 rows up above the target, 2 rows down below it
    np.testing.assert_allclose(result.ct[30:50, :, k], ct[32:52, :, k], atol=0.5)
    np.testing.assert_allclose(result.ct[78:102, :, k], ct[76:100, :, k], atol=0.5)
    # a slice outside the synthesised range is the original
    np.testing.assert_allclose(result.ct[:, :, 3], ct[:, :, 3], atol=0.5)


def test_a_prediction_below_the_vertebra_own_height_keeps_its_own_height() -> None:
    ct, label = crop()
    result = synthesise_vertebra({"sagittal": fixed_height_generator(height=20)}, ct, label, None, 21, (20, 22),
                                 SynthesizeParams(iterative=False), 1.0, torch.device("cpu"))
    assert result.predicted_height_mm == pytest.approx(20, abs=1e-3)
    synthesised_rows = np.flatnonzero((result.label[:, :, 8] == 21).any(axis=1))
    assert synthesised_rows.tolist() == list(range(52, 76))  # the 24 rows it has, in place
    np.testing.assert_allclose(result.ct[20:52, :, 8], ct[20:52, :, 8], atol=0.5)


def test_fill_stretches_a_short_body_over_the_kept_rows_and_keeps_a_full_one() -> None:
    generated = np.zeros(40, dtype=bool)
    generated[10:30] = True
    probability = np.zeros((40, 6), dtype=np.float32)
    probability[12:28, 1:5] = 0.9  # the body stops 2 rows short at either end
    ct = np.tile(np.arange(40, dtype=np.float32)[:, None], (1, 6))
    filled, filled_ct = fill_kept_rows(probability, ct, generated)
    assert np.flatnonzero((filled > 0.5).any(axis=1)).tolist() == list(range(10, 30))
    assert np.all(filled[:10] == 0) and np.all(filled[30:] == 0)
    np.testing.assert_array_equal(filled_ct[:10], ct[:10])  # the context is not touched
    assert filled_ct[10, 0] == pytest.approx(12.0, abs=0.5) and filled_ct[29, 0] == pytest.approx(27.0, abs=0.5)
    full = np.zeros_like(probability)
    full[10:30, 1:5] = 0.9
    kept, kept_ct = fill_kept_rows(full, ct, generated)
    np.testing.assert_allclose(kept, full, atol=1e-6)
    np.testing.assert_allclose(kept_ct, ct, atol=1e-5)
    empty, empty_ct = fill_kept_rows(np.zeros_like(probability), ct, generated)
    assert not empty.any() and np.array_equal(empty_ct, ct)


def test_a_short_segmentation_is_stretched_to_the_restored_height_unless_switched_off() -> None:
    ct, label = crop()
    generator = fixed_height_generator()
    with torch.no_grad():  # the segmentation marks only the rows of the band's central 20
        generator.fine.seg_head.bias.fill_(-20.0)
        generator.fine.seg_head.weight.zero_()
    original_forward = generator.forward

    def short_body(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        out = original_forward(*args, **kwargs)
        seg = torch.zeros_like(out.seg)
        seg[:, :, 54:74] = 1.0  # inside the kept rows 50..77, 4 rows short at either end
        return dataclasses.replace(out, seg=seg)

    generator.forward = short_body  # type: ignore[method-assign]
    rows = {}
    for fill in (True, False):
        result = synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20, 22),
                                     SynthesizeParams(iterative=False, fill_height=fill), 1.0, torch.device("cpu"))
        rows[fill] = np.flatnonzero((result.label[:, :, 8] == 21).any(axis=1)).tolist()
    assert rows[True] == list(range(50, 78))
    assert rows[False] == list(range(54, 74))


def test_iterative_steps_move_the_target_with_its_restored_neighbour() -> None:
    ct, label = crop()
    generator = fixed_height_generator()
    calls = count_calls(generator)
    params = SynthesizeParams(neighbour_min_voxels=10, batch_size=64)
    k = 8
    # the vertebra above (rows 20..43, predicted 28 rows) is restored first, keeping its gap's centre:
    # what lies below it moves down 2 rows, so the target's gap is 46..85 and its generated rows 52..79
    above_only = synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20,), params, 1.0, torch.device("cpu"))
    assert np.flatnonzero((above_only.label[:, :, k] == 21).any(axis=1)).tolist() == list(range(52, 80))
    # restoring the vertebra below as well moves the target back up 2 rows
    both = synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20, 22), params, 1.0, torch.device("cpu"))
    assert np.flatnonzero((both.label[:, :, k] == 21).any(axis=1)).tolist() == list(range(50, 78))
    assert calls == [8, 8, 8, 8, 8]


def test_a_restored_neighbour_keeps_its_own_label_stretched_to_the_restored_height(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ct, label = crop()
    generator = fixed_height_generator()
    with torch.no_grad():  # a segmentation that finds nothing must not erase the neighbour
        generator.fine.seg_head.bias.fill_(-20.0)
    labels: list[np.ndarray] = []
    real_step = iterative._synthesise_step

    def record(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels.append(args[2].copy())  # the working label before each step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(iterative, "_synthesise_step", record)
    synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20,), SynthesizeParams(neighbour_min_voxels=10),
                        1.0, torch.device("cpu"))
    before_target = labels[1][:, :, 8]
    # vertebra 20 (rows 20..43) restored at 28 rows centred on its gap 12..51: rows 18..45, all columns kept
    assert np.flatnonzero((before_target == 20).any(axis=1)).tolist() == list(range(18, 46))
    assert np.array_equal(before_target[30] == 20, label[30, :, 8] == 20)


def test_neighbours_are_skipped_when_small_or_not_iterative() -> None:
    ct, label = crop()
    generator = fixed_height_generator()
    calls = count_calls(generator)
    synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20, 22),
                        SynthesizeParams(neighbour_min_voxels=10_000, batch_size=64), 1.0, torch.device("cpu"))
    synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20, 22),
                        SynthesizeParams(iterative=False, batch_size=64), 1.0, torch.device("cpu"))
    assert len(calls) == 2


def test_layout_and_batch_size_do_not_change_the_synthesis() -> None:
    ct, label = crop(target_rows=16)
    results = []
    for prepare, batch_size in ((False, 64), (True, 64), (True, 2)):
        generator = fixed_height_generator()
        generator = prepare_for_synthesis(generator) if prepare else generator
        params = SynthesizeParams(neighbour_min_voxels=10, batch_size=batch_size)
        results.append(synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (20, 22), params, 1.0,
                                           torch.device("cpu")))
    for result in results[1:]:
        assert np.abs(result.ct.astype(int) - results[0].ct.astype(int)).max() <= 1
        assert np.array_equal(result.label, results[0].label)
        assert result.predicted_height_mm == pytest.approx(results[0].predicted_height_mm, abs=1e-4)


def test_two_views_are_fused() -> None:
    ct, label = crop()
    sagittal, coronal = fixed_height_generator(seed=1), fixed_height_generator(seed=2)
    calls = count_calls(coronal)
    params = SynthesizeParams(views=("sagittal", "coronal"), iterative=False, batch_size=8)
    both = synthesise_vertebra({"sagittal": sagittal, "coronal": coronal}, ct, label, None, 21, (), params, 1.0,
                               torch.device("cpu"))
    only_sagittal = synthesise_vertebra({"sagittal": sagittal}, ct, label, None, 21, (),
                                        SynthesizeParams(iterative=False), 1.0, torch.device("cpu"))
    ap_slices, _ = central_slices(np.transpose(label, (0, 2, 1)), 21, 0.8)
    assert sum(calls) == len(ap_slices) and max(calls) <= 8  # coronal slices, in chunks of batch_size
    assert both.slices == only_sagittal.slices + len(ap_slices)
    assert not np.array_equal(both.ct, only_sagittal.ct)
    # a voxel only the coronal view synthesised (LR slice outside the sagittal range) differs from the original
    lr_outside = 3
    assert not np.array_equal(both.ct[14:54, ap_slices, lr_outside], np.rint(ct[14:54, ap_slices, lr_outside]))


@pytest.fixture()
def model_and_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = tmp_path / "data"
    manifest = write_crops(data, [("sub-a", "train", 21, (0.5, 0.25, 0.0)), ("sub-b", "test", 21, (0.0, 0.0, 0.0))])
    attention = tmp_path / "attention"
    for row in manifest.itertuples():
        cam = np.zeros((64, 32, 16), dtype=np.float32)
        cam[26:42, 6:13] = 0.9
        save_volume(attention / f"{row.case}_{row.vertebra}.nii.gz", cam, IPL)
    model = tmp_path / "model"
    generator = fixed_height_generator()
    save_generator(model / "generator.pt", generator, generator.params, {"view": "sagittal"})
    return data, attention, model


def test_stage_writes_crops_and_index(model_and_data: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, attention, model = model_and_data
    out = tmp_path / "synth"
    argv = ["synthesize", "--data", str(data), "--attention", str(attention), "--model", str(model), "--out", str(out),
            "--set", "model.contextual_attention=false", "--set", "model.height_prior=false",
            "--set", "synthesize.neighbour_min_voxels=10", *NO_PARAMS]
    assert main(argv) == 0
    index = read_index(out)
    assert index[["case", "vertebra"]].values.tolist() == [["sub-a", 21], ["sub-b", 21]]
    assert np.allclose(index["predicted_height_mm"], HEIGHT, atol=1e-3)
    original = load_volume(data / "ct" / "sub-a_21.nii.gz")
    synthesised = load_volume(out / "ct" / "sub-a_21.nii.gz")
    assert synthesised.shape == original.shape and np.allclose(synthesised.affine, original.affine)
    label = load_volume(out / "label" / "sub-a_21.nii.gz", label=True).array
    assert set(np.unique(label)) <= {0, 21}
    assert np.array_equal(label[:, :, 3] == 21, load_volume(data / "label" / "sub-a_21.nii.gz", label=True).array[:, :, 3] == 21)


def test_missing_view_model_is_one_line(model_and_data: tuple[Path, Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data, attention, model = model_and_data
    argv = ["synthesize", "--data", str(data), "--attention", str(attention), "--model", str(model),
            "--out", str(tmp_path / "synth"), "--set", "model.contextual_attention=false",
            "--set", "model.height_prior=false", "--set", "synthesize.views=[sagittal, coronal]", *NO_PARAMS]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "generator_coronal.pt: saved generator not found" in error and error.count("\n") == 1


def test_coarse_stage_generator_runs_without_its_fine_network() -> None:
    ct, label = crop()
    generator = fixed_height_generator()
    fine_calls = count_calls(generator.fine)
    result = synthesise_vertebra({"sagittal": generator}, ct, label, None, 21, (), SynthesizeParams(), 1.0,
                                 torch.device("cpu"), stage="coarse")
    assert fine_calls == []
    assert result.predicted_height_mm == pytest.approx(HEIGHT, abs=1e-3)


def test_height_from_prior_leaves_out_the_learnt_correction_at_synthesis(tmp_path: Path) -> None:
    from test_models import inputs

    params = ModelParams(size="cpu", max_height_px=40, contextual_attention=False)
    generator = HealthiVertGenerator(params)
    with torch.no_grad():
        for head in (generator.coarse_height_head, generator.fine_height_head):
            head.linear.bias.fill_(1.0)  # a learnt correction of the prior
    save_generator(tmp_path / "generator.pt", generator, params, {"view": "sagittal"})
    prior = torch.tensor([24.0])
    heights = []
    for from_prior in (False, True):
        loaded, _ = iterative.load_view_generators(tmp_path, params, SynthesizeParams(height_from_prior=from_prior),
                                                   torch.device("cpu"))
        with torch.inference_mode():
            heights.append(float(loaded["sagittal"](**inputs(1, 64, band=40), neighbour_height=prior).height[0]))
    assert heights[0] > 30.0  # the prior, corrected twice (coarse, then fine)
    assert heights[1] == pytest.approx(24.0, abs=1e-3)
