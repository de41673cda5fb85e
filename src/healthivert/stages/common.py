"""Argument plumbing shared by the stage entry points."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

from healthivert.config import Params, load_params
from healthivert.io.atomic import check_target, write_text_atomic


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


def write_metrics(path: str | os.PathLike[str] | None, metrics: dict[str, float]) -> None:
    """Write metrics JSON atomically when a path was given."""
    if path is not None:
        write_text_atomic(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
