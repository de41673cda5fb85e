"""Stage 1, ``healthivert preprocess``: straighten, de-pedicle and crop every vertebra; write the manifest.

For every case of the input dataset (any supported layout): straighten CT and labels once along the
spine curve, isolate the vertebral bodies, and crop each vertebra whose body lies wholly in the scan
(``crop_shape`` voxels of ``spacing_mm``, see ``docs/architecture.md``). Phantom healthy twins are
straightened along the same curve and cropped at the same place. Vertebrae that cannot be used are
logged with the reason, counted in the metrics and listed in ``skipped.csv``. The output folder is
written whole or not at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from healthivert.config import Params, PreprocessParams, dump_params
from healthivert.data.manifest import COLUMNS, crop_name, read_manifest, resolve, write_manifest
from healthivert.data.splits import patient_of, split_patients
from healthivert.errors import InputDataError
from healthivert.geometry.crops import crop_affine, crop_vertebra
from healthivert.geometry.morphometry import heights_on, select_columns
from healthivert.geometry.spine import NOT_IN_LABEL_MAP, crop_spine, resample_twin
from healthivert.io.atomic import atomic_dir
from healthivert.io.case import SpineCase, load_case
from healthivert.io.grades import read_grades
from healthivert.io.labels import vertebra_name
from healthivert.io.layouts import CaseFiles, discover_cases
from healthivert.io.nifti import save_volume
from healthivert.io.remote import is_s3_uri, local_copy
from healthivert.parallel import map_cases
from healthivert.stages.common import (
    add_metrics_argument, add_params_arguments, check_outputs, log_manifest_dataset, params_from_args, write_metrics)
from healthivert.tracking.runs import stage_run

log = logging.getLogger(__name__)

FOLDERS = ("ct", "label", "mask", "healthy_ct", "healthy_label")
SKIPPED_NAME = "skipped.csv"
_THIRDS = ("ant", "mid", "post")
AIR_HU = -1024.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the stage."""
    parser.add_argument("--input", required=True, metavar="DIR|S3URI",
                        help="dataset folder or s3://bucket/prefix (VerSe / phantom layout, the paper's raw layout, "
                             "or TotalSegmentator outputs)")
    parser.add_argument("--grades", metavar="FILE|S3URI",
                        help="Genant grades: the paper's JSON (its split is used) or a case,vertebra,grade CSV, as a "
                             "path or s3:// URI; default: the phantom truth where present")
    parser.add_argument("--download-cache", type=Path, metavar="DIR",
                        help="where s3:// inputs are downloaded (kept: unchanged objects are not fetched again); "
                             "default: a temporary folder")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (replaced whole)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


@dataclasses.dataclass
class _CaseResult:
    """One case's manifest rows (before grades and splits), skipped vertebrae and height errors (mm)."""

    rows: list[dict[str, object]]
    skipped: list[dict[str, object]]
    height_errors: list[float]


def _truth_row(case: SpineCase, vertebra: int) -> dict[str, object]:
    """Manifest truth columns of a phantom vertebra (empty without truth)."""
    if case.truth is None:
        return {}
    match = case.truth[case.truth["vertebra"] == vertebra]
    if match.empty:
        return {}
    row = match.iloc[0]
    values: dict[str, object] = {"fracture_type": str(row["fracture_type"]), "truth_grade": int(row["grade"])}
    if "source" in row.index and not pd.isna(row["source"]):
        values["source"] = str(row["source"])
    for third in _THIRDS:
        values[f"truth_h_{third}_mm"] = float(row[f"h_{third}_mm"])
        values[f"truth_healthy_h_{third}_mm"] = float(row[f"healthy_h_{third}_mm"])
        values[f"truth_loss_{third}"] = float(row[f"loss_{third}"])
    return values


def _save_crop(folder: Path, sub: str, name: str, array: np.ndarray, affine: np.ndarray) -> str:
    """Write one uint8 crop under ``folder/sub``; returns its path relative to ``folder``."""
    relative = f"{sub}/{name}.nii.gz"
    save_volume(folder / relative, array.astype(np.uint8), affine)
    return relative


def preprocess_case(files: CaseFiles, params: PreprocessParams, out: Path) -> _CaseResult:
    """Straighten, de-pedicle and crop one case into ``out``; returns its manifest rows (no split/grade yet).

    Raises:
        InputDataError: the case has no CT, or too few vertebrae to straighten.
    """
    if params.centroids_from == "mask":
        files = dataclasses.replace(files, centroids=None)
    case = load_case(files, spacing_mm=None)  # native grid: straightening is the only resampling
    if case.ct is None:
        raise InputDataError(files.mask, f"case '{files.case_id}' has no CT",
                             "preprocess needs the CT beside the mask; the heights tool works on masks alone")
    if len(case.centroids) < 2:
        raise InputDataError(files.mask, f"{len(case.centroids)} vertebra(e) in the label map",
                             "at least two are needed to straighten the spine")
    cropped = crop_spine(case.labels.array, case.ct.array, case.labels.spacing_mm, case.centroids, params, air_hu=AIR_HU)
    spine = cropped.spine
    result = _CaseResult([], [], [])
    for vid, reason in spine.skipped.items():
        log.warning("%s: vertebra %s skipped: %s", case.case_id, vertebra_name(vid), reason)
        result.skipped.append({"case": case.case_id, "vertebra": vid, "name": vertebra_name(vid), "reason": reason})
    if not spine.order:
        return result
    healthy_bodies = healthy_ct = None
    if case.healthy_labels is not None and case.healthy_ct is not None:
        healthy_bodies, healthy_ct = resample_twin(spine, case.healthy_labels.array, case.healthy_ct.array,
                                                   cropped.window, remove_arch=params.depedicle, air_hu=AIR_HU)
    affine = spine.map.affine()
    crop_shape = tuple(int(s) for s in params.crop_shape)
    for vid, crop in cropped.crops.items():
        name = crop_name(case.case_id, vid)
        affine_of_crop = crop_affine(affine, crop.origin)
        row: dict[str, object] = {
            "case": case.case_id, "vertebra": vid, "name": vertebra_name(vid),
            "ct_path": _save_crop(out, "ct", name, crop.ct, affine_of_crop),
            "label_path": _save_crop(out, "label", name, crop.labels, affine_of_crop),
            "mask_path": _save_crop(out, "mask", name, crop.mask, affine_of_crop),
            "healthy_ct_path": pd.NA, "healthy_label_path": pd.NA,
            "spacing_mm": params.spacing_mm, "hu_lo": params.hu_window[0], "hu_hi": params.hu_window[1],
            "above": crop.above if crop.above is not None else pd.NA,
            "below": crop.below if crop.below is not None else pd.NA,
            "center_row": crop.center_row, "top_row": crop.top_row, "bottom_row": crop.bottom_row,
            "source_layout": case.layout,
        }
        row |= _truth_row(case, vid)
        if healthy_bodies is not None and healthy_ct is not None:
            twin = crop_vertebra(healthy_bodies, vid, spine.sequence, crop_shape, params.max_height_mm,
                                 params.spacing_mm, healthy_ct, params.hu_window, origin=crop.origin)
            row["healthy_ct_path"] = _save_crop(out, "healthy_ct", name, twin.ct, affine_of_crop)
            row["healthy_label_path"] = _save_crop(out, "healthy_label", name, twin.labels, affine_of_crop)
            if "truth_h_ant_mm" in row and (twin.labels == vid).any():
                # the shared height definition: the fractured body measured on the healthy body's columns
                selection = select_columns(twin.labels == vid)
                measured = heights_on(crop.labels == vid, selection, params.spacing_mm)
                truth = [row[f"truth_h_{t}_mm"] for t in _THIRDS]
                result.height_errors.extend(abs(m - float(t)) for m, t in zip(measured.as_tuple(), truth))
        result.rows.append(row)
    return result


def _attach_grades(rows: pd.DataFrame, grades: pd.DataFrame | None, params: PreprocessParams) -> pd.DataFrame:
    """Fill ``grade`` (from the grades file, else the phantom truth) and ``split`` (given, else by patient)."""
    if grades is not None:
        keyed = grades.set_index(["case", "vertebra"])["grade"]
        # Grade files key scans by case id, or by patient (VerSe'20 scans are named sub-x_dir-ax).
        keys = _grade_keys(rows["case"], grades)
        index = pd.MultiIndex.from_arrays([keys, rows["vertebra"].astype(int)])
        rows["grade"] = pd.array(keyed.reindex(index).to_numpy(), dtype="Int64")
        split_source = grades
    else:
        truth = rows["truth_grade"] if "truth_grade" in rows else pd.Series(pd.NA, index=rows.index)
        rows["grade"] = pd.array(truth.to_numpy(), dtype="Int64")
        split_source = rows[["case", "vertebra", "grade"]]
    splits = split_patients(rows["case"].astype(str).unique(), split_source, params.split)
    rows["split"] = rows["case"].astype(str).map(splits)
    return rows


def _grade_keys(cases: pd.Series, grades: pd.DataFrame) -> pd.Series:
    """The key each case has in the grades file: its own id, else its patient's (VerSe'20 scans)."""
    known = set(grades["case"].astype(str))
    return cases.astype(str).map(lambda case: case if case in known else patient_of(case))


def check_grades_match(grades: pd.DataFrame, grades_path: Path, case_ids: list[str]) -> None:
    """Refuse a grades file that grades none of the dataset's cases (checked before any case is read).

    Raises:
        InputDataError: no graded case is in the dataset.
    """
    keys = set(_grade_keys(pd.Series(case_ids, dtype="string"), grades))
    graded = set(grades["case"].astype(str))
    if not keys & graded:
        raise InputDataError(grades_path, f"grades none of the {len(case_ids)} case(s) of the dataset",
                             f"it keys cases like '{sorted(graded)[0]}', the dataset has '{case_ids[0]}'")
    absent = graded - keys
    if absent:
        log.warning("%s: %d graded case(s) are not in the dataset (e.g. %s)", grades_path, len(absent),
                    sorted(absent)[0])


def check_graded_vertebrae(grades: pd.DataFrame, grades_path: Path, found: pd.DataFrame) -> None:
    """Refuse grades for vertebrae that a graded case's label map does not hold.

    Args:
        grades: the grades file's rows.
        grades_path: the grades file (for the message).
        found: ``case``, ``vertebra`` of every vertebra in the label maps (cropped or skipped).

    Raises:
        InputDataError: a grade names a vertebra missing from its case's label map.
    """
    present = set(zip(_grade_keys(found["case"], grades), found["vertebra"].astype(int)))
    in_data = {case for case, _ in present}
    for row in grades.itertuples(index=False):
        if str(row.case) in in_data and (str(row.case), int(row.vertebra)) not in present:
            raise InputDataError(grades_path, f"grades vertebra {vertebra_name(int(row.vertebra))} ({row.vertebra}) "
                                              f"of case '{row.case}', which its label map does not hold",
                                 "check that the grades file belongs to this dataset")


def run(params: Params, input_dir: str | Path, out: Path, grades_path: str | Path | None = None,
        download_cache: Path | None = None) -> dict[str, float]:
    """Preprocess a dataset into ``out`` (written atomically); returns the stage metrics.

    Args:
        params: all parameters (``preprocess`` is used).
        input_dir: dataset folder, or an ``s3://`` prefix downloaded into ``download_cache`` first.
        out: output folder, replaced whole.
        grades_path: grades file (path or ``s3://`` URI), or ``None`` for the phantom truth.
        download_cache: where ``s3://`` inputs are downloaded (default: a temporary folder).

    Raises:
        InputDataError: the dataset or grades are missing, empty or do not match each other.
    """
    if download_cache is None and (is_s3_uri(input_dir) or (grades_path is not None and is_s3_uri(grades_path))):
        with tempfile.TemporaryDirectory(prefix="healthivert-download-") as scratch:
            return run(params, input_dir, out, grades_path, Path(scratch))
    pp = params.preprocess
    grades_file = local_copy(str(grades_path), download_cache, folder=False) if grades_path is not None else None
    grades = read_grades(grades_file) if grades_file is not None else None
    input_dir = local_copy(str(input_dir), download_cache, folder=True)
    cases = discover_cases(input_dir)
    if grades is not None:
        check_grades_match(grades, grades_file, [c.case_id for c in cases])
    start = time.perf_counter()
    rows: list[dict[str, object]] = []
    skipped: list[dict[str, object]] = []
    errors: list[float] = []
    with atomic_dir(out) as tmp:
        for folder in FOLDERS:
            (tmp / folder).mkdir()
        for result in map_cases(functools.partial(preprocess_case, params=pp, out=tmp), cases, "preprocess"):
            rows += result.rows
            skipped += result.skipped
            errors += result.height_errors
        if not rows:
            raise InputDataError(input_dir, "no vertebra could be cropped", "see the warnings above for the reasons")
        if grades is not None:
            labelled = [item for item in skipped if item["reason"] != NOT_IN_LABEL_MAP]
            check_graded_vertebrae(grades, grades_file, pd.DataFrame(rows + labelled, columns=["case", "vertebra"]))
        table = _attach_grades(pd.DataFrame(rows), grades, pp)
        for column, dtype in COLUMNS.items():
            if column not in table:
                table[column] = pd.Series(index=table.index, dtype=dtype)  # all missing (no phantom truth)
        write_manifest(table, tmp)
        pd.DataFrame(skipped, columns=["case", "vertebra", "name", "reason"]).to_csv(tmp / SKIPPED_NAME, index=False)
        (tmp / "params.yaml").write_text(dump_params(params))
    seconds = time.perf_counter() - start
    metrics = {
        "cases": float(len(cases)),
        "vertebrae": float(len(table)),
        "vertebrae_skipped": float(len(skipped)),
        "seconds_per_case": seconds / len(cases),
        "fractured": float((table["grade"].fillna(0) >= 1).sum()),
    }
    if errors:
        metrics["truth_height_mae_mm"] = float(np.mean(errors))
    log.info("%s: %d vertebrae from %d cases (%d skipped) in %.1f s%s", out, len(table), len(cases), len(skipped),
             seconds, f", height MAE vs truth {metrics['truth_height_mae_mm']:.2f} mm" if errors else "")
    return metrics


def overview_figure(out: Path, count: int = 6) -> Figure:
    """Mid-sagittal slices of a few crops, the most fractured first: CT, body outline, mask band, twin."""
    manifest = read_manifest(out).sort_values("grade", ascending=False, na_position="last").head(count)
    twins = bool(manifest["healthy_ct_path"].notna().any())
    figure = Figure(figsize=(2.2 * len(manifest), 4.6 if twins else 2.4))
    axes = figure.subplots(2 if twins else 1, len(manifest), squeeze=False)
    for column, row in enumerate(manifest.itertuples()):
        band = np.flatnonzero(np.asarray(nib.load(str(resolve(out, row.mask_path))).dataobj).any(axis=(1, 2)))
        versions = [(row.ct_path, row.label_path, "")]
        if twins:
            versions.append((row.healthy_ct_path, row.healthy_label_path, " healthy"))
        for line, (ct_path, label_path, suffix) in enumerate(versions):
            axis = axes[line, column]
            axis.set_axis_off()
            if pd.isna(ct_path):
                continue
            ct = np.asarray(nib.load(str(resolve(out, ct_path))).dataobj)
            labels = np.asarray(nib.load(str(resolve(out, label_path))).dataobj)
            middle = ct.shape[2] // 2
            axis.imshow(ct[:, :, middle], cmap="gray", vmin=0, vmax=255)
            axis.contour(labels[:, :, middle] == row.vertebra, levels=[0.5], colors="tab:orange", linewidths=0.8)
            for edge in (band[0] - 0.5, band[-1] + 0.5):
                axis.axhline(edge, color="tab:cyan", linewidth=0.6, linestyle="--")
            axis.set_title(f"{row.case} {row.name}{suffix}\ngrade {row.grade}", fontsize=7)
    figure.tight_layout()
    return figure


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    check_outputs(folders=[args.out, args.download_cache], files=[args.metrics])
    with stage_run("preprocess", params, ("data", "preprocess")) as tracker:
        metrics = run(params, args.input, args.out, args.grades, args.download_cache)
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        tracker.log_artifact(args.out / "manifest.parquet")
        log_manifest_dataset(tracker, args.out, str(args.input), "preprocess")
        if tracker.active:
            tracker.log_figure(overview_figure(args.out), "preprocess/overview.png")
    write_metrics(args.metrics, metrics)
