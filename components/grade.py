"""Kubeflow Pipelines v2 components of the cohort-grading pipeline (``pipelines/grade_pipeline.py``).

Each function hands its parameters and artifact paths to one function of
:mod:`healthivert.inference.cohort` (the same ones ``healthivert grade-cohort`` runs): list the cases,
grade one case, gather the cohort. They become lightweight components on the project's image (the
image of the training pipeline, which holds the package) by :func:`build_grade_components`.
"""

from collections.abc import Callable
from dataclasses import dataclass

from kfp.dsl import Dataset, Input, Markdown, Metrics, Output

from components.stages import on_image


def list_cases(cases: list, prefix: str) -> list:
    """One entry per scan of ``cases`` (locations or file mappings) and ``prefix``, each a JSON string (the
    loop items: strings pass between steps on every backend); a location without cases gives an entry carrying the reason."""
    import json

    from healthivert.inference.cohort import list_cases as listing

    return [json.dumps(entry) for entry in listing([*cases, prefix])]


def grade_case(entry: str, grader_uri: str, output_uri: str, mlflow_uri: str, graded: Output[Dataset]):
    """Grade one scan into ``graded`` (its folder and record), copied under ``output_uri`` when given; a bad scan gives a failure record."""
    import json
    import os

    from healthivert.inference.cohort import grade_entry, load_grader

    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri  # a models:/ grader URI is read from this store
    record = grade_entry(json.loads(entry), load_grader(grader_uri), graded.path, target=output_uri,
                         link_base=graded.uri)
    graded.metadata["case"], graded.metadata["status"] = record["case"], record["status"]


def gather_cohort(graded: Input[list[Dataset]], output_uri: str, cohort: Output[Dataset], summary: Output[Markdown],
                  metrics: Output[Metrics]):
    """The cohort table and summary of every graded scan (copied under ``output_uri`` when given)."""
    import os
    import shutil

    from healthivert.inference.cohort import SUMMARY_MD, read_records, write_cohort

    result = write_cohort(read_records(artifact.path for artifact in graded), cohort.path, target=output_uri)
    shutil.copyfile(os.path.join(cohort.path, SUMMARY_MD), summary.path)
    for key in ("cases", "cases_graded", "cases_failed", "vertebrae_graded"):
        metrics.log_metric(key, result[key])
    metrics.log_metric("vertebrae_fractured", len(result["fractured"]))


@dataclass(frozen=True)
class GradeComponents:
    """The cohort-grading components, built on one image."""

    list_cases: Callable
    grade_case: Callable
    gather_cohort: Callable


def build_grade_components(image: str) -> GradeComponents:
    """Every step as a lightweight component running on ``image`` (the training pipeline's image)."""
    return GradeComponents(*(on_image(step, image) for step in (list_cases, grade_case, gather_cohort)))
