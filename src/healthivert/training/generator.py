"""One generator training stage end to end: samples, networks, the loop, and the final comparison.

Targets are the train split's vertebrae of grade <= ``target_max_grade``; validation uses the val split's healthy
(grade 0) vertebrae at fixed slices, where the model is compared with the neighbour baselines.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

from healthivert.config import ModelParams, TrainParams, View
from healthivert.data.dataset import SliceDataset, target_rows
from healthivert.errors import InputDataError
from healthivert.models.discriminator import Discriminators
from healthivert.models.generator import HealthiVertGenerator
from healthivert.training.gan import InpaintingTask, Stage
from healthivert.training.loop import FitResult, LoopSettings, MetricSink, fit
from healthivert.training.runtime import Runtime, seed_everything

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GeneratorRun:
    """The outcome of one generator stage.

    Attributes:
        generator: the trained network (on the runtime's device).
        metrics: final losses (``train/...``) and validation metrics of the model and the baselines
            (``val/model/mae_hu``, ``val/nearest/dice``, ...), empty of ``val/`` without a val split.
        fit: the loop's report (steps, resumed-from step, per-epoch history).
        validation_count: held-out samples behind the ``val/`` metrics.
    """

    generator: HealthiVertGenerator
    metrics: dict[str, float]
    fit: FitResult
    validation_count: int


def validation_loader(manifest: pd.DataFrame, root: Path, attention_dir: Path | None, model_params: ModelParams,
                      train: TrainParams, view: View) -> DataLoader[dict] | None:
    """Fixed ``view`` slices of the val split's healthy vertebrae, or ``None`` when there are none."""
    rows = target_rows(manifest, ["val"], max_grade=0)
    if rows.empty:
        log.warning("the val split has no healthy vertebra: training without validation")
        return None
    dataset = SliceDataset(rows, root, view, attention_dir, model_params.max_height_px, train.seed,
                           slice_ratios=train.val_slice_ratios)
    return DataLoader(dataset, batch_size=train.batch_size)


def train_generator(manifest: pd.DataFrame, root: Path, attention_dir: Path | None, model_params: ModelParams,
                    train: TrainParams, stage: Stage, view: View, runtime: Runtime, checkpoint_dir: Path,
                    digest: str, sink: MetricSink | None = None, initial: HealthiVertGenerator | None = None
                    ) -> GeneratorRun:
    """Train the generator of one stage on one view (resuming from ``checkpoint_dir`` when it holds this run).

    Args:
        manifest: the preprocess manifest.
        root: its folder.
        attention_dir: the HGAM maps (``None``: attention off or not computed; all ones then).
        model_params: network sizes and switches.
        train: the stage's settings.
        stage: ``coarse`` or ``fine``.
        view: the slices it learns from (``train.views`` lists the stage's views).
        runtime: device, precision, rank.
        checkpoint_dir: where the loop keeps ``last.pt``.
        digest: hash of everything the run depends on.
        sink: where to report losses, metrics and sample grids.
        initial: weights to start from (the fine stage starts from the coarse generator of the same view).

    Raises:
        InputDataError: no vertebra of grade <= ``train.target_max_grade`` in the train split.
    """
    rows = target_rows(manifest, ["train"], max_grade=train.target_max_grade)
    if rows.empty:
        raise InputDataError(root / "manifest.parquet", f"the train split has no vertebra of grade <= "
                             f"{train.target_max_grade} to train the generator on")
    seed_everything(train.seed)
    settings = LoopSettings(epochs=train.epochs, steps_per_epoch=train.steps_per_epoch, batch_size=train.batch_size,
                            checkpoint_every=train.checkpoint_every, seed=train.seed, num_workers=train.num_workers)
    attention = attention_dir if model_params.attention_module else None
    dataset = SliceDataset(rows, root, view, attention, model_params.max_height_px, train.seed,
                           samples_per_epoch=settings.samples_per_epoch(runtime.world_size))
    validation = validation_loader(manifest, root, attention, model_params, train, view)
    generator = HealthiVertGenerator(model_params)
    if initial is not None:
        generator.load_state_dict(initial.state_dict())
    task = InpaintingTask(generator, Discriminators(model_params), model_params, train.losses, stage, train.lr,
                          train.beta1, train.epochs, train.lr_constant_epochs, runtime, validation,
                          grad_clip_norm=train.grad_clip_norm)
    log.info("%s %s generator: %d target vertebrae, %d validation slices", stage, view, len(rows),
             0 if validation is None else len(validation.dataset))  # type: ignore[arg-type]
    result = fit(task, dataset, settings, runtime, checkpoint_dir, digest, sink,
                 description=f"{stage} {view} generator")
    metrics = {f"train/{k}": v for k, v in result.last_losses.items()}
    if validation is not None and runtime.is_main:
        metrics.update({f"val/{k}": v for k, v in task.evaluate(validation).items()})
    return GeneratorRun(generator=task.generator, metrics=metrics, fit=result,
                        validation_count=0 if validation is None else len(validation.dataset))  # type: ignore[arg-type]
