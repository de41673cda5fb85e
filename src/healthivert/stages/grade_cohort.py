"""``healthivert grade-cohort``: grade a cohort from folders or S3 into one table and a summary.

The steps of the Kubeflow grading pipeline (``pipelines/grade_pipeline.py``), run one after the other
on this machine (see :mod:`healthivert.inference.cohort`): list the cases of ``--cases`` and
``--prefix``, grade each with the bundle ``--model``, gather ``cohort.parquet``, ``summary.json`` and
``summary.md``. ``--out`` (a folder or an ``s3://`` prefix) receives one folder per case and those
three files. A case that cannot be graded is a row of the table naming the reason; the others are graded.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from healthivert.errors import ConfigError
from healthivert.inference.cohort import (
    grade_entry,
    list_cases,
    load_grader,
    parse_location,
    write_cohort,
)
from healthivert.io.remote import is_s3_uri
from healthivert.stages.common import check_outputs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``healthivert grade-cohort``."""
    parser.add_argument("--cases", nargs="+", default=[], metavar="LOCATION",
                        help="case locations: a folder or s3:// prefix of cases in any layout preprocess reads, or "
                             'a JSON object naming one scan\'s files, {"ct": URI, "labels": URI, "ctd": URI, "case": ID}')
    parser.add_argument("--prefix", default="", metavar="URI", help="a folder or s3:// prefix holding the cases")
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="grader bundle: a folder, an s3:// prefix or an MLflow URI (models:/NAME@ALIAS)")
    parser.add_argument("--out", required=True, metavar="LOCATION",
                        help="output folder or s3:// prefix: one folder per case, cohort.parquet, summary.json/.md")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the networks run")


def execute(args: argparse.Namespace) -> None:
    """List, grade and gather the cohort."""
    if not args.cases and not args.prefix:
        raise ConfigError("--cases", "nothing to grade", "give --cases, --prefix or both")
    if not is_s3_uri(args.out):
        check_outputs(folders=[Path(args.out)])
    entries = list_cases([*map(parse_location, args.cases), args.prefix])
    bundle = load_grader(args.model, args.device)
    log.info("grader %r", bundle)
    with tempfile.TemporaryDirectory(prefix="healthivert-cohort-") as scratch:
        records = [grade_entry(entry, bundle, Path(scratch) / str(index), target=args.out)
                   for index, entry in enumerate(entries)]
        summary = write_cohort(records, Path(scratch) / "cohort", target=args.out)
    print(f"{summary['cases_graded']} of {summary['cases']} case(s) graded, {len(summary['fractured'])} fractured "
          f"vertebra(e) -> {args.out}")
    for failure in summary["failed"]:
        print(f"  not graded: {failure['error']}")
