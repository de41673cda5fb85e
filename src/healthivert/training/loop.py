"""The epoch/step loop shared by the generator stages and the fracture classifier.

The loop owns what every run needs and no task should re-implement: deterministic per-epoch sample
order (also under ``torchrun``: each rank gets its share through a ``DistributedSampler``), resuming
from the last checkpoint mid-epoch, periodic and final checkpoints (rank 0 only), a progress bar with
the running losses, and per-step and per-epoch metrics sent to a :class:`MetricSink` (MLflow
through :class:`healthivert.tracking.runs.StageTracker`, or nothing).

A run killed at any point and started again with the same parameters reaches the same weights as an
uninterrupted one: sample draws depend only on ``(seed, epoch, index)``, the sample order only on
``(seed, epoch)``, and the checkpoint holds every other piece of state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from healthivert.errors import CheckpointError, ConfigError
from healthivert.training.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from healthivert.training.runtime import Runtime, rng_state, set_rng_state

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    """Where the loop reports (``StageTracker`` satisfies it)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_figure(self, figure: Any, name: str) -> None: ...


class EpochDataset(Protocol):
    """A dataset whose random draws depend on the epoch (:class:`healthivert.data.dataset.SliceDataset`)."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class Task(Protocol):
    """One kind of training (GAN inpainting, classification) as the loop drives it."""

    def state(self) -> dict[str, Any]:
        """Name -> object with ``state_dict``/``load_state_dict`` (networks, optimisers, schedulers, scaler)."""

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on a batch (already on the device); returns named losses."""

    def end_epoch(self, epoch: int, sink: MetricSink | None) -> dict[str, float]:
        """Step the schedulers, validate, draw figures; returns the epoch's metrics (rank 0 logs them)."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long and how a run goes.

    Attributes:
        epochs: number of epochs.
        steps_per_epoch: optimisation steps per epoch (on every rank).
        batch_size: samples per step and rank.
        checkpoint_every: write a checkpoint every this many steps (and after every epoch).
        seed: seed of the sample order.
        num_workers: DataLoader worker processes.
        log_every: steps between loss reports to the sink (running means).
    """

    epochs: int
    steps_per_epoch: int
    batch_size: int
    checkpoint_every: int
    seed: int
    num_workers: int = 0
    log_every: int = 10

    def samples_per_epoch(self, world_size: int) -> int:
        """Dataset length an epoch needs across all ranks."""
        return self.steps_per_epoch * self.batch_size * world_size


@dataclasses.dataclass
class FitResult:
    """What a finished run reports.

    Attributes:
        step: steps completed.
        resumed_from: step of the checkpoint the run resumed from (0 for a fresh start).
        history: metrics of every epoch, in order.
        last_losses: running means of the losses over the last epoch's steps.
    """

    step: int
    resumed_from: int
    history: list[dict[str, float]]
    last_losses: dict[str, float]


def move_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on ``device``."""
    non_blocking = device.type == "cuda"
    return {key: value.to(device, non_blocking=non_blocking) for key, value in batch.items()}


def _epoch_indices(dataset: EpochDataset, settings: LoopSettings, runtime: Runtime, epoch: int) -> list[int]:
    sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,  # type: ignore[arg-type]
                                 seed=settings.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)[: settings.steps_per_epoch * settings.batch_size]


def _restore(task: Task, checkpoint: Checkpoint, folder: str | os.PathLike[str]) -> None:
    components = task.state()
    missing = set(components) - set(checkpoint.states)
    if missing:
        raise CheckpointError(Path(folder) / CHECKPOINT_NAME, f"has no state for {sorted(missing)}", "delete it to start afresh")
    for name, component in components.items():
        component.load_state_dict(checkpoint.states[name])
    set_rng_state(checkpoint.rng)


def _snapshot(task: Task, digest: str, step: int, epoch: int, history: list[dict[str, float]]) -> Checkpoint:
    states = {name: component.state_dict() for name, component in task.state().items()}
    return Checkpoint(digest=digest, step=step, epoch=epoch, states=states, rng=rng_state(), history=list(history))


def fit(
    task: Task,
    dataset: Dataset[Any],
    settings: LoopSettings,
    runtime: Runtime,
    checkpoint_dir: str | os.PathLike[str],
    digest: str,
    sink: MetricSink | None = None,
    on_step: Callable[[int], None] | None = None,
    description: str = "train",
) -> FitResult:
    """Train ``task`` for ``settings.epochs`` epochs, resuming from ``checkpoint_dir`` when possible.

    Args:
        task: what to train.
        dataset: training samples; its length must be ``settings.samples_per_epoch(world_size)``
            or more, and it should implement ``set_epoch`` to vary its draws.
        settings: epochs, steps, batch size, checkpoint interval, seed.
        runtime: device, precision and rank.
        checkpoint_dir: where ``last.pt`` lives.
        digest: hash of the parameters; a checkpoint with another digest is not resumed (a fresh start replaces it).
        sink: optional receiver of per-step losses and per-epoch metrics (rank 0 only).
        on_step: called with the global step after each step (tests use it to simulate a kill).
        description: label of the progress bar.

    Raises:
        CheckpointError: the checkpoint is unreadable.
        ConfigError: the dataset is shorter than an epoch.
    """
    needed = settings.samples_per_epoch(runtime.world_size)
    if len(dataset) < needed:  # type: ignore[arg-type]
        raise ConfigError("steps_per_epoch", f"an epoch needs {needed} samples, the dataset has {len(dataset)}")  # type: ignore[arg-type]
    checkpoint = load_checkpoint(checkpoint_dir, digest)
    step, epoch, history = 0, 0, []
    if checkpoint is not None:
        _restore(task, checkpoint, checkpoint_dir)
        step, epoch, history = checkpoint.step, checkpoint.epoch, checkpoint.history
        log.info("%s: resuming from step %d (epoch %d) in %s", description, step, epoch, checkpoint_dir)
    resumed_from = step
    sink = sink if runtime.is_main else None
    last_losses: dict[str, float] = {}
    total_steps = settings.epochs * settings.steps_per_epoch
    progress = tqdm(total=total_steps, initial=step, desc=description, disable=None if runtime.is_main else True,
                    dynamic_ncols=True)
    try:
        while epoch < settings.epochs:
            done_in_epoch = step - epoch * settings.steps_per_epoch
            set_epoch = getattr(dataset, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
            indices = _epoch_indices(dataset, settings, runtime, epoch)[done_in_epoch * settings.batch_size:]
            loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=indices, drop_last=True,
                                num_workers=settings.num_workers, pin_memory=runtime.device.type == "cuda")
            sums: dict[str, float] = {}
            window: dict[str, float] = {}
            count = 0
            for batch in loader:
                losses = task.train_step(move_to(batch, runtime.device))
                step += 1
                count += 1
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value
                    window[name] = window.get(name, 0.0) + value
                progress.update(1)
                progress.set_postfix({k: f"{v:.3g}" for k, v in losses.items() if k.startswith("loss")}, refresh=False)
                if sink is not None and step % settings.log_every == 0:
                    sink.log_metrics({f"train/{k}": v / settings.log_every for k, v in window.items()}, step=step)
                if step % settings.log_every == 0:
                    window = {}
                if step % settings.checkpoint_every == 0 and runtime.is_main:
                    save_checkpoint(checkpoint_dir, _snapshot(task, digest, step, epoch, history))
                if on_step is not None:
                    on_step(step)
            last_losses = {k: v / max(count, 1) for k, v in sums.items()}
            with torch.random.fork_rng(devices=[]):
                metrics = task.end_epoch(epoch, sink)
            metrics = {"epoch": float(epoch), **metrics}
            history.append(metrics)
            if sink is not None:
                sink.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)
            log.info("%s epoch %d: %s", description, epoch,
                     ", ".join(f"{k} {v:.4g}" for k, v in {**last_losses, **metrics}.items() if k != "epoch"))
            epoch += 1
            if runtime.is_main:
                save_checkpoint(checkpoint_dir, _snapshot(task, digest, step, epoch, history))
    finally:
        progress.close()
    return FitResult(step=step, resumed_from=resumed_from, history=history, last_losses=last_losses)

