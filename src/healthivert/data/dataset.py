"""2D training samples drawn from the preprocessed vertebra crops (section 2 of the method).

Every crop is ``(CC, AP, LR)`` in ``IPL`` order, centred on its target vertebra. A *sagittal* sample
is ``crop[:, :, k]`` (rows cranio-caudal, columns antero-posterior), a *coronal* one
``crop[:, j, :]`` (rows cranio-caudal, columns left-right). Slices are drawn from the central part
of the target's extent across the slicing axis with a triangular preference for its middle, and
closed up around a fixed-height gap by :func:`healthivert.data.samples.make_sample`.

Randomness is a pure function of ``(seed, epoch, index)``, so a run restarted mid-epoch sees
exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from healthivert.config import View
from healthivert.data.samples import make_sample
from healthivert.errors import InputDataError
from healthivert.io.nifti import load_volume

log = logging.getLogger(__name__)

#: fraction of the target's extent slices are drawn from (the method's central 80 %)
CENTRAL_FRACTION = 0.8
#: other slices tried when the drawn one yields no sample (target absent or too small there)
MAX_REDRAWS = 8


@dataclasses.dataclass(frozen=True)
class Crop:
    """One vertebra crop held in memory.

    Attributes:
        ct: uint8 windowed CT, ``(CC, AP, LR)``.
        label: uint8 VerSe ids of the vertebral bodies, same grid.
        attention: float16 Grad-CAM++ map in [0, 1] (1 = looks fractured), same grid, or ``None``.
        target: VerSe id of the target vertebra.
        lo, hi: first and last index of the target along the slicing axis.
    """

    ct: np.ndarray
    label: np.ndarray
    attention: np.ndarray | None
    target: int
    lo: int
    hi: int


def target_rows(manifest: pd.DataFrame, splits: Sequence[str], max_grade: int | None = 1) -> pd.DataFrame:
    """Manifest rows usable as generator targets.

    Args:
        manifest: the preprocess manifest.
        splits: splits to keep (``train``, ``val``, ``test``).
        max_grade: keep vertebrae of a known Genant grade at most this (the method trains on grade
            <= 1 only, so the real shape is the healthy truth); ``None`` keeps every row.
    """
    rows = manifest[manifest["split"].isin(list(splits))]
    if max_grade is not None:
        grade = rows["grade"]
        rows = rows[grade.notna() & (grade.fillna(99) <= max_grade)]
    return rows.reset_index(drop=True)


def attention_path(folder: str | Path, case: str, vertebra: int) -> Path:
    """Where the stage writes the attention map of one crop (``<case>_<vertebra>.nii.gz``)."""
    return Path(folder) / f"{case}_{int(vertebra)}.nii.gz"


class SliceDataset(Dataset[dict[str, torch.Tensor]]):
    """Closed-up 2D samples of target vertebrae, as tensors for the generator.

    Training mode (``slice_ratios=None``): item ``i`` is target ``i % len(targets)`` at a slice drawn
    at random from the central 80 % of its extent (triangular density peaking at the middle); the
    draw depends only on ``(seed, epoch, i)``. Evaluation mode (``slice_ratios`` given): item ``i`` is
    target ``i // len(slice_ratios)`` at the fixed signed offset ``slice_ratios[i % len]`` (as a
    fraction of the half-extent), the same every epoch.

    Every item holds the arrays of :func:`make_sample` as tensors (``(1, H, W)`` float32 ``ct``,
    ``mask``, ``attention``, ``real_ct``, ``real_target``, ``real_neighbours``; scalars ``slice_ratio``
    and ``height`` in px; int64 ``band`` ``(b0, b1)``) and, for metrics, ``hu_lo``, ``hu_hi``,
    ``spacing_mm`` and ``row`` (position in ``rows``).

    Args:
        rows: manifest rows to draw targets from (see :func:`target_rows`).
        root: folder of the manifest (paths in ``rows`` are relative to it).
        view: ``sagittal`` or ``coronal``.
        attention_dir: folder of the attention maps, or ``None`` (then attention is all ones).
        max_height: height of the gap, px.
        seed: seed of the slice draws.
        samples_per_epoch: length of an epoch in training mode (default: one per target).
        slice_ratios: fixed slice offsets for evaluation mode.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        root: str | Path,
        view: View,
        attention_dir: str | Path | None,
        max_height: int,
        seed: int,
        samples_per_epoch: int | None = None,
        slice_ratios: Sequence[float] | None = None,
    ) -> None:
        if rows.empty:
            raise InputDataError(root, "no target vertebrae to sample from", "check the splits and grades in the manifest")
        self.rows = rows.reset_index(drop=True)
        self.root = Path(root)
        self.view = view
        self.attention_dir = None if attention_dir is None else Path(attention_dir)
        self.max_height = max_height
        self.seed = seed
        self.slice_ratios = None if slice_ratios is None else tuple(float(r) for r in slice_ratios)
        self.samples_per_epoch = samples_per_epoch or len(self.rows)
        self.epoch = 0
        self._cache: dict[int, Crop] = {}

    def __len__(self) -> int:
        if self.slice_ratios is not None:
            return len(self.rows) * len(self.slice_ratios)
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose slice draws ``__getitem__`` returns."""
        self.epoch = epoch

    # ------------------------------------------------------------------------------------ loading
    def crop(self, position: int) -> Crop:
        """The crop of ``rows[position]``, read on first use and then kept in memory."""
        cached = self._cache.get(position)
        if cached is not None:
            return cached
        row = self.rows.iloc[position]
        ct = load_volume(self.root / row["ct_path"]).array
        label = load_volume(self.root / row["label_path"], label=True).array
        if ct.shape != label.shape:
            raise InputDataError(self.root / row["label_path"], f"shape {label.shape} differs from the CT's {ct.shape}")
        target = int(row["vertebra"])
        axis = 2 if self.view == "sagittal" else 1
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero((label == target).any(axis=other))
        if present.size == 0:
            raise InputDataError(self.root / row["label_path"], f"target vertebra {target} is not in the crop")
        attention = None
        if self.attention_dir is not None:
            path = attention_path(self.attention_dir, row["case"], target)
            cam = load_volume(path).array
            if cam.shape != ct.shape:
                raise InputDataError(path, f"shape {cam.shape} differs from the crop's {ct.shape}")
            attention = np.clip(cam, 0.0, 1.0).astype(np.float16)
        crop = Crop(ct=np.clip(ct, 0, 255).astype(np.uint8), label=label.astype(np.uint8), attention=attention,
                    target=target, lo=int(present[0]), hi=int(present[-1]))
        self._cache[position] = crop
        return crop

    def slice_arrays(self, crop: Crop, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """CT, label and CAM ``(CC, AP)`` (sagittal) or ``(CC, LR)`` (coronal) slices at ``index``."""
        if self.view == "sagittal":
            return crop.ct[:, :, index], crop.label[:, :, index], None if crop.attention is None else crop.attention[:, :, index]
        return crop.ct[:, index, :], crop.label[:, index, :], None if crop.attention is None else crop.attention[:, index, :]

    # ----------------------------------------------------------------------------------- sampling
    def offset_slice(self, crop: Crop, offset: float) -> tuple[int, float]:
        """Slice index at signed ``offset`` (fraction of the half-extent) and its ``slice_ratio``."""
        centre = (crop.lo + crop.hi) / 2.0
        half = max((crop.hi - crop.lo) / 2.0, 0.5)
        index = int(np.clip(round(centre + offset * half), crop.lo, crop.hi))
        return index, float(min(abs(index - centre) / half, 1.0))

    def _sample(self, position: int, offsets: Sequence[float]) -> dict[str, Any]:
        crop = self.crop(position)
        for offset in offsets:
            index, ratio = self.offset_slice(crop, offset)
            ct, label, attention = self.slice_arrays(crop, index)
            sample = make_sample(ct, label, crop.target, None if attention is None else attention.astype(np.float32),
                                 ratio, self.max_height)
            if sample is not None:
                return sample
        row = self.rows.iloc[position]
        raise InputDataError(self.root / row["label_path"], f"no usable {self.view} slice of vertebra {crop.target}",
                             "is the target cut by the crop or taller than the gap?")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.slice_ratios is not None:
            position, k = divmod(index, len(self.slice_ratios))
            offsets = [self.slice_ratios[k], 0.0]
        else:
            position = index % len(self.rows)
            rng = np.random.default_rng([self.seed, self.epoch, index])
            spread = CENTRAL_FRACTION
            offsets = list(rng.triangular(-spread, 0.0, spread, size=MAX_REDRAWS)) + [0.0]
        sample = self._sample(position, offsets)
        row = self.rows.iloc[position]
        item = {key: torch.from_numpy(np.array(value, copy=True)) for key, value in sample.items()}  # scalars stay 0-d
        item["hu_lo"] = torch.tensor(float(row["hu_lo"]))
        item["hu_hi"] = torch.tensor(float(row["hu_hi"]))
        item["spacing_mm"] = torch.tensor(float(row["spacing_mm"]))
        item["row"] = torch.tensor(position)
        return item


class ClassifierDataset(Dataset[dict[str, torch.Tensor]]):
    """Whole sagittal (or coronal) slices of vertebra crops, labelled fractured (grade >= 1) or not.

    Item ``i`` draws, from ``(seed, epoch, i)`` alone, a class with probability 1/2 each (balanced
    despite the rarity of fractures; a class that is absent is never drawn), a crop of that class,
    and a slice from the central 80 % of its target's extent (triangular, as for the generator).
    Evaluation mode (``slice_ratios`` given) instead walks every row at those fixed offsets.
    Items hold ``image`` ``(1, H, W)`` in [-1, 1] (rows cranio-caudal) and ``label`` (0. or 1.).

    Args:
        rows: manifest rows with a known grade.
        root: folder of the manifest.
        view: ``sagittal`` or ``coronal``.
        seed: seed of the draws.
        samples_per_epoch: epoch length in training mode.
        slice_ratios: fixed offsets for evaluation mode.
    """

    def __init__(self, rows: pd.DataFrame, root: str | Path, view: View, seed: int,
                 samples_per_epoch: int | None = None, slice_ratios: Sequence[float] | None = None) -> None:
        rows = rows[rows["grade"].notna()].reset_index(drop=True)
        if rows.empty:
            raise InputDataError(root, "no graded vertebrae to train the fracture classifier on",
                                 "the manifest's train split needs known grades")
        self.crops = SliceDataset(rows, root, view, None, max_height=1, seed=seed)
        self.labels = (rows["grade"].astype(int) >= 1).to_numpy()
        self.by_class = [np.flatnonzero(~self.labels), np.flatnonzero(self.labels)]
        self.seed = seed
        self.slice_ratios = None if slice_ratios is None else tuple(float(r) for r in slice_ratios)
        self.samples_per_epoch = samples_per_epoch or len(rows)
        self.epoch = 0

    def __len__(self) -> int:
        if self.slice_ratios is not None:
            return len(self.labels) * len(self.slice_ratios)
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws ``__getitem__`` returns."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.slice_ratios is not None:
            position, k = divmod(index, len(self.slice_ratios))
            offset = self.slice_ratios[k]
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            classes = [c for c in (0, 1) if self.by_class[c].size]
            members = self.by_class[classes[int(rng.integers(len(classes)))]]
            position = int(members[rng.integers(members.size)])
            offset = float(rng.triangular(-CENTRAL_FRACTION, 0.0, CENTRAL_FRACTION))
        crop = self.crops.crop(position)
        slice_index, _ = self.crops.offset_slice(crop, offset)
        ct, _, _ = self.crops.slice_arrays(crop, slice_index)
        image = torch.from_numpy(ct.astype(np.float32) / 127.5 - 1.0).unsqueeze(0)
        return {"image": image, "label": torch.tensor(float(self.labels[position]))}
