"""Kubeflow Pipelines v2 components: one lightweight component per pipeline stage.

Each function only maps its typed artifacts (``Input``/``Output`` of ``Dataset``, ``Model``,
``Metrics``, ``HTML``) to the stage's command-line paths and calls
:func:`healthivert.stages.submit.run_step`, which runs the same ``healthivert`` command DVC runs.
The functions are turned into components by :func:`build_components` on the project's image, which
already holds the package (no ``pip install`` at run time). Every step receives the same parameters
as one JSON line (``params_json``), newline-separated ``section.key=value`` overrides, the MLflow URI
(empty: tracking off) and the id that groups the steps under one MLflow parent run. The training
steps keep their checkpoints under ``checkpoint_uri`` (an s3:// prefix or a mounted volume's path;
empty: a folder inside the pod), so a restarted step resumes.
"""

from collections.abc import Callable
from dataclasses import dataclass

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def dataset(dataset_uri: str, grades_uri: str, params_json: str, overrides: str, mlflow_uri: str,
            pipeline_group: str, raw: Output[Dataset], grades: Output[Dataset], metrics: Output[Metrics]):
    """The dataset: the phantom when ``dataset_uri`` is empty, else that folder or s3:// prefix and its grades."""
    import os
    import shutil

    from healthivert.stages.submit import import_dataset, run_step

    if dataset_uri:
        import_dataset(dataset_uri, grades_uri, raw.path, grades.path)
        raw.metadata["source"], grades.metadata["source"] = dataset_uri, grades_uri
    else:
        run_step(["phantom", "--out", raw.path], params_json, overrides.splitlines(), mlflow_uri, pipeline_group,
                 metrics)
        shutil.copyfile(os.path.join(raw.path, "grades.csv"), grades.path)
        raw.metadata["source"], grades.metadata["source"] = "phantom", "phantom"


def preprocess(raw: Input[Dataset], grades: Input[Dataset], params_json: str, overrides: str, mlflow_uri: str,
               pipeline_group: str, preprocessed: Output[Dataset], metrics: Output[Metrics]):
    """Straighten, de-pedicle and crop every vertebra; write the manifest."""
    from healthivert.stages.submit import run_step

    source = [f"data.source={raw.metadata['source']}", f"data.grades={grades.metadata['source']}"] \
        if raw.metadata.get("source", "phantom") != "phantom" else []
    run_step(["preprocess", "--input", raw.path, "--grades", grades.path, "--out", preprocessed.path], params_json,
             [*overrides.splitlines(), *source], mlflow_uri, pipeline_group, metrics)


def train_coarse(preprocessed: Input[Dataset], params_json: str, overrides: str, mlflow_uri: str,
                 pipeline_group: str, checkpoint_uri: str, coarse: Output[Model], attention: Output[Dataset],
                 metrics: Output[Metrics]):
    """Train the fracture classifier (attention maps) and a coarse generator per view."""
    from healthivert.stages.submit import checkpoint_folder, run_step

    with checkpoint_folder(checkpoint_uri, "train_coarse") as checkpoints:
        run_step(["train-coarse", "--data", preprocessed.path, "--out", coarse.path,
                  "--attention-out", attention.path, "--checkpoint-dir", checkpoints],
                 params_json, overrides.splitlines(), mlflow_uri, pipeline_group, metrics)


def train_fine(preprocessed: Input[Dataset], attention: Input[Dataset], coarse: Input[Model], params_json: str,
               overrides: str, mlflow_uri: str, pipeline_group: str, checkpoint_uri: str, fine: Output[Model],
               metrics: Output[Metrics]):
    """Train the whole generator of each view from the coarse one of the same view."""
    from healthivert.stages.submit import checkpoint_folder, run_step

    with checkpoint_folder(checkpoint_uri, "train_fine") as checkpoints:
        run_step(["train-fine", "--data", preprocessed.path, "--attention", attention.path,
                  "--coarse", coarse.path, "--out", fine.path, "--checkpoint-dir", checkpoints],
                 params_json, overrides.splitlines(), mlflow_uri, pipeline_group, metrics)


def synthesize(preprocessed: Input[Dataset], attention: Input[Dataset], fine: Input[Model], params_json: str,
               overrides: str, mlflow_uri: str, pipeline_group: str, synthesized: Output[Dataset],
               metrics: Output[Metrics]):
    """Synthesise the pseudo-healthy version of every vertebra."""
    from healthivert.stages.submit import run_step

    run_step(["synthesize", "--data", preprocessed.path, "--attention", attention.path, "--model", fine.path,
              "--out", synthesized.path], params_json, overrides.splitlines(), mlflow_uri, pipeline_group, metrics)


def rhlv(preprocessed: Input[Dataset], synthesized: Input[Dataset], params_json: str, overrides: str,
         mlflow_uri: str, pipeline_group: str, rhlv_data: Output[Dataset], metrics: Output[Metrics]):
    """Relative height loss (RHLV) of every vertebra."""
    from healthivert.stages.submit import run_step

    run_step(["rhlv", "--data", preprocessed.path, "--synth", synthesized.path, "--out", rhlv_data.path],
             params_json, overrides.splitlines(), mlflow_uri, pipeline_group, metrics)


def svm_fit(rhlv_data: Input[Dataset], coarse: Input[Model], fine: Input[Model], params_json: str, overrides: str,
            mlflow_uri: str, pipeline_group: str, svm: Output[Model], grader: Output[Model],
            metrics: Output[Metrics]):
    """Fit the Genant-grade SVM on the RHLV features; write the grader bundle ``healthivert grade`` loads."""
    import os

    from healthivert.stages.submit import run_step

    run_step(["svm-fit", "--rhlv", os.path.join(rhlv_data.path, "rhlv.parquet"), "--out", svm.path,
              "--coarse", coarse.path, "--fine", fine.path, "--grader-out", grader.path],
             params_json, overrides.splitlines(), mlflow_uri, pipeline_group, metrics)


def evaluate(preprocessed: Input[Dataset], synthesized: Input[Dataset], rhlv_data: Input[Dataset],
             svm: Input[Model], params_json: str, overrides: str, mlflow_uri: str, pipeline_group: str,
             reports: Output[Dataset], report: Output[HTML], metrics: Output[Metrics]):
    """Metrics, plots and the HTML report (also shown in the Kubeflow UI)."""
    import os
    import shutil

    from healthivert.stages.submit import run_step

    run_step(["evaluate", "--data", preprocessed.path, "--synth", synthesized.path, "--rhlv", rhlv_data.path,
              "--svm", svm.path, "--out", reports.path], params_json, overrides.splitlines(), mlflow_uri,
             pipeline_group, metrics)
    shutil.copyfile(os.path.join(reports.path, "report.html"), report.path)


@dataclass(frozen=True)
class Components:
    """The stage components, built on one image."""

    dataset: Callable
    preprocess: Callable
    train_coarse: Callable
    train_fine: Callable
    synthesize: Callable
    rhlv: Callable
    svm_fit: Callable
    evaluate: Callable


def on_image(func: Callable, image: str) -> Callable:
    """``func`` as a lightweight component running on ``image`` (which must hold this package)."""
    return dsl.component(func, base_image=image, install_kfp_package=False)


def build_components(image: str) -> Components:
    """Every stage as a lightweight component running on ``image``."""
    steps = (dataset, preprocess, train_coarse, train_fine, synthesize, rhlv, svm_fit, evaluate)
    return Components(*(on_image(step, image) for step in steps))
