"""Argument plumbing shared by the stage entry points."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from healthivert.config import Params, load_params
from healthivert.io.atomic import check_target, write_text_atomic

if TYPE_CHECKING:
    from healthivert.tracking.runs import StageTracker


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    """``--params FILE`` (repeatable, later files win) and ``--set section.key=value`` (repeatable)."""
    parser.add_argument("--params", action="append", type=Path, metavar="FILE",
                        help="parameter file (default: params.yaml); repeat to layer overrides, e.g. configs/full.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one parameter (value parsed as YAML); repeatable")


def params_from_args(args: argparse.Namespace) -> Params:
    """Load and validate the parameters named on the command line."""
    return load_params(args.params or [Path("params.yaml")], args.overrides)


def check_outputs(folders: Iterable[Path | None] = (), files: Iterable[Path | None] = ()) -> None:
    """Refuse output paths that cannot be written before the stage reads or computes anything.

    Args:
        folders: output folders of the stage (``None`` entries, flags not given, are skipped).
        files: output files of the stage (``--metrics``, a table).

    Raises:
        OutputError: a path is of the wrong kind, lies under a file, or in a folder not writable.
    """
    for path in folders:
        if path is not None:
            check_target(path, folder=True)
    for path in files:
        if path is not None:
            check_target(path, folder=False)


def add_metrics_argument(parser: argparse.ArgumentParser) -> None:
    """``--metrics FILE``: where the stage writes its metrics JSON (for ``dvc metrics``)."""
    parser.add_argument("--metrics", type=Path, metavar="FILE", help="write the stage's metrics here as JSON")


def write_metrics(path: str | os.PathLike[str] | None, metrics: Mapping[str, Any]) -> None:
    """Write metrics JSON atomically when a path was given, keys in the order given (headline first)."""
    if path is not None:
        write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")


def nest_metrics(metrics: Mapping[str, float]) -> dict[str, Any]:
    """Dotted metric names as nested JSON groups, order kept: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``.

    ``dvc metrics show`` prints a nested key as its dotted path, so the file and MLflow agree on names.

    Raises:
        ValueError: a name is both a value and a group (``a.b`` and ``a.b.c``).
    """
    tree: dict[str, Any] = {}
    for name, value in metrics.items():
        *groups, leaf = name.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
            if not isinstance(node, dict):
                raise ValueError(f"metric {name}: {group} is a value and a group")
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"metric {name}: is a value and a group")
        node[leaf] = value
    return tree


def log_manifest_dataset(tracker: StageTracker, data: Path, source: str, context: str) -> None:
    """Log the preprocessed dataset (one row per vertebra: case, vertebra, grade, split) as an MLflow
    dataset input of the stage and the pipeline run, named after its ``source`` location, tagged with its layout(s)."""
    if not tracker.active:
        return
    from healthivert.data.manifest import read_manifest

    manifest = read_manifest(data)
    layouts = ",".join(sorted(str(v) for v in manifest["source_layout"].dropna().unique()))
    tracker.log_dataset(manifest[["case", "vertebra", "grade", "split"]], source, Path(source.rstrip("/")).name or source,
                        context, tags={"healthivert.layout": layouts} if layouts else None)
