"""Adversarial training of the inpainting generator (one step = discriminators, then generator).

Stage ``coarse`` trains the coarse network and its SHRM head (the fine part is frozen and unused);
stage ``fine`` trains the whole generator. Batches are dicts of ``(B, 1, H, W)`` tensors (rows
cranio-caudal) as :class:`healthivert.data.dataset.SliceDataset` builds them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from healthivert.config import LossWeights, ModelParams
from healthivert.losses import DiscriminatorLoss, GeneratorLoss, real_seg
from healthivert.models.discriminator import Discriminators
from healthivert.models.generator import HealthiVertGenerator
from healthivert.training.baselines import Prediction, baseline_prediction
from healthivert.training.figures import sample_grid
from healthivert.training.loop import MetricSink, move_to
from healthivert.training.metrics import MetricAccumulator
from healthivert.training.runtime import Runtime
from healthivert.training.schedule import adam, linear_decay

log = logging.getLogger(__name__)

Stage = Literal["coarse", "fine"]
#: baselines every validation is compared with (:mod:`healthivert.training.baselines`)
BASELINES = ("nearest", "interpolate")
#: batch key of what each stage's segmentation head is trained to produce (as ``losses.real_seg``)
SEG_TRUTH = {"coarse": "real_neighbours", "fine": "real_target"}


def freeze_for_stage(generator: HealthiVertGenerator, stage: Stage) -> None:
    """Let only the parameters the stage trains require gradients (coarse: everything not ``fine*``)."""
    for name, parameter in generator.named_parameters():
        parameter.requires_grad_(stage == "fine" or not name.startswith("fine"))


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def _wrap(module: nn.Module, runtime: Runtime, broadcast_buffers: bool = True) -> nn.Module:
    if not runtime.distributed:
        return module
    return DistributedDataParallel(module, device_ids=None if runtime.device.type == "cpu" else [runtime.device],
                                   broadcast_buffers=broadcast_buffers)


class InpaintingTask:
    """One stage of HealthiVert-GAN training, as :func:`healthivert.training.loop.fit` drives it.

    Args:
        generator: the generator (coarse stage: freshly built; fine: initialised from the coarse run).
        discriminators: the three PatchGAN discriminators.
        model_params: module switches and sizes.
        weights: loss weights.
        stage: ``coarse`` or ``fine``.
        lr, beta1: Adam settings (both optimisers).
        grad_clip_norm: total gradient norm each network's step is clipped to (0: no clipping).
        epochs, constant_epochs: the linear-decay schedule.
        runtime: device, precision, rank.
        validation: loader of held-out healthy samples, or ``None``.
        channels_last: keep convolution activations in NHWC (faster oneDNN/cuDNN kernels).
    """

    def __init__(self, generator: HealthiVertGenerator, discriminators: Discriminators, model_params: ModelParams,
                 weights: LossWeights, stage: Stage, lr: float, beta1: float, epochs: int, constant_epochs: int,
                 runtime: Runtime, validation: DataLoader[Any] | None = None, channels_last: bool = True,
                 grad_clip_norm: float = 0.0) -> None:
        self.stage = stage
        self.grad_clip_norm = grad_clip_norm
        self.runtime = runtime
        self.model_params = model_params
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = generator.to(runtime.device, memory_format=memory_format)
        self.discriminators = discriminators.to(runtime.device, memory_format=memory_format)
        freeze_for_stage(self.generator, stage)
        # the generator's only buffers are constant kernels: nothing to re-broadcast before each forward
        self.g_net = _wrap(self.generator, runtime, broadcast_buffers=False)
        self.d_net = _wrap(self.discriminators, runtime)
        self.g_optimizer = adam(self.generator.parameters(), lr, beta1)
        self.d_optimizer = adam(self.discriminators.parameters(), lr, beta1)
        self.g_scheduler = linear_decay(self.g_optimizer, epochs, constant_epochs)
        self.d_scheduler = linear_decay(self.d_optimizer, epochs, constant_epochs)
        self.scaler = runtime.grad_scaler()
        self.g_loss = GeneratorLoss(weights, model_params)
        self.d_loss = DiscriminatorLoss()
        self.uses_gan = weights.gan > 0
        self.validation = validation
        self.memory_format = memory_format

    def state(self) -> dict[str, Any]:
        """Checkpointed components."""
        return {"generator": self.generator, "discriminators": self.discriminators,
                "g_optimizer": self.g_optimizer, "d_optimizer": self.d_optimizer,
                "g_scheduler": self.g_scheduler, "d_scheduler": self.d_scheduler, "scaler": self.scaler}

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.contiguous(memory_format=self.memory_format) if value.ndim == 4 else value
                for key, value in batch.items()}

    def _clip(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Clip ``module``'s gradients to ``grad_clip_norm`` (unscaled first when a loss scaler is active)."""
        if self.grad_clip_norm > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip_norm)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Update the discriminators on real vs detached fake, then the generator; returns the loss terms."""
        batch = self._inputs(batch)
        self.generator.train()
        self.discriminators.train()
        with self.runtime.autocast():
            # pixel losses compare at the true height; the height heads learn from their own loss (SHRM)
            output = self.g_net(batch["ct"], batch["mask"], batch["slice_ratio"], batch["attention"],
                                stage=self.stage, assemble_height=batch["height"],
                                neighbour_height=batch["neighbour_height"], neighbour_side=batch["neighbour_side"])
        losses: dict[str, float] = {}
        if self.uses_gan:
            _set_requires_grad(self.discriminators, True)
            self.d_optimizer.zero_grad(set_to_none=True)
            with self.runtime.autocast():
                real = self.d_net(batch["real_ct"], real_seg(batch, self.stage), batch["band"])
                fake = self.d_net(output.ct.detach(), output.seg.detach(), batch["band"])
                d_total, d_terms = self.d_loss(real, fake)
            self.scaler.scale(d_total).backward()
            self._clip(self.discriminators, self.d_optimizer)
            self.scaler.step(self.d_optimizer)
            losses["loss_d"] = float(d_total.detach())
            losses.update({k: float(v.detach()) for k, v in d_terms.items()})
            _set_requires_grad(self.discriminators, False)
        self.g_optimizer.zero_grad(set_to_none=True)
        with self.runtime.autocast():
            # the generator's adversarial term needs no gradient sync of D: use the bare module
            fake_logits = self.discriminators(output.ct, output.seg, batch["band"]) if self.uses_gan else None
            g_total, g_terms = self.g_loss(output, batch, fake_logits, stage=self.stage)
        self.scaler.scale(g_total).backward()
        self._clip(self.generator, self.g_optimizer)
        self.scaler.step(self.g_optimizer)
        self.scaler.update()
        losses["loss_g"] = float(g_total.detach())
        losses.update({f"g_{k}": float(v.detach()) for k, v in g_terms.items()})
        return losses

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> Prediction:
        """The generator's re-assembled output for a batch (at its predicted heights), in eval mode."""
        self.generator.eval()
        batch = self._inputs(batch)
        with self.runtime.autocast():
            output = self.generator(batch["ct"], batch["mask"], batch["slice_ratio"], batch["attention"], stage=self.stage,
                                    neighbour_height=batch["neighbour_height"], neighbour_side=batch["neighbour_side"])
        return Prediction(ct=output.ct.float(), seg=output.seg.float(), height=output.height.float())

    @torch.no_grad()
    def evaluate(self, loader: DataLoader[Any], with_baselines: bool = True) -> dict[str, float]:
        """Masked MAE (HU), Dice and height error (mm) of the model (and the baselines) over a loader.

        Keys: ``model/mae_hu``, ..., ``nearest/dice``, ``interpolate/height_error_mm``. The model's Dice
        is that of the stage's segmentation head (coarse: the healthy neighbours; fine: the target);
        the baselines' is always the target's.
        """
        accumulators = {"model": MetricAccumulator()}
        if with_baselines:
            accumulators.update({name: MetricAccumulator() for name in BASELINES})
        for batch in loader:
            batch = move_to(batch, self.runtime.device)
            accumulators["model"].update(self.predict(batch), batch, SEG_TRUTH[self.stage])
            if with_baselines:
                for name in BASELINES:
                    accumulators[name].update(baseline_prediction(batch, name, self.model_params.max_height_px), batch)
        metrics: dict[str, float] = {}
        for name, accumulator in accumulators.items():
            metrics.update(accumulator.means(prefix=f"{name}/"))
        return metrics

    def end_epoch(self, epoch: int, sink: MetricSink | None) -> dict[str, float]:
        """Step the learning-rate schedules; validate and draw a sample grid (rank 0)."""
        self.g_scheduler.step()
        self.d_scheduler.step()
        if self.validation is None or not self.runtime.is_main:
            return {}
        metrics = {f"val/{k}": v for k, v in self.evaluate(self.validation, with_baselines=False).items()}
        if sink is not None:
            batch = move_to(next(iter(self.validation)), self.runtime.device)
            figure = sample_grid(batch, self.predict(batch), title=f"{self.stage} generator, epoch {epoch + 1}")
            sink.log_figure(figure, f"samples/{self.stage}_epoch_{epoch + 1:03d}.png")
        return metrics
