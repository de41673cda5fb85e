"""Genant grades from the paper's JSON and from CSV files, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from healthivert.errors import InputDataError
from healthivert.io.grades import read_grades


def test_paper_json_keeps_its_split(shared_data: Path) -> None:
    grades = read_grades(shared_data / "verse19-genant-grades.json")
    counts = grades.groupby("split")["grade"].value_counts().unstack().loc[["train", "val", "test"]]
    assert counts.values.tolist() == [[594, 63, 50, 22], [284, 40, 24, 17], [294, 38, 22, 12]]
    first = grades[(grades["case"] == "sub-verse012") & (grades["vertebra"] == 20)]
    assert first[["grade", "split"]].values.tolist() == [[3, "test"]]
    assert str(grades["grade"].dtype) == "Int64"


def test_csv_with_and_without_split(tmp_path: Path) -> None:
    plain = tmp_path / "grades.csv"
    plain.write_text("case,vertebra,grade\nsub-phantom000,20,2\nsub-phantom000,21,0\n007,19,1\n")
    grades = read_grades(plain)
    assert grades[["case", "vertebra", "grade"]].values.tolist()[:2] == [["sub-phantom000", 20, 2], ["sub-phantom000", 21, 0]]
    assert grades["split"].isna().all()
    assert grades["case"].tolist()[2] == "007", "case ids stay text"
    split = tmp_path / "split.csv"
    split.write_text("case,vertebra,grade,split\na,20,1,train\nb,20,0,test\n")
    assert read_grades(split)["split"].tolist() == ["train", "test"]


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("bad_grade.json", {"train": {"sub-verse004_16": 4}}, "grade 4 is not a Genant grade"),
    ("bool_grade.json", {"train": {"sub-verse004_16": True}}, "is not a Genant grade"),
    ("bad_key.json", {"train": {"sub-verse004": 1}}, "malformed key 'sub-verse004'"),
    ("bad_split.json", {"training": {"sub-verse004_16": 1}}, "unknown split 'training'"),
    ("not_object.json", [1, 2], "expected an object of splits"),
    ("bad_grade.csv", "case,vertebra,grade\na,20,7\n", "line 2: grade 7.0 is not a Genant grade"),
    ("text_grade.csv", "case,vertebra,grade\na,20,mild\n", "grade 'mild' is not a Genant grade"),
    ("bad_vertebra.csv", "case,vertebra,grade\na,L1,1\n", "malformed case or vertebra"),
    ("columns.csv", "case,level,grade\na,20,1\n", "missing columns ['vertebra']"),
    ("twice.csv", "case,vertebra,grade\na,20,1\na,20,2\n", "graded twice"),
    ("missing.csv", None, "grades file not found"),
])
def test_bad_grade_files_give_one_line_errors(tmp_path: Path, name: str, content, problem: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputDataError) as caught:
        read_grades(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert problem in message, message
