"""The model registry: which grader version a pipeline run registered, and the ``candidate`` alias on it.

svm-fit tags its run with the digest of the SVM it wrote (:data:`SVM_DIGEST_TAG`); evaluate computes the
digest of the SVM it evaluated and so finds the svm-fit run, and through it the grader version, that
its metrics describe. The svm-fit run of the same pipeline run is preferred; when svm-fit did not
rerun (``dvc repro`` reruns only what changed), the latest svm-fit run that wrote the same SVM.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

SVM_DIGEST_TAG = "healthivert.svm_digest"
CANDIDATE_ALIAS = "candidate"
FIT_STAGE = "svm-fit"


def grader_version(client: MlflowClient, experiment_id: str, name: str, svm_digest: str,
                   parent_run_id: str | None) -> ModelVersion | None:
    """The version of registered model ``name`` logged by the svm-fit run that wrote the SVM ``svm_digest``.

    Args:
        client: client of the tracking store.
        experiment_id: the experiment of the pipeline runs.
        name: the grader's registered name (``tracking.grader_model_name``).
        svm_digest: digest of the ``svm.json`` evaluated (:func:`healthivert.tracking.lineage.file_digest`).
        parent_run_id: the pipeline run evaluate belongs to (its own svm-fit run is preferred).

    Returns:
        the model version, or None when no finished svm-fit run with that SVM registered a version.
    """
    runs = client.search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`healthivert.stage` = '{FIT_STAGE}' and tags.`{SVM_DIGEST_TAG}` = '{svm_digest}' "
                       "and attributes.status = 'FINISHED'"))
    runs.sort(key=lambda run: run.data.tags.get("mlflow.parentRunId") != parent_run_id)  # stable: latest first
    for run in runs:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
        if versions:
            return max(versions, key=lambda version: int(version.version))
    return None


def set_alias(client: MlflowClient, version: ModelVersion, alias: str, reason: str, run_id: str) -> None:
    """Point ``alias`` at ``version`` and note on the version which run set it, and why."""
    client.set_registered_model_alias(version.name, alias, version.version)
    client.set_model_version_tag(version.name, version.version, f"healthivert.{alias}.run", run_id)
    client.set_model_version_tag(version.name, version.version, f"healthivert.{alias}.reason", reason)
    log.info("registry: %s@%s -> version %s (%s)", version.name, alias, version.version, reason)
