"""``healthivert heights``: mask-only morphometry of every vertebra of one label map.

Straightens the spine along its centroids, isolates the vertebral bodies, measures each body's
anterior, middle and posterior height, and compares it with the mean of its neighbours (the
mask-only baseline that RHLV improves on). One CSV row per vertebra; vertebrae that cannot be
measured (body cut by the scan border, a fragment) are listed with the reason and empty heights.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from healthivert.config import PreprocessParams, RhlvParams
from healthivert.errors import ConfigError, InputDataError
from healthivert.geometry.spine import prepare_spine, spine_heights
from healthivert.io.atomic import atomic_path
from healthivert.io.case import SpineCase, load_mask_case
from healthivert.io.labels import vertebra_name
from healthivert.stages.common import check_outputs

log = logging.getLogger(__name__)

#: CSV columns, in order.
COLUMNS = ("vertebra", "name", "status", "h_ant_mm", "h_mid_mm", "h_post_mm", "h_body_mm",
           "expected_h_ant_mm", "expected_h_mid_mm", "expected_h_post_mm", "loss_ant", "loss_mid", "loss_post",
           "neighbours")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the tool."""
    defaults = RhlvParams()
    parser.add_argument("--mask", type=Path, required=True, metavar="MASK",
                        help="vertebra label map (VerSe or TotalSegmentator ids, any orientation and spacing)")
    parser.add_argument("--ctd", type=Path, metavar="CTD.json",
                        help="vertebra centroids (VerSe or the paper's JSON); default: centres of mass of the labels")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.csv", help="per-vertebra heights table")
    parser.add_argument("--spacing-mm", type=float, default=1.0, help="voxel size of the straightened grid (default 1)")
    parser.add_argument("--keep-arch", action="store_true",
                        help="measure whole labels (do not remove pedicles and posterior elements)")
    parser.add_argument("--central-fraction", type=float, default=defaults.central_fraction,
                        help="half-width of the measured LR band, share of the body width (default %(default)s)")
    parser.add_argument("--column-threshold", type=float, default=defaults.column_threshold,
                        help="drop columns lower than this share of the central column (default %(default)s)")


def measure_case(case: SpineCase, spacing_mm: float = 1.0, remove_arch: bool = True,
                 central_fraction: float = 0.2, column_threshold: float = 0.7) -> pd.DataFrame:
    """Heights table (columns :data:`COLUMNS`) of every vertebra of a case, cranial first.

    Raises:
        InputDataError: fewer than two vertebrae to draw the spine curve through.
    """
    if len(case.centroids) < 2:
        raise InputDataError(case.labels.path or case.case_id, f"{len(case.centroids)} vertebra(e) found",
                             "at least two are needed to straighten the spine")
    defaults = PreprocessParams()
    spine = prepare_spine(case.labels.array, case.labels.spacing_mm, case.centroids, spacing_mm=spacing_mm,
                          margin_mm=48.0, smoothing_mm=defaults.curve_smoothing_mm,
                          through_bodies=defaults.curve_through_bodies, remove_arch=remove_arch)
    measured = spine_heights(spine, central_fraction, column_threshold)
    rows = []
    nan = math.nan
    for vid in sorted(case.centroids, key=lambda v: float(spine.straight.centroids[v][0])):
        if vid not in measured:
            reason = spine.skipped.get(vid, "not measured")
            log.warning("%s: vertebra %s skipped: %s", case.case_id, vertebra_name(vid), reason)
            rows.append({"vertebra": vid, "name": vertebra_name(vid), "status": reason})
            continue
        result = measured[vid]
        expected = result.expected.as_tuple() if result.expected is not None else (nan, nan, nan)
        rows.append({
            "vertebra": vid, "name": vertebra_name(vid), "status": "ok",
            "h_ant_mm": result.heights.ant_mm, "h_mid_mm": result.heights.mid_mm,
            "h_post_mm": result.heights.post_mm, "h_body_mm": result.heights.body_mm,
            "expected_h_ant_mm": expected[0], "expected_h_mid_mm": expected[1], "expected_h_post_mm": expected[2],
            "loss_ant": result.loss_ant, "loss_mid": result.loss_mid, "loss_post": result.loss_post,
            "neighbours": " ".join(vertebra_name(n) for n in result.neighbours),
        })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def run(mask: Path, out: Path, ctd: Path | None = None, spacing_mm: float = 1.0, remove_arch: bool = True,
        central_fraction: float = 0.2, column_threshold: float = 0.7) -> pd.DataFrame:
    """Measure one label map and write the table to ``out`` (atomically); returns the table."""
    case = load_mask_case(mask, ctd, spacing_mm=None)  # native grid: straightening resamples once
    table = measure_case(case, spacing_mm, remove_arch, central_fraction, column_threshold)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.3f")
    log.info("%s: %d vertebrae measured, %d skipped -> %s", mask, int((table["status"] == "ok").sum()),
             int((table["status"] != "ok").sum()), out)
    return table


def execute(args: argparse.Namespace) -> None:
    """Run the tool from parsed arguments."""
    try:  # the same bounds as the rhlv parameters
        columns = RhlvParams(central_fraction=args.central_fraction, column_threshold=args.column_threshold)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"--{str(first['loc'][0]).replace('_', '-')}", first["msg"]) from None
    if args.spacing_mm <= 0:
        raise ConfigError("--spacing-mm", "must be positive")
    check_outputs(files=[args.out])
    run(args.mask, args.out, args.ctd, args.spacing_mm, not args.keep_arch, columns.central_fraction,
        columns.column_threshold)
