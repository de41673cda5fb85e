"""Parquet tables passed between stages, read with one-line errors naming the file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from healthivert.errors import InputDataError
from healthivert.io.atomic import atomic_path


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


def conform(frame: pd.DataFrame, columns: Mapping[str, str], source: Path, what: str,
            key: Sequence[str] = ("case", "vertebra")) -> pd.DataFrame:
    """The ``columns`` of ``frame`` in order and dtype, one row per ``key`` (errors name ``source``).

    Args:
        frame: the table read or about to be written.
        columns: column -> pandas dtype, in file order.
        source: the file the table belongs to (named in errors).
        what: what the table is, for the messages (e.g. ``"manifest"``).
        key: columns identifying a row.

    Raises:
        InputDataError: a column is missing or cannot take its dtype, or a key is listed twice.
    """
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputDataError(source, f"{what} lacks column(s) {', '.join(missing)}")
    frame = frame.loc[:, list(columns)].copy()
    for column, dtype in columns.items():
        try:
            values = pd.to_numeric(frame[column]) if dtype == "float64" else frame[column]
            frame[column] = values.astype(dtype)
        except (TypeError, ValueError) as exc:
            raise InputDataError(source, f"{what} column '{column}' is not {dtype}", str(exc).splitlines()[0]) from exc
    duplicated = frame.duplicated(list(key))
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        listed = " of ".join(f"{name} {row[name]}" for name in reversed(key))
        raise InputDataError(source, f"{listed} listed twice")
    return frame.reset_index(drop=True)


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` as Parquet at ``path`` atomically (no half-written file on failure)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path
