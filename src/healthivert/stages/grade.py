"""``healthivert grade``: grade the vertebrae of your own scans with a trained grader bundle.

One scan (``--ct CT --labels LABELS [--ctd CENTROIDS]``) or a folder of scans in any layout
``preprocess`` reads (``--input DIR``). The bundle (``--model``) is a folder (``models/grader``, written
by ``svm-fit``) or an MLflow URI (``models:/NAME@ALIAS``, ``runs:/RUN/PATH``). Each case gets
``OUT/<case>/`` (see :mod:`healthivert.inference.outputs`); a case whose folder is complete is skipped.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from healthivert.errors import ConfigError
from healthivert.inference.bundle import load_bundle
from healthivert.inference.grade import CaseInputs, cases_in_folder, grade_case
from healthivert.inference.outputs import write_case
from healthivert.io.layouts import strip_nifti
from healthivert.stages.common import check_outputs
from healthivert.training.runtime import choose_device

log = logging.getLogger(__name__)

DONE_MARKER = "grades.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``healthivert grade``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ct", type=Path, metavar="CT", help="a CT: NIfTI file or DICOM series folder (with --labels)")
    source.add_argument("--input", type=Path, metavar="DIR", help="a folder of cases in any layout preprocess reads")
    parser.add_argument("--labels", type=Path, metavar="LABELS",
                        help="vertebra label map of --ct (VerSe or TotalSegmentator ids, or TotalSegmentator's mask folder)")
    parser.add_argument("--ctd", type=Path, metavar="CENTROIDS", help="centroid JSON of --labels (default: from the labels)")
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="grader bundle: a folder (models/grader) or an MLflow URI (models:/NAME@ALIAS, runs:/ID/PATH)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder, one sub-folder per case")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the networks run")


def case_inputs(args: argparse.Namespace) -> list[CaseInputs]:
    """The cases named on the command line."""
    if args.input is not None:
        return cases_in_folder(args.input)
    name = strip_nifti(args.ct.name) if args.ct.is_file() else args.ct.name
    return [CaseInputs(name.removesuffix("_ct"), args.ct, args.labels, args.ctd)]


def execute(args: argparse.Namespace) -> None:
    """Grade every case named on the command line."""
    if args.ct is not None and args.labels is None:
        raise ConfigError("--labels", "missing", "--ct needs the vertebra labels of the scan")
    check_outputs(folders=[args.out])
    bundle = load_bundle(args.model, choose_device(args.device))
    cases = case_inputs(args)
    log.info("grader %r", bundle)
    started = time.perf_counter()
    for inputs in cases:
        out = args.out / inputs.case_id
        if (out / DONE_MARKER).is_file():
            log.info("%s: already graded in %s; skipped", inputs.case_id, out)
            continue
        table = write_case(grade_case(inputs, bundle), bundle, out)
        fractured = table[table["graded"] & (table["grade"].fillna(0) >= 1)]
        print(f"{inputs.case_id}: {int(table['graded'].sum())} of {len(table)} vertebrae graded, "
              f"{len(fractured)} fractured -> {out / 'report.html'}")
        for row in fractured.itertuples():
            print(f"  {row.name}: grade {row.grade}, RHLV ant/mid/post {row.rhlv_ant:.2f}/{row.rhlv_mid:.2f}/{row.rhlv_post:.2f}")
        for row in table[~table["graded"]].itertuples():
            log.info("%s %s not graded: %s", inputs.case_id, row.name, row.flag)
    log.info("graded %d case(s) in %.1f s", len(cases), time.perf_counter() - started)
