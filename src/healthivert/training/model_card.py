"""The model card written beside every trained network (what it takes, what it gives, how it was made)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from healthivert.config import ModelParams, Section, View

INTENDED_USE = "research use, not for diagnosis"


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and math.isfinite(v)}


def generator_card(stage: str, view: View, model_params: ModelParams, train: Section, manifest: pd.DataFrame,
                   crop_shape: tuple[int, ...], data_digest: str, params_digest: str, metrics: dict[str, float],
                   training: dict[str, Any]) -> dict[str, Any]:
    """Model card of the generator of one stage and view (for the coarse stage, also of the classifier beside it).

    Args:
        stage: ``coarse`` or ``fine``.
        view: the slices the generator was trained on.
        model_params: the network settings.
        train: the stage's training parameters.
        manifest: the training data's manifest (spacing and HU window are read from it).
        crop_shape: ``(CC, AP, LR)`` voxels of the crops.
        data_digest: hash of the manifest (and of the starting model, for the fine stage).
        params_digest: hash of the parameters the run used.
        metrics: final metrics (validation vs the baselines, losses).
        training: facts of the run (steps, seconds, device, precision, resumed-from step).
    """
    columns = "antero-posterior" if view == "sagittal" else "left-right"
    rows, cols = crop_shape[0], crop_shape[1] if view == "sagittal" else crop_shape[2]
    spacing = sorted(manifest["spacing_mm"].dropna().unique().tolist())
    windows = manifest[["hu_lo", "hu_hi"]].drop_duplicates().to_numpy().tolist()
    return {
        "name": f"HealthiVert-GAN generator ({stage} stage, {view} view)",
        "view": view,
        "intended_use": INTENDED_USE,
        "method": "two-stage inpainting GAN synthesising a pseudo-healthy vertebra from its neighbours (arXiv 2503.05990)",
        "input": {
            "format": f"2D {view} slices of straightened vertebra crops (IPL), rows cranio-caudal (row 0 cranial), "
                      f"columns {columns}",
            "image_size": [int(rows), int(cols)],
            "channels": {"ct": "windowed CT / 127.5 - 1, closed up around the gap (band zeroed)",
                         "mask": f"1 on the {model_params.max_height_px}-row gap centred on the target",
                         "slice_ratio": "distance of the slice from the vertebra centre / half-width",
                         "attention": "1 - Grad-CAM++ of the fracture classifier, closed up like the CT"},
            "spacing_mm": spacing,
            "hu_window": windows[0] if len(windows) == 1 else windows,
        },
        "output": {"ct": "synthesised slice in [-1, 1] re-assembled at the predicted healthy height",
                   "seg": "probability of the healthy target vertebra (coarse stage: of its neighbours)",
                   "height": "predicted healthy target height, rows (= mm at the crop spacing)"},
        "model_params": model_params.model_dump(mode="json"),
        "training_params": train.model_dump(mode="json"),
        "data": {"digest": data_digest, "vertebrae": int(len(manifest)),
                 "cases": int(manifest["case"].nunique()),
                 "splits": {str(k): int(v) for k, v in manifest["split"].value_counts().items()},
                 "targets_grade_at_most_1": int(((manifest["split"] == "train") & (manifest["grade"].fillna(99) <= 1)).sum())},
        "params_digest": params_digest,
        "metrics": _finite(metrics),
        "training": training,
        "limitations": "validated on held-out healthy vertebrae of the same data source only; "
                       "inputs must be straightened crops made by 'healthivert preprocess' with the same spacing and window",
    }
