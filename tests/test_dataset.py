"""SliceDataset: target selection, slice draws, determinism, caching; baselines on exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from healthivert.data.dataset import SliceDataset, attention_path, target_rows
from healthivert.data.manifest import COLUMNS, read_manifest, write_manifest
from healthivert.errors import InputDataError
from healthivert.io.nifti import save_volume
from healthivert.training.baselines import baseline_prediction, closed_context
from healthivert.training.metrics import sample_metrics

#: IPL voxel-to-world matrix at 1 mm (axis 0 inferior, 1 posterior, 2 left)
IPL = np.array([[0, 0, -1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
BOX_SHAPE = (64, 32, 12)   # (CC, AP, LR)
MAX_HEIGHT = 16
LR_EXTENT = (2, 10)        # target body occupies LR slices 2..9


def _box_crop(heights: tuple[int, int, int], rng: np.random.Generator, lr_size: int = BOX_SHAPE[2],
              lr_extent: tuple[int, int] = LR_EXTENT) -> tuple[np.ndarray, np.ndarray]:
    """A crop with three box vertebrae (above, target, below) separated by 4-row discs, target centred.

    Returns uint8 CT ``(CC, AP, lr_size)`` and labels (19 above, 20 target, 21 below); the bodies span
    LR slices ``lr_extent``.
    """
    shape = (*BOX_SHAPE[:2], lr_size)
    ct = np.full(shape, 60, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    centre = BOX_SHAPE[0] // 2
    h_above, h_target, h_below = heights
    t0 = centre - h_target // 2
    spans = {19: (t0 - 4 - h_above, t0 - 4), 20: (t0, t0 + h_target), 21: (t0 + h_target + 4, t0 + h_target + 4 + h_below)}
    for vid, (r0, r1) in spans.items():
        label[r0:r1, 6:26, lr_extent[0]:lr_extent[1]] = vid
        ct[r0:r1, 6:26, lr_extent[0]:lr_extent[1]] = 170.0
        ct[r0, 6:26, lr_extent[0]:lr_extent[1]] = 230.0          # endplates
        ct[r1 - 1, 6:26, lr_extent[0]:lr_extent[1]] = 230.0
    ct += rng.normal(0.0, 2.0, size=ct.shape)
    return np.clip(ct, 0, 255).astype(np.uint8), label


def write_box_dataset(root: Path, grades: list[tuple[str, int]], seed: int = 0, attention: bool = False,
                      lr_size: int = BOX_SHAPE[2], lr_extent: tuple[int, int] = LR_EXTENT) -> pd.DataFrame:
    """Write crops + ``manifest.parquet`` following the preprocess contract; one row per (split, grade).

    Healthy targets are as high as their neighbours (10 rows); fractured ones lose rows with the grade.
    ``lr_size`` and ``lr_extent`` widen the crops and bodies left-right (coronal slices are ``CC x lr_size``).
    """
    rng = np.random.default_rng(seed)
    records = []
    for i, (split, grade) in enumerate(grades):
        case, vid = f"sub-box{i:03d}", 20
        target_h = {0: 10, 1: 8, 2: 7, 3: 5}[grade]
        ct, label = _box_crop((10, target_h, 10), rng, lr_size, lr_extent)
        mask = np.zeros_like(label)
        mask[BOX_SHAPE[0] // 2 - MAX_HEIGHT // 2: BOX_SHAPE[0] // 2 + MAX_HEIGHT // 2] = 1
        paths = {kind: f"{kind}/{case}_{vid}.nii.gz" for kind in ("ct", "label", "mask")}
        save_volume(root / paths["ct"], ct, IPL)
        save_volume(root / paths["label"], label, IPL)
        save_volume(root / paths["mask"], mask, IPL)
        if attention:
            cam = np.zeros(label.shape, dtype=np.float32)
            cam[label == vid] = 0.25 * grade
            save_volume(attention_path(root / "attention", case, vid), cam, IPL)
        rows = np.flatnonzero((label == vid).any(axis=(1, 2)))
        records.append({
            "case": case, "vertebra": vid, "name": "L1", "split": split, "grade": grade, "fracture_type": "none" if grade == 0 else "wedge",
            "ct_path": paths["ct"], "label_path": paths["label"], "mask_path": paths["mask"],
            "healthy_ct_path": None, "healthy_label_path": None, "spacing_mm": 1.0, "hu_lo": -300.0, "hu_hi": 1200.0,
            "above": 19, "below": 21, "center_row": BOX_SHAPE[0] // 2, "top_row": int(rows[0]), "bottom_row": int(rows[-1]),
            "source_layout": "verse",
        })
    manifest = pd.DataFrame.from_records(records)
    for column in COLUMNS:
        if column not in manifest:
            manifest[column] = np.nan
    write_manifest(manifest, root)
    return read_manifest(root)


@pytest.fixture()
def boxes(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    grades = [("train", 0), ("train", 1), ("train", 2), ("train", 3), ("val", 0), ("val", 2), ("test", 0)]
    return tmp_path, write_box_dataset(tmp_path, grades, attention=True)


def test_targets_are_known_grades_at_most_one(boxes: tuple[Path, pd.DataFrame]) -> None:
    _, manifest = boxes
    manifest = manifest.copy()
    manifest.loc[0, "grade"] = pd.NA
    rows = target_rows(manifest, ["train"])
    assert list(rows["grade"]) == [1]
    assert len(target_rows(manifest, ["train", "val", "test"])) == 3
    assert len(target_rows(manifest, ["train"], max_grade=None)) == 4


def test_slices_come_from_the_central_part_with_a_middle_preference(boxes: tuple[Path, pd.DataFrame]) -> None:
    root, manifest = boxes
    ds = SliceDataset(target_rows(manifest, ["train"], max_grade=0), root, "sagittal", None, MAX_HEIGHT, seed=3,
                      samples_per_epoch=400)
    ratios = np.array([float(ds[i]["slice_ratio"]) for i in range(len(ds))])
    # extent 2..9: centre 5.5, half-width 3.5; central 80 % -> offsets within 2.8 -> indices 3..8
    assert ratios.max() <= 2.5 / 3.5 + 1e-6
    assert ratios.min() >= 0.5 / 3.5 - 1e-6          # integer slices never sit exactly on 5.5
    counts = np.bincount(np.round(ratios * 3.5 - 0.5).astype(int), minlength=3)
    assert counts[0] > counts[1] > counts[2] > 0     # triangular: the middle slices are the likeliest


def test_item_content_and_determinism(boxes: tuple[Path, pd.DataFrame]) -> None:
    root, manifest = boxes
    rows = target_rows(manifest, ["train"])
    ds = SliceDataset(rows, root, "sagittal", root / "attention", MAX_HEIGHT, seed=0, samples_per_epoch=8)
    item = ds[1]
    assert item["ct"].shape == (1, 64, 32) and item["ct"].dtype == torch.float32
    assert item["band"].tolist() == [24, 40] and item["band"].dtype == torch.int64
    assert item["height"].shape == () and item["slice_ratio"].shape == ()
    assert int(item["row"]) == 1 and int(item["height"]) == 8          # the grade-1 target lost 2 rows
    assert float(item["mask"].sum()) == MAX_HEIGHT * 32
    assert float(item["ct"][0, 24:40].abs().sum()) == 0.0             # the gap hides the target
    # the grade-1 target's CAM (0.25 on its body) is cut out with it: the band of 1 - cam is all ones
    assert torch.equal(item["attention"][0, 24:40], torch.ones(16, 32))
    assert float(item["attention"].min()) == 1.0
    again = SliceDataset(rows, root, "sagittal", root / "attention", MAX_HEIGHT, seed=0, samples_per_epoch=8)
    for i in range(8):
        assert torch.equal(ds[i]["real_ct"], again[i]["real_ct"]) and float(ds[i]["slice_ratio"]) == float(again[i]["slice_ratio"])
    draws = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        draws.append(tuple(float(ds[i]["slice_ratio"]) for i in range(8)))
    assert len(set(draws)) == 4                                         # every epoch draws other slices
    assert len(ds._cache) == 2                                          # each crop read once


def test_coronal_view_slices_across_ap(boxes: tuple[Path, pd.DataFrame]) -> None:
    root, manifest = boxes
    ds = SliceDataset(target_rows(manifest, ["val"], max_grade=0), root, "coronal", None, MAX_HEIGHT, seed=0,
                      slice_ratios=(0.0, 0.5))
    assert len(ds) == 2
    assert ds[0]["ct"].shape == (1, 64, 12)
    assert float(ds[0]["slice_ratio"]) < 0.1 and abs(float(ds[1]["slice_ratio"]) - 0.5) < 0.1


def test_missing_files_and_empty_selection_are_reported(boxes: tuple[Path, pd.DataFrame]) -> None:
    root, manifest = boxes
    with pytest.raises(InputDataError, match="no target vertebrae"):
        SliceDataset(manifest.iloc[:0], root, "sagittal", None, MAX_HEIGHT, seed=0)
    (root / manifest.loc[0, "ct_path"]).unlink()
    ds = SliceDataset(manifest.iloc[:1], root, "sagittal", None, MAX_HEIGHT, seed=0)
    with pytest.raises(InputDataError, match="file not found"):
        ds[0]
    ds = SliceDataset(manifest.iloc[1:2], root, "sagittal", root / "nowhere", MAX_HEIGHT, seed=0)
    with pytest.raises(InputDataError, match="file not found"):
        ds[0]


def test_closed_context_inverts_the_assembly(boxes: tuple[Path, pd.DataFrame]) -> None:
    root, manifest = boxes
    ds = SliceDataset(target_rows(manifest, ["train"]), root, "sagittal", None, MAX_HEIGHT, seed=0, samples_per_epoch=2)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    recovered = closed_context(batch["real_ct"], batch["band"], batch["height"])
    assert torch.equal(recovered, batch["ct"])


def test_baselines_are_exact_when_neighbours_are_copies_of_the_target(boxes: tuple[Path, pd.DataFrame]) -> None:
    root, manifest = boxes
    ds = SliceDataset(target_rows(manifest, ["train", "val", "test"], max_grade=0), root, "sagittal", None, MAX_HEIGHT,
                      seed=0, slice_ratios=(0.0,))
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    for mode in ("nearest", "interpolate"):
        metrics = sample_metrics(baseline_prediction(batch, mode, MAX_HEIGHT), batch)
        assert torch.all(metrics["dice"] == 1.0), mode
        assert torch.all(metrics["height_error_mm"] == 0.0), mode
        assert float(metrics["mae_hu"].max()) < 20.0, mode              # only the noise differs (~2 units)
    empty = dict(batch, real_neighbours=torch.zeros_like(batch["real_neighbours"]))
    metrics = sample_metrics(baseline_prediction(empty, "nearest", MAX_HEIGHT), batch)
    assert torch.all(metrics["dice"] == 0.0) and torch.all(metrics["height_error_mm"] == 10.0)
