"""Stage 6, ``healthivert svm-fit``: the Genant-grade SVM on RHLV features, and on the mask-only baseline.

Writes ``svm.json`` (the RHLV model), ``baseline_svm.json`` (the same fit on the neighbour baseline's
losses, for comparison) and ``predictions.parquet`` (``case, vertebra, split, grade, predicted,
predicted_baseline``); the model is logged (and registered) in MLflow, and so is the grader bundle, as the
MLflow model ``healthivert-grader`` (:mod:`healthivert.inference.pyfunc`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from healthivert.config import Params
from healthivert.errors import ConfigError, InputDataError
from healthivert.io.tables import read_table
from healthivert.grading import GRADES, GradingResult, fit_grader
from healthivert.inference.bundle import write_bundle
from healthivert.io.atomic import atomic_dir, atomic_path
from healthivert.stages.common import add_metrics_argument, add_params_arguments, check_outputs, params_from_args, write_metrics
from healthivert.tracking.runs import stage_run

log = logging.getLogger(__name__)

MODEL_NAME = "svm.json"
BASELINE_MODEL_NAME = "baseline_svm.json"
PREDICTIONS_NAME = "predictions.parquet"
#: RHLV feature -> the mask-only baseline's counterpart (features without one are left out of the baseline).
BASELINE_COUNTERPARTS = {f"rhlv_{part}": f"baseline_loss_{part}" for part in ("ant", "mid", "post", "max")}
KEY_COLUMNS = ("case", "vertebra", "split", "grade")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``healthivert svm-fit``."""
    parser.add_argument("--rhlv", type=Path, required=True, metavar="FILE", help="rhlv.parquet of the rhlv stage")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    bundle = parser.add_argument_group("grader bundle (all three or none): what `healthivert grade` loads")
    bundle.add_argument("--coarse", type=Path, metavar="DIR", help="train-coarse's model folder (the classifier)")
    bundle.add_argument("--fine", type=Path, metavar="DIR", help="train-fine's model folder (the generators)")
    bundle.add_argument("--grader-out", type=Path, metavar="DIR", help="grader bundle folder (replaced whole)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    check_outputs(folders=[args.out], files=[args.metrics])
    with stage_run("svm-fit", params, ("svm_fit",)) as tracker:
        bundle_paths = (args.coarse, args.fine, args.grader_out)
        if any(p is not None for p in bundle_paths) and not all(p is not None for p in bundle_paths):
            raise ConfigError("--grader-out", "needs --coarse, --fine and --grader-out together")
        metrics = run(params, args.rhlv, args.out)
        if args.grader_out is not None:
            write_bundle(args.grader_out, params, args.coarse, args.fine, args.out, training_data(args.rhlv))
            tracker.log_artifacts(args.grader_out, "grader")  # grade --model runs:/<run id>/grader
            tracker.log_grader_model(args.grader_out, params.tracking.grader_model_name)
        tracker.log_metrics(metrics)
        tracker.log_artifact(args.out / PREDICTIONS_NAME)
        tracker.log_model_files(args.out / MODEL_NAME, "svm")
        if tracker.active:  # evaluate finds this run, and the grader version it registered, by the SVM it evaluates
            from healthivert.tracking.lineage import file_digest
            from healthivert.tracking.registry import SVM_DIGEST_TAG

            tracker.set_tags({SVM_DIGEST_TAG: file_digest(args.out / MODEL_NAME)})
    write_metrics(args.metrics, metrics)


def training_data(rhlv_table: Path) -> dict[str, object]:
    """What the models were trained on, as the grader bundle and its reports state it."""
    table = read_table(rhlv_table, "RHLV table", "run 'healthivert rhlv' first")
    truth = [c for c in table.columns if c.startswith("truth_loss_")]
    phantom = bool(truth) and bool(table[truth].notna().all(axis=None))
    return {"source": "synthetic phantoms (healthivert phantom)" if phantom else "scans with Genant grades",
            "cases": int(table["case"].nunique()), "vertebrae": int(len(table)),
            "splits": {str(k): int(v) for k, v in table["split"].value_counts().items()}}


def read_rhlv_table(path: Path, features: tuple[str, ...]) -> pd.DataFrame:
    """Read and check ``rhlv.parquet``: key columns, features, known grades and splits, unique vertebrae.

    Raises:
        InputDataError: a missing column, an unknown grade or split, a repeated vertebra, or a
            missing (NaN) feature.
    """
    table = read_table(path, "RHLV table", "run 'healthivert rhlv' first")
    missing = [c for c in (*KEY_COLUMNS, *features) if c not in table.columns]
    if missing:
        raise InputDataError(path, f"lacks column(s) {', '.join(missing)}",
                             "features must be columns of the RHLV table (svm_fit.features)")
    table = table.copy()
    table["grade"] = table["grade"].astype("Int64")
    unknown = table["grade"].notna() & ~table["grade"].isin(GRADES)
    if unknown.any():
        row = table[unknown].iloc[0]
        raise InputDataError(path, f"unknown grade {row['grade']} for {row['case']}_{row['vertebra']}",
                             "Genant grades are 0, 1, 2, 3 (NA when unknown)")
    bad_split = ~table["split"].isin(["train", "val", "test"])
    if bad_split.any():
        raise InputDataError(path, f"unknown split '{table.loc[bad_split, 'split'].iloc[0]}'", "expected train, val or test")
    repeated = table.duplicated(["case", "vertebra"])
    if repeated.any():
        row = table[repeated].iloc[0]
        raise InputDataError(path, f"{row['case']}_{row['vertebra']} listed twice")
    if "measurable" in table.columns:
        unmeasurable = ~table["measurable"].astype(bool)
        if unmeasurable.any():
            log.warning("%s: %d vertebra(e) without a measurable synthesis are not graded: %s", path,
                        int(unmeasurable.sum()), ", ".join(f"{r.case}_{r.vertebra}" for r in table[unmeasurable].itertuples()))
            table = table[~unmeasurable]
    nan = table[list(features)].isna().any(axis=1)
    if nan.any():
        row = table[nan].iloc[0]
        raise InputDataError(path, f"{row['case']}_{row['vertebra']} has no value for a feature of {list(features)}")
    return table


def generator_targets(table: pd.DataFrame, params: Params) -> pd.Series:
    """Rows whose vertebra was a training target of the generator: train split, grade <= the stages' target_max_grade."""
    max_grade = max(params.train_coarse.target_max_grade, params.train_fine.target_max_grade)
    return (table["split"] == "train") & table["grade"].notna() & (table["grade"] <= max_grade)


def _fit(table: pd.DataFrame, params: Params, features: tuple[str, ...], source: Path,
         learnt: pd.Series | None = None) -> GradingResult:
    train_grades = table.loc[(table["split"] == "train") & table["grade"].notna(), "grade"].unique()
    if len(train_grades) < 2:
        raise InputDataError(source, f"the train split has {len(train_grades)} distinct grade(s)",
                             "grading needs graded vertebrae of at least two grades in train")
    try:
        return fit_grader(table, params.svm_fit, features, learnt)
    except ValueError as exc:
        raise InputDataError(source, str(exc), "check the split of the data or svm_fit settings") from exc


def run(params: Params, rhlv_table: Path, out: Path) -> dict[str, float]:
    """Fit the RHLV grader and the baseline grader; write models and predictions.

    The RHLV grader leaves out the generator's training targets (``svm_fit.fit_on``,
    :func:`healthivert.grading.fit.fit_unseen`). The baseline is fitted on the vertebrae where it is
    defined (it needs a measured neighbour); the others get no baseline prediction.

    Returns:
        flat metrics: ``svm_*`` for RHLV features, ``baseline_*`` for the mask-only baseline.
    """
    features = tuple(params.svm_fit.features)
    table = read_rhlv_table(rhlv_table, features)
    result = _fit(table, params, features, rhlv_table, generator_targets(table, params))
    metrics = {f"svm_{key}": value for key, value in result.metrics.items()}
    predictions = result.predictions
    baseline_features = tuple(BASELINE_COUNTERPARTS[f] for f in features if f in BASELINE_COUNTERPARTS)
    baseline = None
    if baseline_features and all(c in table.columns for c in baseline_features):
        defined = table.dropna(subset=list(baseline_features))
        try:
            baseline = _fit(defined, params, baseline_features, rhlv_table)
        except InputDataError as exc:
            log.warning("mask-only baseline not fitted: %s", exc)
    metrics["baseline_available"] = float(baseline is not None)
    if baseline is not None:
        metrics.update({f"baseline_{key}": value for key, value in baseline.metrics.items()})
        merged = predictions.merge(baseline.predictions[["case", "vertebra", "predicted"]].rename(
            columns={"predicted": "predicted_baseline"}), on=["case", "vertebra"], how="left")
        predictions = merged.astype({"predicted_baseline": "Int64"})
        log.info("baseline fitted on %d of %d vertebrae", len(defined), len(table))
    with atomic_dir(out) as tmp:
        result.model.save(tmp / MODEL_NAME)
        if baseline is not None:
            baseline.model.save(tmp / BASELINE_MODEL_NAME)
        with atomic_path(tmp / PREDICTIONS_NAME) as path:
            predictions.to_parquet(path, index=False)
    headline = "test_macro_f1" if params.svm_fit.protocol == "holdout" else "cv_macro_f1"
    log.info("macro-F1 (%s): RHLV %.3f, baseline %s", headline, metrics[f"svm_{headline}"],
             f"{metrics[f'baseline_{headline}']:.3f}" if baseline is not None else "n/a")
    return {key: float(value) for key, value in metrics.items() if np.isfinite(value)}
