"""MLflow tracking: one parent run per pipeline execution, one nested run per stage."""

from healthivert.tracking.runs import StageTracker, stage_run

__all__ = ["StageTracker", "stage_run"]
