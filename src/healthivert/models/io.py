"""Saved networks: state dict + the model parameters that built it, loaded with ``weights_only=True``.

A saved model is a plain dictionary (``format``, ``kind``, ``model_params`` as JSON-able data,
``state_dict``, ``extra``), so loading never unpickles code. Loading a file with parameters that
would build a different network raises :class:`~healthivert.errors.CheckpointError` naming the
file and the mismatched settings. A model folder holds one generator per view it was trained on,
named by :func:`generator_file`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthivert.config import ModelParams, View
from healthivert.errors import CheckpointError
from healthivert.io.atomic import atomic_path
from healthivert.models.classifier import FractureClassifier
from healthivert.models.generator import HealthiVertGenerator

FORMAT_VERSION = 1
#: the sagittal generator's file in a model folder; another view's adds the view (:func:`generator_file`).
GENERATOR_FILE = "generator.pt"


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """The contents of a saved network file.

    Attributes:
        kind: ``"generator"`` or ``"classifier"``.
        model_params: the parameters the network was built with.
        state_dict: its weights.
        extra: whatever the saver added (epoch, metrics, data digest...).
    """

    kind: str
    model_params: ModelParams
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]


def architecture(model_params: ModelParams, kind: str) -> dict[str, Any]:
    """The settings of ``model_params`` that change the shape of a ``kind`` network."""
    net = model_params.network
    if kind == "classifier":
        return {"network.classifier_channels": net.classifier_channels}
    return {"network.cnum": net.cnum, "max_height_px": model_params.max_height_px,
            "attention_module": model_params.attention_module, "height_module": model_params.height_module,
            "contextual_attention": model_params.contextual_attention}


def view_file_name(name: str, view: View) -> str:
    """The name of ``view``'s copy of a per-view file or folder of a model folder.

    The sagittal view keeps ``name``; another view adds ``_<view>`` before the extension
    (``generator.pt`` -> ``generator_coronal.pt``, ``samples`` -> ``samples_coronal``).
    """
    if view == "sagittal":
        return name
    stem, dot, extension = name.partition(".")
    return f"{stem}_{view}{dot}{extension}"


def generator_file(view: View) -> str:
    """File name of the generator trained on ``view`` slices (``generator.pt``, ``generator_coronal.pt``)."""
    return view_file_name(GENERATOR_FILE, view)


def _save(path: str | os.PathLike[str], kind: str, network: nn.Module, model_params: ModelParams,
          extra: dict[str, Any] | None) -> None:
    payload = {"format": FORMAT_VERSION, "kind": kind, "model_params": model_params.model_dump(mode="json"),
               "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
               "extra": dict(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_saved_model(path: str | os.PathLike[str], kind: str) -> SavedModel:
    """Read a saved network file without building the network.

    Raises:
        CheckpointError: the file is missing, unreadable, of another format or of another kind.
    """
    path = Path(path)
    try:
        found = path.is_file()
        payload = torch.load(path, map_location="cpu", weights_only=True) if found else None
    except OSError as exc:  # an unreadable file, or a folder on its path that the user may not enter
        raise CheckpointError(path, f"cannot read the saved {kind}: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(path, f"cannot read the saved {kind}", type(exc).__name__) from exc
    if not found:
        raise CheckpointError(path, f"saved {kind} not found", "run the training stage that writes it")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(path, f"not a saved HealthiVert model of format {FORMAT_VERSION}")
    if payload.get("kind") != kind:
        raise CheckpointError(path, f"holds a {payload.get('kind')}, not a {kind}")
    return SavedModel(kind=kind, model_params=ModelParams.model_validate(payload["model_params"]),
                      state_dict=payload["state_dict"], extra=payload.get("extra", {}))


def _check_architecture(path: Path, saved: ModelParams, expected: ModelParams | None, kind: str) -> None:
    if expected is None:
        return
    have, want = architecture(saved, kind), architecture(expected, kind)
    differences = [f"model.{key}={have[key]} (params: {want[key]})" for key in want if have[key] != want[key]]
    if differences:
        raise CheckpointError(path, f"{kind} saved with another configuration: " + ", ".join(differences),
                              "retrain, or use the parameters it was trained with")


def _load_into(path: Path, network: nn.Module, state_dict: dict[str, torch.Tensor], kind: str) -> None:
    try:
        network.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(path, f"weights do not fit the {kind} its parameters describe", first) from exc


def save_generator(path: str | os.PathLike[str], generator: HealthiVertGenerator, model_params: ModelParams,
                   extra: dict[str, Any] | None = None) -> None:
    """Write a generator's weights and parameters atomically (``extra``: JSON-able data)."""
    _save(path, "generator", generator, model_params, extra)


def load_generator(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                   expected: ModelParams | None = None) -> HealthiVertGenerator:
    """Build a generator from a saved file, in eval mode on ``device``.

    Args:
        path: file written by :func:`save_generator`.
        device: where to put the network.
        expected: the current parameters; a saved network of another architecture is refused.

    Raises:
        CheckpointError: missing/unreadable file, another kind, or an architecture mismatch.
    """
    saved = read_saved_model(path, "generator")
    _check_architecture(Path(path), saved.model_params, expected, "generator")
    generator = HealthiVertGenerator(saved.model_params)
    _load_into(Path(path), generator, saved.state_dict, "generator")
    return generator.to(device).eval()


def load_view_generator(folder: str | os.PathLike[str], view: View, device: str | torch.device = "cpu",
                        expected: ModelParams | None = None) -> tuple[HealthiVertGenerator, dict[str, Any]]:
    """The generator of ``view`` in a model folder (see :func:`load_generator`) and what its saver added.

    Raises:
        CheckpointError: as :func:`load_generator`, or the file was trained on another view's slices.
    """
    path = Path(folder) / generator_file(view)
    extra = read_saved_model(path, "generator").extra
    trained_view = extra.get("view", view)
    if trained_view != view:
        raise CheckpointError(path, f"generator trained on {trained_view} slices, used for the {view} view",
                              f"train one with {view} in the training stage's views")
    return load_generator(path, device, expected), extra


def save_classifier(path: str | os.PathLike[str], classifier: FractureClassifier, model_params: ModelParams,
                    extra: dict[str, Any] | None = None) -> None:
    """Write a fracture classifier's weights and parameters atomically (``extra``: JSON-able data)."""
    _save(path, "classifier", classifier, model_params, extra)


def load_classifier(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    expected: ModelParams | None = None) -> FractureClassifier:
    """Build a fracture classifier from a saved file, in eval mode on ``device`` (see :func:`load_generator`)."""
    saved = read_saved_model(path, "classifier")
    _check_architecture(Path(path), saved.model_params, expected, "classifier")
    classifier = FractureClassifier(saved.model_params)
    _load_into(Path(path), classifier, saved.state_dict, "classifier")
    return classifier.to(device).eval()
