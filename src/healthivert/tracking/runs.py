"""Stage runs in MLflow, nested under one parent run per pipeline execution.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else a local SQLite file ``mlflow.db`` in the
working directory (no server needed). A new experiment keeps its artifacts under
``HEALTHIVERT_ARTIFACT_LOCATION`` when set (e.g. ``s3://bucket/mlflow``, with
``MLFLOW_S3_ENDPOINT_URL`` for a non-AWS endpoint), else in ``./mlartifacts`` for a local store and
wherever the server decides for an ``http(s)`` one. With ``tracking.enabled: false`` every tracker
method is a no-op and nothing touches MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from healthivert.config import Params
from healthivert.errors import ConfigError
from healthivert.signals import interrupts_raise

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACT_LOCATION_ENV = "HEALTHIVERT_ARTIFACT_LOCATION"
LOCAL_ARTIFACT_FOLDER = "mlartifacts"
REGISTERED_PREFIX = "healthivert-"
#: the experiment tag the MLflow 3 UI reads to open an experiment on its training runs (not the GenAI view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tracking_uri() -> str:
    """The tracking store this process logs to."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _pip_requirements() -> list[str]:
    """What a logged torch model needs to load: torch and this package, at the running versions."""
    torch_version = metadata.version("torch").split("+")[0]
    return [f"torch=={torch_version}", f"healthivert=={metadata.version('healthivert')}"]


class StageTracker:
    """What a stage may log. Every method is a no-op when tracking is off.

    Args:
        run_id: the stage's MLflow run, None when tracking is off.
        register_models: whether ``log_*model*`` also registers the model in the model registry.
        parent_run_id: the pipeline run the stage run is nested under.
        experiment_id: the experiment of both.
    """

    def __init__(self, run_id: str | None = None, register_models: bool = False, parent_run_id: str | None = None,
                 experiment_id: str | None = None) -> None:
        self.run_id = run_id
        self.register_models = register_models
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id

    @property
    def active(self) -> bool:
        """Whether anything is logged."""
        return self.run_id is not None

    def _registered(self, name: str, registered_name: str | None) -> str | None:
        """The registry name of model ``name`` (None when registering is off)."""
        if not self.register_models:
            return None
        return registered_name or REGISTERED_PREFIX + name.replace("_", "-")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalar metrics (optionally at a training step)."""
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        """Log scalar metrics on the pipeline run too (the headline numbers the runs table compares)."""
        if self.active and self.parent_run_id is not None:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            from healthivert.tracking.pipeline import log_metric_batches

            stamp = int(time.time() * 1000)
            log_metric_batches(MlflowClient(), self.parent_run_id,
                               [Metric(k, float(v), stamp, 0) for k, v in metrics.items()])

    def set_parent_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the pipeline run."""
        if self.active and self.parent_run_id is not None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            for key, value in tags.items():
                client.set_tag(self.parent_run_id, key, value)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log extra parameters (nested mappings are flattened to ``a.b.c``)."""
        if self.active:
            from mlflow.tracking import MlflowClient

            from healthivert.tracking.pipeline import log_param_tree

            log_param_tree(MlflowClient(), self.run_id, params)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy one file into the run's artifacts."""
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a folder's content into the run's artifacts."""
        if self.active:
            import mlflow

            mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        """Save a matplotlib figure as an artifact (``name`` ends in .png, .svg, ...)."""
        if self.active:
            import mlflow

            mlflow.log_figure(figure, name)

    def log_text(self, text: str, name: str) -> None:
        """Save a text (a report, a model card) as an artifact file ``name``."""
        if self.active:
            import mlflow

            mlflow.log_text(text, name)

    def log_dataset(self, table: Any, source: str, name: str, context: str, tags: dict[str, str] | None = None) -> None:
        """Record the dataset a stage read as an MLflow dataset input of its run and of the pipeline run.

        MLflow stores its name, source URI, a digest of ``table`` and the table's schema; the runs
        table shows it in its Dataset column.

        Args:
            table: a pandas table describing it (e.g. case, vertebra, grade, split per vertebra).
            source: where it came from (a folder or ``s3://`` prefix).
            name: its display name.
            context: how the stage used it (``preprocess``).
            tags: further input tags (e.g. the layout the dataset was read in).
        """
        if self.active:
            import warnings

            import mlflow
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.tracking import MlflowClient

            # a local path fits two of MLflow's source types (it takes the first); integer columns draw a
            # hint meant for model signatures
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_pandas(table, source=source, name=name)._to_mlflow_entity()
            input_tags = [InputTag("mlflow.data.context", context), *(InputTag(k, v) for k, v in (tags or {}).items())]
            client = MlflowClient()
            for run_id in dict.fromkeys(r for r in (self.run_id, self.parent_run_id) if r is not None):
                client.log_inputs(run_id, datasets=[DatasetInput(dataset, input_tags)])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        if self.active:
            import mlflow

            mlflow.set_tags(tags)

    def log_torch_model(self, model: Any, name: str = "generator", registered_name: str | None = None) -> None:
        """Log a ``torch.nn.Module`` with ``mlflow.pytorch`` and register it.

        The registered name defaults to ``healthivert-<name>`` (``coarse_generator`` ->
        ``healthivert-coarse-generator``). Loading it back (``mlflow.pytorch.load_model``) needs
        this package installed: the module's class is stored by reference.
        """
        if self.active:
            import mlflow.pytorch

            mlflow.pytorch.log_model(model, name=name, serialization_format="pickle",
                                     pip_requirements=_pip_requirements(),
                                     registered_model_name=self._registered(name, registered_name))

    def log_grader_model(self, bundle_dir: str | os.PathLike[str], registered_name: str) -> None:
        """Log a grader bundle as the MLflow model ``healthivert-grader`` (see
        :func:`healthivert.inference.pyfunc.log_grader_model`), registered as ``registered_name``
        when registering is on."""
        if self.active:
            from healthivert.inference.pyfunc import log_grader_model

            log_grader_model(bundle_dir, registered_name if self.register_models else None)

    def promote_grader(self, name: str, svm_digest: str, reason: str) -> str | None:
        """Set the registry alias ``candidate`` on the grader version this pipeline run's svm-fit registered.

        Args:
            name: the grader's registered name.
            svm_digest: digest of the SVM evaluated (finds the svm-fit run, see :mod:`healthivert.tracking.registry`).
            reason: why the run passed the gate (a tag on the version).

        Returns:
            the version that got the alias; None when tracking is off or no matching version exists.
        """
        if not self.active:
            return None
        from mlflow.tracking import MlflowClient

        from healthivert.tracking.registry import CANDIDATE_ALIAS, grader_version, set_alias

        client = MlflowClient()
        version = grader_version(client, str(self.experiment_id), name, svm_digest, self.parent_run_id)
        if version is None:
            log.warning("gate passed, but no svm-fit run of this SVM registered %s: no alias set", name)
            return None
        set_alias(client, version, CANDIDATE_ALIAS, reason, str(self.run_id))
        return str(version.version)

    def log_model_files(self, path: str | os.PathLike[str], name: str, registered_name: str | None = None) -> None:
        """Log a saved model (a file or a folder, e.g. ``models/svm``) and register it as is.

        The registered version's source is the run's artifact folder ``name``, holding the files
        exactly as the stage wrote them (not an MLflow-flavoured model: load them with the
        project's own loader).
        """
        if not self.active:
            return
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=name)
        else:
            mlflow.log_artifact(str(path), artifact_path=name)
        registered_name = self._registered(name, registered_name)
        if registered_name is not None:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            try:
                client.get_registered_model(registered_name)
            except MlflowException:
                client.create_registered_model(registered_name)
            version = client.create_model_version(registered_name, source=mlflow.get_artifact_uri(name),
                                                  run_id=self.run_id)
            log.info("registered %s version %s", registered_name, version.version)


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (with its artifact location) when new.

    Raises:
        ConfigError: the tracking store cannot be reached or used.
    """
    from mlflow.exceptions import MlflowException

    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # an experiment made before the tag existed
                client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return experiment.experiment_id
        location = os.environ.get(ARTIFACT_LOCATION_ENV)
        if location is None and not client.tracking_uri.startswith(("http://", "https://")):
            location = Path(LOCAL_ARTIFACT_FOLDER).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as exc:
        raise ConfigError(client.tracking_uri, f"MLflow tracking store unusable: {str(exc).splitlines()[0]}",
                          "check MLFLOW_TRACKING_URI or set tracking.enabled=false") from exc


def _section_tree(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    return {section: getattr(params, section).model_dump(mode="json") for section in sections}


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...],
              root: str | os.PathLike[str] = ".") -> Iterator[StageTracker]:
    """Open the MLflow run of one stage, nested under the pipeline's parent run; yield a tracker.

    The run is tagged with the stage, the git commit, the parameter digest, the DVC data hash of
    the stage's inputs (:mod:`healthivert.tracking.lineage`) and MLflow's source tags (the parent
    too), and logs the given params sections; its wall time goes on the parent (``time.<stage>_s``).
    If the stage raises, its run (and a managed parent) is marked FAILED and the error propagates;
    SIGINT and SIGTERM raise :class:`~healthivert.signals.Interrupted` (tracking on or off), so an
    interrupted stage also ends FAILED and removes its temporary outputs.

    Args:
        stage: the stage's command name (``train-coarse``).
        params: all parameters; ``params.tracking`` decides whether and where to log.
        sections: the params sections the stage reads (logged as ``section.key`` params).
        root: the project root (``dvc.yaml``, ``dvc.lock``, ``.healthivert/``).
    """
    if not params.tracking.enabled:
        with interrupts_raise():
            yield StageTracker()
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    from healthivert.tracking.lineage import dvc_lineage, git_commit, git_source_tags, params_digest
    from healthivert.tracking.pipeline import (
        PIPELINE_GROUP_ENV, PIPELINE_RUN_ENV, close_parent, log_param_tree, log_stage_time, resolve_parent)

    root = Path(root)
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment_id = _experiment_id(client, params.tracking.experiment)
    orchestrated = bool(os.environ.get(PIPELINE_GROUP_ENV) or os.environ.get(PIPELINE_RUN_ENV))
    tags = {"git.commit": git_commit(root), "params.digest": params_digest(params),
            "mlflow.source.type": "JOB" if orchestrated else "LOCAL", **git_source_tags(root)}
    parent = resolve_parent(client, experiment_id, stage, params, tags, root)
    tags.update(dvc_lineage(stage, root).tags())
    tags.update({"healthivert.kind": "stage", "healthivert.stage": stage, "mlflow.source.name": f"healthivert {stage}"})
    failed = True
    try:
        with interrupts_raise(), mlflow.start_run(experiment_id=experiment_id, run_name=stage,
                                                  parent_run_id=parent.run_id, tags=tags) as run:
            log.info("MLflow run %s (%s) in pipeline run %s", run.info.run_id, stage, parent.run_id)
            log_param_tree(client, run.info.run_id, _section_tree(params, sections))
            start = time.perf_counter()
            yield StageTracker(run.info.run_id, register_models=params.tracking.register_models,
                               parent_run_id=parent.run_id, experiment_id=experiment_id)
            log_stage_time(client, parent.run_id, stage, time.perf_counter() - start)
            failed = False
    finally:
        close_parent(client, parent, stage, failed)

