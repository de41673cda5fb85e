"""Grade a cohort: list its cases, grade each on its own, gather one table and a summary.

The three steps of the Kubeflow grading pipeline (``pipelines/grade_pipeline.py``) and of
``healthivert grade-cohort``, which runs them one after the other:

1. :func:`list_cases` turns *locations* into one :class:`CaseEntry` per scan. A location is a folder
   or ``s3://`` prefix holding cases in any layout ``preprocess`` reads (found by
   :func:`~healthivert.io.layouts.discover_cases`), or a mapping naming the files of one scan
   (``ct``, ``labels``, optionally ``ctd`` and ``case``: paths or ``s3://`` URIs, as the rows of the
   MLflow model). A location that holds no case becomes an entry carrying the reason.
2. :func:`grade_entry` grades one entry with :func:`~healthivert.inference.grade.grade_case` and writes
   its folder (:func:`~healthivert.inference.outputs.write_case`), published to an ``s3://`` prefix or
   a folder when asked. A case that cannot be graded (:class:`~healthivert.errors.HealthiVertError`)
   gives a failure record naming the case; the other cases are not affected.
3. :func:`write_cohort` gathers the records into ``cohort.parquet`` (one row per vertebra, one row per
   failed case), ``summary.json`` and ``summary.md`` (grade counts, the fractured vertebrae with a link
   to each case's report, the failures).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from healthivert.errors import ConfigError, HealthiVertError, InputDataError
from healthivert.io.atomic import atomic_path
from healthivert.io.layouts import discover_cases, strip_nifti
from healthivert.io.remote import (
    download_file,
    download_prefix,
    is_s3_uri,
    list_objects,
    split_s3_uri,
    upload_file,
)

log = logging.getLogger(__name__)

RECORD_NAME = "record.json"
TABLE_NAME = "cohort.parquet"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
GRADED, FAILED = "graded", "failed"
#: columns of ``cohort.parquet``: one row per vertebra of a graded case, one row per failed case.
COHORT_COLUMNS = ("case", "status", "error", "vertebra", "name", "graded", "grade", "rhlv_ant", "rhlv_mid",
                  "rhlv_post", "rhlv_max", "flag", "report")
FILE_KEYS = ("ct", "labels", "ctd")


@dataclasses.dataclass(frozen=True)
class CaseEntry:
    """One scan of the cohort, as the listing step found it (JSON-able: a Kubeflow loop item).

    Attributes:
        case: the case id (its output folder).
        ct: CT file (path or ``s3://`` URI), empty when the entry failed.
        labels: vertebra label map, likewise.
        ctd: centroid JSON, or empty (computed from the labels).
        label_scheme: ``verse``, ``totalseg`` or ``auto``.
        error: why the location gave no gradable scan (empty when it did).
    """

    case: str
    ct: str = ""
    labels: str = ""
    ctd: str = ""
    label_scheme: str = "auto"
    error: str = ""

    def to_dict(self) -> dict[str, str]:
        """As a plain mapping (what the listing step returns)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> CaseEntry:
        """From :meth:`to_dict`'s form (unknown keys refused)."""
        unknown = set(item) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError("case entry", f"unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**{key: "" if value is None else str(value) for key, value in item.items()})


def _location_name(location: str) -> str:
    """A case name for a location: its last path component, without a NIfTI extension."""
    return strip_nifti(PurePosixPath(location.rstrip("/")).name) or location


def _join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if is_s3_uri(base) else str(Path(base) / relative)


def _discover(location: str) -> list[CaseEntry]:
    """The scans under a folder or ``s3://`` prefix.

    An S3 prefix is read from its listing alone: its keys are laid out as empty files in a scratch
    folder, which :func:`discover_cases` reads by name, and each file found maps back to its URI.

    Raises:
        InputDataError: no folder or object there, or no known layout.
    """
    with tempfile.TemporaryDirectory(prefix="healthivert-listing-") as scratch:
        if is_s3_uri(location):
            _, prefix = split_s3_uri(location)
            items = list_objects(location)
            if not items:
                raise InputDataError(location, "no objects under this prefix")
            root = Path(scratch)
            for item in items:
                placeholder = root / item["Key"][len(prefix):].lstrip("/")
                placeholder.parent.mkdir(parents=True, exist_ok=True)
                placeholder.touch()
            base = location.rstrip("/")

            def uri(path: Path | None) -> str:
                return f"{base}/{path.relative_to(root).as_posix()}" if path is not None else ""
        else:
            root = Path(location)

            def uri(path: Path | None) -> str:
                return str(path) if path is not None else ""
        try:
            found = discover_cases(root)
        except InputDataError as exc:  # name the location, not the scratch folder
            raise InputDataError(location, exc.problem, exc.hint) from exc
        return [CaseEntry(files.case_id, uri(files.ct), uri(files.mask), uri(files.centroids), files.label_scheme,
                          "" if files.ct is not None else f"{uri(files.mask)}: no CT beside the labels")
                for files in found]


def _file_entry(item: Mapping[str, Any]) -> CaseEntry:
    """The entry of a mapping naming one scan's files (``ct``, ``labels``, optionally ``ctd``, ``case``)."""
    unknown = set(item) - {*FILE_KEYS, "case"}
    missing = [key for key in ("ct", "labels") if not item.get(key)]
    ct = str(item.get("ct") or "")
    case = str(item.get("case") or (strip_nifti(PurePosixPath(ct).name).removesuffix("_ct") if ct else "")) or "case"
    error = ""
    if unknown:
        error = f"unknown key(s) {', '.join(sorted(unknown))} (expected ct, labels, ctd, case)"
    elif missing:
        error = f"no {' or '.join(missing)} given (each scan needs ct and labels)"
    return CaseEntry(case, ct, str(item.get("labels") or ""), str(item.get("ctd") or ""), error=error)


def parse_location(text: str, flag: str = "--cases") -> str | dict[str, Any]:
    """A location given as text: a JSON object (``{"ct": ..., "labels": ...}``) when it starts with ``{``.

    Raises:
        ConfigError: text starting with ``{`` that is not a JSON object (named with ``flag``).
    """
    if not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} {text}", "not a JSON object", str(exc)) from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} {text}", "not a JSON object")
    return value


def list_cases(locations: Iterable[str | Mapping[str, Any]]) -> list[dict[str, str]]:
    """One entry per scan found at ``locations`` (see the module's docstring), in the order given.

    A location that yields no scan gives one entry carrying the reason, so that the grading step of
    that entry reports it and the cohort table lists it.

    Raises:
        ConfigError: no location at all, or two scans with the same case id.
    """
    entries: list[CaseEntry] = []
    for location in locations:
        if isinstance(location, Mapping):
            entries.append(_file_entry(location))
            continue
        location = str(location).strip()
        if not location:
            continue
        try:
            entries += _discover(location)
        except HealthiVertError as exc:
            log.warning("%s", exc)
            entries.append(CaseEntry(_location_name(location), error=str(exc)))
    if not entries:
        raise ConfigError("cases", "nothing to grade", "give case locations or a prefix holding cases")
    seen: set[str] = set()
    for entry in entries:
        if entry.case in seen:
            raise ConfigError(entry.case, "case id given twice", "each case needs its own output folder")
        seen.add(entry.case)
    log.info("%d case(s) to grade, %d of them already failed", len(entries), sum(bool(e.error) for e in entries))
    return [entry.to_dict() for entry in entries]


def load_grader(model: str, device: str = "auto") -> Any:
    """The grader bundle at a folder, an ``s3://`` prefix or an MLflow URI, loaded once.

    Raises:
        CheckpointError: see :func:`~healthivert.inference.bundle.load_bundle`.
        InputDataError: the S3 prefix holds nothing or cannot be read.
    """
    from healthivert.inference.bundle import load_bundle
    from healthivert.training.runtime import choose_device

    if not model:
        raise ConfigError("grader_uri", "empty", "give the grader bundle: a folder, an s3:// prefix or models:/NAME@ALIAS")
    if not is_s3_uri(model):
        return load_bundle(model, choose_device(device))
    with tempfile.TemporaryDirectory(prefix="healthivert-grader-") as cache:
        return load_bundle(download_prefix(model, cache), choose_device(device))


def _fetch(entry: CaseEntry, cache: Path) -> tuple[Any, dict[str, str]]:
    """The entry's :class:`CaseInputs` with local files, and local path -> the location it came from."""
    from healthivert.inference.grade import CaseInputs

    local: dict[str, Path | None] = {}
    origin: dict[str, str] = {}
    for key in FILE_KEYS:
        location = getattr(entry, key)
        if not location:
            local[key] = None
            continue
        path = download_file(location, cache) if is_s3_uri(location) else Path(location)
        if not path.exists():
            raise InputDataError(location, "not found")
        local[key], origin[str(path)] = path, location
    assert local["ct"] is not None and local["labels"] is not None
    return CaseInputs(entry.case, local["ct"], local["labels"], local["ctd"], entry.label_scheme), origin


def publish(files: Iterable[Path], root: Path, target: str) -> None:
    """Copy ``files`` (under the local folder ``root``) to the same relative places under ``target``.

    Args:
        files: the files to copy.
        root: the local folder they are relative to.
        target: an ``s3://`` prefix, or a folder (each file replaced atomically).
    """
    for file in files:
        relative = file.relative_to(root)
        if is_s3_uri(target):
            upload_file(file, _join(target, relative.as_posix()))
        else:
            with atomic_path(Path(target) / relative) as tmp:
                shutil.copyfile(file, tmp)


def grade_entry(entry: Mapping[str, Any], bundle: Any, out: str | os.PathLike[str], target: str = "",
                link_base: str = "") -> dict[str, Any]:
    """Grade one listed case; write its folder ``out/<case>`` and ``out/record.json``; return the record.

    Args:
        entry: an item of :func:`list_cases`.
        bundle: a loaded :class:`~healthivert.inference.bundle.GraderBundle` (:func:`load_grader`).
        out: local folder of this step (the case's outputs go in ``out/<case>``).
        target: where the case's folder is also copied (``s3://`` prefix or folder; its ``<case>``
            sub-folder); empty: not copied.
        link_base: where ``out`` is reachable from outside (a Kubeflow artifact's URI), for the links of
            the record when there is no ``target``; default: ``out``.

    Returns:
        ``case``, ``status`` (``graded`` or ``failed``), ``error`` (one line naming the case), ``outputs``
        and ``report`` (locations of the case's folder and report), ``rows`` (one dict per vertebra).
    """
    from healthivert.inference.grade import grade_case
    from healthivert.inference.outputs import write_case

    case = CaseEntry.from_dict(entry)
    out = Path(out)
    record: dict[str, Any] = {"case": case.case, "status": FAILED, "error": "", "outputs": "", "report": "",
                              "rows": []}
    try:
        if case.error:
            raise InputDataError(case.case, case.error)
        with tempfile.TemporaryDirectory(prefix="healthivert-case-") as cache:
            inputs, origin = _fetch(case, Path(cache))
            try:
                result = grade_case(inputs, bundle, progress=False)
            except HealthiVertError as exc:  # name the location given, not the download in the cache
                raise type(exc)(origin.get(exc.source, exc.source), exc.problem, exc.hint) from exc
        table = write_case(result, bundle, out / case.case)
        if target:
            publish(sorted(p for p in (out / case.case).rglob("*") if p.is_file()), out, target)
    except HealthiVertError as exc:
        message = str(exc) if str(exc).startswith(f"{case.case}:") else f"{case.case}: {exc}"
        record["error"] = message
        log.error("%s", message)
    else:
        base = _join(target or link_base or str(out), case.case)
        record |= {"status": GRADED, "outputs": base, "report": _join(base, "report.html"),
                   "rows": json.loads(table.to_json(orient="records"))}
        log.info("%s: %d of %d vertebrae graded", case.case, int(table["graded"].sum()), len(table))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / RECORD_NAME) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return record


def read_records(folders: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The records :func:`grade_entry` wrote into each folder (a Kubeflow step's artifact).

    Raises:
        InputDataError: a folder without a record.
    """
    records = []
    for folder in folders:
        path = Path(folder) / RECORD_NAME
        if not path.is_file():
            raise InputDataError(path, "no grading record", "each grading step writes one")
        records.append(json.loads(path.read_text()))
    return records


def cohort_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``cohort.parquet``: the vertebrae of every graded case, then one row per failed case (:data:`COHORT_COLUMNS`)."""
    rows = []
    for record in records:
        common = {"case": record["case"], "status": record["status"], "error": record["error"] or None,
                  "report": record["report"] or None}
        if record["status"] == GRADED:
            rows += [{**row, **common} for row in record["rows"]]
        else:
            rows.append(common)
    table = pd.DataFrame(rows).reindex(columns=list(COHORT_COLUMNS))
    return table.astype({"case": str, "status": str, "error": "string", "vertebra": "Int64", "name": "string",
                         "graded": "boolean", "grade": "Int64", "flag": "string", "report": "string",
                         **{column: "float64" for column in ("rhlv_ant", "rhlv_mid", "rhlv_post", "rhlv_max")}})


def cohort_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Grade counts, the fractured vertebrae (grade 1 or more) with their reports, and the failed cases."""
    cases = table.drop_duplicates("case")
    graded = table[table["graded"].fillna(False).astype(bool)]
    counts = {str(grade): int((graded["grade"] == grade).sum()) for grade in range(4)}
    fractured = graded[graded["grade"] >= 1]
    return {
        "cases": len(cases),
        "cases_graded": int((cases["status"] == GRADED).sum()),
        "cases_failed": int((cases["status"] == FAILED).sum()),
        "vertebrae": int(table["vertebra"].notna().sum()),
        "vertebrae_graded": len(graded),
        "grade_counts": counts,
        "fractured": [{"case": row.case, "vertebra": int(row.vertebra), "name": row.name, "grade": int(row.grade),
                       "rhlv_max": float(row.rhlv_max), "report": row.report}
                      for row in fractured.itertuples(index=False)],
        "failed": [{"case": row.case, "error": row.error} for row in cases[cases["status"] == FAILED].itertuples()],
    }


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown (shown by the Kubeflow UI)."""
    counts = summary["grade_counts"]
    lines = ["# HealthiVert cohort grades", "",
             (f"{summary['cases_graded']} of {summary['cases']} case(s) graded, {summary['cases_failed']} failed; "
              f"{summary['vertebrae_graded']} of {summary['vertebrae']} vertebrae graded. Research use, not for diagnosis."),
             "", "| Genant grade | 0 normal | 1 mild | 2 moderate | 3 severe |", "|---|---|---|---|---|",
             f"| vertebrae | {counts['0']} | {counts['1']} | {counts['2']} | {counts['3']} |", "",
             "## Fractured vertebrae (grade 1 or more)", ""]
    lines += [f"- {item['case']} {item['name']}: grade {item['grade']}, RHLV max {item['rhlv_max']:.2f} "
              f"([report]({item['report']}))" for item in summary["fractured"]] or ["none"]
    lines += ["", "## Cases not graded", ""]
    lines += [f"- {item['error']}" for item in summary["failed"]] or ["none"]
    return "\n".join(lines) + "\n"


def write_cohort(records: Sequence[Mapping[str, Any]], out: str | os.PathLike[str],
                 target: str = "") -> dict[str, Any]:
    """Write ``cohort.parquet``, ``summary.json`` and ``summary.md`` into the folder ``out``; return the summary.

    Args:
        records: what :func:`grade_entry` returned for each case.
        out: local folder (its files are replaced; other files are kept).
        target: where the three files are also copied (``s3://`` prefix or folder); empty: nowhere.
    """
    table = cohort_table(records)
    summary = cohort_summary(table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TABLE_NAME) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out / SUMMARY_JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_path(out / SUMMARY_MD) as tmp:
        tmp.write_text(summary_markdown(summary))
    if target:
        publish([out / name for name in (TABLE_NAME, SUMMARY_JSON, SUMMARY_MD)], out, target)
    log.info("cohort: %d of %d case(s) graded, %d fractured vertebra(e) -> %s", summary["cases_graded"],
             summary["cases"], len(summary["fractured"]), target or out)
    return summary
