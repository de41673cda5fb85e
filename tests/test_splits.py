"""Patient-wise splits: by patient, reproducible, stratified by fracture, no empty split."""

from __future__ import annotations

import pandas as pd

from healthivert.config import SplitParams
from healthivert.data.splits import patient_of, split_patients


def _grades(cases: list[str], fractured: set[str]) -> pd.DataFrame:
    rows = [{"case": c, "vertebra": v, "grade": (2 if c in fractured and v == 20 else 0)} for c in cases for v in (19, 20, 21)]
    return pd.DataFrame(rows)


def test_scans_of_one_patient_share_a_split_and_fractions_hold() -> None:
    cases = [f"sub-verse{n:03d}_dir-{d}" for n in range(30) for d in ("ax", "sag")]
    splits = split_patients(cases, None, SplitParams())
    for n in range(30):
        assert splits[f"sub-verse{n:03d}_dir-ax"] == splits[f"sub-verse{n:03d}_dir-sag"]
    per_patient = pd.Series({patient_of(c): s for c, s in splits.items()}).value_counts()
    assert per_patient.to_dict() == {"train": 18, "val": 6, "test": 6}


def test_reproducible_from_the_seed() -> None:
    cases = [f"p{n:02d}" for n in range(20)]
    assert split_patients(cases, None, SplitParams(seed=3)) == split_patients(list(reversed(cases)), None, SplitParams(seed=3))
    others = [split_patients(cases, None, SplitParams(seed=s)) for s in range(4, 8)]
    assert any(o != split_patients(cases, None, SplitParams(seed=3)) for o in others)


def test_fractured_patients_spread_over_the_splits() -> None:
    cases = [f"p{n:02d}" for n in range(24)]
    fractured = set(cases[::4])  # 6 fractured patients
    for seed in range(5):
        splits = split_patients(cases, _grades(cases, fractured), SplitParams(seed=seed))
        counts = pd.Series([splits[c] for c in fractured]).value_counts()
        assert counts.get("train", 0) >= 3 and counts.get("val", 0) >= 1 and counts.get("test", 0) >= 1, counts.to_dict()


def test_every_split_is_filled_from_three_patients_and_given_splits_are_kept() -> None:
    for seed in range(10):
        assert set(split_patients(["a", "b", "c"], None, SplitParams(seed=seed)).values()) == {"train", "val", "test"}
    assert set(split_patients(["a", "b"], None, SplitParams()).values()) <= {"train", "val", "test"}
    given = pd.DataFrame({"case": ["a", "b", "c", "d"], "vertebra": [20] * 4, "grade": [0, 1, 0, 3],
                          "split": ["test", "test", "val", "train"]})
    splits = split_patients(["a", "b", "c", "d", "e"], given, SplitParams())
    assert [splits[c] for c in "abcd"] == ["test", "test", "val", "train"]
    assert splits["e"] in {"train", "val", "test"}
