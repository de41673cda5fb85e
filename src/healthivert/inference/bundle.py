"""The grader bundle: one folder holding everything ``healthivert grade`` needs, checked on load.

Layout (schema :data:`SCHEMA`)::

    bundle.json                 schema, versions, files and their SHA-256, views, training data, model card
    params.yaml                 the resolved parameters (preprocess, model, synthesize, rhlv, svm_fit are used)
    generator.pt [generator_coronal.pt]   the synthesis generator of each view (synthesize.views)
    model_card.json [model_card_coronal.json]
    classifier.pt               the fracture classifier (attention maps)
    svm.json [baseline_svm.json]          the Genant grader on RHLV (and on the mask-only baseline)

A bundle is a folder, or an MLflow artifact URI (``models:/NAME@ALIAS``, ``runs:/RUN/PATH``) that is
downloaded first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import healthivert
from healthivert.config import Params, dump_params, load_params
from healthivert.errors import CheckpointError, HealthiVertError
from healthivert.grading.model import GradingModel, load_model
from healthivert.io.atomic import atomic_dir
from healthivert.models.classifier import FractureClassifier
from healthivert.models.generator import HealthiVertGenerator, Stage
from healthivert.models.io import load_classifier, view_file_name
from healthivert.synthesis.iterative import load_view_generators
from healthivert.tracking.runs import tracking_uri
from healthivert.training.model_card import INTENDED_USE

SCHEMA = "healthivert-grader/1"
MANIFEST_NAME = "bundle.json"
PARAMS_NAME = "params.yaml"
CLASSIFIER_NAME = "classifier.pt"
SVM_NAME = "svm.json"
BASELINE_SVM_NAME = "baseline_svm.json"
MLFLOW_SCHEMES = ("models:/", "runs:/")


@dataclasses.dataclass(frozen=True, eq=False)
class GraderBundle:
    """A loaded grader: the networks on one device, the SVMs and the settings they were trained with.

    Attributes:
        path: the bundle folder.
        params: resolved parameters of the training run.
        generators: view -> generator, ready for synthesis.
        stage: training stage of the generators (``fine`` for a full pipeline).
        classifier: the fracture classifier, or ``None`` when the model has no attention module.
        svm: the Genant grader on RHLV features.
        baseline_svm: the grader on the mask-only baseline's losses, or ``None``.
        manifest: the content of ``bundle.json`` (model card, training data, versions).
        device: where the networks run.
    """

    path: Path
    params: Params
    generators: dict[str, HealthiVertGenerator]
    stage: Stage
    classifier: FractureClassifier | None
    svm: GradingModel
    baseline_svm: GradingModel | None
    manifest: dict[str, Any]
    device: torch.device

    def __repr__(self) -> str:
        return (f"GraderBundle({self.path}, views={list(self.generators)}, stage={self.stage}, "
                f"features={list(self.svm.features)}, device={self.device})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the software a bundle was written with."""
    return {"healthivert": healthivert.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def write_bundle(out: Path, params: Params, coarse_dir: Path, fine_dir: Path, svm_dir: Path,
                 training_data: dict[str, Any]) -> Path:
    """Assemble the grader bundle from the outputs of train-coarse, train-fine and svm-fit (written whole).

    Args:
        out: bundle folder (replaced whole).
        params: the resolved parameters of the run.
        coarse_dir: train-coarse's model folder (``classifier.pt``).
        fine_dir: train-fine's model folder (a generator and model card per view of ``synthesize.views``).
        svm_dir: svm-fit's folder (``svm.json``, optionally ``baseline_svm.json``).
        training_data: what the models were trained on (source, cases, vertebrae), for the report.

    Raises:
        CheckpointError: a file the bundle needs is missing.
    """
    views = list(params.synthesize.views)
    sources = {view_file_name(name, view): fine_dir / view_file_name(name, view)
               for view in views for name in ("generator.pt", "model_card.json")}
    if params.model.attention_module:
        sources[CLASSIFIER_NAME] = coarse_dir / CLASSIFIER_NAME
    sources[SVM_NAME] = svm_dir / SVM_NAME
    if (svm_dir / BASELINE_SVM_NAME).is_file():
        sources[BASELINE_SVM_NAME] = svm_dir / BASELINE_SVM_NAME
    for source in sources.values():
        if not source.is_file():
            raise CheckpointError(source, "missing; the grader bundle needs it", "run the training stages first")
    card = json.loads((fine_dir / view_file_name("model_card.json", views[0])).read_text())
    with atomic_dir(out) as tmp:
        for name, source in sources.items():
            shutil.copyfile(source, tmp / name)
        (tmp / PARAMS_NAME).write_text(dump_params(params))
        manifest = {
            "schema": SCHEMA,
            "name": "HealthiVert-GAN grader",
            "intended_use": INTENDED_USE,
            "views": views,
            "input": {"ct": "a spine CT (NIfTI or a DICOM series), HU",
                      "labels": "its vertebra label map (VerSe ids, or TotalSegmentator's)",
                      "preprocess": params.preprocess.model_dump(mode="json")},
            "output": "per vertebra: Genant grade (0-3), RHLV per third, heights, pseudo-healthy CT and label",
            "training_data": training_data,
            "generator_card": {key: card[key] for key in ("name", "data", "metrics", "params_digest") if key in card},
            "svm_features": list(params.svm_fit.features),
            "versions": versions(),
            "files": {name: _sha256(tmp / name) for name in sorted([*sources, PARAMS_NAME])},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def resolve_bundle(source: str | os.PathLike[str]) -> Path:
    """The local folder of a bundle given as a folder or an MLflow URI (downloaded from the tracking store
    the stages log to: ``MLFLOW_TRACKING_URI``, else the project's default).

    Raises:
        CheckpointError: the URI cannot be downloaded, or the folder does not exist.
    """
    text = str(source)
    if text.startswith(MLFLOW_SCHEMES):
        import mlflow.artifacts  # imported here: only MLflow URIs need it

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=text, tracking_uri=tracking_uri()))
        except Exception as exc:  # MLflow raises many types (missing run, model, alias, server)
            raise CheckpointError(text, "MLflow could not download the grader bundle",
                                  str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    path = Path(source)
    if not path.is_dir():
        raise CheckpointError(path, "grader bundle folder not found",
                              "give the folder svm-fit writes (models/grader) or an MLflow URI (models:/NAME@ALIAS, runs:/ID/PATH)")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """``bundle.json`` of a bundle folder, its schema and file digests checked.

    Raises:
        CheckpointError: missing or unreadable, another schema, or a file missing or altered.
    """
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(manifest_path, "not found; is this a grader bundle?", "svm-fit writes one (models/grader)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(manifest_path, "not a JSON file", str(exc)) from exc
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != SCHEMA:
        raise CheckpointError(manifest_path, f"grader bundle schema {schema!r} is not supported",
                              f"this healthivert {healthivert.__version__} reads {SCHEMA}; rebuild the bundle with it")
    for name, digest in dict(manifest.get("files", {})).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(file, "missing from the grader bundle")
        if _sha256(file) != digest:
            raise CheckpointError(file, "does not match the SHA-256 in bundle.json", "the bundle was edited or is corrupt")
    return manifest


def load_bundle(source: str | os.PathLike[str], device: torch.device | str = "cpu") -> GraderBundle:
    """Load a grader bundle once (networks on ``device``), to grade any number of cases with it.

    Raises:
        CheckpointError: see :func:`resolve_bundle` and :func:`read_manifest`; or a network or SVM file
            that cannot be read.
    """
    path = resolve_bundle(source)
    manifest = read_manifest(path)
    device = torch.device(device)
    try:
        params = load_params([path / PARAMS_NAME])
    except HealthiVertError as exc:
        raise CheckpointError(path / PARAMS_NAME, "parameters of the bundle are not valid", str(exc)) from exc
    generators, stage = load_view_generators(path, params.model, params.synthesize, device)
    classifier = None
    if params.model.attention_module:
        classifier = load_classifier(path / CLASSIFIER_NAME, device, expected=params.model)
    baseline = load_model(path / BASELINE_SVM_NAME) if (path / BASELINE_SVM_NAME).is_file() else None
    return GraderBundle(path, params, generators, stage, classifier, load_model(path / SVM_NAME), baseline,
                        manifest, device)
