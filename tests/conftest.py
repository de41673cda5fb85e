"""Session fixtures shared by the test files: a small phantom dataset and the real sample files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from healthivert.config import PhantomParams
from healthivert.phantom.generator import write_dataset

try:
    import torch
except ImportError:  # the data-layer tests run without torch
    torch = None
if torch is not None:
    torch.set_num_threads(1)

# The command-line tools the tests start (dvc, healthivert, hadolint, mlflow) are those installed beside the
# interpreter running the tests, whether or not its virtual environment is activated.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: The phantom dataset behind ``phantom_root``: 3 cases of 5-6 vertebrae, coarse voxels, several fractures.
SMALL_PHANTOM = PhantomParams(cases=3, seed=33, vertebrae_per_case=(5, 6), fracture_share=0.4,
                              spacing_mm_range=(1.0, 1.5))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The sample data folder ``../shared/data`` beside the repository (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom dataset (VerSe layout + truth/ + grades.csv) of 3 small cases, written once per session."""
    root = tmp_path_factory.mktemp("phantom") / "raw"
    write_dataset(root, SMALL_PHANTOM)
    return root
