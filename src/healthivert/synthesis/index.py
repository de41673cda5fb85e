"""``index.parquet`` of the synthesis output: one row per synthesised target vertebra.

Columns: ``case`` (str), ``vertebra`` (int, VerSe id), ``ct_path``, ``label_path`` (str, relative to
the index's folder), ``predicted_height_mm`` (float: mean healthy height the generator predicted
over the synthesised slices), ``slices`` (int: how many slices per view were synthesised).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from healthivert.io.tables import conform, read_table, write_table

INDEX_NAME = "index.parquet"

COLUMNS: dict[str, str] = {
    "case": "string",
    "vertebra": "int64",
    "ct_path": "string",
    "label_path": "string",
    "predicted_height_mm": "float64",
    "slices": "int64",
}


def write_index(frame: pd.DataFrame, folder: str | os.PathLike[str]) -> Path:
    """Write ``frame`` (the columns of :data:`COLUMNS`) as ``folder/index.parquet``, atomically."""
    path = Path(folder) / INDEX_NAME
    return write_table(conform(frame, COLUMNS, path, "synthesis index"), path)


def read_index(folder: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a synthesis index, with ``ct_path`` and ``label_path`` made absolute.

    Args:
        folder: the synthesis output folder (holding ``index.parquet``).

    Raises:
        InputDataError: the index is missing, unreadable, lacks columns or lists a vertebra twice.
    """
    path = Path(folder) / INDEX_NAME
    frame = conform(read_table(path, "synthesis index", "run 'healthivert synthesize' first"), COLUMNS, path,
                    "synthesis index")
    for column in ("ct_path", "label_path"):
        frame[column] = [str(Path(folder) / relative) for relative in frame[column]]
    return frame.reset_index(drop=True)
