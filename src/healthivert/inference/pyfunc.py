"""The grader bundle as one MLflow model (``mlflow.pyfunc``), to load, register and serve.

``mlflow.pyfunc.load_model("models:/healthivert-grader@candidate").predict(rows)`` takes one row per
scan (columns ``ct`` and ``labels``, optionally ``ctd`` and ``case``: local paths or ``s3://`` URIs of
NIfTI files) and returns one row per vertebra (:data:`OUTPUT_COLUMNS`), graded by the same
:func:`~healthivert.inference.grade.grade_case` as ``healthivert grade``. ``mlflow models serve``
answers ``/invocations`` with that table.
"""

from __future__ import annotations

import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from healthivert.errors import HealthiVertError, InputDataError
from healthivert.inference.bundle import GraderBundle, load_bundle
from healthivert.inference.grade import CaseInputs, grade_case
from healthivert.io.layouts import strip_nifti
from healthivert.io.remote import is_s3_uri, local_copy
from healthivert.training.runtime import choose_device

log = logging.getLogger(__name__)

REGISTERED_NAME = "healthivert-grader"
#: the model's folder in the run's artifacts, and the name of the bundle among the model's artifacts.
MODEL_ARTIFACT = "grader_model"
BUNDLE_ARTIFACT = "bundle"
INPUT_COLUMNS = ("ct", "labels")
OPTIONAL_INPUT_COLUMNS = ("ctd", "case")
#: the per-vertebra table ``predict`` returns (``grade`` is empty where the vertebra was not graded).
OUTPUT_COLUMNS = ("case", "vertebra", "name", "graded", "grade", "rhlv_ant", "rhlv_mid", "rhlv_post", "rhlv_max",
                  "flag")
#: what ``mlflow models serve`` needs beside the project's own requirements.
_SERVING_EXTRAS = ("uvicorn", "fastapi")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "ct"), ColSpec("string", "labels"),
                   ColSpec("string", "ctd", required=False), ColSpec("string", "case", required=False)]),
    outputs=Schema([ColSpec("string", "case"), ColSpec("long", "vertebra"), ColSpec("string", "name"),
                    ColSpec("boolean", "graded"), ColSpec("long", "grade", required=False),
                    *(ColSpec("double", name, required=False) for name in ("rhlv_ant", "rhlv_mid", "rhlv_post", "rhlv_max")),
                    ColSpec("string", "flag")]),
)
INPUT_EXAMPLE = pd.DataFrame({"ct": ["s3://bucket/cases/sub-01_ct.nii.gz"],
                              "labels": ["s3://bucket/cases/sub-01_seg-vert_msk.nii.gz"]})


def _text(row: pd.Series, column: str) -> str | None:
    value = row.get(column)
    return None if value is None or (isinstance(value, float) and pd.isna(value)) or value == "" else str(value)


def case_inputs(row: pd.Series, cache: Path) -> CaseInputs:
    """The files of one input row, fetched into ``cache`` when they are ``s3://`` URIs.

    Raises:
        InputDataError: a required column is empty, a local file does not exist, or an S3 object cannot be fetched.
    """
    locations: dict[str, str | None] = {column: _text(row, column) for column in (*INPUT_COLUMNS, "ctd")}
    for column in INPUT_COLUMNS:
        if locations[column] is None:
            raise InputDataError(f"row {row.name}", f"no '{column}'", "each row needs ct and labels (paths or s3:// URIs)")
    files: dict[str, Path | None] = {}
    for column, location in locations.items():
        if location is None:
            files[column] = None
            continue
        path = local_copy(location, cache, folder=False)
        if not is_s3_uri(location) and not path.exists():
            raise InputDataError(path, f"not found ({column} of row {row.name})")
        files[column] = path
    ct = files["ct"]
    assert ct is not None and files["labels"] is not None
    name = _text(row, "case") or strip_nifti(ct.name).removesuffix("_ct")
    return CaseInputs(name, ct, files["labels"], files["ctd"])


def grades_table(rows: pd.DataFrame, bundle: GraderBundle) -> pd.DataFrame:
    """Grade every scan of ``rows`` with a loaded bundle; one row per vertebra (:data:`OUTPUT_COLUMNS`).

    Raises:
        InputDataError: a row lacks a column or names a file that cannot be read (see :func:`case_inputs`).
    """
    missing = [column for column in INPUT_COLUMNS if column not in rows.columns]
    if missing:
        raise InputDataError("model input", f"lacks column(s) {', '.join(missing)}",
                             "give one row per scan with ct and labels (and optionally ctd, case)")
    tables = []
    with tempfile.TemporaryDirectory(prefix="healthivert-grade-") as cache:
        for _, row in rows.iterrows():
            inputs = case_inputs(row, Path(cache))
            try:
                graded = grade_case(inputs, bundle, progress=False)
            except HealthiVertError as exc:  # name the URI the row gave, not the download in the cache
                given = {inputs.ct: "ct", inputs.labels: "labels", inputs.centroids: "ctd"}
                uris = {str(path): _text(row, column) for path, column in given.items() if path is not None}
                raise type(exc)(uris.get(exc.source) or exc.source, exc.problem, exc.hint) from exc
            tables.append(pd.DataFrame(graded.table_rows()))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(OUTPUT_COLUMNS))
    table = table.reindex(columns=list(OUTPUT_COLUMNS))
    return table.astype({"case": str, "vertebra": "int64", "name": str, "graded": bool, "grade": "Int64",
                         "flag": str, **{c: "float64" for c in ("rhlv_ant", "rhlv_mid", "rhlv_post", "rhlv_max")}})


class BadInputError(MlflowException):
    """A bad input row: MLflow's ``INVALID_PARAMETER_VALUE`` (status 400 from ``mlflow models serve``), one line.

    The scoring server rewrites the message of an error ``predict`` raises to ``"Failed to predict data
    '<the whole input table>'. \\nError: <message>"``, several lines; this error keeps the message it
    was made with (later assignments are ignored), so the answer is the one line naming the file.
    """

    def __init__(self, error: HealthiVertError) -> None:
        super().__init__(" ".join(str(error).splitlines()), error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        """The one-line message."""
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


class GraderModel(mlflow.pyfunc.PythonModel):
    """``healthivert-grader``: the grader bundle behind MLflow's ``predict``; the bundle loads once."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the bundle (networks on the GPU when there is one)."""
        self.bundle = load_bundle(context.artifacts[BUNDLE_ARTIFACT], choose_device("auto"))
        log.info("grader %r", self.bundle)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Grade the scans of ``model_input`` (see :func:`grades_table`).

        Raises:
            BadInputError: a bad row, as one line naming the file (a 400 from ``mlflow models serve``).
        """
        try:
            return grades_table(model_input, self.bundle)
        except HealthiVertError as exc:
            raise BadInputError(exc) from exc


def pip_requirements() -> list[str]:
    """The runtime requirements of the installed ``healthivert`` and the model server, pinned to the installed versions."""
    from packaging.requirements import Requirement

    pinned = {}
    for text in [*(metadata.requires("healthivert") or []), *_SERVING_EXTRAS]:
        requirement = Requirement(text)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        try:
            pinned[requirement.name] = f"{requirement.name}=={metadata.version(requirement.name).split('+')[0]}"
        except metadata.PackageNotFoundError:
            continue
    return sorted(pinned.values())


def log_grader_model(bundle_dir: str | os.PathLike[str], registered_name: str | None = None) -> str:
    """Log a grader bundle as the MLflow model ``healthivert-grader`` in the active run; register it when named.

    The model carries the bundle as its artifact, the ``healthivert`` package as code, and the
    runtime requirements pinned to the installed versions (:func:`pip_requirements`). It is saved
    first and then logged as the run's artifacts, because ``mlflow.pyfunc.log_model`` would try its
    input example, whose scans are placeholders.

    Returns:
        the logged model's URI (``runs:/<run id>/grader_model``).
    """
    import healthivert

    run = mlflow.active_run()
    if run is None:
        raise MlflowException("log_grader_model needs an active MLflow run", error_code=INVALID_PARAMETER_VALUE)
    with tempfile.TemporaryDirectory(prefix="healthivert-model-") as tmp:
        local = Path(tmp) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(
            local, python_model=GraderModel(), artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(Path(healthivert.__file__).parent)], pip_requirements=pip_requirements(),
            signature=SIGNATURE, input_example=INPUT_EXAMPLE)
        mlflow.log_artifacts(str(local), MODEL_ARTIFACT)
    model_uri = f"runs:/{run.info.run_id}/{MODEL_ARTIFACT}"
    if registered_name is None:
        log.info("logged the grader model %s", model_uri)
    else:
        version = mlflow.register_model(model_uri, registered_name)
        log.info("logged the grader model %s, registered as %s version %s", model_uri, registered_name, version.version)
    return model_uri
