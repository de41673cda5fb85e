"""Genant grades per vertebra, from the paper's JSON or a ``case,vertebra,grade`` CSV.

The paper's JSON: ``{"train": {"sub-verse004_16": 2, ...}, "val": {...}, "test": {...}}`` (keys are
``<case>_<VerSe id>``); its split is kept. A CSV has columns ``case,vertebra,grade`` (``split`` optional).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from healthivert.errors import InputDataError

SPLITS = ("train", "val", "test")
_KEY = re.compile(r"^(?P<case>.+)_(?P<vertebra>\d+)$")


def _frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["case", "vertebra", "grade", "split"])
    return frame.astype({"case": "string", "vertebra": "int64", "grade": "Int64", "split": "string"})


def _check_grade(path: Path, where: str, value: object) -> int:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1, 2, 3)
    if not valid:
        raise InputDataError(path, f"{where}: grade {value!r} is not a Genant grade 0-3")
    return int(value)


def _read_json(path: Path) -> pd.DataFrame:
    try:
        tree = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputDataError(path, "not valid JSON", str(exc)) from exc
    if not isinstance(tree, dict) or not tree:
        raise InputDataError(path, "expected an object of splits", '{"train": {"sub-verse004_16": 2, ...}, "val": ..., "test": ...}')
    rows = []
    for split, grades in tree.items():
        if split not in SPLITS:
            raise InputDataError(path, f"unknown split '{split}'", f"expected {', '.join(SPLITS)}")
        if not isinstance(grades, dict):
            raise InputDataError(path, f"split '{split}' is not an object of <case>_<vertebra>: grade")
        for key, grade in grades.items():
            match = _KEY.match(str(key))
            if not match:
                raise InputDataError(path, f"malformed key '{key}'", "expected <case>_<VerSe id>, e.g. sub-verse004_16")
            rows.append({"case": match["case"], "vertebra": int(match["vertebra"]),
                         "grade": _check_grade(path, f"'{key}'", grade), "split": split})
    return _frame(rows)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"case": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputDataError(path, "not a readable CSV file", str(exc).splitlines()[0]) from exc
    missing = [c for c in ("case", "vertebra", "grade") if c not in table.columns]
    if missing:
        raise InputDataError(path, f"missing columns {missing}", "expected case,vertebra,grade")
    rows = []
    for line, row in enumerate(table.itertuples(index=False), start=2):
        vertebra = pd.to_numeric(row.vertebra, errors="coerce")
        if pd.isna(vertebra) or vertebra != int(vertebra) or pd.isna(row.case):
            raise InputDataError(path, f"line {line}: malformed case or vertebra ({row.case!r}, {row.vertebra!r})")
        split = getattr(row, "split", pd.NA)
        if not pd.isna(split) and split not in SPLITS:
            raise InputDataError(path, f"line {line}: unknown split '{split}'", f"expected {', '.join(SPLITS)}")
        grade = pd.to_numeric(row.grade, errors="coerce")
        rows.append({"case": str(row.case), "vertebra": int(vertebra),
                     "grade": _check_grade(path, f"line {line}", row.grade if pd.isna(grade) else float(grade)),
                     "split": split})
    return _frame(rows)


def _is_json(path: Path) -> bool:
    """By the suffix, else (a pipeline artifact has none) by the first character."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".csv"):
        return suffix == ".json"
    with path.open("rb") as handle:
        return handle.read(64).lstrip().startswith(b"{")


def read_grades(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read Genant grades from the paper's JSON or a CSV.

    Returns:
        Columns ``case`` (str), ``vertebra`` (int, VerSe id), ``grade`` (Int64, 0-3), ``split``
        (``train``/``val``/``test`` from the JSON or the CSV's optional column, else NA).

    Raises:
        InputDataError: missing or unreadable file, malformed key, unknown split, grade not in 0-3,
            or a vertebra listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(path, "grades file not found")
    grades = _read_json(path) if _is_json(path) else _read_csv(path)
    duplicated = grades.duplicated(["case", "vertebra"])
    if duplicated.any():
        first = grades[duplicated].iloc[0]
        raise InputDataError(path, f"vertebra {first['vertebra']} of case '{first['case']}' is graded twice")
    return grades.reset_index(drop=True)
