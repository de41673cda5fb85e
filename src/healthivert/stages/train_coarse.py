"""Stage 2, ``healthivert train-coarse``: fracture classifier + attention maps, then the coarse generator.

(a) The fracture classifier (fractured = grade >= 1, train split) is trained and its Grad-CAM++ map is
written for every crop of the manifest to ``--attention-out`` (``<case>_<vertebra>.nii.gz`` on the
crop's grid, plus ``index.parquet``). (b) The coarse generator is trained on the train split's
vertebrae of grade <= 1 and compared on the val split's healthy vertebrae with the neighbour
baselines. ``--out`` receives ``classifier.pt``, ``generator.pt``, ``model_card.json``, ``samples/``
and the resolved ``params.yaml``. Both trainings resume automatically from ``--checkpoint-dir``.

Under ``torchrun`` every process trains its share of each batch; rank 0 alone writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch.distributed as dist
from tqdm import tqdm

from healthivert.config import Params, TrainParams, dump_params
from healthivert.data.dataset import attention_path
from healthivert.data.manifest import MANIFEST_NAME, read_manifest, resolve
from healthivert.io.atomic import atomic_dir
from healthivert.io.nifti import load_volume, save_volume
from healthivert.models.classifier import FractureClassifier
from healthivert.models.io import save_classifier, save_generator
from healthivert.stages.common import add_metrics_argument, add_params_arguments, params_from_args, write_metrics
from healthivert.tracking.runs import StageTracker, stage_run
from healthivert.training.checkpoint import digest_of, file_digest
from healthivert.training.classifier import attention_volume, train_classifier
from healthivert.training.figures import FolderSink
from healthivert.training.generator import GeneratorRun, train_generator
from healthivert.training.model_card import generator_card
from healthivert.training.runtime import Runtime, runtime_for

log = logging.getLogger(__name__)

SECTIONS = ("model", "train_coarse")
SAMPLES = "samples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the stage."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocess output (manifest.parquet + crops)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="model folder (replaced whole)")
    parser.add_argument("--attention-out", type=Path, required=True, metavar="DIR", help="attention maps folder (replaced whole)")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, metavar="DIR",
                        help="training checkpoints; a run resumes from it automatically (keep it between runs)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def training_digest(params: Params, train: TrainParams, *parts: Any) -> str:
    """Hash of what a training run depends on (device, worker and thread counts excluded: a run may resume elsewhere)."""
    settings = train.model_dump(mode="json", exclude={"device", "num_workers", "cpu_threads"})
    return digest_of(params.model.model_dump(mode="json"), settings, *parts)


def barrier(runtime: Runtime) -> None:
    """Wait for every ``torchrun`` process (a no-op when alone)."""
    if runtime.distributed:
        dist.barrier()


def write_attention_maps(manifest: pd.DataFrame, data: Path, classifier: FractureClassifier, runtime: Runtime,
                         out: Path, slice_step: int) -> dict[str, float]:
    """Grad-CAM++ maps of every crop of the manifest, written whole to ``out`` with ``index.parquet``."""
    records = []
    with atomic_dir(out) as tmp:
        for row in tqdm(manifest.itertuples(index=False), total=len(manifest), desc="attention maps", disable=None):
            ct = load_volume(resolve(data, row.ct_path))  # type: ignore[arg-type]
            cam = attention_volume(classifier, np.clip(ct.array, 0, 255).astype(np.uint8), runtime.device, slice_step)
            path = attention_path(tmp, row.case, row.vertebra)
            save_volume(path, cam, ct.affine)
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


def write_model_folder(out: Path, params: Params, stage: str, run: GeneratorRun, manifest: pd.DataFrame, data: Path,
                       data_digest: str, params_digest: str, metrics: dict[str, float], training: dict[str, Any],
                       samples: Path, extra_files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write ``generator.pt``, ``model_card.json``, ``params.yaml``, ``samples/`` (and extras) whole to ``out``.

    Args:
        extra_files: file name -> function writing it (e.g. ``classifier.pt``).
    """
    train = getattr(params, f"train_{stage}")
    with atomic_dir(out) as tmp:
        save_generator(tmp / "generator.pt", run.generator, params.model,
                       extra={"stage": stage, "data_digest": data_digest, "params_digest": params_digest,
                              "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)}})
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        crop_shape = load_volume(resolve(data, manifest["ct_path"].iloc[0])).shape  # type: ignore[arg-type]
        card = generator_card(stage, params.model, train, manifest, crop_shape, data_digest, params_digest, metrics,
                              training)
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "params.yaml").write_text(dump_params(params))
        if samples.is_dir():
            shutil.copytree(samples, tmp / SAMPLES)
        else:
            (tmp / SAMPLES).mkdir()


def report_model(tracker: StageTracker | None, out: Path, run: GeneratorRun, model_name: str, stage: str,
                 metrics: dict[str, float]) -> None:
    """Log a written model folder's generator and card to MLflow (when tracking) and its validation scores."""
    if tracker is not None:
        tracker.log_torch_model(run.generator.cpu(), name=model_name)
        tracker.log_artifact(out / "model_card.json")
    log.info("train-%s: %s", stage, ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("val/")))


def run(params: Params, data: Path, out: Path, attention_out: Path, checkpoint_dir: Path,
        tracker: StageTracker | None = None) -> dict[str, float]:
    """Train the classifier (writing the attention maps) and the coarse generator; returns the metrics."""
    manifest = read_manifest(data)
    train = params.train_coarse
    data_digest = file_digest(data / MANIFEST_NAME)
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    with runtime_for(train.device, train.precision, train.cpu_threads) as runtime:
        sink = tracker if runtime.is_main else None
        classifier_digest = digest_of(params.model.network.model_dump(mode="json"),
                                      train.classifier.model_dump(mode="json"), train.view, train.precision, data_digest)
        classifier, classifier_metrics = train_classifier(
            manifest, data, params.model, train.classifier, train.view, runtime,
            checkpoint_dir / "classifier", classifier_digest, sink)
        metrics.update(classifier_metrics)
        if runtime.is_main:
            metrics.update(write_attention_maps(manifest, data, classifier, runtime, attention_out,
                                                train.classifier.cam_slice_step))
        barrier(runtime)
        params_digest = training_digest(params, train, "coarse", data_digest, classifier_digest)
        samples = checkpoint_dir / "generator" / SAMPLES
        generator_sink = FolderSink(samples.parent, sink) if runtime.is_main else None
        result = train_generator(manifest, data, attention_out, params.model, train, "coarse", runtime,
                                 checkpoint_dir / "generator", params_digest, generator_sink)
        metrics.update(result.metrics)
        seconds = time.perf_counter() - start
        metrics["seconds"] = seconds
        if runtime.is_main:
            training = {"steps": result.fit.step, "resumed_from_step": result.fit.resumed_from, "seconds": round(seconds, 1),
                        "device": str(runtime.device), "processes": runtime.world_size,
                        "autocast": str(runtime.autocast_dtype), "validation_slices": result.validation_count}
            write_model_folder(out, params, "coarse", result, manifest, data, data_digest, params_digest, metrics, training,
                               samples, {"classifier.pt": lambda path: save_classifier(
                                   path, classifier, params.model, extra={"metrics": classifier_metrics})})
            report_model(tracker, out, result, "coarse_generator", "coarse", metrics)
        barrier(runtime)
    return metrics


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    with stage_run("train-coarse", params, SECTIONS) as tracker:
        metrics = run(params, args.data, args.out, args.attention_out, args.checkpoint_dir, tracker)
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    write_metrics(args.metrics, metrics)
