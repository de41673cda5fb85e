"""Per-case work in worker processes: input order, and one-line errors that survive the process boundary."""

from __future__ import annotations

import pytest

from healthivert.errors import InputDataError
from healthivert.parallel import available_cores, map_cases


def _square_or_fail(value: int) -> int:
    """Square ``value``; a negative value is a bad input."""
    if value < 0:
        raise InputDataError(f"case-{value}.nii.gz", "negative value", "drop the case")
    return value * value


def test_available_cores_is_positive() -> None:
    assert available_cores() >= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_input_order(workers: int) -> None:
    values = [5, 1, 4, 2, 3, 0]
    assert list(map_cases(_square_or_fail, values, "test", workers=workers)) == [v * v for v in values]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_error_reaches_the_caller_unchanged(workers: int) -> None:
    with pytest.raises(InputDataError) as raised:
        list(map_cases(_square_or_fail, [1, 2, -3, 4], "test", workers=workers))
    assert str(raised.value) == "case--3.nii.gz: negative value (drop the case)"
