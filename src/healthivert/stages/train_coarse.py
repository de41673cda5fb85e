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
import dataclasses
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

from healthivert.config import Params, TrainParams, View, dump_params
from healthivert.data.dataset import attention_path
from healthivert.data.manifest import MANIFEST_NAME, read_manifest, resolve
from healthivert.io.atomic import atomic_dir
from healthivert.io.nifti import load_volume, save_volume
from healthivert.models.classifier import FractureClassifier
from healthivert.models.generator import HealthiVertGenerator
from healthivert.models.io import generator_file, save_classifier, save_generator, view_file_name
from healthivert.stages.common import add_metrics_argument, add_params_arguments, params_from_args, write_metrics
from healthivert.tracking.runs import StageTracker, stage_run
from healthivert.training.checkpoint import digest_of, file_digest
from healthivert.training.classifier import attention_volume, train_classifier
from healthivert.training.figures import FolderSink, ViewSink, view_key
from healthivert.training.gan import Stage
from healthivert.training.generator import GeneratorRun, train_generator
from healthivert.training.model_card import generator_card
from healthivert.training.runtime import Runtime, runtime_for

log = logging.getLogger(__name__)

SECTIONS = ("model", "train_coarse")
#: per-view names in a model folder (the sagittal view's; others add the view, ``view_file_name``)
SAMPLES = "samples"
MODEL_CARD = "model_card.json"
#: the sagittal coarse generator's checkpoint folder in ``--checkpoint-dir`` (others add the view)
GENERATOR_CHECKPOINTS = "generator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the stage."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocess output (manifest.parquet + crops)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="model folder (replaced whole)")
    parser.add_argument("--attention-out", type=Path, required=True, metavar="DIR", help="attention maps folder (replaced whole)")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, metavar="DIR",
                        help="training checkpoints; a run resumes from it automatically (keep it between runs)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def training_digest(params: Params, train: TrainParams, view: View, *parts: Any) -> str:
    """Hash of what one view's training run depends on.

    Device, worker and thread counts are left out (a run may resume elsewhere). The view replaces the stage's list of views: a checkpoint of one view is never resumed as another, and
    adding a view to ``views`` leaves the others' runs (and digests) as they were.
    """
    settings = train.model_dump(mode="json", exclude={"device", "num_workers", "cpu_threads", "views"})
    settings["view"] = view
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


@dataclasses.dataclass(frozen=True)
class ViewModel:
    """The generator a stage trained on one view, with what its model files need.

    Attributes:
        view: the slices it was trained on.
        run: the training outcome (network, its own metrics under plain keys, loop report).
        data_digest: hash of the data it learnt from (and of its starting model, in the fine stage).
        params_digest: hash of the parameters of its run (:func:`training_digest`).
        training: facts of the run for the model card (steps, seconds, device...).
        samples: folder of its sample grids.
    """

    view: View
    run: GeneratorRun
    data_digest: str
    params_digest: str
    training: dict[str, Any]
    samples: Path


def train_view(params: Params, stage: Stage, view: View, manifest: pd.DataFrame, data: Path, attention: Path,
               runtime: Runtime, checkpoint_dir: Path, data_digest: str, tracker: StageTracker | None,
               depends_on: tuple[str, ...] = (), start_from: tuple[Path, HealthiVertGenerator] | None = None
               ) -> ViewModel:
    """Train the ``stage`` generator of one view of ``train_<stage>.views``.

    The first view reports to ``tracker`` under the plain metric and figure names, the others under
    their view's (:func:`healthivert.training.figures.view_key`).

    Args:
        checkpoint_dir: the view's own checkpoint folder (its sample grids go to ``samples/`` in it).
        data_digest: hash of the training data.
        depends_on: further hashes the run depends on (the coarse stage: the classifier's run).
        start_from: the file and network of the saved generator the run starts from (the fine stage: the
            coarse one of the same view); its file's hash joins the data digest.
    """
    train: TrainParams = getattr(params, f"train_{stage}")
    initial, started = None, {}
    if start_from is not None:
        initial_file, initial = start_from
        data_digest += "+" + file_digest(initial_file)
        started = {"initialised_from": str(initial_file)}
    params_digest = training_digest(params, train, view, stage, data_digest, *depends_on)
    sink = None
    if runtime.is_main:
        named = tracker if tracker is None or view == train.views[0] else ViewSink(tracker, view)
        sink = FolderSink(checkpoint_dir, named)
    start = time.perf_counter()
    run = train_generator(manifest, data, attention, params.model, train, stage, view, runtime, checkpoint_dir,
                          params_digest, sink, initial=initial)
    training = {"steps": run.fit.step, "resumed_from_step": run.fit.resumed_from,
                "seconds": round(time.perf_counter() - start, 1), "device": str(runtime.device),
                "processes": runtime.world_size, "autocast": str(runtime.autocast_dtype),
                "validation_slices": run.validation_count, **started}
    return ViewModel(view, run, data_digest, params_digest, training, checkpoint_dir / SAMPLES)


def views_metrics(models: list[ViewModel]) -> dict[str, float]:
    """The views' metrics for the stage: the first view's under their plain keys, the others' under :func:`view_key`."""
    metrics: dict[str, float] = {}
    for index, model in enumerate(models):
        metrics.update({k if index == 0 else view_key(k, model.view): v for k, v in model.run.metrics.items()})
    return metrics


def write_model_folder(out: Path, params: Params, stage: Stage, models: list[ViewModel], manifest: pd.DataFrame,
                       data: Path, shared_metrics: dict[str, float],
                       extra_files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write every view's generator, model card and sample grids, ``params.yaml`` (and extras) whole to ``out``.

    The sagittal view's files keep the plain names (``generator.pt``, ``model_card.json``, ``samples/``),
    another view's carry it (``generator_coronal.pt``, ``model_card_coronal.json``, ``samples_coronal/``).

    Args:
        shared_metrics: metrics of the stage that belong to every view (the classifier's), recorded with
            each generator's own in its file and card.
        extra_files: file name -> function writing it (e.g. ``classifier.pt``).
    """
    train = getattr(params, f"train_{stage}")
    crop_shape = load_volume(resolve(data, manifest["ct_path"].iloc[0])).shape  # type: ignore[arg-type]
    with atomic_dir(out) as tmp:
        for model in models:
            metrics = {**shared_metrics, **model.run.metrics}
            save_generator(tmp / generator_file(model.view), model.run.generator, params.model,
                           extra={"stage": stage, "view": model.view, "data_digest": model.data_digest,
                                  "params_digest": model.params_digest,
                                  "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)}})
            card = generator_card(stage, model.view, params.model, train, manifest, crop_shape, model.data_digest,
                                  model.params_digest, metrics, model.training)
            (tmp / view_file_name(MODEL_CARD, model.view)).write_text(json.dumps(card, indent=2) + "\n")
            samples = tmp / view_file_name(SAMPLES, model.view)
            if model.samples.is_dir():
                shutil.copytree(model.samples, samples)
            else:
                samples.mkdir()
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        (tmp / "params.yaml").write_text(dump_params(params))


def report_model(tracker: StageTracker | None, out: Path, model: ViewModel, model_name: str, stage: Stage) -> None:
    """Log one view's written generator and card to MLflow (when tracking) and its validation scores.

    Args:
        model_name: the MLflow model name of the sagittal generator; another view's adds its view
            (``coarse_generator`` -> ``coarse_generator_coronal``).
    """
    if tracker is not None:
        tracker.log_torch_model(model.run.generator.cpu(), name=view_file_name(model_name, model.view))
        tracker.log_artifact(out / view_file_name(MODEL_CARD, model.view))
    log.info("train-%s, %s view: %s", stage, model.view,
             ", ".join(f"{k} {v:.4g}" for k, v in sorted(model.run.metrics.items()) if k.startswith("val/")))


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
    with stage_run("train-coarse", params, SECTIONS) as tracker:
        metrics = run(params, args.data, args.out, args.attention_out, args.checkpoint_dir, tracker)
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    write_metrics(args.metrics, metrics)
