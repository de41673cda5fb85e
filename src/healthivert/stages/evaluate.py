"""Stage 7, ``healthivert evaluate``: generation and grading quality, plots and the clinician's report.

Writes into ``--out``: ``metrics.json`` (for ``dvc metrics``), ``plots/`` (CSV data for
``dvc plots``: per-vertebra true/predicted grades, RHLV against the truth), ``figures/`` (PNG) and
``report.html`` (self-contained). Grading is reported on the split the SVM did not see: ``test``
under the ``holdout`` protocol, ``val`` under ``reference_cv``.

Metric names are dotted groups, headline first: ``grading.<gan|baseline>.macro_f1`` (with
``_ci_low``/``_ci_high``), ``grading.gan_minus_baseline.*``, ``rhlv.mae.<third>``,
``rhlv.floor.*`` (phantoms: :mod:`healthivert.evaluation.floor`), ``generation.<healthy|fractured>.*``,
``candidate.passed``, then ``source.<source>.*`` (the same per
phantom source). MLflow gets them by these names; the JSON files nest them (``{"grading": {"gan":
{"macro_f1": ...}}}``), which ``dvc metrics show`` prints as ``grading.gan.macro_f1``.

With tracking on, the stage also copies the headline metrics to the pipeline run, logs the dataset
on it, and sets the registry alias ``candidate`` on the grader this pipeline's svm-fit registered
when the run passes ``evaluate.candidate_gate``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from healthivert.config import CandidateGateParams, Params
from healthivert.data.manifest import crop_name, read_manifest, resolve
from healthivert.errors import InputDataError
from healthivert.io.tables import read_table
from healthivert.evaluation.figures import confusion_figure, figure_png, rhlv_truth_figure, vertebra_panel
from healthivert.evaluation.floor import rhlv_floor_metrics
from healthivert.evaluation.generation import GenerationScores, generation_scores
from healthivert.evaluation.grading import bootstrap_scores, paired_bootstrap_difference
from healthivert.evaluation.report import ReportContent, VertebraEntry, grade_recall_text, render_report
from healthivert.grading import grade_confusion, grade_metrics, load_model
from healthivert.io.atomic import atomic_dir, atomic_path, write_text_atomic
from healthivert.io.nifti import check_same_grid, load_volume
from healthivert.rhlv import height_loss_map
from healthivert.stages.common import (
    add_metrics_argument, add_params_arguments, check_outputs, log_manifest_dataset, nest_metrics, params_from_args,
    write_metrics)
from healthivert.synthesis.index import read_index
from healthivert.tracking.runs import StageTracker, stage_run

log = logging.getLogger(__name__)

METHODS = {"gan": ("predicted", "HealthiVert-GAN (RHLV)"), "baseline": ("predicted_baseline", "mask-only neighbour baseline")}
THIRDS = ("ant", "mid", "post")
#: the RHLV grader in svm-fit's output folder.
SVM_NAME = "svm.json"
#: grading scores in the order the metrics list them (the rest of :func:`grade_metrics` follows).
LEADING_SCORES = ("macro_f1", "macro_precision", "macro_recall")
#: what the pipeline run carries, for the MLflow runs table and compare view (stage times come from stage_run).
HEADLINE_METRICS = (
    *(f"grading.{method}.macro_f1{suffix}" for method in ("gan", "baseline", "gan_minus_baseline")
      for suffix in ("", "_ci_low", "_ci_high")),
    *(f"rhlv.mae.{third}" for third in THIRDS),
    "generation.healthy.dice", "generation.healthy.height_error_mm",
    "generation.fractured.dice", "generation.fractured.height_error_mm",
    "candidate.passed",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``healthivert evaluate``."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocessed folder (manifest.parquet)")
    parser.add_argument("--synth", type=Path, required=True, metavar="DIR", help="synthesis output folder")
    parser.add_argument("--rhlv", type=Path, required=True, metavar="DIR", help="rhlv stage output folder")
    parser.add_argument("--svm", type=Path, required=True, metavar="DIR", help="svm-fit stage output folder")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    check_outputs(folders=[args.out], files=[args.metrics])
    with stage_run("evaluate", params, ("evaluate",)) as tracker:
        metrics = run(params, args.data, args.synth, args.rhlv, args.svm, args.out)
        tracker.log_metrics(metrics)
        tracker.log_artifact(args.out / "report.html")
        tracker.log_artifacts(args.out / "figures", "figures")
        publish(tracker, params, metrics, args.data, args.svm)
    write_metrics(args.metrics, nest_metrics(metrics))


def publish(tracker: StageTracker, params: Params, metrics: dict[str, float], data: Path, svm_dir: Path) -> None:
    """What the pipeline run shows: headline metrics, the dataset, the gate's verdict; the ``candidate`` alias.

    The alias goes on the grader version registered by the svm-fit run that wrote the SVM in ``svm_dir``
    (:mod:`healthivert.tracking.registry`), when the run passes ``evaluate.candidate_gate``.
    """
    if not tracker.active:
        return
    tracker.log_parent_metrics({key: metrics[key] for key in HEADLINE_METRICS if key in metrics})
    log_manifest_dataset(tracker, data, params.data.source, "evaluate")
    passed, reason = candidate_verdict(metrics, params.evaluate.candidate_gate)
    verdict = f"{'passed' if passed else 'not passed'}: {reason}"
    if passed and params.tracking.register_models:
        from healthivert.tracking.lineage import file_digest

        version = tracker.promote_grader(params.tracking.grader_model_name, file_digest(svm_dir / SVM_NAME), reason)
        verdict += (f"; {params.tracking.grader_model_name} version {version} is @candidate" if version
                    else "; no registered grader of this SVM to mark")
    tracker.set_tags({"healthivert.candidate": verdict})
    tracker.set_parent_tags({"healthivert.candidate": verdict})
    log.info("candidate gate %s", verdict)


def candidate_verdict(metrics: dict[str, float], gate: CandidateGateParams) -> tuple[bool, str]:
    """Whether the grader passes the gate for the ``candidate`` alias, and why (one line).

    Passing needs the GAN's macro-F1 at least ``gate.min_macro_f1`` and, with ``gate.beat_baseline``,
    at least the mask-only baseline's (a missing baseline fails: nothing to compare with).
    """
    gan = metrics.get("grading.gan.macro_f1")
    if gan is None:
        return False, "no graded vertebrae in the evaluated split"
    if gan < gate.min_macro_f1:
        return False, f"GAN macro-F1 {gan:.3f} < min_macro_f1 {gate.min_macro_f1:.3f}"
    if not gate.beat_baseline:
        return True, f"GAN macro-F1 {gan:.3f} >= min_macro_f1 {gate.min_macro_f1:.3f}"
    baseline = metrics.get("grading.baseline.macro_f1")
    if baseline is None:
        return False, "no mask-only baseline grades to compare with (beat_baseline is on)"
    if gan < baseline:
        return False, f"GAN macro-F1 {gan:.3f} < the mask-only baseline's {baseline:.3f}"
    return True, f"GAN macro-F1 {gan:.3f} >= min_macro_f1 {gate.min_macro_f1:.3f} and >= the baseline's {baseline:.3f}"


# ------------------------------------------------------------------------------------------ inputs
def _read_table(path: Path, what: str, hint: str, columns: tuple[str, ...]) -> pd.DataFrame:
    table = read_table(path, what, hint)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputDataError(path, f"{what} lacks column(s) {', '.join(missing)}", hint)
    return table


def _check_ids(table: pd.DataFrame, known: set[tuple[str, int]], path: Path) -> None:
    ids = list(zip(table["case"], table["vertebra"].astype(int)))
    unknown = [key for key in ids if key not in known]
    if unknown:
        raise InputDataError(path, f"vertebra {crop_name(*unknown[0])} is not in the manifest",
                             f"{len(unknown)} unknown; were the stages run on different data?")
    missing = known - set(ids)
    if missing:
        raise InputDataError(path, f"vertebra {crop_name(*sorted(missing)[0])} of the manifest is missing",
                             f"{len(missing)} missing; rerun the stage on this data")


def load_inputs(data: Path, synth: Path, rhlv_dir: Path, svm_dir: Path) -> tuple[pd.DataFrame, str]:
    """The manifest joined with RHLV, predictions and synthesised paths, and the protocol of the SVM.

    Raises:
        InputDataError: a table is missing or unreadable, or lists vertebrae the manifest does not.
    """
    manifest = read_manifest(data)
    known = set(zip(manifest["case"], manifest["vertebra"].astype(int)))
    index = read_index(synth)
    _check_ids(index, known, synth / "index.parquet")
    rhlv = _read_table(rhlv_dir / "rhlv.parquet", "RHLV table", "run 'healthivert rhlv' first",
                       ("case", "vertebra", "rhlv_ant", "rhlv_mid", "rhlv_post", "rhlv_body"))
    _check_ids(rhlv, known, rhlv_dir / "rhlv.parquet")
    predictions = _read_table(svm_dir / "predictions.parquet", "predictions", "run 'healthivert svm-fit' first",
                              ("case", "vertebra", "predicted"))
    _check_ids(predictions, known, svm_dir / "predictions.parquet")
    protocol = str(load_model(svm_dir / SVM_NAME).info.get("protocol", "holdout"))
    rhlv_columns = [c for c in rhlv.columns
                    if c.startswith(("rhlv_", "baseline_loss_", "h_syn_", "h_ori_")) or c == "shape_ratio"]
    table = manifest.merge(rhlv[["case", "vertebra", *rhlv_columns]], on=["case", "vertebra"])
    prediction_columns = [c for c in ("predicted", "predicted_baseline") if c in predictions.columns]
    table = table.merge(predictions[["case", "vertebra", *prediction_columns]], on=["case", "vertebra"])
    table = table.merge(index[["case", "vertebra", "ct_path", "label_path"]].rename(
        columns={"ct_path": "syn_ct_path", "label_path": "syn_label_path"}), on=["case", "vertebra"])
    return table, protocol


# ------------------------------------------------------------------------------------------ grading
def grading_metrics(table: pd.DataFrame, resamples: int, seed: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Grading metrics with bootstrap intervals (``grading.<method>.<score>[_ci_low|_ci_high]``, and
    ``grading.gan_minus_baseline.macro_f1*``), and confusion matrices, per method.

    Args:
        table: the evaluated vertebrae with ``case, grade, predicted[, predicted_baseline]``.
    """
    metrics: dict[str, float] = {}
    confusions: dict[str, np.ndarray] = {}
    for method, (column, label) in METHODS.items():
        if column not in table.columns:
            continue
        rows = table[table["grade"].notna() & table[column].notna()]
        if rows.empty:
            continue
        y_true, y_pred = rows["grade"].to_numpy(dtype=np.int64), rows[column].to_numpy(dtype=np.int64)
        scores = grade_metrics(y_true, y_pred)
        intervals = bootstrap_scores(rows["case"].tolist(), y_true, y_pred, resamples, seed)
        for key in (*LEADING_SCORES, *(k for k in scores if k not in LEADING_SCORES)):
            metrics[f"grading.{method}.{key}"] = scores[key]
            if key in intervals:
                metrics[f"grading.{method}.{key}_ci_low"] = intervals[key].low
                metrics[f"grading.{method}.{key}_ci_high"] = intervals[key].high
        confusions[label] = grade_confusion(y_true, y_pred)
    if all(column in table.columns for column, _ in METHODS.values()):
        rows = table[table["grade"].notna() & table["predicted"].notna() & table["predicted_baseline"].notna()]
        if not rows.empty:
            difference = paired_bootstrap_difference(
                rows["case"].tolist(), rows["grade"].to_numpy(dtype=np.int64), rows["predicted"].to_numpy(dtype=np.int64),
                rows["predicted_baseline"].to_numpy(dtype=np.int64), resamples, seed)
            metrics["grading.gan_minus_baseline.macro_f1"] = difference.value
            metrics["grading.gan_minus_baseline.macro_f1_ci_low"] = difference.low
            metrics["grading.gan_minus_baseline.macro_f1_ci_high"] = difference.high
    return metrics, confusions


def source_metrics(table: pd.DataFrame, evaluated: pd.DataFrame, resamples: int, seed: int) -> dict[str, float]:
    """Grading (on the evaluated split) and RHLV error (on every vertebra with truth) of each phantom source.

    Keys are ``source.<source>.<metric>`` with ``<source>`` ``drawn`` or ``real_shape`` (``-`` as ``_``).
    """
    metrics: dict[str, float] = {}
    for source in sorted(table["source"].dropna().unique()):
        prefix = f"source.{str(source).replace('-', '_')}."
        grading, _ = grading_metrics(evaluated[evaluated["source"] == source], resamples, seed)
        metrics |= {prefix + key: value for key, value in grading.items()}
        rows = table[table["source"] == source]
        metrics |= {prefix + key: value for key, value in (rhlv_errors(rows) | rhlv_floor_metrics(rows)).items()}
    return metrics


def rhlv_errors(table: pd.DataFrame) -> dict[str, float]:
    """``rhlv.mae.<third>``: mean absolute difference between the GAN's RHLV and the true loss, over
    vertebrae with truth (``rhlv.n`` of them)."""
    truth = table.dropna(subset=[f"truth_loss_{t}" for t in THIRDS])
    if truth.empty:
        return {}
    metrics = {f"rhlv.mae.{third}": float(np.mean(np.abs(truth[f"rhlv_{third}"] - truth[f"truth_loss_{third}"])))
               for third in THIRDS}
    return metrics | {"rhlv.n": float(len(truth))}


def comparison_sentence(metrics: dict[str, float], split: str) -> str:
    """How the GAN and the mask-only baseline compare, in words, with the bootstrap intervals."""
    def describe(method: str) -> str:
        score = f"{metrics[f'grading.{method}.macro_f1']:.2f}"
        if f"grading.{method}.macro_f1_ci_low" not in metrics:
            return score
        return (f"{score} (95 % CI {metrics[f'grading.{method}.macro_f1_ci_low']:.2f}"
                f"-{metrics[f'grading.{method}.macro_f1_ci_high']:.2f})")

    if "grading.gan.macro_f1" not in metrics:
        return f"No graded vertebrae in the {split} split: grading quality cannot be measured."
    text = (f"On the {int(metrics['grading.gan.n'])} graded {split} vertebrae, grading from the GAN's RHLV "
            f"reached macro-F1 {describe('gan')}")
    if "grading.baseline.macro_f1" not in metrics:
        return text + "; the mask-only baseline was not available."
    nan = float("nan")  # without bootstrap intervals neither method is "clearly" better
    gan_low, base_high = metrics.get("grading.gan.macro_f1_ci_low", nan), metrics.get("grading.baseline.macro_f1_ci_high", nan)
    base_low, gan_high = metrics.get("grading.baseline.macro_f1_ci_low", nan), metrics.get("grading.gan.macro_f1_ci_high", nan)
    if gan_low > base_high:
        verdict = "the GAN is clearly better (the intervals do not overlap)"
    elif base_low > gan_high:
        verdict = "the baseline is clearly better (the intervals do not overlap)"
    else:
        better = "GAN" if metrics["grading.gan.macro_f1"] >= metrics["grading.baseline.macro_f1"] else "baseline"
        verdict = f"the {better} scores higher, but the intervals overlap, so the difference is not conclusive"
    sentence = f"{text}, against {describe('baseline')} for the mask-only neighbour baseline: {verdict}."
    key = "grading.gan_minus_baseline.macro_f1"
    if f"{key}_ci_low" in metrics:
        low, high = metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]
        conclusion = ("the GAN is better" if low > 0 else "the baseline is better" if high < 0
                      else "the interval includes 0, so the difference is not conclusive")
        sentence += (f" Paired by patient, the difference GAN - baseline is {metrics[key]:+.2f} "
                     f"(95 % CI {low:+.2f} to {high:+.2f}): {conclusion}.")
    return sentence


# --------------------------------------------------------------------------------------- generation
def _generation_row(row: pd.Series, data: Path) -> tuple[GenerationScores, str]:
    """Scores of one synthesised vertebra against the healthy truth (phantoms) or its own (real) crop."""
    has_truth = not pd.isna(row["healthy_label_path"]) and not pd.isna(row["healthy_ct_path"])
    ct_column, label_column = ("healthy_ct_path", "healthy_label_path") if has_truth else ("ct_path", "label_path")
    ref_ct = load_volume(resolve(data, row[ct_column]))
    ref_label = load_volume(resolve(data, row[label_column]), label=True)
    syn_ct = load_volume(row["syn_ct_path"])
    syn_label = load_volume(row["syn_label_path"], label=True)
    band = load_volume(resolve(data, row["mask_path"]), label=True)
    for volume in (ref_label, syn_ct, syn_label, band):
        check_same_grid(ref_ct, volume)
    vertebra = int(row["vertebra"])
    scores = generation_scores(syn_ct.array, ref_ct.array, syn_label.array == vertebra, ref_label.array == vertebra,
                               band.array, ref_ct.spacing_mm)
    return scores, "healthy truth" if has_truth else "original"


def generation_metrics(table: pd.DataFrame, data: Path) -> dict[str, float]:
    """Mean PSNR, SSIM, Dice and absolute height error over the healthy vertebrae (grade 0) of ``table``.

    Where the phantom truth exists, the fractured vertebrae are also scored against their healthy
    truth (``generation.fractured.*``): how well the fracture was undone.
    """
    groups: dict[str, list[GenerationScores]] = {"healthy": [], "fractured": []}
    references = set()
    for _, row in tqdm(table.iterrows(), total=len(table), desc="generation", unit="vertebra", disable=None):
        if pd.isna(row["grade"]):
            continue
        group = "healthy" if row["grade"] == 0 else "fractured"
        if group == "fractured" and pd.isna(row["healthy_label_path"]):
            continue
        scores, reference = _generation_row(row, data)
        groups[group].append(scores)
        references.add(reference)
    metrics: dict[str, float] = {}
    for group, scores in groups.items():
        if not scores:
            continue
        prefix = f"generation.{group}."
        metrics[prefix + "dice"] = float(np.mean([s.dice for s in scores]))
        metrics[prefix + "height_error_mm"] = float(np.mean([abs(s.height_error_mm) for s in scores]))
        metrics[prefix + "height_bias_mm"] = float(np.mean([s.height_error_mm for s in scores]))
        metrics[prefix + "psnr_db"] = float(np.mean([s.psnr_db for s in scores]))
        metrics[prefix + "ssim"] = float(np.mean([s.ssim for s in scores]))
        metrics[prefix + "n"] = float(len(scores))
    if references:
        log.info("generation scored against the %s", " and ".join(sorted(references)))
    return metrics


# ------------------------------------------------------------------------------------------ report
def _vertebra_entry(row: pd.Series, data: Path) -> VertebraEntry:
    vertebra = int(row["vertebra"])
    original_ct = load_volume(resolve(data, row["ct_path"]))
    original_label = load_volume(resolve(data, row["label_path"]), label=True).array == vertebra
    synthesised_ct = load_volume(row["syn_ct_path"]).array
    synthesised_label = load_volume(row["syn_label_path"], label=True).array == vertebra
    lr = np.flatnonzero(original_label.any(axis=(0, 1)))
    k = int((lr[0] + lr[-1]) // 2)
    loss_map = height_loss_map(synthesised_label, original_label, original_ct.spacing_mm)
    panel = vertebra_panel(original_ct.array[:, :, k], synthesised_ct[:, :, k], original_label[:, :, k],
                           synthesised_label[:, :, k], loss_map, original_ct.spacing_mm,
                           f"{row['case']} {row['name']} ({row['split']})")
    baseline = row.get("predicted_baseline")
    return VertebraEntry(
        title=f"{row['case']} {row['name']} ({row['split']} split)",
        true_grade=None if pd.isna(row["grade"]) else int(row["grade"]),
        predicted=int(row["predicted"]),
        predicted_baseline=None if baseline is None or pd.isna(baseline) else int(baseline),
        rhlv=(float(row["rhlv_ant"]), float(row["rhlv_mid"]), float(row["rhlv_post"]), float(row["rhlv_body"])),
        panel_png=figure_png(panel),
    )


def _report_selection(table: pd.DataFrame, count: int) -> pd.DataFrame:
    """The vertebrae shown in the report: misgraded first, then by severity."""
    ranked = table.assign(
        _wrong=(table["grade"].notna() & (table["grade"] != table["predicted"])).astype(int),
        _severity=table[["grade", "predicted"]].max(axis=1).fillna(0))
    return ranked.sort_values(["_wrong", "_severity", "case", "vertebra"], ascending=[False, False, True, True]).head(count)


def _write_plot_data(folder: Path, evaluated: pd.DataFrame, truth: pd.DataFrame) -> None:
    """``confusion_<method>.csv`` (actual, predicted per evaluated vertebra) and ``rhlv_vs_truth.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    for method, (column, _) in METHODS.items():
        if column in evaluated.columns:
            rows = evaluated[evaluated["grade"].notna() & evaluated[column].notna()]
            data = pd.DataFrame({"case": rows["case"], "vertebra": rows["vertebra"],
                                 "actual": rows["grade"].astype(int), "predicted": rows[column].astype(int)})
            with atomic_path(folder / f"confusion_{method}.csv") as path:
                data.to_csv(path, index=False)
    if len(truth):
        long = pd.concat([pd.DataFrame({
            "case": truth["case"], "vertebra": truth["vertebra"], "third": third,
            "truth_loss": truth[f"truth_loss_{third}"], "rhlv": truth[f"rhlv_{third}"],
            **({"baseline_loss": truth[f"baseline_loss_{third}"]} if f"baseline_loss_{third}" in truth else {}),
        }) for third in THIRDS])
        with atomic_path(folder / "rhlv_vs_truth.csv") as path:
            long.to_csv(path, index=False)


def _score_with_interval(metrics: dict[str, float], key: str) -> str:
    """``"0.912 (0.80-0.98)"``: a score and its bootstrap interval."""
    low, high = metrics.get(f"{key}_ci_low", np.nan), metrics.get(f"{key}_ci_high", np.nan)
    return f"{metrics[key]:.3f} ({low:.2f}-{high:.2f})"


def _generation_text(metrics: dict[str, float], group: str) -> str:
    """One line of generation scores of a group (``healthy``: against the healthy reference,
    ``fractured``: against the phantom's healthy truth)."""
    prefix = f"generation.{group}."
    return (f"PSNR {metrics[prefix + 'psnr_db']:.1f} dB, SSIM {metrics[prefix + 'ssim']:.3f}, "
            f"Dice {metrics[prefix + 'dice']:.3f}, |height error| {metrics[prefix + 'height_error_mm']:.2f} mm "
            f"(bias {metrics[prefix + 'height_bias_mm']:+.2f} mm)")


def _floor_text(metrics: dict[str, float]) -> str:
    """The GAN's RHLV MAE beside the neighbour oracle's (:mod:`healthivert.evaluation.floor`), per third."""
    def thirds(kind: str) -> str:
        return " / ".join(f"{metrics[f'rhlv.floor.{kind}.{third}']:.3f}" for third in THIRDS)

    return (f"RHLV MAE (anterior / middle / posterior) of the GAN {thirds('gan_mae')}; restoring each vertebra "
            f"from its two neighbours' true fracture-free heights {thirds('mae')} (what its neighbours cannot tell)")


def run(params: Params, data: Path, synth: Path, rhlv_dir: Path, svm_dir: Path, out: Path) -> dict[str, float]:
    """Evaluate the pipeline's outputs and write metrics, plot data, figures and the report.

    Returns:
        metrics under dotted names, headline first (see the module docstring).
    """
    settings = params.evaluate
    table, protocol = load_inputs(data, synth, rhlv_dir, svm_dir)
    split = "test" if protocol == "holdout" else "val"
    evaluated = table[table["split"] == split]
    metrics, confusions = grading_metrics(evaluated, settings.bootstrap, settings.seed)
    truth = table.dropna(subset=[f"truth_loss_{t}" for t in THIRDS])
    metrics.update(rhlv_errors(table))
    metrics.update(rhlv_floor_metrics(table))
    metrics.update(generation_metrics(evaluated, data))
    metrics = {key: float(value) for key, value in metrics.items() if np.isfinite(value)}
    passed, reason = candidate_verdict(metrics, settings.candidate_gate)
    metrics["candidate.passed"] = float(passed)
    metrics.update({key: float(value) for key, value in source_metrics(table, evaluated, settings.bootstrap, settings.seed).items()
                    if np.isfinite(value)})

    figures: dict[str, tuple[str, bytes]] = {}  # file name -> (caption, PNG)
    if confusions:
        figures["confusion.png"] = (f"Confusion matrices of the Genant grades, {split} split (rows: annotated grade)",
                                    figure_png(confusion_figure(confusions)))
    if len(truth):
        figures["rhlv_vs_truth.png"] = ("Measured height loss against the phantom's true loss, per third (all vertebrae)",
                                        figure_png(rhlv_truth_figure(truth)))
    entries = [_vertebra_entry(row, data) for _, row in tqdm(
        _report_selection(evaluated, settings.report_vertebrae).iterrows(), desc="report", unit="vertebra", disable=None)]
    grading_rows = [(label, *(_score_with_interval(metrics, f"grading.{method}.{key}")
                              for key in ("macro_precision", "macro_recall", "macro_f1")),
                     grade_recall_text(metrics, f"grading.{method}."))
                    for method, (_, label) in METHODS.items() if f"grading.{method}.macro_f1" in metrics]
    grading_rows += [(f"{label}, {source} cases only (n={int(metrics[f'source.{key}.grading.{method}.n'])})",
                      *(_score_with_interval(metrics, f"source.{key}.grading.{method}.{score}")
                        for score in ("macro_precision", "macro_recall", "macro_f1")),
                      grade_recall_text(metrics, f"source.{key}.grading.{method}."))
                     for source, key in (("drawn", "drawn"), ("real-shape", "real_shape"))
                     for method, (_, label) in METHODS.items() if f"source.{key}.grading.{method}.macro_f1" in metrics]
    generation_rows = [(f"{group} vertebrae (n={int(metrics[f'generation.{group}.n'])})", _generation_text(metrics, group))
                       for group in ("healthy", "fractured") if f"generation.{group}.n" in metrics]
    if "rhlv.floor.n" in metrics:
        generation_rows.append((f"RHLV error floor (n={int(metrics['rhlv.floor.n'])})", _floor_text(metrics)))
    graded = table["grade"].notna()
    content = ReportContent(
        summary=[("patients", str(table["case"].nunique())), ("vertebrae", str(len(table))),
                 ("fractured (annotated grade >= 1)", str(int((table.loc[graded, "grade"] >= 1).sum()))),
                 (f"vertebrae in the evaluated split ({split})", str(len(evaluated))),
                 ("grading protocol", protocol),
                 ("candidate gate (registry alias)", f"{'passed' if passed else 'not passed'}: {reason}")],
        comparison=comparison_sentence(metrics, split),
        grading_rows=grading_rows, generation_rows=generation_rows,
        figures=dict(figures.values()), vertebrae=entries)
    with atomic_dir(out) as tmp:
        write_text_atomic(tmp / "report.html", render_report(content))
        write_text_atomic(tmp / "metrics.json", json.dumps(nest_metrics(metrics), indent=2) + "\n")
        _write_plot_data(tmp / "plots", evaluated, truth)
        (tmp / "figures").mkdir()
        for name, (_, png) in figures.items():
            (tmp / "figures" / name).write_bytes(png)
    log.info("%s", content.comparison)
    return metrics
