"""Per-case work in worker processes: input order, and one-line errors that survive the process boundary."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthivert import parallel
from healthivert.errors import ConfigError, InputDataError
from healthivert.parallel import WORKERS_ENV, available_cores, map_cases


def _square_or_fail(value: int) -> int:
    """Square ``value``; a negative value is a bad input."""
    if value < 0:
        raise InputDataError(f"case-{value}.nii.gz", "negative value", "drop the case")
    return value * value


def test_available_cores_is_positive() -> None:
    assert available_cores() >= 1


def test_a_cgroup_cpu_quota_caps_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container limited to half a CPU runs one process, however many cores the host shows."""
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(parallel, "_CGROUP_V2_MAX", cpu_max)
    cpu_max.write_text("50000 100000\n")
    assert available_cores() == 1
    cpu_max.write_text("max 100000\n")
    unlimited = available_cores()
    cpu_max.write_text("not a quota\n")
    assert available_cores() == unlimited >= 1


def test_the_workers_setting_caps_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert available_cores() == 1
    monkeypatch.setenv(WORKERS_ENV, "0")
    with pytest.raises(ConfigError, match="HEALTHIVERT_WORKERS: must be a whole number of processes"):
        available_cores()


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_input_order(workers: int) -> None:
    values = [5, 1, 4, 2, 3, 0]
    assert list(map_cases(_square_or_fail, values, "test", workers=workers)) == [v * v for v in values]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_error_reaches_the_caller_unchanged(workers: int) -> None:
    with pytest.raises(InputDataError) as raised:
        list(map_cases(_square_or_fail, [1, 2, -3, 4], "test", workers=workers))
    assert str(raised.value) == "case--3.nii.gz: negative value (drop the case)"
