"""Stage 2, ``healthivert train-coarse``: fracture classifier + attention maps, then a coarse generator per view.

(a) The fracture classifier (fractured = grade >= 1, train split, slices of the first of
``train_coarse.views``) is trained and its Grad-CAM++ map is written for every crop of the manifest to
``--attention-out`` (``<case>_<vertebra>.nii.gz`` on the crop's grid, plus ``index.parquet``). (b) For
each view of ``train_coarse.views`` a coarse generator is trained on the train split's vertebrae of
grade <= ``target_max_grade`` and compared on the val split's healthy vertebrae with the neighbour baselines.
``--out`` receives ``classifier.pt``, per view a generator, its model card and sample grids
(sagittal: ``generator.pt``, ``model_card.json``, ``samples/``; coronal: ``generator_coronal.pt``,
``model_card_coronal.json``, ``samples_coronal/``) and the resolved ``params.yaml``. Every training
resumes automatically from ``--checkpoint-dir`` (``classifier/``, ``generator/``, ``generator_coronal/``).

Under ``torchrun`` every process trains its share of each batch; rank 0 alone writes the outputs.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from healthivert.config import Params
from healthivert.data.dataset import attention_path
from healthivert.data.manifest import MANIFEST_NAME, read_manifest, resolve
from healthivert.io.atomic import atomic_dir
from healthivert.io.nifti import load_volume, save_volume
from healthivert.models.classifier import FractureClassifier
from healthivert.models.io import save_classifier, view_file_name
from healthivert.stages.common import add_metrics_argument, add_params_arguments, check_outputs, params_from_args, write_metrics
from healthivert.tracking.runs import StageTracker, stage_run
from healthivert.training.checkpoint import digest_of, file_digest
from healthivert.training.classifier import attention_volume, train_classifier
from healthivert.training.runtime import Runtime, runtime_for
from healthivert.training.views import (GENERATOR_CHECKPOINTS, barrier, report_model, train_view, views_metrics,
                                        write_model_folder)

log = logging.getLogger(__name__)

SECTIONS = ("model", "train_coarse")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the stage."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocess output (manifest.parquet + crops)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="model folder (replaced whole)")
    parser.add_argument("--attention-out", type=Path, required=True, metavar="DIR", help="attention maps folder (replaced whole)")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, metavar="DIR",
                        help="training checkpoints; a run resumes from it automatically (keep it between runs)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def write_attention_maps(manifest: pd.DataFrame, data: Path, classifier: FractureClassifier, runtime: Runtime,
                         out: Path, slice_step: int) -> dict[str, float]:
    """Grad-CAM++ maps of every crop of the manifest, written whole to ``out`` with ``index.parquet``."""
    records = []
    with atomic_dir(out) as tmp:
        for row in tqdm(manifest.itertuples(index=False), total=len(manifest), desc="attention maps", disable=None):
            ct = load_volume(resolve(data, row.ct_path))  # type: ignore[arg-type]
            cam = attention_volume(classifier, np.clip(ct.array, 0, 255).astype(np.uint8), runtime.device, slice_step)
            path = attention_path(tmp, row.case, row.vertebra)
            save_volume(path, cam, ct.affine, stored_dtype=np.uint8)  # 256 levels: 6x faster to write than float32
            label = load_volume(resolve(data, row.label_path), label=True).array  # type: ignore[arg-type]
            body = label == int(row.vertebra)
            records.append({"case": row.case, "vertebra": int(row.vertebra), "split": row.split, "grade": row.grade,
                            "path": path.name, "cam_mean_in_target": float(cam[body].mean()) if body.any() else float("nan")})
        index = pd.DataFrame.from_records(records)
        index["grade"] = index["grade"].astype("Int64")
        index.to_parquet(tmp / "index.parquet", index=False)
    graded = index[index["grade"].notna()]
    fractured = graded["grade"].astype(int) >= 1
    metrics = {"attention/maps": float(len(index))}
    if fractured.any() and (~fractured).any():
        metrics["attention/cam_in_target_fractured"] = float(graded.loc[fractured, "cam_mean_in_target"].mean())
        metrics["attention/cam_in_target_healthy"] = float(graded.loc[~fractured, "cam_mean_in_target"].mean())
    return metrics


def run(params: Params, data: Path, out: Path, attention_out: Path, checkpoint_dir: Path,
        tracker: StageTracker | None = None) -> dict[str, float]:
    """Train the classifier (writing the attention maps) and a coarse generator per view; returns the metrics."""
    manifest = read_manifest(data)
    train = params.train_coarse
    data_digest = file_digest(data / MANIFEST_NAME)
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    with runtime_for(train.device, train.precision, train.cpu_threads) as runtime:
        sink = tracker if runtime.is_main else None
        classifier_view = train.views[0]
        classifier_digest = digest_of(params.model.network.model_dump(mode="json"),
                                      train.classifier.model_dump(mode="json"), classifier_view, train.precision,
                                      data_digest)
        classifier, classifier_metrics = train_classifier(
            manifest, data, params.model, train.classifier, classifier_view, runtime,
            checkpoint_dir / "classifier", classifier_digest, sink)
        metrics.update(classifier_metrics)
        if runtime.is_main:
            metrics.update(write_attention_maps(manifest, data, classifier, runtime, attention_out,
                                                train.classifier.cam_slice_step))
        barrier(runtime)
        models = [train_view(params, "coarse", view, manifest, data, attention_out, runtime,
                             checkpoint_dir / view_file_name(GENERATOR_CHECKPOINTS, view), data_digest, tracker,
                             depends_on=(classifier_digest,))
                  for view in train.views]
        shared_metrics = dict(metrics)
        metrics.update(views_metrics(models))
        metrics["seconds"] = time.perf_counter() - start
        if runtime.is_main:
            write_model_folder(out, params, "coarse", models, manifest, data, shared_metrics,
                               {"classifier.pt": lambda path: save_classifier(
                                   path, classifier, params.model, extra={"metrics": classifier_metrics})})
            for model in models:
                report_model(tracker, out, model, "coarse_generator", "coarse")
        barrier(runtime)
    return metrics


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    check_outputs(folders=[args.out, args.attention_out, args.checkpoint_dir], files=[args.metrics])
    with stage_run("train-coarse", params, SECTIONS) as tracker:
        metrics = run(params, args.data, args.out, args.attention_out, args.checkpoint_dir, tracker)
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    write_metrics(args.metrics, metrics)
