"""One generator per view: train it, collect its metrics, write the model folder and report it.

Shared by the two training stages (``healthivert train-coarse`` and ``train-fine``): each trains the
generator of every view of ``train_<stage>.views`` with :func:`train_view`, then writes them whole to
its ``--out`` folder with :func:`write_model_folder` and logs them with :func:`report_model`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch.distributed as dist

from healthivert.config import Params, TrainParams, View, dump_params
from healthivert.data.manifest import resolve
from healthivert.io.atomic import atomic_dir
from healthivert.io.nifti import load_volume
from healthivert.models.generator import HealthiVertGenerator
from healthivert.models.io import generator_file, save_generator, view_file_name
from healthivert.tracking.runs import StageTracker
from healthivert.training.checkpoint import digest_of, file_digest
from healthivert.training.figures import FolderSink, ViewSink, view_key
from healthivert.training.gan import Stage
from healthivert.training.generator import GeneratorRun, train_generator
from healthivert.training.model_card import generator_card
from healthivert.training.runtime import Runtime

log = logging.getLogger(__name__)

#: per-view names in a model folder (the sagittal view's; others add the view, ``view_file_name``)
SAMPLES = "samples"
MODEL_CARD = "model_card.json"
#: the sagittal coarse generator's checkpoint folder in ``--checkpoint-dir`` (others add the view)
GENERATOR_CHECKPOINTS = "generator"
#: a generator whose validation Dice ends below this marks (almost) no vertebra: its syntheses cannot be measured
COLLAPSED_DICE = 0.5



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


def collapse_warning(metrics: dict[str, float], stage: Stage, view: View) -> str | None:
    """One warning line when a generator's validation Dice ends below :data:`COLLAPSED_DICE`, else ``None``.

    Synthesis with such a view fuses an empty body into every vertebra (the coronal fine generator of
    the CPU default, docs/architecture.md "Trained models").
    """
    dice = metrics.get("val/model/dice", math.nan)
    if not dice < COLLAPSED_DICE:
        return None
    interpolation = metrics.get("val/interpolate/dice", math.nan)
    return (f"train-{stage}, {view} view: the generator's segmentation collapsed (validation Dice {dice:.3f}, "
            f"neighbour interpolation {interpolation:.3f}); its syntheses will mark no vertebra: do not synthesise "
            f"with this view (synthesize.views), or train it again at another lr or seed")


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
    warning = collapse_warning(model.run.metrics, stage, model.view)
    if warning:
        log.warning(warning)
