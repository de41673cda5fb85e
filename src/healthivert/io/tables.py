"""Parquet tables passed between stages, read with one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from healthivert.errors import InputDataError


def read_table(path: Path, what: str, hint: str) -> pd.DataFrame:
    """Read a Parquet table written by an earlier stage.

    Args:
        path: the ``.parquet`` file.
        what: what the table is, for the message (e.g. ``"manifest"``).
        hint: how to produce it (e.g. ``"run 'healthivert preprocess' first"``).

    Raises:
        InputDataError: the file is missing or is not readable Parquet.
    """
    if not path.is_file():
        raise InputDataError(path, f"{what} not found", hint)
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for foreign or truncated files
        raise InputDataError(path, "not a readable Parquet file", type(exc).__name__) from exc
