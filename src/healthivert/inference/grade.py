"""Grade one scan: load -> straighten -> crop -> attention -> synthesise -> RHLV -> grade -> un-straighten.

:func:`grade_case` is the one code path from a CT and its vertebra labels to graded vertebrae; the
``grade`` command, and any wrapper (an MLflow pyfunc, a Kubeflow step), call it with a loaded
:class:`~healthivert.inference.bundle.GraderBundle`. Every per-vertebra step is the library function
the DAG stages call (``geometry.spine.crop_spine``, ``training.classifier.attention_volume``,
``synthesis.iterative.synthesise_vertebra``, ``rhlv.vertebra.measure_vertebra``, ``GradingModel``), so
a scan graded here gets the grades and RHLV the pipeline gives it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from healthivert.errors import InputDataError
from healthivert.geometry.crops import VertebraCrop
from healthivert.geometry.spine import SpineCrops, crop_spine
from healthivert.geometry.straighten import unstraighten_many
from healthivert.grading.model import GradingModel
from healthivert.inference.bundle import GraderBundle
from healthivert.io.case import SpineCase, load_case
from healthivert.io.labels import vertebra_name
from healthivert.io.layouts import CaseFiles, discover_cases
from healthivert.io.nifti import Volume, orientation
from healthivert.io.resample import reorient
from healthivert.rhlv.vertebra import THIRD_NAMES, measure_vertebra
from healthivert.synthesis.iterative import SynthesisResult, synthesise_vertebra
from healthivert.training.classifier import attention_volume
from healthivert.training.runtime import choose_precision

log = logging.getLogger(__name__)

AIR_HU = -1024.0


@dataclasses.dataclass(frozen=True)
class CaseInputs:
    """The files of one scan to grade.

    Attributes:
        case_id: name of the case (its output folder).
        ct: a NIfTI file or a DICOM series folder.
        labels: a vertebra label map (VerSe or TotalSegmentator ids) or TotalSegmentator's mask folder.
        centroids: optional centroid JSON (VerSe or the paper's form); computed from the labels otherwise.
        label_scheme: ``verse``, ``totalseg`` or ``auto``.
    """

    case_id: str
    ct: Path
    labels: Path
    centroids: Path | None = None
    label_scheme: str = "auto"

    def files(self) -> CaseFiles:
        """As the dataset loader's :class:`CaseFiles`."""
        return CaseFiles(self.case_id, self.case_id, "grade", self.labels, self.ct, self.centroids, self.label_scheme)


@dataclasses.dataclass(frozen=True, eq=False)
class GradedVertebra:
    """One vertebra of a graded scan.

    Attributes:
        values: the row of ``grades.csv`` (NaN where not measured).
        crop: its straightened crop, or ``None`` when it was not cropped.
        synthesis: its pseudo-healthy crop, or ``None`` when not synthesised.
        loss_map: ``(AP, LR)`` height-loss map, or ``None``.
    """

    values: dict[str, Any]
    crop: VertebraCrop | None = None
    synthesis: SynthesisResult | None = None
    loss_map: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class CaseGrades:
    """Everything graded in one scan.

    Attributes:
        case: the loaded scan (canonical ``IPL`` grid).
        crops: the straightened spine and its crops.
        vertebrae: cranial first, graded or with the reason they were not.
        pseudo_healthy_ct: HU on the canonical grid, every graded vertebra replaced by its pseudo-healthy version.
        pseudo_healthy_label: uint8 VerSe ids of the pseudo-healthy bodies on the canonical grid.
    """

    case: SpineCase
    crops: SpineCrops
    vertebrae: list[GradedVertebra]
    pseudo_healthy_ct: np.ndarray
    pseudo_healthy_label: np.ndarray

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per vertebra (the content of ``grades.csv``)."""
        return [v.values for v in self.vertebrae]


def cases_in_folder(folder: str | os.PathLike[str]) -> list[CaseInputs]:
    """Every case of a dataset folder, in any layout ``preprocess`` reads.

    Raises:
        InputDataError: no case found, or a case without a CT.
    """
    inputs = []
    for files in discover_cases(folder):
        if files.ct is None:
            raise InputDataError(files.mask, f"case '{files.case_id}' has no CT", "grading needs the CT beside the labels")
        inputs.append(CaseInputs(files.case_id, files.ct, files.mask, files.centroids, files.label_scheme))
    return inputs


def grade_scores(model: GradingModel, features: np.ndarray) -> tuple[int, dict[str, float]]:
    """Grade of one feature vector and the share of the one-vs-one votes each grade got."""
    grade = int(model.predict(features[None])[0])
    if len(model.classes) == 1:
        return grade, {str(model.classes[0]): 1.0}
    decision = model.decision_function(features[None])[0]
    votes = np.zeros(len(model.classes))
    for column, (i, j) in enumerate(model.pairs):
        votes[i if decision[column] > 0 else j] += 1
    shares = votes / (len(model.classes) - 1)
    return grade, {str(c): float(s) for c, s in zip(model.classes, shares)}


def _features(model: GradingModel, values: dict[str, Any]) -> np.ndarray | None:
    features = np.asarray([float(values.get(name, math.nan)) for name in model.features])
    return features if np.all(np.isfinite(features)) else None


def _flags(crop: VertebraCrop) -> str:
    missing = [side for side, neighbour in (("above", crop.above), ("below", crop.below)) if neighbour is None]
    return f"no whole neighbour {' or '.join(missing)} in the crop (synthesised from one side)" if missing else ""


def _skipped_row(vertebra: int, reason: str) -> dict[str, Any]:
    return {"vertebra": vertebra, "name": vertebra_name(vertebra), "graded": False, "grade": None, "flag": reason}


def _grade_vertebra(crop: VertebraCrop, bundle: GraderBundle, autocast: Any) -> GradedVertebra:
    """Attention, synthesis, RHLV and grade of one cropped vertebra (what the DAG stages 2-6 do for it)."""
    params = bundle.params
    vid = crop.vertebra
    assert crop.ct is not None  # crop_spine crops the CT
    cam = None
    if bundle.classifier is not None:
        cam = np.clip(attention_volume(bundle.classifier, crop.ct, bundle.device,
                                       params.train_coarse.classifier.cam_slice_step), 0.0, 1.0)
    neighbours = tuple(v for v in (crop.above, crop.below) if v is not None)
    labels = crop.labels.astype(np.int32)
    synthesis = synthesise_vertebra(bundle.generators, crop.ct.astype(np.float32), labels, cam, vid, neighbours,
                                    params.synthesize, params.preprocess.spacing_mm, bundle.device, autocast,
                                    bundle.stage)
    row: dict[str, Any] = {"vertebra": vid, "name": vertebra_name(vid), "graded": False, "grade": None,
                           "flag": _flags(crop), "predicted_height_mm": synthesis.predicted_height_mm}
    if not (synthesis.label == vid).any():
        row["flag"] = "synthesis degenerate: no pseudo-healthy body"
        return GradedVertebra(row, crop, synthesis)
    spacing = (params.preprocess.spacing_mm,) * 3
    measured = measure_vertebra(labels, synthesis.label.astype(np.int32), vid, spacing, params.rhlv)
    row |= measured.values
    features = _features(bundle.svm, measured.values)
    if features is None:
        row["flag"] = f"synthesis degenerate: {measured.values['problem'] or 'a grading feature is not measured'}"
    else:
        row["grade"], scores = grade_scores(bundle.svm, features)
        row["graded"] = True
        row |= {f"score_grade_{grade}": share for grade, share in scores.items()}
    baseline = bundle.baseline_svm
    baseline_features = _features(baseline, measured.values) if baseline is not None else None
    row["baseline_grade"] = (int(baseline.predict(baseline_features[None])[0])  # type: ignore[union-attr]
                             if baseline_features is not None else None)
    return GradedVertebra(row, crop, synthesis, measured.loss_map)


def _unwindow(ct_u8: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    lo, hi = hu_window
    return (ct_u8.astype(np.float32) * ((hi - lo) / 255.0) + lo).astype(np.float32)


def _paste_back(graded: GradedVertebra, crops: SpineCrops, bundle: GraderBundle, ct: np.ndarray,
                labels: np.ndarray) -> None:
    """Write a vertebra's pseudo-healthy band (changed voxels and its body) into the canonical grid.

    Only the bounding box of the changed voxels and the body (plus one voxel, within the band) is
    mapped back: outside it nothing is written, and the margin keeps the interpolation at its edge
    as over the whole band.
    """
    crop, synthesis = graded.crop, graded.synthesis
    assert crop is not None and synthesis is not None and crop.ct is not None
    rows = np.flatnonzero(crop.mask.any(axis=(1, 2)))
    band = slice(int(rows[0]), int(rows[-1]) + 1)
    vid = crop.vertebra
    changed = synthesis.ct[band] != crop.ct[band]
    body = synthesis.label[band] == vid
    region = np.argwhere(changed | body)
    if region.size == 0:
        return
    low = np.maximum(region.min(axis=0) - 1, 0)
    high = np.minimum(region.max(axis=0) + 2, changed.shape)
    tight = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))
    origin = (crop.origin[0] + band.start + int(low[0]), crop.origin[1] + int(low[1]), crop.origin[2] + int(low[2]))
    hu = np.where(changed[tight], _unwindow(synthesis.ct[band][tight], bundle.params.preprocess.hu_window), np.nan)
    body_ids = np.where(body[tight], vid, 0).astype(np.uint8)
    box, (hu_values, body_values), inside = unstraighten_many(
        crops.spine.map, [(hu, False, np.nan), (body_ids, True, 0.0)], origin, ct.shape)  # type: ignore[arg-type]
    take = inside & np.isfinite(hu_values)
    ct[box][take] = hu_values[take]
    labels[box][inside & (body_values == vid)] = vid


def load_grading_case(inputs: CaseInputs) -> SpineCase:
    """Read one scan for grading (native voxel size, canonical orientation), checking what grading needs.

    Raises:
        InputDataError: unreadable files, CT and labels of different grids, no or one vertebra.
    """
    case = load_case(inputs.files(), spacing_mm=None)
    if len(case.centroids) < 2:
        raise InputDataError(inputs.labels, f"{len(case.centroids)} vertebra(e) in the label map",
                             "at least two are needed to straighten the spine")
    return case


def grade_case(inputs: CaseInputs, bundle: GraderBundle, progress: bool = True) -> CaseGrades:
    """Grade every vertebra of one scan with a loaded bundle.

    Args:
        inputs: the scan's files.
        bundle: from :func:`~healthivert.inference.bundle.load_bundle`.
        progress: a progress bar per vertebra (off without a TTY anyway).

    Returns:
        the graded vertebrae (cranial first) and the pseudo-healthy volumes on the canonical grid; write
        them with :func:`healthivert.inference.outputs.write_case`.

    Raises:
        InputDataError: see :func:`load_grading_case`.
    """
    case = load_grading_case(inputs)
    assert case.ct is not None
    params = bundle.params
    crops = crop_spine(case.labels.array, case.ct.array, case.labels.spacing_mm, case.centroids, params.preprocess,
                       air_hu=AIR_HU)
    autocast = choose_precision(bundle.device, params.synthesize.precision)
    pseudo_ct = case.ct.array.copy()
    pseudo_label = np.zeros(case.labels.shape, dtype=np.uint8)
    results: dict[int, GradedVertebra] = {vid: GradedVertebra(_skipped_row(vid, reason))
                                          for vid, reason in crops.spine.skipped.items()}
    for vid, crop in tqdm(crops.crops.items(), desc=f"grade {inputs.case_id}", unit="vertebra",
                          disable=None if progress else True):
        graded = _grade_vertebra(crop, bundle, autocast)
        if graded.values["graded"]:
            _paste_back(graded, crops, bundle, pseudo_ct, pseudo_label)
        results[vid] = graded
    order = {vid: float(case.centroids[vid][0]) if vid in case.centroids else math.inf for vid in results}
    vertebrae = [results[vid] for vid in sorted(results, key=lambda v: order[v])]
    for graded in vertebrae:
        graded.values["case"] = inputs.case_id
    return CaseGrades(case, crops, vertebrae, pseudo_ct, pseudo_label)


def to_stored_orientation(array: np.ndarray, case: SpineCase) -> Volume:
    """A canonical-grid array back in the orientation of the input scan (the affine of its label map)."""
    canonical = case.labels.with_array(array)
    stored = case.stored_affine if case.stored_affine is not None else canonical.affine
    return reorient(canonical, orientation(stored))


#: columns of ``grades.csv``, in order (score columns follow the grades the SVM knows).
TABLE_COLUMNS = ("case", "vertebra", "name", "graded", "grade", "flag",
                 *(f"rhlv_{t}" for t in (*THIRD_NAMES, "max", "body")), "rhlv_cor_right", "rhlv_cor_mid",
                 "rhlv_cor_left", *(f"h_{kind}_{t}_mm" for kind in ("ori", "syn") for t in (*THIRD_NAMES, "body")),
                 "predicted_height_mm", *(f"baseline_loss_{t}" for t in (*THIRD_NAMES, "max")), "baseline_grade")
