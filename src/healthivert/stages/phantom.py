"""``healthivert phantom``: write the synthetic spine CT dataset (VerSe layout, ground truth, grades)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from healthivert.config import PhantomParams
from healthivert.io.case import load_case
from healthivert.io.layouts import discover_cases
from healthivert.phantom.generator import write_dataset
from healthivert.phantom.preview import preview_figure
from healthivert.stages.common import add_metrics_argument, add_params_arguments, check_outputs, params_from_args, write_metrics
from healthivert.tracking.runs import stage_run

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the stage."""
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder to write (replaced whole)")
    parser.add_argument("--cases", type=int, metavar="N", help="number of cases (overrides phantom.cases)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (overrides phantom.seed)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def run(params: PhantomParams, out: Path) -> dict[str, float]:
    """Generate the dataset into ``out`` and return its summary metrics."""
    return write_dataset(out, params)


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    overrides = list(args.overrides)
    if args.cases is not None:
        overrides.append(f"phantom.cases={args.cases}")
    if args.seed is not None:
        overrides.append(f"phantom.seed={args.seed}")
    args.overrides = overrides
    params = params_from_args(args)
    check_outputs(folders=[args.out], files=[args.metrics])
    with stage_run("phantom", params, ("phantom",)) as tracker:
        metrics = run(params.phantom, args.out)
        tracker.log_metrics(metrics)
        tracker.log_artifact(args.out / "grades.csv")
        if tracker.active:  # a look at the first case, read back through the loader
            first = load_case(discover_cases(args.out)[0])
            tracker.log_figure(preview_figure(first), "phantom_preview.png")
    write_metrics(args.metrics, metrics)
