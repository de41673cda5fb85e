"""Stage 4, ``healthivert synthesize``: pseudo-healthy CT and label of every target vertebra.

Reads the preprocessed crops, their attention maps and the trained generator(s) of ``--model``
(``generator.pt`` for the sagittal view, ``generator_coronal.pt`` for the coronal one) and writes
``ct/<name>.nii.gz``, ``label/<name>.nii.gz`` (the input's geometry) and ``index.parquet``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from healthivert.config import Params
from healthivert.data.dataset import attention_path
from healthivert.data.manifest import crop_name, read_manifest, resolve
from healthivert.io.atomic import atomic_dir
from healthivert.io.nifti import check_same_grid, load_volume, save_volume
from healthivert.stages.common import add_metrics_argument, add_params_arguments, check_outputs, params_from_args, write_metrics
from healthivert.synthesis.index import write_index
from healthivert.synthesis.iterative import load_view_generators, synthesise_vertebra
from healthivert.tracking.runs import stage_run
from healthivert.training.runtime import choose_device, choose_precision

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``healthivert synthesize``."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocessed folder (manifest.parquet)")
    parser.add_argument("--attention", type=Path, required=True, metavar="DIR", help="attention maps of train-coarse")
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="trained generator folder (models/fine)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    check_outputs(folders=[args.out], files=[args.metrics])
    with stage_run("synthesize", params, ("model", "synthesize")) as tracker:
        metrics = run(params, args.data, args.attention, args.model, args.out)
        tracker.log_metrics(metrics)
    write_metrics(args.metrics, metrics)


def _neighbours(row: pd.Series) -> tuple[int, ...]:
    """The target's neighbours in the crop, above first (the synthesis order)."""
    return tuple(int(row[side]) for side in ("above", "below") if not pd.isna(row[side]))


def run(params: Params, data: Path, attention: Path, model_dir: Path, out: Path) -> dict[str, float]:
    """Synthesise every target vertebra of the manifest.

    Returns:
        ``synthesize_vertebrae``, ``synthesize_seconds_per_vertebra`` and ``synthesize_height_mm``
        (mean predicted healthy height).
    """
    settings = params.synthesize
    device = choose_device(settings.device)
    autocast_dtype = choose_precision(device, settings.precision)
    generators, stage = load_view_generators(model_dir, params.model, settings, device)
    manifest = read_manifest(data)
    records = []
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        for _, row in tqdm(manifest.iterrows(), total=len(manifest), desc="synthesize", unit="vertebra", disable=None):
            name = crop_name(row["case"], row["vertebra"])
            ct = load_volume(resolve(data, row["ct_path"]))
            label = load_volume(resolve(data, row["label_path"]), label=True)
            check_same_grid(ct, label)
            cam = None
            if params.model.attention_module:
                cam_volume = load_volume(attention_path(attention, row["case"], row["vertebra"]))
                check_same_grid(ct, cam_volume)
                cam = np.clip(cam_volume.array, 0.0, 1.0)
            result = synthesise_vertebra(generators, np.clip(ct.array, 0, 255), label.array, cam, int(row["vertebra"]),
                                         _neighbours(row), settings, ct.spacing_mm[0], device, autocast_dtype, stage)
            save_volume(tmp / "ct" / f"{name}.nii.gz", ct.with_array(result.ct))
            save_volume(tmp / "label" / f"{name}.nii.gz", label.with_array(result.label))
            records.append({"case": row["case"], "vertebra": int(row["vertebra"]), "ct_path": f"ct/{name}.nii.gz",
                            "label_path": f"label/{name}.nii.gz", "predicted_height_mm": result.predicted_height_mm,
                            "slices": result.slices})
        index = pd.DataFrame(records, columns=["case", "vertebra", "ct_path", "label_path", "predicted_height_mm", "slices"])
        write_index(index, tmp)
    elapsed = time.perf_counter() - started
    metrics = {"synthesize_vertebrae": float(len(index)),
               "synthesize_seconds_per_vertebra": elapsed / max(len(index), 1)}
    if index["predicted_height_mm"].notna().any():
        metrics["synthesize_height_mm"] = float(index["predicted_height_mm"].mean())
    log.info("synthesised %d vertebrae with the %s generator, %.2f s each (%s, %s)", len(index), stage,
             metrics["synthesize_seconds_per_vertebra"], device, autocast_dtype or "float32")
    return metrics
