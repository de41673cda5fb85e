"""The one error family: one line, file first, and it survives a trip between processes."""

import pickle

import pytest

from healthivert.errors import CheckpointError, ConfigError, InputDataError


@pytest.mark.parametrize("kind", [InputDataError, ConfigError, CheckpointError])
def test_message_is_one_line_naming_the_source(kind: type) -> None:
    error = kind("data/ct.nii.gz", "truncated\n  image data", "re-export it")
    assert str(error) == "data/ct.nii.gz: truncated image data (re-export it)"


@pytest.mark.parametrize("kind", [InputDataError, ConfigError, CheckpointError])
def test_errors_pickle_for_worker_processes(kind: type) -> None:
    error = kind("mask.nii.gz", "empty label map")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is kind
    assert str(copy) == "mask.nii.gz: empty label map"
