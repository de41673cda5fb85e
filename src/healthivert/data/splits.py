"""Patient-wise train/val/test splits, reproducible from a seed and stratified by fracture status."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd

from healthivert.config import SplitParams

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def patient_of(case_id: str) -> str:
    """Patient id of a case id: the part before the first ``_`` (``sub-verse500_dir-ax`` -> ``sub-verse500``)."""
    return case_id.split("_")[0]


def _assign(patients: list[str], fractions: np.ndarray, rng: np.random.Generator) -> dict[str, str]:
    """Deal patients (already shuffled) to splits so every prefix stays close to the target fractions."""
    counts = np.zeros(len(SPLITS))
    assigned = {}
    for number, patient in enumerate(patients, start=1):
        deficit = fractions * number - counts
        best = np.flatnonzero(np.isclose(deficit, deficit.max()))
        choice = int(rng.choice(best))
        counts[choice] += 1
        assigned[patient] = SPLITS[choice]
    return assigned


def split_patients(cases: Iterable[str], grades: pd.DataFrame | None, params: SplitParams) -> dict[str, str]:
    """Assign every case to ``train``, ``val`` or ``test``, all cases of one patient to the same split.

    Splits given in ``grades`` (the paper's JSON) are kept for the patients they cover. The other patients
    are split by the fractions of ``params``, separately for patients with a fracture (any grade >= 1),
    without one, and with unknown grades, so that fractured patients spread over the splits. With at least
    three patients, every split whose fraction is positive receives at least one patient.

    Args:
        cases: case ids.
        grades: ``case, vertebra, grade[, split]`` table (see :func:`healthivert.io.grades.read_grades`) or ``None``.
        params: fractions and seed.

    Returns:
        case id -> split name.
    """
    cases = sorted(set(cases))
    patients = sorted({patient_of(c) for c in cases})
    given: dict[str, str] = {}
    fractured: set[str] = set()
    graded: set[str] = set()
    if grades is not None and len(grades):
        table = grades.assign(patient=grades["case"].astype(str).map(patient_of))
        table = table[table["patient"].isin(patients)]
        graded = set(table.loc[table["grade"].notna(), "patient"])
        fractured = set(table.loc[table["grade"].fillna(0) >= 1, "patient"])
        if "split" in table.columns:
            for patient, splits in table.dropna(subset=["split"]).groupby("patient")["split"]:
                counts = splits.value_counts()
                if len(counts) > 1:
                    logger.warning("patient %s has vertebrae in splits %s; using '%s'", patient, dict(counts), counts.index[0])
                given[patient] = str(counts.index[0])
    fractions = np.array([params.train, params.val, params.test], dtype=float)
    fractions /= fractions.sum()
    rng = np.random.default_rng(params.seed)
    assigned = dict(given)
    free = [p for p in patients if p not in given]
    strata = ([p for p in free if p in fractured], [p for p in free if p in graded and p not in fractured],
              [p for p in free if p not in graded])
    for stratum in strata:
        order = list(rng.permutation(stratum)) if stratum else []
        assigned |= _assign([str(p) for p in order], fractions, rng)
    if len(patients) >= 3:
        _fill_empty_splits(assigned, fractions, [p for p in free])
    return {case: assigned[patient_of(case)] for case in cases}


def _fill_empty_splits(assigned: dict[str, str], fractions: np.ndarray, movable: list[str]) -> None:
    """Move patients from the largest split into any empty split that should have some (in place)."""
    for split, fraction in zip(SPLITS, fractions):
        if fraction <= 0 or split in assigned.values():
            continue
        sizes = pd.Series(list(assigned.values())).value_counts()
        donors = [p for p in movable if assigned[p] == sizes.index[0]]
        if sizes.iloc[0] > 1 and donors:
            assigned[donors[-1]] = split
