"""Evaluation: bootstrap by patient, generation scores, and ``rhlv -> svm-fit -> evaluate`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from healthivert.evaluation.floor import neighbour_oracle_rhlv, rhlv_floor_metrics
from healthivert.evaluation.generation import MAX_PSNR_DB, dice, generation_scores
from healthivert.evaluation.grading import bootstrap_scores, confusion_stack, macro_scores, paired_bootstrap_difference
from healthivert.config import CandidateGateParams
from healthivert.stages.common import nest_metrics
from healthivert.stages.evaluate import candidate_verdict, comparison_sentence
from healthivert.tracking.pipeline import flatten
from test_rhlv_stage import NO_PARAMS, main, write_crops, write_synthesis


def test_macro_scores_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 3, 200))
    _, stack = confusion_stack([f"p{i % 17}" for i in range(200)], y_true, y_pred)
    scores = macro_scores(stack.sum(axis=0))
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert scores["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro", zero_division=0))
    assert scores["macro_recall"] == pytest.approx(recall_score(y_true, y_pred, average="macro"))


def test_bootstrap_intervals_resample_patients() -> None:
    rng = np.random.default_rng(1)
    cases = [f"p{i // 8}" for i in range(160)]
    y_true = rng.integers(0, 4, 160)
    perfect = bootstrap_scores(cases, y_true, y_true, resamples=200)
    assert perfect["macro_f1"].value == 1.0 and perfect["macro_f1"].low == 1.0
    noisy_pred = np.where(rng.random(160) < 0.6, y_true, (y_true + 1) % 4)
    noisy = bootstrap_scores(cases, y_true, noisy_pred, resamples=500, seed=2)["macro_f1"]
    assert noisy.low < noisy.value < noisy.high
    assert 0.05 < noisy.high - noisy.low < 0.4
    # one patient's vertebrae move together: pooling 20 patients gives wider intervals than 160 independent ones
    independent = bootstrap_scores([f"q{i}" for i in range(160)], y_true, noisy_pred, resamples=500, seed=2)["macro_f1"]
    assert (noisy.high - noisy.low) >= 0.8 * (independent.high - independent.low)
    assert np.isnan(bootstrap_scores(cases, y_true, y_true, resamples=0)["macro_f1"].low)


def test_paired_bootstrap_of_the_difference_resamples_patients_together() -> None:
    rng = np.random.default_rng(2)
    cases = [f"p{i // 8}" for i in range(160)]
    y_true = rng.choice(4, size=160, p=[0.6, 0.2, 0.12, 0.08])
    noisy = np.where(rng.random(160) < 0.3, (y_true + 1) % 4, y_true)
    same = paired_bootstrap_difference(cases, y_true, noisy, noisy, resamples=200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    better = paired_bootstrap_difference(cases, y_true, y_true, noisy, resamples=200)
    f1 = bootstrap_scores(cases, y_true, noisy, resamples=200)["macro_f1"]
    assert better.value == pytest.approx(1.0 - f1.value)
    assert 0.0 < better.low <= better.value <= better.high
    # paired: narrower than the two methods' own intervals side by side
    assert better.high - better.low < (f1.high - f1.low) + 1e-12
    worse = paired_bootstrap_difference(cases, y_true, noisy, y_true, resamples=200)
    assert worse.high < 0.0


def test_comparison_sentence_states_the_paired_difference() -> None:
    metrics = {"grading.gan.n": 90.0, "grading.gan.macro_f1": 0.95, "grading.gan.macro_f1_ci_low": 0.9,
               "grading.gan.macro_f1_ci_high": 0.99, "grading.baseline.macro_f1": 0.8,
               "grading.baseline.macro_f1_ci_low": 0.7, "grading.baseline.macro_f1_ci_high": 0.92,
               "grading.gan_minus_baseline.macro_f1": 0.15, "grading.gan_minus_baseline.macro_f1_ci_low": 0.05,
               "grading.gan_minus_baseline.macro_f1_ci_high": 0.25}
    sentence = comparison_sentence(metrics, "test")
    assert "difference GAN - baseline is +0.15 (95 % CI +0.05 to +0.25): the GAN is better." in sentence
    metrics["grading.gan_minus_baseline.macro_f1_ci_low"] = -0.02
    assert "includes 0, so the difference is not conclusive" in comparison_sentence(metrics, "test")


@pytest.mark.parametrize("metrics, gate, passed, reason", [
    ({"grading.gan.macro_f1": 0.9, "grading.baseline.macro_f1": 0.7}, {}, True, "GAN macro-F1 0.900 >= min_macro_f1 0.800"),
    ({"grading.gan.macro_f1": 0.7, "grading.baseline.macro_f1": 0.6}, {}, False, "GAN macro-F1 0.700 < min_macro_f1 0.800"),
    ({"grading.gan.macro_f1": 0.85, "grading.baseline.macro_f1": 0.9}, {}, False,
     "GAN macro-F1 0.850 < the mask-only baseline's 0.900"),
    ({"grading.gan.macro_f1": 0.85, "grading.baseline.macro_f1": 0.9}, {"beat_baseline": False}, True, "0.850 >= min"),
    ({"grading.gan.macro_f1": 0.85}, {}, False, "no mask-only baseline grades"),
    ({}, {}, False, "no graded vertebrae"),
])
def test_candidate_gate(metrics: dict[str, float], gate: dict, passed: bool, reason: str) -> None:
    verdict = candidate_verdict(metrics, CandidateGateParams(**gate))
    assert verdict[0] == passed and reason in verdict[1] and "\n" not in verdict[1]


def test_dotted_metric_names_nest_in_order_and_flatten_back() -> None:
    flat = {"grading.gan.macro_f1": 0.9, "grading.gan.n": 3.0, "rhlv.mae.ant": 0.03, "candidate.passed": 1.0}
    nested = nest_metrics(flat)
    assert nested == {"grading": {"gan": {"macro_f1": 0.9, "n": 3.0}}, "rhlv": {"mae": {"ant": 0.03}},
                      "candidate": {"passed": 1.0}}
    assert list(flatten(nested)) == list(flat)
    with pytest.raises(ValueError, match="a value and a group"):
        nest_metrics({"rhlv.mae": 0.1, "rhlv.mae.ant": 0.2})


def test_generation_scores_of_a_perfect_and_a_short_synthesis() -> None:
    shape = (40, 24, 16)
    label = np.zeros(shape, dtype=bool)
    label[12:28, 4:20, 3:13] = True
    ct = np.where(label, 200.0, 40.0) + np.random.default_rng(0).normal(0, 3, shape)
    band = np.zeros(shape, dtype=np.uint8)
    band[8:32] = 1
    perfect = generation_scores(ct, ct, label, label, band, (1.0, 1.0, 1.0))
    assert perfect.psnr_db == MAX_PSNR_DB and perfect.ssim == pytest.approx(1.0) and perfect.dice == 1.0
    assert perfect.height_error_mm == 0.0
    short = label.copy()
    short[12:16] = False  # 4 of 16 rows missing
    scores = generation_scores(np.where(short, 200.0, 40.0), ct, short, label, band, (2.0, 1.0, 1.0))
    assert scores.height_error_mm == pytest.approx(-8.0)
    assert scores.dice == pytest.approx(dice(short, label)) == pytest.approx(2 * 12 / 28)
    assert scores.psnr_db < 30 and scores.ssim < 0.9


def _spine_truth(healthy: list[float], fractured: list[float], rhlv: list[float]) -> pd.DataFrame:
    """One patient's consecutive vertebrae 20, 21, ... with the same height in every third."""
    ids = list(range(20, 20 + len(healthy)))
    rows = []
    for i, (h, f, measured) in enumerate(zip(healthy, fractured, rhlv)):
        rows.append({"case": "sub-p00", "vertebra": ids[i], "above": ids[i - 1] if i else pd.NA,
                     "below": ids[i + 1] if i + 1 < len(ids) else pd.NA,
                     **{f"truth_healthy_h_{t}_mm": h for t in ("ant", "mid", "post")},
                     **{f"truth_h_{t}_mm": f for t in ("ant", "mid", "post")},
                     **{f"truth_loss_{t}": (h - f) / h for t in ("ant", "mid", "post")},
                     **{f"rhlv_{t}": measured for t in ("ant", "mid", "post")}})
    return pd.DataFrame(rows).astype({"above": "Int64", "below": "Int64"})


def test_the_neighbour_oracle_restores_from_the_two_neighbours_true_heights() -> None:
    # 21 is 2 mm taller than the mean of its neighbours and lost 5 mm; 22 lies on the line of its neighbours
    table = _spine_truth(healthy=[20.0, 24.0, 22.0, 20.0], fractured=[20.0, 19.0, 22.0, 20.0],
                         rhlv=[0.0, 0.25, 0.1, 0.0])
    oracle = neighbour_oracle_rhlv(table)
    assert oracle["vertebra"].tolist() == [21, 22]  # the ends have one neighbour only
    assert oracle["oracle_mid"].tolist() == pytest.approx([(21.0 - 19.0) / 21.0, 0.0])
    metrics = rhlv_floor_metrics(table)
    truth_21 = (24.0 - 19.0) / 24.0
    assert metrics["rhlv.floor.mae.ant"] == pytest.approx((abs(2.0 / 21.0 - truth_21) + 0.0) / 2)
    assert metrics["rhlv.floor.gan_mae.post"] == pytest.approx((abs(0.25 - truth_21) + 0.1) / 2)
    assert metrics["rhlv.floor.n"] == 2
    assert rhlv_floor_metrics(table.drop(columns=["truth_h_ant_mm"])) == {}  # scans without a phantom truth


def wedge_vertebrae(cases: int = 10, seed: int = 0) -> list[tuple[str, str, int, tuple[float, float, float]]]:
    """Three vertebrae per patient (grades 0, 2 and 3 in random order), splits 60/20/20 by patient.

    Heights are whole rows of 16, so losses come in steps of 1/16 and grade 1 (20-25 %) cannot be
    built; the ranges keep clear of the grade boundaries.
    """
    rng = np.random.default_rng(seed)
    ranges = {0: (0.0, 0.13), 2: (0.28, 0.37), 3: (0.45, 0.6)}
    out = []
    for case in range(cases):
        split = "train" if case < 0.6 * cases else "val" if case < 0.8 * cases else "test"
        for vertebra, grade in zip((20, 22, 24), rng.permutation([0, 2, 3])):
            loss = rng.uniform(*ranges[int(grade)])
            out.append((f"sub-p{case:02d}", split, vertebra, (loss, loss * rng.uniform(0.2, 0.6), 0.0)))
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    manifest = write_crops(root / "data", wedge_vertebrae())
    write_synthesis(root / "synth", manifest, root / "data")
    paths = {name: root / name for name in ("data", "synth", "rhlv", "svm", "reports")}
    assert main(["rhlv", "--data", str(paths["data"]), "--synth", str(paths["synth"]), "--out", str(paths["rhlv"]), *NO_PARAMS]) == 0
    assert main(["svm-fit", "--rhlv", str(paths["rhlv"] / "rhlv.parquet"), "--out", str(paths["svm"]), *NO_PARAMS]) == 0
    return paths


def evaluate_argv(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--data", str(paths["data"]), "--synth", str(paths["synth"]), "--rhlv", str(paths["rhlv"]),
            "--svm", str(paths["svm"]), "--out", str(out), "--set", "evaluate.bootstrap=200", *NO_PARAMS, *extra]


def test_evaluate_writes_metrics_plots_and_report(pipeline: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "reports"
    assert main(evaluate_argv(pipeline, out, "--metrics", str(tmp_path / "m.json"))) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads((tmp_path / "m.json").read_text())
    assert list(written)[:2] == ["grading", "rhlv"] and list(written["grading"]) == ["gan", "baseline", "gan_minus_baseline"]
    assert list(written["grading"]["gan"])[:3] == ["macro_f1", "macro_f1_ci_low", "macro_f1_ci_high"]
    metrics = flatten(written)  # the dotted names MLflow gets
    predictions = pd.read_parquet(pipeline["svm"] / "predictions.parquet").query("split == 'test'")
    assert metrics["grading.gan.macro_f1"] == pytest.approx(
        f1_score(predictions["grade"].astype(int), predictions["predicted"].astype(int), average="macro"))
    assert metrics["grading.gan.macro_f1"] >= 0.9
    assert metrics["grading.gan.macro_f1_ci_low"] <= metrics["grading.gan.macro_f1"] <= metrics["grading.gan.macro_f1_ci_high"]
    assert "grading.baseline.macro_f1" in metrics
    low, high = metrics["grading.gan_minus_baseline.macro_f1_ci_low"], metrics["grading.gan_minus_baseline.macro_f1_ci_high"]
    assert low <= metrics["grading.gan_minus_baseline.macro_f1"] <= high
    assert metrics["source.drawn.grading.gan.n"] == metrics["grading.gan.n"]  # the fixture's cases are all drawn
    assert metrics["source.drawn.rhlv.mae.ant"] == metrics["rhlv.mae.ant"]
    # a perfect synthesis (the healthy truth) scores perfectly against the healthy truth
    assert metrics["generation.healthy.dice"] == 1.0 and metrics["generation.healthy.height_error_mm"] == 0.0
    assert metrics["generation.fractured.dice"] == 1.0
    assert metrics["rhlv.mae.ant"] == pytest.approx(0.0, abs=1e-9)
    passed = metrics["grading.gan.macro_f1"] >= max(0.8, metrics["grading.baseline.macro_f1"])
    assert metrics["candidate.passed"] == float(passed)
    confusion = pd.read_csv(out / "plots" / "confusion_gan.csv")
    assert set(confusion.columns) >= {"actual", "predicted"} and len(confusion) == 6  # 2 test patients
    assert set(pd.read_csv(out / "plots" / "rhlv_vs_truth.csv")["third"]) == {"ant", "mid", "post"}
    assert (out / "figures" / "confusion.png").is_file() and (out / "figures" / "rhlv_vs_truth.png").is_file()
    report = (out / "report.html").read_text()
    assert "Research use, not for diagnosis." in report
    assert report.count("data:image/png;base64,") == 2 + 6
    assert "mask-only neighbour baseline" in report and "macro-F1" in report
    assert ("candidate gate (registry alias)</th><td class='num'>" + ("passed: " if passed else "not passed: ")) in report
    assert "src=\"http" not in report  # self-contained


def _unknown_case(svm: Path) -> None:
    predictions = pd.read_parquet(svm / "predictions.parquet")
    predictions.loc[0, "case"] = "sub-stranger"
    predictions.to_parquet(svm / "predictions.parquet")


def _no_predicted_column(svm: Path) -> None:
    pd.read_parquet(svm / "predictions.parquet").drop(columns=["predicted"]).to_parquet(svm / "predictions.parquet")


def _edited_model(svm: Path) -> None:
    content = json.loads((svm / "svm.json").read_text())
    content["classes"] = [0, 1, 2, 3][: len(content["classes"])][::-1]
    (svm / "svm.json").write_text(json.dumps(content))


@pytest.mark.parametrize("damage, message", [
    (_unknown_case, "predictions.parquet: vertebra sub-stranger_"),
    (_no_predicted_column, "predictions.parquet: predictions lacks column(s) predicted"),
    (_edited_model, "svm.json: content does not match its SHA-256"),
])
def test_bad_svm_outputs_are_refused_in_one_line(pipeline: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], damage, message: str) -> None:
    svm = tmp_path / "svm"
    svm.mkdir()
    for name in ("svm.json", "predictions.parquet"):
        (svm / name).write_bytes((pipeline["svm"] / name).read_bytes())
    damage(svm)
    assert main(evaluate_argv({**pipeline, "svm": svm}, tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_kubeflow_step_gets_the_grouped_metrics_by_their_dotted_names(pipeline: dict[str, Path], tmp_path: Path) -> None:
    from healthivert.stages.submit import run_step

    class Sink:  # what a KFP Metrics artifact offers a step
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metric(self, name: str, value: float) -> None:
            self.logged[name] = value

    sink = Sink()
    command = evaluate_argv(pipeline, tmp_path / "out")[:11]  # the subcommand and its paths
    metrics = run_step(command, json.dumps({"evaluate": {"bootstrap": 50}}), tracking_uri="", metrics_out=sink)
    assert sink.logged == metrics and list(metrics)[0] == "grading.gan.macro_f1"
    assert metrics == flatten(json.loads((tmp_path / "out" / "metrics.json").read_text()))
