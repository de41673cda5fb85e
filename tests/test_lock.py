"""requirements.lock: the pins README's install, CI and the images use, resolved from pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)")


def _pins() -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        found = PIN.match(line)
        if found:
            pins.setdefault(canonicalize_name(found.group(1).split("[")[0]), set()).add(found.group(2))
    return pins


def test_every_declared_dependency_is_pinned_and_satisfies_its_range() -> None:
    pins = _pins()
    declared = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]
    for text in declared:
        requirement = Requirement(text.split("#")[0].strip())
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared in pyproject.toml but not in requirements.lock: refresh the lock"
        assert all(requirement.specifier.contains(version) for version in pins[name]), (name, pins[name])


def test_the_lock_holds_the_pinned_torch_and_no_cuda_runtime() -> None:
    pins = _pins()
    assert pins["torch"] == {"2.13.0"}
    gpu_only = sorted(name for name in pins if name.startswith(("nvidia-", "cuda-")) or name == "triton")
    assert not gpu_only, f"requirements.lock pins GPU-only packages {gpu_only}: see README, Development"
