"""One vertebra's measurements: RHLV (sagittal and coronal thirds), heights, mask-only baseline, loss map.

Shared by the ``rhlv`` stage and ``grade``. Inputs are ``(CC, AP, LR)`` label crops (straightened
``IPL``: row 0 cranial, column 0 anterior, slice 0 right) on one grid with voxel size ``spacing_mm``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from healthivert.config import RhlvParams
from healthivert.geometry.morphometry import neighbour_baseline, vertebra_heights
from healthivert.io.nifti import Volume
from healthivert.rhlv.measure import height_loss_map, rhlv_with_params

log = logging.getLogger(__name__)

THIRD_NAMES = ("ant", "mid", "post")
CORONAL_NAMES = ("right", "mid", "left")


@dataclasses.dataclass(frozen=True, eq=False)
class VertebraMeasurement:
    """The measurements of one target vertebra against its pseudo-healthy version.

    Attributes:
        values: ``measurable``, ``problem``, ``rhlv_ant/mid/post/body``, ``rhlv_max``, ``shape_ratio``,
            ``h_syn_*_mm`` and ``h_ori_*_mm`` (``*`` = ant, mid, post, body), ``rhlv_cor_right/mid/left``
            and the mask-only baseline ``baseline_loss_ant/mid/post/max`` (NaN where not measured).
        loss_map: ``(AP, LR)`` float32 height-loss map (NaN outside the synthesised body).
    """

    values: dict[str, object]
    loss_map: np.ndarray


def neighbour_losses(labels: np.ndarray, vertebra: int, spacing: tuple[float, float, float],
                     params: RhlvParams) -> tuple[float, float, float]:
    """Mask-only baseline: the target's height loss against its neighbours in the crop.

    NaN without a measured neighbour. A third whose own columns all fall below the column threshold
    (a severe wedge measured on its own columns) counts as height 0, loss 1, as in the reference.
    """
    heights = vertebra_heights(labels, spacing, params.central_fraction, params.column_threshold)
    baseline = neighbour_baseline(heights).get(vertebra)
    if baseline is None or baseline.expected is None:
        return float("nan"), float("nan"), float("nan")
    own = baseline.heights.as_tuple()
    losses = (baseline.loss_ant, baseline.loss_mid, baseline.loss_post)
    return tuple(1.0 if np.isnan(h) else loss for h, loss in zip(own, losses))  # type: ignore[return-value]


def measure_vertebra(original: np.ndarray, synthesised: np.ndarray, vertebra: int,
                     spacing_mm: tuple[float, float, float], params: RhlvParams) -> VertebraMeasurement:
    """RHLV, heights and the mask-only baseline of one vertebra.

    Args:
        original: body labels (VerSe ids) of the crop, the target and its neighbours.
        synthesised: labels of the pseudo-healthy crop (the target's id where it is).
        vertebra: the target's VerSe id (present in both).
        spacing_mm: voxel size ``(CC, AP, LR)``.
        params: the RHLV settings.

    A synthesis too degenerate to measure gives ``measurable`` false and the reason in ``problem``.
    """
    ori = original == vertebra
    syn = synthesised == vertebra
    sagittal = rhlv_with_params(syn, ori, spacing_mm, params, "sagittal")
    coronal = rhlv_with_params(syn, ori, spacing_mm, params, "coronal")
    unmeasured = [third for third, value in zip(THIRD_NAMES, sagittal.as_tuple()) if not np.isfinite(value)]
    problem = f"no measurable column in the {', '.join(unmeasured)} third(s) of the synthesised body" if unmeasured else ""
    values: dict[str, object] = {
        "measurable": not unmeasured, "problem": problem,
        "rhlv_ant": sagittal.ant, "rhlv_mid": sagittal.mid, "rhlv_post": sagittal.post, "rhlv_body": sagittal.body,
        "rhlv_max": float(np.max(sagittal.as_tuple())), "shape_ratio": sagittal.shape_ratio,
    }
    for part in ("ant", "mid", "post", "body"):
        values[f"h_syn_{part}_mm"] = getattr(sagittal.syn, f"{part}_mm")
        values[f"h_ori_{part}_mm"] = getattr(sagittal.ori, f"{part}_mm")
    for third, value in zip(CORONAL_NAMES, coronal.as_tuple()):
        values[f"rhlv_cor_{third}"] = value
    baseline = neighbour_losses(original, vertebra, spacing_mm, params)
    for third, value in zip(THIRD_NAMES, baseline):
        values[f"baseline_loss_{third}"] = value
    values["baseline_loss_max"] = max(baseline) if not np.isnan(baseline).any() else float("nan")
    return VertebraMeasurement(values, height_loss_map(syn, ori, spacing_mm))


def loss_map_volume(loss: np.ndarray, crop_affine: np.ndarray, syn: np.ndarray) -> Volume:
    """The ``(AP, LR)`` map as a one-row ``(1, AP, LR)`` volume at the synthesised body's central row (0 outside the body)."""
    centre_row = float(np.mean(np.nonzero(syn.any(axis=(1, 2)))[0]))
    affine = crop_affine.copy()
    affine[:3, 3] = crop_affine[:3, :3] @ np.array([centre_row, 0.0, 0.0]) + crop_affine[:3, 3]
    return Volume(np.nan_to_num(loss, nan=0.0)[None].astype(np.float32), affine)
