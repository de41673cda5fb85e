"""Stages ``train-coarse`` and ``train-fine`` through ``cli.main``: outputs, resume, one-line errors, and two views
(a generator per view, each with its own checkpoints, fused by ``synthesize``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from healthivert.cli import main
from healthivert.config import load_params
from healthivert.io.nifti import load_volume
from healthivert.models.io import load_classifier, load_generator, read_saved_model
from healthivert.training.views import collapse_warning, training_digest
from healthivert.synthesis.index import read_index
from healthivert.training.checkpoint import CHECKPOINT_NAME
from test_dataset import MAX_HEIGHT, write_box_dataset

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
GRADES = [("train", g) for g in (0, 0, 1, 0, 2, 3, 0, 2)] + [("val", 0), ("val", 0), ("val", 2), ("test", 0)]
TINY = [
    "tracking.enabled=false",
    "model.sizes.cpu.cnum=4", "model.sizes.cpu.disc_channels=4", "model.sizes.cpu.disc_layers=1",
    "model.sizes.cpu.classifier_channels=4", f"model.max_height_px={MAX_HEIGHT}",
]
for section in ("train_coarse", "train_fine"):
    TINY += [f"{section}.epochs=2", f"{section}.steps_per_epoch=2", f"{section}.batch_size=4",
             f"{section}.lr_constant_epochs=1", f"{section}.checkpoint_every=1", f"{section}.device=cpu",
             f"{section}.precision=fp32"]
TINY += ["train_coarse.classifier.epochs=1", "train_coarse.classifier.steps_per_epoch=2",
         "train_coarse.classifier.batch_size=4", "train_coarse.classifier.cam_slice_step=3"]


def _args(*extra: str) -> list[str]:
    args = ["--params", str(PARAMS)]
    for setting in TINY + list(extra):
        args += ["--set", setting]
    return args


def _coarse(root: Path, *extra: str) -> list[str]:
    return ["train-coarse", "--data", str(root / "pre"), "--out", str(root / "coarse"), "--attention-out",
            str(root / "attention"), "--checkpoint-dir", str(root / "ck" / "coarse"), "--metrics",
            str(root / "coarse.json"), *_args(*extra)]


def _fine(root: Path, *extra: str) -> list[str]:
    return ["train-fine", "--data", str(root / "pre"), "--attention", str(root / "attention"), "--coarse",
            str(root / "coarse"), "--out", str(root / "fine"), "--checkpoint-dir", str(root / "ck" / "fine"),
            "--metrics", str(root / "fine.json"), *_args(*extra)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    write_box_dataset(root / "pre", GRADES)
    assert main(_coarse(root)) == 0
    assert main(_fine(root)) == 0
    return root


def test_coarse_stage_writes_models_card_samples_and_attention_for_every_crop(trained: Path) -> None:
    manifest = pd.read_parquet(trained / "pre" / "manifest.parquet")
    index = pd.read_parquet(trained / "attention" / "index.parquet")
    assert sorted(zip(index["case"], index["vertebra"])) == sorted(zip(manifest["case"], manifest["vertebra"]))
    cam = load_volume(trained / "attention" / index["path"].iloc[0])
    crop = load_volume(trained / "pre" / manifest["ct_path"].iloc[0])
    assert cam.shape == crop.shape and np.allclose(cam.affine, crop.affine)
    assert 0.0 <= cam.array.min() and cam.array.max() <= 1.0 and cam.array.max() > 0.0
    assert {p.name for p in (trained / "coarse").iterdir()} >= {"classifier.pt", "generator.pt", "model_card.json",
                                                                "params.yaml", "samples"}
    assert len(list((trained / "coarse" / "samples").glob("coarse_epoch_*.png"))) == 2
    card = json.loads((trained / "coarse" / "model_card.json").read_text())
    assert card["intended_use"] == "research use, not for diagnosis"
    assert card["input"]["image_size"] == [64, 32] and card["input"]["hu_window"] == [-300.0, 1200.0]
    assert card["training"]["steps"] == 4 and "val/nearest/mae_hu" in card["metrics"]
    load_classifier(trained / "coarse" / "classifier.pt")
    metrics = json.loads((trained / "coarse.json").read_text())
    for who in ("model", "nearest", "interpolate"):
        for name in ("mae_hu", "dice", "height_error_mm"):
            assert np.isfinite(metrics[f"val/{who}/{name}"])
    assert metrics["val/nearest/dice"] > 0.9                     # the boxes' neighbours are copies of healthy targets
    assert 0.0 <= metrics["val/classifier/balanced_accuracy"] <= 1.0 and "train/loss_classifier" in metrics
    assert np.isnan(metrics["val/classifier/auc"]) or 0.0 <= metrics["val/classifier/auc"] <= 1.0


def _relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> float:
    """Norm of the change of every float weight under ``prefix``, relative to the norm of those weights."""
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point() and "running_" not in k]
    change = torch.cat([(after[k] - before[k]).flatten() for k in keys]).norm()
    return float(change / torch.cat([before[k].flatten() for k in keys]).norm())


def test_fine_stage_starts_from_the_coarse_generator(trained: Path) -> None:
    coarse = load_generator(trained / "coarse" / "generator.pt").state_dict()
    fine = load_generator(trained / "fine" / "generator.pt").state_dict()
    fresh = load_generator(trained / "coarse" / "generator.pt")
    torch.manual_seed(1)
    for module in fresh.modules():
        if module is not fresh and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    # the fine stage trained every branch further, starting from the coarse weights: the weights moved, but
    # far less than the distance between the coarse generator and a freshly initialised one
    for branch in ("coarse.", "fine."):
        moved = _relative_change(coarse, fine, branch)
        assert 0.0 < moved < 0.5 * _relative_change(coarse, fresh.state_dict(), branch), branch
    card = json.loads((trained / "fine" / "model_card.json").read_text())
    assert card["training"]["initialised_from"].endswith("generator.pt")
    assert len(list((trained / "fine" / "samples").glob("fine_epoch_*.png"))) == 2
    metrics = json.loads((trained / "fine.json").read_text())
    assert 0.0 <= metrics["val/model/dice"] <= 1.0


def test_rerun_resumes_from_the_finished_checkpoint_and_reproduces_the_model(trained: Path) -> None:
    before = load_generator(trained / "fine" / "generator.pt").state_dict()
    assert main(_fine(trained)) == 0
    metrics = json.loads((trained / "fine.json").read_text())
    card = json.loads((trained / "fine" / "model_card.json").read_text())
    assert card["training"]["resumed_from_step"] == 4
    after = load_generator(trained / "fine" / "generator.pt").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(metrics["val/model/mae_hu"])


def test_changed_parameters_start_afresh_and_replace_the_checkpoint(trained: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(trained / "ck" / "fine", tmp_path / "ck")
    argv = _fine(trained, "train_fine.lr=0.0005")
    argv[argv.index("--checkpoint-dir") + 1], argv[argv.index("--out") + 1] = str(tmp_path / "ck"), str(tmp_path / "fine")
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert f"{CHECKPOINT_NAME} was written with other parameters" in caplog.text
    card = json.loads((tmp_path / "fine" / "model_card.json").read_text())
    assert card["training"]["resumed_from_step"] == 0
    assert (tmp_path / "ck" / CHECKPOINT_NAME).read_bytes() != (trained / "ck" / "fine" / CHECKPOINT_NAME).read_bytes()


@pytest.mark.parametrize(("case", "expected"), [
    ("no_manifest", "manifest not found"),
    ("no_healthy_train", "no vertebra of grade <= 0"),
    ("no_coarse", "saved generator not found"),
    ("no_attention", "attention maps not found"),
])
def test_bad_inputs_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str) -> None:
    if case == "no_healthy_train":
        write_box_dataset(tmp_path / "pre", [("train", 2), ("train", 3), ("val", 0)])
        argv = _coarse(tmp_path)
    elif case == "no_manifest":
        argv = _coarse(tmp_path)
    else:
        write_box_dataset(tmp_path / "pre", GRADES[:3])
        (tmp_path / "attention").mkdir()
        if case == "no_coarse":
            pd.DataFrame({"case": [], "vertebra": []}).to_parquet(tmp_path / "attention" / "index.parquet")
        argv = _fine(tmp_path)
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert expected in message and message.count("\n") == 0


# ----------------------------------------------------------------------------------- 2.5D: two views
BOTH_VIEWS = ["train_coarse.views=[sagittal, coronal]", "train_fine.views=[sagittal, coronal]"]


@pytest.fixture(scope="module")
def two_views(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two_views")
    write_box_dataset(root / "pre", GRADES, lr_size=32, lr_extent=(8, 22))  # coronal slices 64 x 32, like sagittal
    assert main(_coarse(root, *BOTH_VIEWS)) == 0
    assert main(_fine(root, *BOTH_VIEWS)) == 0
    return root


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_each_view_gets_its_generator_card_samples_checkpoints_and_metrics(two_views: Path, stage: str) -> None:
    folder = two_views / stage
    for view, generator, card_name, samples, checkpoints in [
            ("sagittal", "generator.pt", "model_card.json", "samples", "generator" if stage == "coarse" else "."),
            ("coronal", "generator_coronal.pt", "model_card_coronal.json", "samples_coronal", "generator_coronal")]:
        extra = read_saved_model(folder / generator, "generator").extra
        assert (extra["view"], extra["stage"]) == (view, stage)
        card = json.loads((folder / card_name).read_text())
        assert card["view"] == view and card["input"]["image_size"] == [64, 32]
        assert len(list((folder / samples).glob(f"{stage}_epoch_*.png"))) == 2
        assert (two_views / "ck" / stage / checkpoints / CHECKPOINT_NAME).is_file()
    if stage == "fine":
        assert card["training"]["initialised_from"].endswith("generator_coronal.pt")
    metrics = json.loads((two_views / f"{stage}.json").read_text())
    for name in ("val/model/dice", "val/coronal/model/dice", "val/coronal/nearest/mae_hu"):
        assert np.isfinite(metrics[name])
    assert metrics["val/model/mae_hu"] != metrics["val/coronal/model/mae_hu"]
    sagittal, coronal = (load_generator(folder / name).state_dict() for name in ("generator.pt", "generator_coronal.pt"))
    assert not all(torch.equal(sagittal[k], coronal[k]) for k in sagittal)   # each learnt from its own slices


def test_training_digest_names_the_view_not_the_list_of_views() -> None:
    one, both = load_params([], []), load_params([], ["train_fine.views=[sagittal, coronal]"])
    sagittal = training_digest(both, both.train_fine, "sagittal", "fine")
    assert sagittal == training_digest(one, one.train_fine, "sagittal", "fine")  # adding a view keeps the others' runs
    assert sagittal != training_digest(both, both.train_fine, "coronal", "fine")


def test_a_collapsed_segmentation_is_named_in_one_warning() -> None:
    metrics = {"val/model/dice": 0.0, "val/interpolate/dice": 0.93}
    warning = collapse_warning(metrics, "fine", "coronal")
    assert warning is not None and "\n" not in warning
    assert "coronal view" in warning and "Dice 0.000" in warning and "synthesize.views" in warning
    assert collapse_warning({**metrics, "val/model/dice": 0.95}, "fine", "coronal") is None
    assert collapse_warning({}, "coarse", "sagittal") is None  # no validation slices: nothing to judge


def test_a_views_checkpoint_is_not_resumed_as_another_view(two_views: Path, caplog: pytest.LogCaptureFixture) -> None:
    swapped = two_views / "ck" / "swapped"
    shutil.copytree(two_views / "ck" / "coarse", swapped)
    shutil.copyfile(swapped / "generator" / CHECKPOINT_NAME, swapped / "generator_coronal" / CHECKPOINT_NAME)
    argv = _coarse(two_views, *BOTH_VIEWS)
    argv[argv.index("--checkpoint-dir") + 1], argv[argv.index("--out") + 1] = str(swapped), str(two_views / "swapped")
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert f"generator_coronal/{CHECKPOINT_NAME} was written with other parameters" in caplog.text
    cards = [json.loads((two_views / "swapped" / name).read_text()) for name in ("model_card.json", "model_card_coronal.json")]
    assert [card["training"]["resumed_from_step"] for card in cards] == [4, 0]   # the sagittal run had finished


def test_fine_stage_refuses_a_coarse_generator_of_another_view_before_training(two_views: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:
    coarse = tmp_path / "coarse"
    shutil.copytree(two_views / "coarse", coarse)
    shutil.copyfile(coarse / "generator.pt", coarse / "generator_coronal.pt")
    argv = _fine(two_views, *BOTH_VIEWS)
    argv[argv.index("--coarse") + 1], argv[argv.index("--out") + 1] = str(coarse), str(tmp_path / "fine")
    argv[argv.index("--checkpoint-dir") + 1] = str(tmp_path / "ck")
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "generator trained on sagittal slices, used for the coronal view" in message
    assert not (tmp_path / "ck").exists() and not (tmp_path / "fine").exists()


def test_synthesis_fuses_the_two_trained_views(two_views: Path) -> None:
    def synthesize(*views: str) -> pd.DataFrame:
        out = two_views / ("synth_" + "_".join(views))
        argv = ["synthesize", "--data", str(two_views / "pre"), "--attention", str(two_views / "attention"),
                "--model", str(two_views / "fine"), "--out", str(out), *_args(f"synthesize.views=[{', '.join(views)}]",
                                                                           "synthesize.device=cpu",
                                                                           "synthesize.precision=fp32")]
        assert main(argv) == 0
        return read_index(out)

    both, sagittal = synthesize("sagittal", "coronal"), synthesize("sagittal")
    assert len(both) == len(GRADES) and (both["slices"] > sagittal["slices"]).all()
    assert not np.array_equal(load_volume(both["ct_path"].iloc[0]).array, load_volume(sagittal["ct_path"].iloc[0]).array)
