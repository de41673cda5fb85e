"""``manifest.parquet``: one row per cropped target vertebra, the contract between preprocess and later stages.

Columns and dtypes are those of ``docs/architecture.md``; paths are stored relative to the manifest's
folder (so the folder can be moved) and resolved with :func:`resolve`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from healthivert.errors import InputDataError
from healthivert.io.tables import conform, read_table, write_table

MANIFEST_NAME = "manifest.parquet"

#: column -> pandas dtype, in file order.
COLUMNS: dict[str, str] = {
    "case": "string",
    "vertebra": "int64",
    "name": "string",
    "split": "string",
    "grade": "Int64",
    "fracture_type": "string",
    "ct_path": "string",
    "label_path": "string",
    "mask_path": "string",
    "healthy_ct_path": "string",
    "healthy_label_path": "string",
    "spacing_mm": "float64",
    "hu_lo": "float64",
    "hu_hi": "float64",
    "above": "Int64",
    "below": "Int64",
    "center_row": "int64",
    "top_row": "int64",
    "bottom_row": "int64",
    "source_layout": "string",
    "source": "string",
    "truth_h_ant_mm": "float64",
    "truth_h_mid_mm": "float64",
    "truth_h_post_mm": "float64",
    "truth_healthy_h_ant_mm": "float64",
    "truth_healthy_h_mid_mm": "float64",
    "truth_healthy_h_post_mm": "float64",
    "truth_loss_ant": "float64",
    "truth_loss_mid": "float64",
    "truth_loss_post": "float64",
}

#: columns holding paths relative to the manifest folder (NA when the file does not exist).
PATH_COLUMNS = ("ct_path", "label_path", "mask_path", "healthy_ct_path", "healthy_label_path")

SPLITS = ("train", "val", "test")


def crop_name(case: str, vertebra: int) -> str:
    """File stem of a vertebra's crops, e.g. ``("sub-verse004", 20) -> "sub-verse004_20"``."""
    return f"{case}_{int(vertebra)}"


def _coerce(frame: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The manifest columns of ``frame`` in order and dtype, checked (errors name ``source``)."""
    frame = conform(frame, COLUMNS, source, "manifest")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        raise InputDataError(source, f"unknown split '{frame.loc[bad_split, 'split'].iloc[0]}'",
                             "expected train, val or test")
    return frame


def write_manifest(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Validate ``frame`` against the manifest schema and write it atomically as Parquet.

    Args:
        frame: one row per target vertebra with (at least) the columns of :data:`COLUMNS`.
        path: ``manifest.parquet`` or the folder to write it in.

    Returns:
        the file written.
    """
    path = Path(path)
    if path.suffix != ".parquet":
        path = path / MANIFEST_NAME
    return write_table(_coerce(frame, path), path)


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a manifest (``manifest.parquet`` or the folder holding it).

    Raises:
        InputDataError: the file is missing or unreadable, or a column is missing or ill-typed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    frame = read_table(path, "manifest", "run 'healthivert preprocess' first")
    return _coerce(frame, path)


def resolve(manifest_path: str | os.PathLike[str], relative: str | None | float) -> Path | None:
    """Absolute path of a manifest path entry (``None`` for NA entries).

    Args:
        manifest_path: ``manifest.parquet`` or its folder.
        relative: an entry of one of :data:`PATH_COLUMNS`.
    """
    if relative is None or relative is pd.NA or (isinstance(relative, float) and np.isnan(relative)):
        return None
    folder = Path(manifest_path)
    if folder.suffix == ".parquet":
        folder = folder.parent
    return folder / str(relative)
