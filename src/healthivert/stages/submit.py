"""``healthivert submit``: compile a Kubeflow pipeline and send it to a KFP endpoint, or only compile it.

Two pipelines share the project's image: ``train`` (``pipelines/healthivert_pipeline.py``, the DVC DAG)
and ``grade`` (``pipelines/grade_pipeline.py``, a cohort graded in parallel with a grader bundle).

Also the in-container side of every Kubeflow step (:func:`run_step`): the lightweight components in
``components/`` only hand their artifact paths to it, so a step runs exactly the CLI command that DVC
runs, with the same parameter validation and tracking.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from healthivert.config import Params
from healthivert.errors import ConfigError, InputDataError
from healthivert.io.atomic import atomic_path
from healthivert.stages.common import add_params_arguments, check_outputs, params_from_args

log = logging.getLogger(__name__)

DEFAULT_PIPELINE_FILE = Path("pipelines") / "healthivert_pipeline.py"
#: pipeline names ``--pipeline`` accepts (a file path is accepted too), relative to the project root.
PIPELINES = {"train": DEFAULT_PIPELINE_FILE, "grade": Path("pipelines") / "grade_pipeline.py"}
DEFAULT_PARALLELISM = 4
#: flags that belong to one kind of pipeline only (their default is None: "not given").
TRAIN_FLAGS = {"params": "--params", "overrides": "--set", "checkpoints": "--checkpoints"}
GRADE_FLAGS = {"cases": "--cases", "prefix": "--prefix", "grader": "--grader", "output": "--output",
               "parallelism": "--parallelism"}
DEFAULT_IMAGE = "ghcr.io/healthivert/healthivert"
DEFAULT_TAG = "0.1.0-cuda"


def run_step(command: Sequence[str], params_json: str, overrides: Sequence[str] = (),
             tracking_uri: str = "", pipeline_group: str = "", metrics_out: Any = None) -> dict[str, float]:
    """Run one stage command in-process the way a Kubeflow step does; return its finite metrics (nested
    groups as dotted names, ``grading.gan.macro_f1``).

    Args:
        command: the subcommand and its path arguments, e.g. ``["rhlv", "--data", ..., "--out", ...]``.
        params_json: all parameters as one JSON line (a pipeline parameter; JSON is YAML, so it is
            read like any parameter file).
        overrides: ``section.key=value`` assignments applied on top (blank entries ignored).
        tracking_uri: MLflow tracking URI; empty switches tracking off for the step.
        pipeline_group: id shared by the steps of one pipeline run (their MLflow parent run's tag).
        metrics_out: a KFP ``Metrics`` artifact (anything with ``log_metric(name, value)``) that
            receives the stage's metrics.

    Raises:
        RuntimeError: the stage exited non-zero (the step, and the Kubeflow run, fail).
    """
    from healthivert.cli import main
    from healthivert.tracking.pipeline import PIPELINE_GROUP_ENV, flatten

    with tempfile.TemporaryDirectory(prefix="healthivert-step-") as scratch:
        params_file = Path(scratch) / "params.yaml"
        params_file.write_text(params_json)
        metrics_file = Path(scratch) / "metrics.json"
        argv = [*command, "--params", str(params_file), "--metrics", str(metrics_file)]
        for assignment in overrides:
            if assignment.strip():
                argv += ["--set", assignment.strip()]
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
            if pipeline_group:
                os.environ[PIPELINE_GROUP_ENV] = pipeline_group
        else:
            argv += ["--set", "tracking.enabled=false"]
        code = main(argv)
        if code != 0:
            raise RuntimeError(f"healthivert {command[0]} exited with code {code}")
        written = flatten(json.loads(metrics_file.read_text())) if metrics_file.exists() else {}
    metrics = {key: float(value) for key, value in written.items()
               if isinstance(value, (int, float)) and math.isfinite(value)}
    if metrics_out is not None:
        for key, value in metrics.items():
            metrics_out.log_metric(key, value)
    return metrics


def import_dataset(dataset_uri: str, grades_uri: str, out: str | os.PathLike[str],
                   grades_out: str | os.PathLike[str]) -> None:
    """Bring a dataset and its grades into a step's artifacts, checking both before any training.

    Args:
        dataset_uri: dataset folder (e.g. on a mounted volume) or ``s3://`` prefix.
        grades_uri: its grades file, path or ``s3://`` URI.
        out: the dataset artifact's folder (filled with the dataset's files).
        grades_out: the grades artifact's file.

    Raises:
        HealthiVertError: no grades given, a location missing or empty, no case found in the
            dataset, an unreadable grades file.
    """
    from healthivert.io.grades import read_grades
    from healthivert.io.layouts import discover_cases
    from healthivert.io.remote import download_file, download_prefix, is_s3_uri

    if not grades_uri:
        raise ConfigError("grades_uri", f"no grades file given for the dataset {dataset_uri}",
                          "the paper's JSON or a case,vertebra,grade CSV, as a path or s3:// URI")
    with tempfile.TemporaryDirectory(prefix="healthivert-import-") as scratch:
        grades = download_file(grades_uri, scratch) if is_s3_uri(grades_uri) else Path(grades_uri)
        read_grades(grades)  # readable, grades 0-3, no vertebra twice
        if is_s3_uri(dataset_uri):
            shutil.move(download_prefix(dataset_uri, Path(scratch) / "dataset"), out)
        elif not Path(dataset_uri).is_dir():
            raise InputDataError(dataset_uri, "dataset folder not found")
        else:
            shutil.copytree(dataset_uri, out, dirs_exist_ok=True)
        discover_cases(out)  # a known layout with at least one case
        shutil.copyfile(grades, grades_out)


@contextlib.contextmanager
def checkpoint_folder(location: str, stage: str, interval_s: float = 30.0) -> Iterator[str]:
    """The checkpoint folder of a training step, persisted at ``location`` when one is given.

    Args:
        location: ``s3://`` prefix (restored at the start, updated every ``interval_s`` and at the end),
            a path on a mounted volume, or empty for a temporary folder that dies with the pod.
        stage: sub-folder of ``location`` for this step (``train_coarse``).
        interval_s: seconds between uploads to S3.
    """
    from healthivert.io.remote import is_s3_uri, mirrored_folder

    if location and not is_s3_uri(location):
        folder = Path(location) / stage
        folder.mkdir(parents=True, exist_ok=True)
        yield str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="checkpoints-") as scratch:
        if not location:
            yield scratch
            return
        with mirrored_folder(scratch, f"{location.rstrip('/')}/{stage}", interval_s) as folder:
            yield str(folder)


def params_json(params: Params) -> str:
    """All parameters as one JSON line (a multi-line default would break the KFP file's header comment)."""
    return json.dumps(params.model_dump(mode="json"), sort_keys=False)


def load_pipeline_module(path: Path) -> ModuleType:
    """Import the pipeline definition file (its project root goes on ``sys.path`` for ``components``)."""
    if not path.is_file():
        raise InputDataError(path, "pipeline definition not found",
                             f"run from the project root, or give --pipeline {' or '.join(PIPELINES)} or a file")
    root = str(path.resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("healthivert_kfp_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``healthivert submit``."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="KFP API endpoint, e.g. http://localhost:8080")
    target.add_argument("--compile-only", type=Path, metavar="FILE", help="write the pipeline IR YAML here, send nothing")
    parser.add_argument("--experiment", default="healthivert", help="KFP experiment of the run")
    parser.add_argument("--run-name", help="name of the KFP run (default: KFP's)")
    parser.add_argument("--pipeline", default="train", metavar="NAME|FILE",
                        help=f"{' or '.join(PIPELINES)} (the files {', '.join(map(str, PIPELINES.values()))}), "
                             "or a pipeline definition file (default: train)")
    add_params_arguments(parser)  # train: resolved and validated here; the result is the run's params_json
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image of every step (default: {DEFAULT_IMAGE})")
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default: {DEFAULT_TAG})")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="GPUs requested by train-coarse, train-fine and synthesize, or by each grade-case step (0: none)")
    parser.add_argument("--mlflow-uri", default="", metavar="URI",
                        help="MLflow tracking URI reachable from the cluster (empty: no tracking)")
    parser.add_argument("--checkpoints", metavar="URI",
                        help="train: where training steps keep their checkpoints, to resume after a lost pod: an s3:// "
                             "prefix or a path on a mounted volume (default: inside the pod)")
    grade = parser.add_argument_group("grade pipeline (defaults of its run parameters)")
    grade.add_argument("--cases", nargs="+", metavar="LOCATION",
                       help="case locations: folders or s3:// prefixes of cases in any layout preprocess reads, or JSON "
                            'objects naming one scan\'s files, {"ct": URI, "labels": URI}')
    grade.add_argument("--prefix", metavar="URI", help="an s3:// prefix (or mounted folder) holding the cases")
    grade.add_argument("--grader", metavar="MODEL",
                       help="grader bundle: s3:// prefix, mounted folder or MLflow URI (models:/healthivert-grader@candidate)")
    grade.add_argument("--output", metavar="URI",
                       help="s3:// prefix (or mounted folder) for each case's folder and the cohort files (default: "
                            "the run's artifacts only)")
    grade.add_argument("--parallelism", type=int, metavar="N",
                       help=f"cases graded at the same time, at most (default: {DEFAULT_PARALLELISM})")


def pipeline_file(name: str) -> Path:
    """The definition file of ``--pipeline``: a name of :data:`PIPELINES` or a path."""
    return PIPELINES.get(name, Path(name))


def _refuse_foreign_flags(args: argparse.Namespace, kind: str) -> None:
    """One line for a flag of the other pipeline kind."""
    foreign = GRADE_FLAGS if kind == "train" else TRAIN_FLAGS
    for attribute, flag in foreign.items():
        if getattr(args, attribute) not in (None, []):
            raise ConfigError(flag, f"not a flag of the {kind} pipeline",
                              f"it is for --pipeline {'grade' if kind == 'train' else 'train'}")


def build_grade(build: Callable, args: argparse.Namespace, image: str) -> Any:
    """The grade pipeline with the run parameters' defaults from the flags.

    Raises:
        ConfigError: a parallelism below 1, a ``--cases`` entry that is not valid JSON; when submitting,
            no grader or nothing to grade.
    """
    from healthivert.inference.cohort import parse_location

    parallelism = DEFAULT_PARALLELISM if args.parallelism is None else args.parallelism
    if parallelism < 1:
        raise ConfigError("--parallelism", f"must be 1 or more, got {parallelism}")
    cases = [parse_location(text) for text in args.cases or []]
    if args.host and not args.grader:
        raise ConfigError("--grader", "missing", "the grader bundle to grade with: s3:// prefix or models:/NAME@ALIAS")
    if args.host and not (cases or args.prefix):
        raise ConfigError("--cases", "nothing to grade", "give --cases, --prefix or both")
    return build(image=image, gpus=args.gpus, parallelism=parallelism, cases=cases, prefix=args.prefix or "",
                 grader_uri=args.grader or "", output_uri=args.output or "", mlflow_uri=args.mlflow_uri)


def execute(args: argparse.Namespace) -> None:
    """Compile the pipeline; unless ``--compile-only``, submit it to ``--host``."""
    from kfp import compiler

    if args.gpus < 0:
        raise ConfigError("--gpus", f"must be 0 or more, got {args.gpus}")
    check_outputs(files=[args.compile_only])
    if args.pipeline in PIPELINES:  # a name: its flags are checked before its file is read
        _refuse_foreign_flags(args, args.pipeline)
    # the training parameters are validated before anything is read, compiled or sent
    params = params_from_args(args) if args.pipeline == "train" else None
    module = load_pipeline_module(pipeline_file(args.pipeline))
    kind = getattr(module, "KIND", "train")
    _refuse_foreign_flags(args, kind)
    build: Callable = module.build_pipeline
    image = f"{args.image}:{args.tag}"
    if kind == "grade":
        pipeline = build_grade(build, args, image)
    else:
        params = params or params_from_args(args)
        data = params.data
        pipeline = build(image=image, gpus=args.gpus, params_json=params_json(params), mlflow_uri=args.mlflow_uri,
                         dataset_uri="" if data.is_phantom else data.source,
                         grades_uri="" if data.is_phantom else data.grades, checkpoint_uri=args.checkpoints or "")
    if args.compile_only:
        with atomic_path(args.compile_only) as tmp:
            compiler.Compiler().compile(pipeline, str(tmp))
        log.info("pipeline compiled to %s", args.compile_only)
        return
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    with tempfile.TemporaryDirectory(prefix="healthivert-submit-") as scratch:
        package = Path(scratch) / "healthivert.yaml"
        compiler.Compiler().compile(pipeline, str(package))
        try:
            client = kfp.Client(host=args.host)
            result = client.create_run_from_pipeline_package(str(package), arguments={}, run_name=args.run_name,
                                                             experiment_name=args.experiment)
        except (OSError, urllib3.exceptions.HTTPError, ApiException) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(args.host, f"Kubeflow Pipelines endpoint refused the run: {reason}",
                              "check --host, the cluster's authentication, or use --compile-only") from exc
    log.info("submitted run %s to %s (experiment %s)", result.run_id, args.host, args.experiment)
