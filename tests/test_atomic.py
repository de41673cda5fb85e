"""Atomic outputs: whole or nothing, usual modes, one-line errors, temporaries of dead processes cleaned up."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from healthivert.errors import OutputError
from healthivert.io.atomic import atomic_dir, atomic_path, remove_stale_temporaries

DEAD_PID = 4_194_305  # above Linux's largest pid


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_outputs_get_the_umask_modes(tmp_path: Path, umask_022: None) -> None:
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "weights.bin").write_bytes(b"w")
    with atomic_path(tmp_path / "table.csv") as path:
        path.write_text("a\n")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "table.csv").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_previous_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as folder:
        (folder / "first").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as folder:
        (folder / "second").write_text("2")
        raise RuntimeError("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["first"]


def test_only_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "crop.nii.gz"
    dead = tmp_path / f".crop.nii.gz.{DEAD_PID}-00ff00ff.tmp.nii.gz"
    legacy = tmp_path / ".crop.nii.gz.ab_c1234.tmp.nii.gz"  # named by tempfile.mkstemp, without a pid
    alive = tmp_path / f".crop.nii.gz.{os.getpid()}-00ff00ff.tmp.nii.gz"
    unrelated = tmp_path / f".crop.nii.{DEAD_PID}-00ff00ff.tmp.nii"
    for path in (dead, legacy, alive, unrelated):
        path.write_bytes(b"")
    (tmp_path / f".crop.nii.gz.{DEAD_PID}-11ee11ee.tmp").mkdir()
    assert sorted(p.name for p in remove_stale_temporaries(target)) == sorted(
        [dead.name, legacy.name, f".crop.nii.gz.{DEAD_PID}-11ee11ee.tmp"])
    assert alive.exists() and unrelated.exists()


@pytest.mark.parametrize(("make", "writer", "message"), [
    (lambda p: p.mkdir(), atomic_path, "is a folder, a file is expected here"),
    (lambda p: p.write_text("x"), atomic_dir, "is a file, a folder is expected here"),
])
def test_wrong_kind_of_target_is_refused_before_anything_is_written(tmp_path: Path, make, writer, message) -> None:
    target = tmp_path / "out"
    make(target)
    with pytest.raises(OutputError, match=message), writer(target):
        pytest.fail("the body must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_on_the_path_is_named(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OutputError) as info, atomic_path(tmp_path / "blocker" / "sub" / "out.csv"):
        pytest.fail("the body must not run")
    assert str(info.value) == f"{tmp_path}/blocker/sub/out.csv: {tmp_path}/blocker is a file, not a folder (choose another path)"


def test_writes_inside_a_new_folder_skip_the_stale_scan(tmp_path: Path) -> None:
    """A folder being built holds nothing stale: its files are not checked (no quadratic cost in big folders)."""
    with atomic_dir(tmp_path / "crops") as folder:
        own = folder / f".a.nii.gz.{DEAD_PID}-00ff00ff.tmp.nii.gz"
        own.write_bytes(b"")
        with atomic_path(folder / "a.nii.gz") as path:
            path.write_bytes(b"crop")
        assert own.exists()
