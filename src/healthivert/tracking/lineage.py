"""Where a run's code and data come from: git commit, parameter digest and DVC data hashes.

The data hash of a stage is read from DVC's own records, not recomputed: for every data dependency
the stage declares in ``dvc.yaml`` (``${data.source}`` resolved from params.yaml), the md5 that ``dvc.lock`` records for the upstream output that
holds it (for a file inside an output folder, its entry in the folder's cached listing). During
``dvc repro`` the upstream stages have already written their entries, so the hash names exactly
the inputs the stage is about to read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from healthivert.config import Params

log = logging.getLogger(__name__)

#: dependencies under these folders are code, not data (their hashes are covered by the git commit).
CODE_PREFIXES = ("src/",)
#: where DVC 3 keeps cached files by md5 (``<md5[:2]>/<md5[2:]>``), relative to the project root.
CACHE_FILES = Path(".dvc") / "cache" / "files" / "md5"

UNKNOWN = "unknown"
#: folder of the dataset stages' own dvc.yaml files (their outputs' hashes are in the dvc.lock beside them,
#: written relative to the project root).
DATASET_STAGES = Path("datasets")


def git_commit(root: Path) -> str:
    """The checked-out commit of the git repository containing ``root`` (``unknown`` outside git).

    A ``+dirty`` suffix marks uncommitted changes to tracked files.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, capture_output=True,
                               timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{commit}+dirty" if dirty else commit


def _git(root: Path, *args: str) -> str | None:
    """Output of ``git <args>`` in ``root`` (None when git fails or prints nothing)."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def git_source_tags(root: Path) -> dict[str, str]:
    """MLflow's source tags (the runs table's Source column) for the checkout at ``root``.

    ``mlflow.source.git.commit`` (without a dirty suffix), ``mlflow.source.git.branch`` and
    ``mlflow.source.git.repoURL`` where git knows them, and ``git.dirty``; nothing outside git.
    """
    commit = git_commit(root)
    if commit == UNKNOWN:
        return {}
    tags = {"mlflow.source.git.commit": commit.removesuffix("+dirty"),
            "git.dirty": str(commit.endswith("+dirty")).lower()}
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = _git(root, "remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    return tags


def file_digest(path: Path) -> str:
    """Short sha256 of a file's bytes (``unknown`` when it cannot be read)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return UNKNOWN


def params_digest(params: Params) -> str:
    """Short stable hash of every parameter section."""
    return params.digest()


@dataclass(frozen=True)
class DataLineage:
    """The data inputs of one DVC stage with the md5 that ``dvc.lock`` records for each.

    Attributes:
        stage: the DVC stage name (``train_coarse``).
        inputs: data dependency path -> md5 (``unknown`` when DVC has no record of it).
    """

    stage: str
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """One hash over every input (``none`` without inputs, ``unknown`` when any is unrecorded)."""
        if not self.inputs:
            return "none"
        if UNKNOWN in self.inputs.values():
            return UNKNOWN
        payload = json.dumps(sorted(self.inputs.items()))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        """MLflow tags: ``dvc.data_hash`` plus one ``dvc.dep.<path>`` per input."""
        tags = {"dvc.data_hash": self.digest}
        tags.update({f"dvc.dep.{path}": md5 for path, md5 in self.inputs.items()})
        return tags


def _read_yaml(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _recorded_outputs(lock: dict) -> dict[str, str]:
    """Path -> md5 of every stage output ``dvc.lock`` records (current once its stage has run).

    Dependency records are not used: they describe the inputs of the previous run of a stage.
    """
    return {str(item["path"]).rstrip("/"): str(item["md5"])
            for entry in (lock.get("stages") or {}).values()
            for item in entry.get("outs") or [] if "md5" in item}


def _file_in_folder(root: Path, folder_md5: str, relative: str) -> str:
    """The md5 of ``relative`` inside a cached output folder, from DVC's ``.dir`` listing in the cache."""
    listing = root / CACHE_FILES / folder_md5[:2] / folder_md5[2:]
    try:
        entries = json.loads(listing.read_text())
    except (OSError, ValueError):
        return UNKNOWN
    return next((str(e["md5"]) for e in entries if e.get("relpath") == relative and "md5" in e), UNKNOWN)


def _input_hash(path: str, outputs: dict[str, str], root: Path) -> str:
    """The recorded md5 of a data input: an output itself, or a file inside an output folder."""
    if path in outputs:
        return outputs[path]
    for out, md5 in outputs.items():
        if path.startswith(out + "/") and md5.endswith(".dir"):
            return _file_in_folder(root, md5, path[len(out) + 1:])
    return UNKNOWN


def _resolve(path: str, defaults: dict) -> str:
    """``path`` with DVC's ``${section.key}`` placeholders filled from params.yaml (unresolvable: left as is)."""
    def value(match: re.Match[str]) -> str:
        node: object = defaults
        for key in match[1].split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return match[0] if node is None else str(node)

    return re.sub(r"\$\{\s*([\w.]+)\s*\}", value, path)


def dvc_lineage(stage: str, root: Path) -> DataLineage:
    """The data inputs of DVC stage ``stage`` (dashes allowed) and their recorded md5s.

    Args:
        stage: stage name as the CLI spells it (``train-coarse``) or as ``dvc.yaml`` does.
        root: the DVC project root holding ``dvc.yaml`` and ``dvc.lock``.

    Returns:
        The lineage; empty when the project or the stage has no ``dvc.yaml`` entry.
    """
    name = stage.replace("-", "_")
    definition = (_read_yaml(root / "dvc.yaml").get("stages") or {}).get(name)
    if not definition:
        return DataLineage(stage=name)
    outputs: dict[str, str] = {}
    for lock in (root / "dvc.lock", *sorted((root / DATASET_STAGES).glob("*/dvc.lock"))):
        outputs |= _recorded_outputs(_read_yaml(lock))
    defaults = _read_yaml(root / "params.yaml")
    inputs = {}
    for dep in definition.get("deps") or []:
        path = _resolve(str(dep), defaults).rstrip("/")
        if not path.startswith(CODE_PREFIXES):
            inputs[path] = _input_hash(path, outputs, root)
    return DataLineage(stage=name, inputs=inputs)
