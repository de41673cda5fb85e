"""Training checkpoints: one state dict per file, written atomically, read with ``weights_only=True``.

A checkpoint holds the networks, optimisers, schedulers and loss scaler (their state dicts), the
step and epoch reached, the random states of python, numpy and torch, and the digest of the
parameters that produced it. A checkpoint of other parameters is not resumed: the run starts afresh
(with a warning) and replaces it at its first checkpoint, so a parameter edit in a DVC workflow just
retrains. An unreadable checkpoint is refused in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healthivert.errors import CheckpointError
from healthivert.io.atomic import atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_NAME = "last.pt"


@dataclasses.dataclass
class Checkpoint:
    """The resumable state of a training run.

    Attributes:
        digest: hash of the parameters the run was started with.
        step: optimisation steps completed.
        epoch: epoch the next step belongs to (0-based).
        states: component name -> state dict (networks, optimisers, schedulers, scaler).
        rng: random states (:func:`healthivert.training.runtime.rng_state`).
        history: per-epoch validation metrics logged so far.
    """

    digest: str
    step: int
    epoch: int
    states: dict[str, dict[str, Any]]
    rng: dict[str, Any]
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _encode_rng(rng: dict[str, Any]) -> dict[str, Any]:
    """Turn numpy's RNG tuple into tensors and plain values, which ``weights_only`` accepts."""
    name, keys, pos, has_gauss, cached = rng["numpy"]
    encoded = dict(rng)
    encoded["numpy"] = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    return encoded


def _decode_rng(encoded: dict[str, Any]) -> dict[str, Any]:
    rng = dict(encoded)
    n = encoded["numpy"]
    rng["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    return rng


def digest_of(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (parameters, data hashes) identifying a run."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """Short SHA-256 of a file's bytes (the manifest, a starting model)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def save_checkpoint(folder: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``folder/last.pt`` atomically (a kill never leaves half a file)."""
    path = Path(folder) / CHECKPOINT_NAME
    payload = {
        "format": FORMAT_VERSION,
        "digest": checkpoint.digest,
        "step": checkpoint.step,
        "epoch": checkpoint.epoch,
        "states": checkpoint.states,
        "rng": _encode_rng(checkpoint.rng),
        "history": checkpoint.history,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    log.debug("checkpoint at step %d written to %s", checkpoint.step, path)
    return path


def load_checkpoint(folder: str | os.PathLike[str], digest: str) -> Checkpoint | None:
    """Read ``folder/last.pt`` if present and written with the same parameters.

    Returns:
        The checkpoint, or ``None`` for a fresh start: the folder holds none, or one written with
        other parameters (logged; the caller's first checkpoint replaces it).

    Raises:
        CheckpointError: the file is unreadable or not a checkpoint of this version.
    """
    path = Path(folder) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, "unreadable checkpoint", f"{type(exc).__name__}; delete it to start afresh") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(path, "not a HealthiVert training checkpoint of this version", "delete it to start afresh")
    if payload["digest"] != digest:
        log.warning("%s was written with other parameters (digest %s, now %s): starting afresh, the first "
                    "checkpoint of this run replaces it", path, payload["digest"], digest)
        return None
    return Checkpoint(
        digest=payload["digest"],
        step=int(payload["step"]),
        epoch=int(payload["epoch"]),
        states=payload["states"],
        rng=_decode_rng(payload["rng"]),
        history=list(payload.get("history", [])),
    )
