"""NIfTI volumes (io/nifti.py) and atomic outputs (io/atomic.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from healthivert.errors import InputDataError
from healthivert.io.atomic import atomic_dir, atomic_path, write_text_atomic
from healthivert.io.nifti import Volume, check_same_grid, load_volume, save_volume


def _affine() -> np.ndarray:
    affine = np.array([[0.0, 0.0, -1.2, 10.0], [0.0, -0.8, 0.0, 5.0], [-2.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
    return affine


def test_round_trip_keeps_dtype_geometry_and_orientation(tmp_path: Path) -> None:
    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = save_volume(tmp_path / "labels.nii.gz", labels, _affine())
    loaded = load_volume(path, label=True)
    assert loaded.array.dtype == np.int32 and np.array_equal(loaded.array, labels)
    assert np.allclose(loaded.affine, _affine())
    assert loaded.orientation == ("I", "P", "L")
    assert np.allclose(loaded.spacing_mm, (2.0, 0.8, 1.2))
    ct = np.linspace(-1000, 1500, 24, dtype=np.float64).reshape(2, 3, 4)
    image = load_volume(save_volume(tmp_path / "ct.nii.gz", Volume(ct, _affine())))
    assert image.array.dtype == np.float32 and np.allclose(image.array, ct)
    assert "orientation=IPL" in repr(image) and "ct.nii.gz" in repr(image)


def test_a_float_map_stored_as_uint8_reads_back_as_floats_within_a_level(tmp_path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    attention = rng.random((8, 9, 10)).astype(np.float32)
    path = save_volume(tmp_path / "cam.nii.gz", attention, np.eye(4), stored_dtype=np.uint8)
    assert nib.load(str(path)).get_data_dtype() == np.uint8
    back = load_volume(path).array
    assert back.dtype == np.float32
    assert np.max(np.abs(back - attention)) <= 0.5 / 255 * (attention.max() - attention.min()) + 1e-6


def test_with_array_and_grid_checks(tmp_path: Path) -> None:
    volume = Volume(np.zeros((2, 3, 4), dtype=np.float32), _affine(), tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="shape"):
        volume.with_array(np.zeros((2, 3, 5)))
    other = Volume(np.zeros((2, 3, 4)), np.eye(4), tmp_path / "b.nii.gz")
    with pytest.raises(InputDataError, match="b.nii.gz: affine differs from that of a.nii.gz"):
        check_same_grid(volume, other)
    check_same_grid(volume, volume.with_array(np.ones((2, 3, 4), dtype=np.float32)))


def test_negative_labels_and_folders_are_rejected(tmp_path: Path) -> None:
    path = save_volume(tmp_path / "neg.nii.gz", np.full((2, 2, 2), -1, dtype=np.int16), np.eye(4))
    with pytest.raises(InputDataError, match="negative labels"):
        load_volume(path, label=True)
    with pytest.raises(InputDataError, match="is a folder"):
        load_volume(tmp_path)


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "table.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".parquet") and tmp.parent == target.parent
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(target.parent.iterdir()) == []
    write_text_atomic(target, "done")
    assert target.read_text() == "done" and len(list(target.parent.iterdir())) == 1


def test_atomic_dir_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "stage"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
