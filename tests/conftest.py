"""Session fixtures shared by the test files: a small phantom dataset and the real sample files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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


#: the bucket of the ``s3`` fixture.
BUCKET = "healthivert-test"


def free_port() -> int:
    """A TCP port free on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    """Poll ``url`` until it answers 200; fail with the end of ``log`` if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer in {timeout_s:.0f} s:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS variables point boto3, DVC and MLflow at it."""
    import boto3

    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    from healthivert.tracking.pipeline import PIPELINE_GROUP_ENV, PIPELINE_RUN_ENV

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                            "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", PIPELINE_RUN_ENV, PIPELINE_GROUP_ENV):
            patch.delenv(name, raising=False)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()
