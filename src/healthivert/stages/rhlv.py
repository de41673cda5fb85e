"""Stage 5, ``healthivert rhlv``: relative height loss and height-loss maps of every vertebra.

Reads the preprocessing manifest and the synthesised labels (``--synth``, or with
``--healthy-truth`` the phantoms' fracture-free labels, which checks grading independently of the
GAN) and writes ``rhlv.parquet`` (one row per vertebra) and ``maps/<name>.nii.gz`` + ``.png``.

Columns of ``rhlv.parquet``: ``case, vertebra, name, split, grade, fracture_type``; sagittal
``measurable`` and ``problem`` (a synthesis too degenerate to measure: RHLV NaN, not graded),
``rhlv_ant/mid/post/body``, ``rhlv_max`` (worst third), ``shape_ratio``, heights
``h_syn_*_mm``/``h_ori_*_mm`` (``*`` = ant, mid, post, body); coronal ``rhlv_cor_right/mid/left``;
the mask-only neighbour baseline ``baseline_loss_ant/mid/post/max``; ``truth_loss_*`` (phantoms,
else NaN) and ``map_path``.
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from healthivert.config import Params
from healthivert.data.manifest import crop_name, read_manifest, resolve
from healthivert.errors import InputDataError
from healthivert.io.atomic import atomic_dir, atomic_path
from healthivert.io.nifti import Volume, check_same_grid, load_volume, save_volume
from healthivert.parallel import map_cases
from healthivert.rhlv.vertebra import THIRD_NAMES, loss_map_volume
from healthivert.rhlv.vertebra import measure_vertebra as measure_vertebra_crop
from healthivert.rhlv.figures import height_loss_figure
from healthivert.stages.common import add_metrics_argument, add_params_arguments, check_outputs, params_from_args, write_metrics
from healthivert.synthesis.index import read_index
from healthivert.tracking.runs import stage_run

log = logging.getLogger(__name__)

TABLE_NAME = "rhlv.parquet"
MAPS_FOLDER = "maps"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``healthivert rhlv``."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocessed folder (manifest.parquet)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synth", type=Path, metavar="DIR", help="synthesis output folder (index.parquet)")
    source.add_argument("--healthy-truth", action="store_true",
                        help="measure against the phantoms' fracture-free labels instead of a synthesis")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    check_outputs(folders=[args.out], files=[args.metrics])
    with stage_run("rhlv", params, ("rhlv",)) as tracker:
        metrics = run(params, args.data, None if args.healthy_truth else args.synth, args.out)
        tracker.log_metrics(metrics)
        tracker.log_artifact(args.out / TABLE_NAME)
    write_metrics(args.metrics, metrics)


def _healthy_labels(manifest: pd.DataFrame, data: Path) -> dict[tuple[str, int], Path]:
    paths = {}
    for row in manifest.itertuples():
        path = resolve(data, row.healthy_label_path)
        if path is None:
            raise InputDataError(data / "manifest.parquet", f"{crop_name(row.case, row.vertebra)} has no healthy label",
                                 "--healthy-truth needs phantom data; use --synth")
        paths[(row.case, int(row.vertebra))] = path
    return paths


def _synthesised_labels(manifest: pd.DataFrame, synth: Path) -> dict[tuple[str, int], Path]:
    index = read_index(synth)
    paths = {(row.case, int(row.vertebra)): Path(row.label_path) for row in index.itertuples()}
    wanted = {(row.case, int(row.vertebra)) for row in manifest.itertuples()}
    missing, extra = sorted(wanted - paths.keys()), sorted(paths.keys() - wanted)
    if missing:
        raise InputDataError(synth / "index.parquet", f"vertebra {crop_name(*missing[0])} of the manifest was not synthesised",
                             f"{len(missing)} missing; rerun 'healthivert synthesize' on this data")
    if extra:
        raise InputDataError(synth / "index.parquet", f"synthesised vertebra {crop_name(*extra[0])} is not in the manifest",
                             "synthesis and data folders do not belong together")
    return paths


def _target(volume: Volume, vertebra: int, name: str) -> np.ndarray:
    mask = volume.array == vertebra
    if not mask.any():
        raise InputDataError(volume.path or "<memory>", f"vertebra {name} (label {vertebra}) is missing from the label map")
    return mask


def measure_vertebra(row: pd.Series, data: Path, syn_path: Path, params: Params
                     ) -> tuple[dict[str, object], np.ndarray, Volume]:
    """RHLV (sagittal and coronal) of one manifest row; returns the table record and the loss map.

    Raises:
        InputDataError: unreadable labels, different grids, or the vertebra missing on one side. A
            synthesised body too degenerate to measure gives a row with ``measurable`` false instead.
    """
    name = crop_name(row["case"], row["vertebra"])
    original = load_volume(resolve(data, row["label_path"]), label=True)
    synthesised = load_volume(syn_path, label=True)
    check_same_grid(original, synthesised)
    _target(original, int(row["vertebra"]), name)
    syn = _target(synthesised, int(row["vertebra"]), name)
    measured = measure_vertebra_crop(original.array, synthesised.array, int(row["vertebra"]), original.spacing_mm,
                                     params.rhlv)
    if measured.values["problem"]:
        # a degenerate synthesis is reported on its row (and not graded), not allowed to stop the whole run
        log.warning("%s: %s: %s", syn_path, name, measured.values["problem"])
    record = {"case": row["case"], "vertebra": int(row["vertebra"]), "name": row["name"], "split": row["split"],
              "grade": row["grade"], "fracture_type": row["fracture_type"], **measured.values}
    for third in THIRD_NAMES:
        record[f"truth_loss_{third}"] = row[f"truth_loss_{third}"]
    loss = measured.loss_map
    return record, loss, loss_map_volume(loss, original.affine, syn)


def measure_case(rows: pd.DataFrame, data: Path, params: Params, maps: Path) -> list[dict[str, object]]:
    """Measure the vertebrae of one case (manifest rows with ``syn_path``), writing their maps (NIfTI, PNG) to ``maps``."""
    records = []
    for _, row in rows.iterrows():
        name = crop_name(row["case"], row["vertebra"])
        record, loss, map_volume = measure_vertebra(row, data, row["syn_path"], params)
        save_volume(maps / f"{name}.nii.gz", map_volume)
        figure = height_loss_figure(loss, map_volume.spacing_mm[1:], title=f"{name} ({row['name']})")
        with atomic_path(maps / f"{name}.png") as png:
            figure.savefig(png, format="png")
        records.append(record | {"map_path": f"{MAPS_FOLDER}/{name}.nii.gz"})
    return records


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Stage metrics: vertebrae measured and, where the truth is known, mean absolute errors per third.

    ``rhlv_mae*`` are RHLV's errors, ``baseline_mae*`` those of the mask-only neighbour baseline
    (over the vertebrae where it has neighbours).
    """
    metrics = {"rhlv_vertebrae": float(len(table)), "rhlv_unmeasurable": float((~table["measurable"]).sum())}
    table = table[table["measurable"]]
    truth = table.dropna(subset=[f"truth_loss_{third}" for third in THIRD_NAMES])
    if len(truth):
        metrics["rhlv_vertebrae_with_truth"] = float(len(truth))
        for prefix, column in (("rhlv", "rhlv_{}"), ("baseline", "baseline_loss_{}")):
            errors = [np.abs(truth[column.format(third)] - truth[f"truth_loss_{third}"]) for third in THIRD_NAMES]
            for third, error in zip(THIRD_NAMES, errors):
                metrics[f"{prefix}_mae_{third}"] = float(error.mean())
            metrics[f"{prefix}_mae"] = float(np.mean([e.mean() for e in errors]))
    return {key: value for key, value in metrics.items() if np.isfinite(value)}


def run(params: Params, data: Path, synth: Path | None, out: Path) -> dict[str, float]:
    """Measure every vertebra of the manifest against its synthesis (or, ``synth=None``, its healthy truth).

    Args:
        params: all parameters (``rhlv`` is read).
        data: preprocessed folder.
        synth: synthesis output folder, or ``None`` for the phantoms' healthy labels.
        out: output folder, replaced atomically.

    Returns:
        the stage metrics (see :func:`summarise`).
    """
    manifest = read_manifest(data)
    syn_paths = _healthy_labels(manifest, data) if synth is None else _synthesised_labels(manifest, synth)
    manifest = manifest.assign(syn_path=[syn_paths[(row.case, int(row.vertebra))] for row in manifest.itertuples()])
    cases = [rows for _, rows in manifest.groupby("case", sort=False)]
    with atomic_dir(out) as tmp:
        (tmp / MAPS_FOLDER).mkdir()
        measure = functools.partial(measure_case, data=data, params=params, maps=tmp / MAPS_FOLDER)
        table = pd.DataFrame([record for records in map_cases(measure, cases, "rhlv") for record in records])
        table["grade"] = table["grade"].astype("Int64")
        with atomic_path(tmp / TABLE_NAME) as path:
            table.to_parquet(path, index=False)
    metrics = summarise(table)
    log.info("RHLV of %d vertebrae%s", len(table),
             f", MAE vs truth {metrics['rhlv_mae']:.3f}" if "rhlv_mae" in metrics else "")
    return metrics
