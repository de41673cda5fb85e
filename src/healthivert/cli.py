"""The ``healthivert`` command: one subcommand per pipeline stage plus tools.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``execute(args)``;
this file only dispatches and turns :class:`~healthivert.errors.HealthiVertError` into one line on
stderr and exit code 2, and an interrupt (SIGINT, SIGTERM) into one line and the shell's code (130, 143).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Iterable, Sequence

from healthivert.errors import HealthiVertError
from healthivert.signals import Interrupted, interrupts_raise

#: subcommand -> (module, one-line help). Stages first, in DAG order, then tools.
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("healthivert.stages.phantom", "generate the synthetic spine CT dataset (VerSe layout, with ground truth)"),
    "preprocess": ("healthivert.stages.preprocess", "stage 1: straighten, de-pedicle and crop every vertebra; write the manifest"),
    "train-coarse": ("healthivert.stages.train_coarse", "stage 2: train the fracture classifier (attention maps) and a coarse generator per view"),
    "train-fine": ("healthivert.stages.train_fine", "stage 3: train the whole generator of each view from its coarse one"),
    "synthesize": ("healthivert.stages.synthesize", "stage 4: iterative 2.5D synthesis of pseudo-healthy vertebrae"),
    "rhlv": ("healthivert.stages.rhlv", "stage 5: relative height loss (RHLV) and height-loss maps per vertebra"),
    "svm-fit": ("healthivert.stages.svm_fit", "stage 6: fit the Genant-grade SVM on RHLV features"),
    "evaluate": ("healthivert.stages.evaluate", "stage 7: metrics, plots and the HTML report"),
    "heights": ("healthivert.stages.heights", "mask-only morphometry: body heights and height loss of every vertebra"),
    "grade": ("healthivert.stages.grade", "grade the vertebrae of your own CT scans with a trained grader bundle"),
    "grade-cohort": ("healthivert.stages.grade_cohort", "grade a cohort (folders or S3) into one table and a summary"),
    "submit": ("healthivert.stages.submit", "compile the Kubeflow pipeline and submit it (or only compile it)"),
}


# GNU OpenMP threads (torch's CPU kernels) spin while they wait for each other: with any other busy
# process on the cores a convolution then took 15-50x longer (2 threads on a shared 2-core machine,
# benchmarks/bench_grade.py). Threads that sleep while they wait cost little when the cores are free.
# Read when torch loads, after this module; an OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the modules of ``commands`` (default: every subcommand) are imported.

    Every subcommand is listed in the help either way. Importing all of them (torch, MLflow, KFP,
    matplotlib, ...) took 7.4 s where a stage needs 2-3 s of it, once per stage and per ``grade`` call.
    """
    wanted = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(prog="healthivert", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name in wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code (0 success, 2 on a reported error, 128 + signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser([command] if command in COMMANDS else []).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        with interrupts_raise():
            args._module.execute(args)
    except HealthiVertError as exc:
        print(f"healthivert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"healthivert {args.command}: stopped by {exc.signal_name}; outputs being written were discarded",
              file=sys.stderr)
        return int(exc.code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
