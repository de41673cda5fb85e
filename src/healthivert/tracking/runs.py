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
    """

    def __init__(self, run_id: str | None = None, register_models: bool = False) -> None:
        self.run_id = run_id
        self.register_models = register_models

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

    def log_dataset(self, table: Any, source: str, name: str, context: str) -> None:
        """Record the dataset a stage read as an MLflow dataset input: its source URI, name and a digest.

        Args:
            table: a pandas table describing it (e.g. case, vertebra, grade, split per vertebra).
            source: where it came from (a folder or ``s3://`` prefix).
            name: its display name.
            context: how the stage used it (``preprocess``).
        """
        if self.active:
            import warnings

            import mlflow

            # a local path fits two of MLflow's source types (it takes the first); integer columns draw a
            # hint meant for model signatures
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mlflow.log_input(mlflow.data.from_pandas(table, source=source, name=name), context=context)

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
            return experiment.experiment_id
        location = os.environ.get(ARTIFACT_LOCATION_ENV)
        if location is None and not client.tracking_uri.startswith(("http://", "https://")):
            location = Path(LOCAL_ARTIFACT_FOLDER).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        raise ConfigError(client.tracking_uri, f"MLflow tracking store unusable: {str(exc).splitlines()[0]}",
                          "check MLFLOW_TRACKING_URI or set tracking.enabled=false") from exc


def _section_tree(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    return {section: getattr(params, section).model_dump(mode="json") for section in sections}


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...],
              root: str | os.PathLike[str] = ".") -> Iterator[StageTracker]:
    """Open the MLflow run of one stage, nested under the pipeline's parent run; yield a tracker.

    The run is tagged with the stage, the git commit, the parameter digest and the DVC data hash of
    the stage's inputs (:mod:`healthivert.tracking.lineage`), and logs the given params sections.
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

    from healthivert.tracking.lineage import dvc_lineage, git_commit, params_digest
    from healthivert.tracking.pipeline import close_parent, log_param_tree, resolve_parent

    root = Path(root)
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment_id = _experiment_id(client, params.tracking.experiment)
    tags = {"git.commit": git_commit(root), "params.digest": params_digest(params)}
    parent = resolve_parent(client, experiment_id, stage, params, tags, root)
    tags.update(dvc_lineage(stage, root).tags())
    tags.update({"healthivert.kind": "stage", "healthivert.stage": stage})
    failed = True
    try:
        with interrupts_raise(), mlflow.start_run(experiment_id=experiment_id, run_name=stage,
                                                  parent_run_id=parent.run_id, tags=tags) as run:
            log.info("MLflow run %s (%s) in pipeline run %s", run.info.run_id, stage, parent.run_id)
            log_param_tree(client, run.info.run_id, _section_tree(params, sections))
            yield StageTracker(run.info.run_id, register_models=params.tracking.register_models)
            failed = False
    finally:
        close_parent(client, parent, stage, failed)

