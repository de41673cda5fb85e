"""Stage runs in MLflow; a no-op tracker when tracking is switched off."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from healthivert.config import Params

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class StageTracker:
    """What a stage may log. Every method is a no-op when tracking is off."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_figure(figure, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags(tags)


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...]) -> Iterator[StageTracker]:
    """Open an MLflow run for one stage, logging the given params sections; yields a tracker.

    The run is marked failed if the stage raises.
    """
    if not params.tracking.enabled:
        yield StageTracker(active=False)
        return
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(params.tracking.experiment)
    flat: dict[str, Any] = {}
    for section in sections:
        for key, value in getattr(params, section).model_dump(mode="json").items():
            flat[f"{section}.{key}"] = value
    with mlflow.start_run(run_name=stage) as run:
        log.info("MLflow run %s (%s)", run.info.run_id, stage)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        yield StageTracker(active=True)
