"""Training engine: exact resume after a kill (also of a pod whose checkpoints live in S3), refused foreign
checkpoints, falling loss, DDP on 2 CPU processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from healthivert.config import LossWeights, ModelParams, NetworkSize
from healthivert.data.dataset import SliceDataset, target_rows
from healthivert.errors import CheckpointError
from healthivert.models.classifier import FractureClassifier
from healthivert.models.discriminator import Discriminators
from healthivert.models.generator import HealthiVertGenerator
from healthivert.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from healthivert.training.classifier import ClassifierTask, attention_volume
from healthivert.training.figures import ViewSink
from healthivert.training.gan import InpaintingTask
from healthivert.training.loop import LoopSettings, fit
from healthivert.training.runtime import Runtime, runtime_for, seed_everything
from healthivert.training.schedule import LinearDecay
from test_dataset import MAX_HEIGHT, write_box_dataset

TINY = ModelParams(size="cpu", sizes={"cpu": NetworkSize(cnum=4, disc_channels=4, disc_layers=1, classifier_channels=4)},
                   max_height_px=MAX_HEIGHT)
GRADES = [("train", g) for g in (0, 0, 1, 0, 2, 1)] + [("val", 0), ("val", 0)]


class Killed(Exception):
    """Stands for SIGKILL: raised between steps, after whatever the loop had written."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("boxes")
    return root, write_box_dataset(root, GRADES)


def _task(data: tuple[Path, pd.DataFrame], stage: str, runtime: Runtime, epochs: int, seed: int = 0,
          with_validation: bool = False) -> tuple[InpaintingTask, SliceDataset]:
    root, manifest = data
    seed_everything(seed)
    validation = None
    if with_validation:
        val = SliceDataset(target_rows(manifest, ["val"], max_grade=0), root, "sagittal", None, MAX_HEIGHT, seed, slice_ratios=(0.0,))
        validation = DataLoader(val, batch_size=4)
    task = InpaintingTask(HealthiVertGenerator(TINY), Discriminators(TINY), TINY, LossWeights(), stage, 2e-4, 0.5,
                          epochs, 1, runtime, validation, channels_last=False)
    train = SliceDataset(target_rows(manifest, ["train"]), root, "sagittal", None, MAX_HEIGHT, seed,
                         samples_per_epoch=3 * 4 * runtime.world_size)
    return task, train


def _state(task: InpaintingTask) -> dict[str, torch.Tensor]:
    flat = {}
    for name, component in task.state().items():
        for key, value in component.state_dict().items():
            if isinstance(value, torch.Tensor):
                flat[f"{name}.{key}"] = value.clone()
    for group, optimizer in (("g", task.g_optimizer), ("d", task.d_optimizer)):
        for index, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                flat[f"{group}.opt.{index}.{key}"] = torch.as_tensor(value).clone()
    return flat


def _s3_keys(run: str) -> list[str]:
    """Checkpoint objects the mirror of ``run`` has uploaded."""
    import boto3
    from conftest import BUCKET

    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=f"checkpoints/{run}/")
    return [item["Key"] for item in listing.get("Contents", []) if item["Key"].endswith(CHECKPOINT_NAME)]


def _mirrored(run: str, local: Path) -> bool:
    """Whether the bucket holds the pod's latest checkpoint ``local`` (the mirror uploads in the background)."""
    import boto3
    from conftest import BUCKET

    keys = _s3_keys(run)
    if not keys or not local.is_file():
        return False
    return boto3.client("s3").get_object(Bucket=BUCKET, Key=keys[0])["Body"].read() == local.read_bytes()


SETTINGS = LoopSettings(epochs=2, steps_per_epoch=3, batch_size=4, checkpoint_every=2, seed=0)
CPU = Runtime(torch.device("cpu"))


@contextlib.contextmanager
def _checkpoint_folder(storage: str, pod: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """``disk``: a folder that survives the kill; ``s3``: the pod's folder, mirrored to a moto bucket."""
    if storage == "disk":
        yield pod.parent
        return
    from conftest import BUCKET

    from healthivert.io.remote import mirrored_folder

    request.getfixturevalue("s3")
    with mirrored_folder(pod, f"s3://{BUCKET}/checkpoints/{pod.parents[1].name}", interval_s=0.05) as folder:
        yield folder


@pytest.mark.parametrize(("kill_at", "storage"), [(3, "disk"), (5, "disk"), (5, "s3")])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(data, tmp_path: Path, kill_at: int, storage: str,
                                                             request: pytest.FixtureRequest) -> None:
    """With ``s3`` the pod's disk is lost with it: the run resumes from the checkpoint mirrored to the bucket."""
    task, train = _task(data, "coarse", CPU, SETTINGS.epochs)
    fit(task, train, SETTINGS, CPU, tmp_path / "whole", "digest")
    expected = _state(task)

    def kill(step: int) -> None:
        if step == kill_at:
            if storage == "s3":
                # the mirror uploads in the background: wait for the latest checkpoint (step 4), not any
                # (on a busy machine the bucket still held step 3's when the pod was lost)
                local = tmp_path / "killed" / "pod-1" / CHECKPOINT_NAME
                deadline = time.monotonic() + 10
                while not (mirrored := _mirrored(tmp_path.name, local)) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert mirrored, "the latest checkpoint did not reach the bucket"
                shutil.rmtree(tmp_path / "killed" / "pod-1")
            raise Killed

    task, train = _task(data, "coarse", CPU, SETTINGS.epochs)
    with pytest.raises(Killed), _checkpoint_folder(storage, tmp_path / "killed" / "pod-1", request) as folder:
        fit(task, train, SETTINGS, CPU, folder, "digest", on_step=kill)
    # a new process: fresh networks from another seed, everything else from the checkpoint
    task, train = _task(data, "coarse", CPU, SETTINGS.epochs, seed=123)
    train.seed = 0
    with _checkpoint_folder(storage, tmp_path / "killed" / "pod-2", request) as folder:
        result = fit(task, train, SETTINGS, CPU, folder, "digest")
    assert result.resumed_from == 2 * ((kill_at - 1) // 2) and result.step == 6
    got = _state(task)
    assert got.keys() == expected.keys()
    # the same arithmetic in the same order; a tolerance keeps the verdict independent of the CPU's kernels
    different = [key for key in expected if not torch.allclose(expected[key].float(), got[key].float(),
                                                                 rtol=1e-5, atol=1e-7)]
    assert not different, different[:5]


def test_gradients_are_clipped_to_the_set_norm(data) -> None:
    task, train = _task(data, "fine", CPU, 1)
    batch = next(iter(DataLoader(train, batch_size=4)))

    def norm(module: torch.nn.Module) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()
                                                            if p.grad is not None])))

    task.train_step(batch)
    free = norm(task.generator), norm(task.discriminators)
    task.grad_clip_norm = 1e-3
    task.train_step(batch)
    assert min(free) > 1e-2
    assert norm(task.generator) <= 1e-3 * 1.001 and norm(task.discriminators) <= 1e-3 * 1.001


def test_checkpoint_of_other_parameters_starts_afresh_and_is_replaced(data, tmp_path: Path, caplog) -> None:
    task, train = _task(data, "coarse", CPU, 1)
    settings = LoopSettings(epochs=1, steps_per_epoch=2, batch_size=4, checkpoint_every=1, seed=0)
    fit(task, train, settings, CPU, tmp_path, "digest-a")
    assert load_checkpoint(tmp_path, "digest-a").step == 2
    with caplog.at_level(logging.WARNING):
        result = fit(task, train, settings, CPU, tmp_path, "digest-b")
    assert result.resumed_from == 0 and result.step == 2
    assert "other parameters (digest digest-a, now digest-b)" in caplog.text
    assert load_checkpoint(tmp_path, "digest-b").digest == "digest-b"
    (tmp_path / CHECKPOINT_NAME).write_bytes((tmp_path / CHECKPOINT_NAME).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable") as error:
        fit(task, train, settings, CPU, tmp_path, "digest-b")
    assert "\n" not in str(error.value) and CHECKPOINT_NAME in str(error.value)


def test_generator_loss_falls_and_validation_improves(data, tmp_path: Path) -> None:
    task, train = _task(data, "fine", CPU, 4, with_validation=True)
    settings = LoopSettings(epochs=4, steps_per_epoch=3, batch_size=4, checkpoint_every=100, seed=0)
    before = task.evaluate(task.validation, with_baselines=False)
    result = fit(task, train, settings, CPU, tmp_path, "d")
    first, last = result.history[0], result.history[-1]
    assert last["val/model/mae_hu"] < before["model/mae_hu"]
    assert last["val/model/mae_hu"] < first["val/model/mae_hu"] or last["val/model/mae_hu"] < 0.8 * before["model/mae_hu"]
    task2, train2 = _task(data, "fine", CPU, 4)
    losses = []
    fit(task2, train2, settings, CPU, tmp_path / "b", "d",
        on_step=lambda step: losses.append(task2.g_optimizer.param_groups[0]["lr"]))
    assert losses[0] == 2e-4 and losses[-1] < losses[0]                 # the linear decay is applied


def test_linear_decay_schedule() -> None:
    decay = LinearDecay(total_epochs=6, constant_epochs=2)
    assert [decay(e) for e in range(6)] == pytest.approx([1, 1, 0.8, 0.6, 0.4, 0.2])
    assert LinearDecay(3, 5)(2) == 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, root: str, manifest: pd.DataFrame, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with runtime_for("cpu", "fp32") as runtime:
        task, train = _task((Path(root), manifest), "coarse", runtime, 1)
        settings = LoopSettings(epochs=1, steps_per_epoch=2, batch_size=2, checkpoint_every=1, seed=0)
        seen = []
        original = task.train_step
        task.train_step = lambda batch: (seen.append(batch["row"].tolist()), original(batch))[1]  # type: ignore[method-assign]
        fit(task, train, settings, runtime, Path(out) / "ckpt", "digest")
        torch.save({"state": task.generator.state_dict(), "seen": seen}, Path(out) / f"rank{rank}.pt")


def test_distributed_data_parallel_on_two_cpu_processes(data, tmp_path: Path) -> None:
    root, manifest = data
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(root), manifest, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])   # gradients were averaged
    assert rank0["seen"] != rank1["seen"]                                                     # each rank its own share
    assert (tmp_path / "ckpt" / CHECKPOINT_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CHECKPOINT_NAME]


def test_attention_volume_interpolates_between_computed_slices() -> None:
    torch.manual_seed(0)
    classifier = FractureClassifier(TINY)
    ct = np.random.default_rng(0).integers(0, 256, size=(32, 24, 9), dtype=np.uint8)
    every = attention_volume(classifier, ct, torch.device("cpu"), slice_step=1)
    sparse = attention_volume(classifier, ct, torch.device("cpu"), slice_step=4)
    assert every.shape == sparse.shape == ct.shape and every.dtype == np.float32
    assert 0.0 <= every.min() and every.max() <= 1.0
    for k in (0, 4, 8):
        np.testing.assert_allclose(sparse[:, :, k], every[:, :, k], atol=1e-5)
    np.testing.assert_allclose(sparse[:, :, 1], 0.75 * every[:, :, 0] + 0.25 * every[:, :, 4], atol=1e-5)


def test_view_sink_forwards_a_further_views_metrics_and_figures_under_its_name() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.metrics: list[tuple[dict[str, float], int | None]] = []
            self.figures: list[str] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.metrics.append((metrics, step))

        def log_figure(self, figure: object, name: str) -> None:
            self.figures.append(name)

    recorder = Recorder()
    sink = ViewSink(recorder, "coronal")
    sink.log_metrics({"val/model/dice": 0.5, "epoch": 1.0}, step=7)
    sink.log_figure(object(), "samples/fine_epoch_001.png")
    assert recorder.metrics == [({"val/coronal/model/dice": 0.5, "coronal/epoch": 1.0}, 7)]
    assert recorder.figures == ["samples/coronal/fine_epoch_001.png"]


class _MeanLogit(torch.nn.Module):
    """A stand-in classifier: the logit is the image mean plus an offset."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(offset))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=(1, 2, 3)).unsqueeze(1) + self.offset


def test_classifier_auc_ranks_while_the_threshold_is_off() -> None:
    images = torch.linspace(-1, 1, 8).reshape(8, 1, 1, 1).expand(8, 1, 4, 4).contiguous()
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float32)
    loader = DataLoader([{"image": i, "label": y} for i, y in zip(images, labels)], batch_size=3)
    shifted = ClassifierTask(_MeanLogit(5.0), 1e-3, 0.9, CPU).evaluate(loader)   # every logit > 0
    assert shifted["auc"] == 1.0 and shifted["sensitivity"] == 1.0 and shifted["specificity"] == 0.0
    assert ClassifierTask(_MeanLogit(0.0), 1e-3, 0.9, CPU).evaluate(loader)["balanced_accuracy"] == 1.0
