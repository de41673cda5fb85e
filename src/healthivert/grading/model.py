"""The Genant-grade classifier as plain data: standardisation + linear one-vs-one SVM.

The fitted model is saved as JSON (feature names, scaler means and scales, the pairwise
hyperplanes, classes and a SHA-256 of the content) and rebuilt from it without pickle, so a
model file can be read, diffed and checked by people and tools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from healthivert.errors import CheckpointError
from healthivert.io.atomic import write_text_atomic

FORMAT = "healthivert-svm/1"


@dataclasses.dataclass(frozen=True, eq=False)
class GradingModel:
    """A standardiser and a linear one-vs-one SVM over named features.

    Attributes:
        features: feature (column) names, in the order of the columns of ``X``.
        classes: the grades the SVM can predict, ascending.
        means: per-feature mean removed before scaling, shape ``(n_features,)``.
        scales: per-feature standard deviation divided by, shape ``(n_features,)``.
        coef: one hyperplane per class pair ``(i, j)``, i < j in ``classes`` order,
            shape ``(n_pairs, n_features)``; a positive decision votes for ``i``.
        intercept: shape ``(n_pairs,)``.
        c: the SVM's regularisation constant.
        info: free-form provenance (protocol, metrics), saved with the model.
    """

    features: tuple[str, ...]
    classes: tuple[int, ...]
    means: np.ndarray
    scales: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    c: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n_pairs = len(self.classes) * (len(self.classes) - 1) // 2
        n_features = len(self.features)
        if self.means.shape != (n_features,) or self.scales.shape != (n_features,):
            raise ValueError("means and scales must have one entry per feature")
        if self.coef.shape != (n_pairs, n_features) or self.intercept.shape != (n_pairs,):
            raise ValueError(f"expected {n_pairs} pairwise hyperplanes over {n_features} features")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Index pairs ``(i, j)`` of ``classes`` in the order of the rows of ``coef``."""
        return list(combinations(range(len(self.classes)), 2))

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Pairwise decision values, shape ``(n_samples, n_pairs)``, for raw features ``(n_samples, n_features)``."""
        standardised = (np.asarray(x, dtype=np.float64) - self.means) / self.scales
        return standardised @ self.coef.T + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Grades for raw features ``(n_samples, n_features)`` by one-vs-one voting (ties: lower grade)."""
        if len(self.classes) == 1:
            return np.full(len(x), self.classes[0], dtype=np.int64)
        decision = self.decision_function(x)
        votes = np.zeros((len(decision), len(self.classes)), dtype=np.int64)
        for column, (i, j) in enumerate(self.pairs):
            positive = decision[:, column] > 0
            votes[positive, i] += 1
            votes[~positive, j] += 1
        return np.asarray(self.classes, dtype=np.int64)[np.argmax(votes, axis=1)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content, including its SHA-256 under ``sha256``."""
        content: dict[str, Any] = {
            "format": FORMAT,
            "features": list(self.features),
            "classes": [int(c) for c in self.classes],
            "scaler": {"mean": self.means.tolist(), "scale": self.scales.tolist()},
            "svm": {
                "kernel": "linear",
                "decision": "one-vs-one",
                "C": float(self.c),
                "pairs": [[int(self.classes[i]), int(self.classes[j])] for i, j in self.pairs],
                "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist(),
            },
            "info": self.info,
        }
        content["sha256"] = _content_hash(content)
        return content

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model as JSON, atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return Path(path)


def _content_hash(content: dict[str, Any]) -> str:
    body = {key: value for key, value in content.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_model(path: str | os.PathLike[str]) -> GradingModel:
    """Rebuild a :class:`GradingModel` from its JSON file, refusing edited or foreign files.

    Raises:
        CheckpointError: missing, not JSON, another format, a SHA-256 mismatch, or inconsistent shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "SVM model file not found", "run `healthivert svm-fit` first")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, "not a JSON file", str(exc)) from exc
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(path, f"not a {FORMAT} model file")
    if content.get("sha256") != _content_hash(content):
        raise CheckpointError(path, "content does not match its SHA-256", "the file was edited or is corrupt; refit it")
    try:
        return GradingModel(
            features=tuple(content["features"]),
            classes=tuple(int(c) for c in content["classes"]),
            means=np.asarray(content["scaler"]["mean"], dtype=np.float64),
            scales=np.asarray(content["scaler"]["scale"], dtype=np.float64),
            coef=np.asarray(content["svm"]["coef"], dtype=np.float64).reshape(-1, len(content["features"])),
            intercept=np.asarray(content["svm"]["intercept"], dtype=np.float64),
            c=float(content["svm"]["C"]),
            info=dict(content.get("info", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, "inconsistent model content", str(exc)) from exc
