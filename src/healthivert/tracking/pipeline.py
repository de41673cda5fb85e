"""The MLflow parent run that groups the stage runs of one pipeline execution.

DVC and Kubeflow run every stage in its own process, so the stages agree on their parent through
one of three mechanisms, tried in this order:

1. ``HEALTHIVERT_PIPELINE_RUN=<run id>``: a wrapper created the parent itself and manages its status.
2. ``HEALTHIVERT_PIPELINE_GROUP=<id>``: the parent is the run of the experiment tagged
   ``healthivert.group=<id>``, created by the first stage that arrives (Kubeflow passes its job id).
3. Otherwise (``dvc repro``, stages run by hand): the group file ``.healthivert/pipeline_run.json``
   names the current parent. A stage joins it when the git commit, the parameter digest, the tracking
   store and the experiment are unchanged, the parent is still running, and the stage has not run in
   it yet; anything else closes it (FINISHED) and starts a new parent. So one ``dvc repro`` (or
   ``dvc exp run``) gives one parent, and a rerun, an edited parameter or a new commit gives the next.

In modes 2 and 3 the stages also close the parent: FINISHED when the final stage succeeds, FAILED
as soon as a stage fails.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from healthivert.config import Params, dump_params
from healthivert.io.atomic import write_text_atomic

log = logging.getLogger(__name__)

PIPELINE_RUN_ENV = "HEALTHIVERT_PIPELINE_RUN"
PIPELINE_GROUP_ENV = "HEALTHIVERT_PIPELINE_GROUP"
GROUP_FILE = Path(".healthivert") / "pipeline_run.json"
GROUP_TAG = "healthivert.group"
FINAL_STAGE = "evaluate"
_MLFLOW_BATCH = 100
#: the parent's metrics of stage times: ``time.<stage>_s`` per stage that ran in it, and their sum.
TIME_PREFIX = "time."
TOTAL_TIME = "time.total_s"


@dataclass(frozen=True)
class ParentRun:
    """The parent of a stage run.

    Attributes:
        run_id: MLflow run id.
        managed: whether the stages set its final status (False when a wrapper owns it).
    """

    run_id: str
    managed: bool


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"section.key.sub": value}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_param_tree(client: MlflowClient, run_id: str, tree: dict[str, Any]) -> None:
    """Log a nested mapping as flat ``section.key`` params, in batches MLflow accepts."""
    items = [Param(key, str(value)[:500]) for key, value in flatten(tree).items()]
    for start in range(0, len(items), _MLFLOW_BATCH):
        client.log_batch(run_id, params=items[start:start + _MLFLOW_BATCH])


def log_metric_batches(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Log metrics in batches MLflow accepts."""
    for start in range(0, len(metrics), _MLFLOW_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + _MLFLOW_BATCH])


def log_stage_time(client: MlflowClient, parent_run_id: str, stage: str, seconds: float) -> None:
    """Record a stage's wall time on the pipeline run (``time.<stage>_s``) and update ``time.total_s``."""
    key = f"{TIME_PREFIX}{stage.replace('-', '_')}_s"
    times = {k: v for k, v in client.get_run(parent_run_id).data.metrics.items()
             if k.startswith(TIME_PREFIX) and k != TOTAL_TIME}
    times[key] = seconds
    stamp = int(time.time() * 1000)
    log_metric_batches(client, parent_run_id, [Metric(key, seconds, stamp, 0),
                                               Metric(TOTAL_TIME, sum(times.values()), stamp, 0)])


def _create_parent(client: MlflowClient, experiment_id: str, params: Params, tags: dict[str, str]) -> str:
    """A new RUNNING parent holding every parameter (and ``params.yaml``); returns its id."""
    name = "pipeline " + time.strftime("%Y-%m-%d %H:%M:%S")
    run = client.create_run(experiment_id, run_name=name,
                            tags={"healthivert.kind": "pipeline", **tags, "mlflow.source.name": "healthivert pipeline"})
    log_param_tree(client, run.info.run_id, params.model_dump(mode="json"))
    client.log_text(run.info.run_id, dump_params(params), "params.yaml")
    log.info("MLflow pipeline run %s", run.info.run_id)
    return run.info.run_id


def _is_running(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING)
    except MlflowException:  # deleted or unknown run: start a fresh parent
        return False


def _group_file_parent(client: MlflowClient, experiment_id: str, stage: str, params: Params,
                       tags: dict[str, str], root: Path) -> str:
    """Mode 3: join the parent the group file names, or close it and start the next one."""
    path = root / GROUP_FILE
    key = {"tracking_uri": client.tracking_uri, "experiment_id": experiment_id,
           "git_commit": tags["git.commit"], "params_digest": tags["params.digest"]}
    try:
        group = json.loads(path.read_text())
    except (OSError, ValueError):
        group = {}
    same_store = group.get("tracking_uri") == key["tracking_uri"]
    running = same_store and _is_running(client, str(group.get("run_id")))
    if not (running and all(group.get(k) == v for k, v in key.items()) and stage not in group.get("stages", [])):
        if running:  # every stage it saw succeeded (a failure closes it), but the final one never came
            client.set_terminated(str(group["run_id"]), "FINISHED")
        group = {**key, "run_id": _create_parent(client, experiment_id, params, tags), "stages": []}
    group["stages"] = [*group["stages"], stage]
    write_text_atomic(path, json.dumps(group, indent=2) + "\n")
    return str(group["run_id"])


def _tagged_parent(client: MlflowClient, experiment_id: str, group_id: str, params: Params,
                   tags: dict[str, str]) -> str:
    """Mode 2: the run tagged with ``group_id``, created by the first stage that asks."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{GROUP_TAG}` = '{group_id}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    return _create_parent(client, experiment_id, params, {**tags, GROUP_TAG: group_id})


def resolve_parent(client: MlflowClient, experiment_id: str, stage: str, params: Params,
                   tags: dict[str, str], root: Path) -> ParentRun:
    """Find or create the parent run of ``stage`` (see the module docstring for the rules).

    Args:
        client: client of the tracking store.
        experiment_id: the experiment the runs belong to.
        stage: the stage about to run.
        params: all parameters (logged on a new parent).
        tags: ``git.commit`` and ``params.digest`` at least; set on a new parent.
        root: the project root holding ``.healthivert/``.
    """
    if os.environ.get(PIPELINE_RUN_ENV):
        return ParentRun(os.environ[PIPELINE_RUN_ENV], managed=False)
    if os.environ.get(PIPELINE_GROUP_ENV):
        return ParentRun(_tagged_parent(client, experiment_id, os.environ[PIPELINE_GROUP_ENV], params, tags),
                         managed=True)
    return ParentRun(_group_file_parent(client, experiment_id, stage, params, tags, root), managed=True)


def close_parent(client: MlflowClient, parent: ParentRun, stage: str, failed: bool) -> None:
    """Mark a managed parent FAILED when a stage failed, FINISHED when the final stage succeeded."""
    if not parent.managed:
        return
    if failed:
        client.set_terminated(parent.run_id, "FAILED")
    elif stage == FINAL_STAGE:
        client.set_terminated(parent.run_id, "FINISHED")
