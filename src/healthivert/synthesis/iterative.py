"""Iterative 2.5D synthesis of a pseudo-healthy vertebra (section 5 of the method), batched.

Crops are ``(CC, AP, LR)`` (``IPL``: row 0 cranial, column 0 anterior, slice 0 right). A *sagittal*
slice is ``crop[:, :, k]``, a *coronal* one ``crop[:, j, :]``; rows are always cranio-caudal.

For every slice in the central ``slice_fraction`` of the target's extent across the slicing axis,
with ``iterative`` (the method): first the vertebra above is synthesised (where it has more than
``neighbour_min_voxels`` voxels in the slice) and put back in the slice, then the vertebra below on
that result, then the target on that result, so a fractured neighbour cannot distort the target's
restored height. Without it, the target is synthesised once, on its real neighbours. Each step runs
all slices of the vertebra through the generator in one batch (chunks of ``batch_size``). Each
synthesised slice is re-assembled at the predicted healthy height, or at the vertebra's own height
in the slice where that is taller (as the method: a restoration never shortens a vertebra): the
context above and below is shifted to meet the generated band, for the CT and the labels alike.

A restored neighbour is labelled by its own label stretched to its restored height: the label only
carries the target's context (and the SHRM's neighbour height), and the generator's segmentation,
trained on vertebrae centred in the crop, is unreliable for the off-centre neighbours (it lost whole
neighbours of the phantom's test vertebrae, which halved the target's neighbour height). The target
is labelled by the generator's segmentation; with ``fill_height`` its body (segmentation and CT) is
stretched over the kept rows, so the synthesised vertebra has the restored height.

With two views, the CT intensities and the target probabilities of the views are averaged where
both synthesised a voxel; slices outside the synthesised range keep the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from healthivert.config import ModelParams, SynthesizeParams
from healthivert.errors import CheckpointError
from healthivert.models.io import generator_file, load_view_generator
from healthivert.data.samples import assembly_rows, close_up, make_sample
from healthivert.models.generator import HealthiVertGenerator, Stage

#: axes order that puts a view's slicing axis last: sagittal slices along LR, coronal along AP.
VIEW_AXES = {"sagittal": (0, 1, 2), "coronal": (0, 2, 1)}


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
    """The pseudo-healthy crop of one target vertebra.

    Attributes:
        ct: uint8 windowed CT ``(CC, AP, LR)``, synthesised slices fused over the views.
        label: uint8 ``(CC, AP, LR)``: the target's VerSe id where the pseudo-healthy vertebra is.
        predicted_height_mm: mean healthy height the generator predicted for the target.
        slices: number of target slices synthesised, all views together.
    """

    ct: np.ndarray
    label: np.ndarray
    predicted_height_mm: float
    slices: int


@dataclasses.dataclass
class _ViewResult:
    ct: np.ndarray          # float32 0..255, in the view's layout
    probability: np.ndarray  # float32 target probability, in the view's layout
    covered: np.ndarray     # bool per slice index
    heights: list[float]    # predicted target heights, rows


def central_slices(label: np.ndarray, target: int, slice_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Slices (last axis) within the central ``slice_fraction`` of the target's extent, and their ``slice_ratio``.

    Args:
        label: ``(CC, X, S)`` labels, slicing axis last.
        target: VerSe id.
        slice_fraction: the kept part of the extent (0.8: the central 80 %).

    Returns:
        slice indices and ``|k - centre| / half-extent`` for each.
    """
    present = np.flatnonzero((label == target).any(axis=(0, 1)))
    if present.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    centre = (present[0] + present[-1]) / 2.0
    half = max((present[-1] - present[0]) / 2.0, 0.5)
    index = np.arange(present[0], present[-1] + 1)
    ratio = np.abs(index - centre) / half
    keep = ratio <= slice_fraction + 1e-9
    return index[keep], ratio[keep]


def _target_rows(label_slice: np.ndarray, vertebra: int, max_height: int) -> tuple[int, int]:
    """Rows ``[x1, x2)`` of a vertebra in a slice as :func:`make_sample` cuts them (central ``max_height`` rows at most)."""
    rows = np.flatnonzero((label_slice == vertebra).any(axis=1))
    x1, x2 = int(rows[0]), int(rows[-1]) + 1
    if x2 - x1 > max_height:
        x1 += (x2 - x1 - max_height) // 2
        x2 = x1 + max_height
    return x1, x2


def _stretched(label_slice: np.ndarray, vertebra: int, rows: tuple[int, int], generated: np.ndarray) -> np.ndarray:
    """The vertebra's label of rows ``[x1, x2)`` resampled (nearest row) onto the ``generated`` rows."""
    x1, x2 = rows
    out_rows = np.flatnonzero(generated)
    if out_rows.size == 0:
        return np.zeros_like(label_slice)
    source = x1 + ((out_rows - out_rows[0]) * (x2 - x1)) // out_rows.size
    out = np.zeros_like(label_slice)
    out[out_rows] = np.where(label_slice[source] == vertebra, vertebra, 0)
    return out


def fill_kept_rows(probability: np.ndarray, ct: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stretch a synthesised vertebra over the rows the assembly kept, so it has the restored height.

    The segmentation head's body can stop short of the kept rows (its probability stays below 0.5 at
    the endplates: 0.6 rows short of the restored height on the phantom's vertebrae, training ones
    included). The kept rows of the probability and the CT are resampled along the rows (linearly, one
    mapping for both) so that the body's rows (probability > 0.5 in some column) span them exactly.

    Args:
        probability: ``(H, W)`` the vertebra's probability, 0 outside the kept rows.
        ct: ``(H, W)`` the assembled CT.
        generated: ``(H,)`` bool, the kept rows (contiguous).

    Returns:
        The stretched probability and CT (unchanged where no body or no kept row is found).
    """
    rows = np.flatnonzero(generated)
    body = np.flatnonzero(probability.max(axis=1) > 0.5)
    if rows.size == 0 or body.size == 0:
        return probability, ct
    first, count = int(rows[0]), rows.size
    top, bottom = int(body[0]), int(body[-1]) + 1
    source = top + (np.arange(count) + 0.5) * (bottom - top) / count - 0.5
    low = np.floor(source).astype(np.int64)
    share = (source - low)[:, None]
    high = np.clip(low + 1, 0, probability.shape[0] - 1)
    low = np.clip(low, 0, probability.shape[0] - 1)
    filled_probability, filled_ct = np.zeros_like(probability), ct.copy()
    filled_probability[first:first + count] = probability[low] * (1 - share) + probability[high] * share
    filled_ct[first:first + count] = ct[low] * (1 - share) + ct[high] * share
    return filled_probability, filled_ct


def prepare_for_synthesis(generator: HealthiVertGenerator) -> HealthiVertGenerator:
    """``generator`` in eval mode with channels-last weights.

    With channels-last weights oneDNN runs every convolution in NHWC, whatever the inputs' layout:
    on a CPU the full-size generator then takes 1.21 instead of 1.61 s per 16 slices (bf16).
    """
    return generator.eval().to(memory_format=torch.channels_last)


def load_view_generators(model_dir: Path, model_params: ModelParams, settings: SynthesizeParams,
                         device: torch.device) -> tuple[dict[str, HealthiVertGenerator], Stage]:
    """The generator of each of ``settings.views`` in a model folder (ready for synthesis) and their training stage.

    With ``settings.height_from_prior`` the SHRM heads leave out their learnt correction where the
    neighbour prior is known.

    Raises:
        CheckpointError: a file is missing, of another architecture, trained on another view, or the
            views' generators come from different stages.
    """
    generators, stages = {}, set()
    for view in settings.views:
        generator, extra = load_view_generator(model_dir, view, device, expected=model_params)
        if settings.height_from_prior:
            generator.heights_from_prior()
        generators[view] = prepare_for_synthesis(generator)
        stages.add(extra.get("stage", "fine"))
    if len(stages) > 1:
        raise CheckpointError(model_dir, f"the views' generators come from different stages ({', '.join(sorted(stages))})")
    stage = stages.pop()
    if stage not in ("coarse", "fine"):
        raise CheckpointError(model_dir / generator_file(settings.views[0]), f"unknown training stage '{stage}'")
    return generators, stage  # type: ignore[return-value]


def _run_generator(generator: HealthiVertGenerator, samples: list[dict[str, np.ndarray]], batch_size: int,
                   device: torch.device, autocast_dtype: torch.dtype | None, stage: Stage
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Final CT ``(N, H, W)`` in [-1, 1], target probability ``(N, H, W)``, predicted height ``(N,)`` and
    generated rows kept ``(N,)`` (at least the vertebra's own height, as the method) of the samples."""
    cts, segs, heights, kept = [], [], [], []
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]

            def stack(key: str) -> torch.Tensor:
                return torch.from_numpy(np.stack([s[key] for s in chunk])).to(device)

            out = generator(stack("ct"), stack("mask"), stack("slice_ratio"), stack("attention"), stage=stage,
                            neighbour_height=stack("neighbour_height"), neighbour_side=stack("neighbour_side"),
                            min_height=stack("height"))
            cts.append(out.ct[:, 0].float().cpu().numpy())
            segs.append(out.seg[:, 0].float().cpu().numpy())
            heights.append(out.height.float().reshape(-1).cpu().numpy())
            kept.append(out.kept_rows.cpu().numpy())
    return np.concatenate(cts), np.concatenate(segs), np.concatenate(heights), np.concatenate(kept)


def _synthesise_step(generator: HealthiVertGenerator, ct: np.ndarray, label: np.ndarray, cam: np.ndarray | None,
                     vertebra: int, slices: np.ndarray, ratios: np.ndarray, min_voxels: int, max_height: int,
                     batch_size: int, device: torch.device, autocast_dtype: torch.dtype | None, stage: Stage,
                     label_from_segmentation: bool, fill_height: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthesise ``vertebra`` in the given slices of ``ct``/``label``/``cam`` (slicing axis last), in place.

    The restored vertebra is labelled by the generator's segmentation (``label_from_segmentation``),
    stretched over the kept rows with ``fill_height`` (:func:`fill_kept_rows`), or by its own label
    stretched to the restored height.

    Returns:
        the slices done, the vertebra's probability ``(n, H, W)`` in them (0 outside its generated
        rows) and its predicted heights in rows.
    """
    chosen, samples = [], []
    for k, ratio in zip(slices, ratios):
        label_slice = label[:, :, k]
        if np.count_nonzero(label_slice == vertebra) <= min_voxels:
            continue
        sample = make_sample(ct[:, :, k], label_slice, vertebra, None if cam is None else cam[:, :, k],
                             float(ratio), max_height)
        if sample is not None:
            chosen.append(int(k))
            samples.append(sample)
    n_rows = ct.shape[0]
    if not samples:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_rows, ct.shape[1]), np.float32), np.zeros(0)
    out_ct, out_seg, heights, kept = _run_generator(generator, samples, batch_size, device, autocast_dtype, stage)
    bands = torch.from_numpy(np.stack([s["band"] for s in samples]))
    context_rows, generated = (t.numpy() for t in assembly_rows(n_rows, bands, torch.from_numpy(kept)))
    probabilities = np.where(generated[:, :, None], out_seg, 0.0).astype(np.float32)
    if label_from_segmentation and fill_height:
        for i in range(len(samples)):
            probabilities[i], out_ct[i] = fill_kept_rows(probabilities[i], out_ct[i], generated[i])
    for i, k in enumerate(chosen):
        label_slice = label[:, :, k]
        band = (int(samples[i]["band"][0]), int(samples[i]["band"][1]))
        context_label = close_up(label_slice, _target_rows(label_slice, vertebra, max_height), band)[context_rows[i]]
        context_label[context_label == vertebra] = 0  # rows of a target taller than the gap
        if label_from_segmentation:
            restored = np.where(probabilities[i] > 0.5, vertebra, 0)
        else:
            restored = _stretched(label_slice, vertebra, _target_rows(label_slice, vertebra, max_height), generated[i])
        new_label = np.where(generated[i][:, None], restored, context_label)
        if cam is not None:  # the attention moves with the context; the restored vertebra looks healthy
            rows = _target_rows(label_slice, vertebra, max_height)
            cam[:, :, k] = np.where(generated[i][:, None], 0.0, close_up(cam[:, :, k], rows, band)[context_rows[i]])
        label[:, :, k] = new_label.astype(label.dtype)
        ct[:, :, k] = np.clip((out_ct[i] + 1.0) * 127.5, 0.0, 255.0)
    return np.asarray(chosen), probabilities, heights


def _synthesise_view(generator: HealthiVertGenerator, ct: np.ndarray, label: np.ndarray, cam: np.ndarray | None,
                     target: int, neighbours: tuple[int, ...], params: SynthesizeParams, max_height: int,
                     device: torch.device, autocast_dtype: torch.dtype | None, stage: Stage) -> _ViewResult:
    """All steps of one view on ``(CC, X, S)`` arrays (slicing axis last)."""
    work_ct = ct.astype(np.float32)
    work_label = label.copy()
    work_cam = None if cam is None else cam.astype(np.float32)
    slices, ratios = central_slices(label, target, params.slice_fraction)
    steps = [*(n for n in neighbours if params.iterative), target]
    probability = (label == target).astype(np.float32)
    covered = np.zeros(label.shape[2], dtype=bool)
    heights: list[float] = []
    for vertebra in steps:
        is_target = vertebra == target
        done, prob, step_heights = _synthesise_step(
            generator, work_ct, work_label, work_cam, vertebra, slices, ratios,
            0 if is_target else params.neighbour_min_voxels, max_height, params.batch_size, device, autocast_dtype,
            stage, label_from_segmentation=is_target, fill_height=params.fill_height)
        if is_target and done.size:
            probability[:, :, done] = np.moveaxis(prob, 0, -1)
            covered[done] = True
            heights.extend(float(h) for h in step_heights)
    return _ViewResult(work_ct, probability, covered, heights)


def synthesise_vertebra(generators: Mapping[str, HealthiVertGenerator], ct: np.ndarray, label: np.ndarray,
                        attention: np.ndarray | None, target: int, neighbours: tuple[int, ...],
                        params: SynthesizeParams, spacing_cc_mm: float, device: torch.device,
                        autocast_dtype: torch.dtype | None = None, stage: Stage = "fine") -> SynthesisResult:
    """Pseudo-healthy CT and label of one target vertebra of a crop.

    Args:
        generators: view (``sagittal``/``coronal``) -> generator trained on that view; the views of
            ``params.views`` are used.
        ct: windowed CT ``(CC, AP, LR)``, 0..255.
        label: body labels (VerSe ids) ``(CC, AP, LR)``.
        attention: Grad-CAM++ map in [0, 1] ``(CC, AP, LR)`` (high = looks fractured), or ``None``.
        target: the target's VerSe id.
        neighbours: VerSe ids synthesised first when ``params.iterative`` (above, then below).
        params: synthesis settings.
        spacing_cc_mm: cranio-caudal voxel size (for the predicted height in mm).
        device: where the generators run.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision, ``None`` for float32.
        stage: ``fine`` (the whole generator) or ``coarse`` (a generator of the coarse stage only).
    """
    total_ct = np.zeros(ct.shape, dtype=np.float32)
    total_probability = np.zeros(ct.shape, dtype=np.float32)
    weight = np.zeros(ct.shape, dtype=np.float32)
    heights: list[float] = []
    slices = 0
    for view in params.views:
        generator = generators[view]
        max_height = generator.params.max_height_px
        axes = VIEW_AXES[view]
        result = _synthesise_view(generator, np.transpose(ct, axes), np.transpose(label, axes),
                                  None if attention is None else np.transpose(attention, axes),
                                  target, neighbours, params, max_height, device, autocast_dtype, stage)
        done = np.flatnonzero(result.covered)
        # the transposes are views: the sums land in the (CC, AP, LR) totals, on the synthesised slices only
        np.transpose(total_ct, axes)[:, :, done] += result.ct[:, :, done]
        np.transpose(total_probability, axes)[:, :, done] += result.probability[:, :, done]
        np.transpose(weight, axes)[:, :, done] += 1.0
        heights.extend(result.heights)
        slices += done.size
    synthesised = weight > 0
    fused_ct = np.where(synthesised, total_ct / np.maximum(weight, 1), ct)
    fused_probability = np.where(synthesised, total_probability / np.maximum(weight, 1), label == target)
    return SynthesisResult(
        ct=np.clip(np.rint(fused_ct), 0, 255).astype(np.uint8),
        label=np.where(fused_probability > 0.5, target, 0).astype(np.uint8),
        predicted_height_mm=float(np.mean(heights) * spacing_cc_mm) if heights else float("nan"),
        slices=slices,
    )
