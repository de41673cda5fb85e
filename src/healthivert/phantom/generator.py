"""Synthetic spine CT cases with known ground truth, and a writer for the VerSe-like dataset layout.

A case holds a fractured spine CT, its vertebra labels, the same spine without fractures (the healthy
twin, identical elsewhere, noise included) and a table of true body heights per vertebra. Volumes are
kept in ``IPL`` axis order (superior -> inferior, anterior -> posterior, right -> left) at the case's own
(possibly anisotropic) voxel size, and written in the case's storage orientation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from healthivert.config import PhantomParams, RealShapeSource
from healthivert.io.atomic import atomic_dir, atomic_path
from healthivert.io.case import TRUTH_COLUMNS
from healthivert.io.centroids import centroids_from_labels, write_centroids
from healthivert.io.nifti import Volume, save_volume
from healthivert.io.resample import reorient
from healthivert.parallel import map_cases
from healthivert.phantom.anatomy import VertebraSpec, genant_grade, third_heights
from healthivert.phantom.real import generate_real_case, load_real_spine
from healthivert.phantom.render import RenderedSpine, render_spine
from healthivert.phantom.spine import SpineLayout, sample_spine

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class PhantomCase:
    """One synthetic case, volumes in ``IPL`` axis order.

    Attributes:
        case_id: e.g. ``"sub-phantom000"``.
        ct: HU (float32) with fractures.
        labels: VerSe ids (uint8) with fractures.
        healthy_ct: HU of the fracture-free twin.
        healthy_labels: its labels.
        truth: one row per vertebra, columns :data:`healthivert.io.case.TRUTH_COLUMNS`.
        layout: the analytic spine the volumes were drawn from (``None`` for a real-shape case).
        storage_orientation: axis codes the files are written in, e.g. ``"LPS"``.
        source: ``drawn`` or ``real-shape`` (the spine of a real label map), written with the truth.
    """

    case_id: str
    ct: Volume
    labels: Volume
    healthy_ct: Volume
    healthy_labels: Volume
    truth: pd.DataFrame
    layout: SpineLayout | None
    storage_orientation: str
    source: str = "drawn"

    def __repr__(self) -> str:
        grades = self.truth["grade"].value_counts().sort_index().to_dict()
        return (f"PhantomCase({self.case_id}, {self.source}, shape={self.ct.shape}, spacing_mm={tuple(round(s, 2) for s in self.ct.spacing_mm)}, "
                f"stored={self.storage_orientation}, grades={grades})")


def ipl_affine(spacing_mm: tuple[float, float, float], origin_mm: np.ndarray) -> np.ndarray:
    """Voxel-to-world (RAS+) affine of an ``IPL`` grid with the given voxel size and first-voxel position."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0.0, 0.0, -spacing_mm[2]], [0.0, -spacing_mm[1], 0.0], [-spacing_mm[0], 0.0, 0.0]])
    affine[:3, 3] = origin_mm
    return affine


def truth_table(vertebrae: list[VertebraSpec]) -> pd.DataFrame:
    """Ground-truth heights of each vertebra by the shared height definition (analytic, not from voxels)."""
    rows = []
    for spec in vertebrae:
        healthy = third_heights(spec, fractured=False)
        actual = third_heights(spec, fractured=True)
        loss = 1.0 - actual / healthy
        rows.append({
            "vertebra": spec.vertebra, "name": spec.name, "grade": genant_grade(float(loss.max())),
            "fracture_type": spec.fracture.kind,
            "healthy_h_ant_mm": healthy[0], "healthy_h_mid_mm": healthy[1], "healthy_h_post_mm": healthy[2],
            "h_ant_mm": actual[0], "h_mid_mm": actual[1], "h_post_mm": actual[2],
            "loss_ant": loss[0], "loss_mid": loss[1], "loss_post": loss[2],
        })
    return pd.DataFrame(rows, columns=list(TRUTH_COLUMNS))


def generate_case(rng: np.random.Generator, params: PhantomParams, case_id: str = "sub-phantom000") -> PhantomCase:
    """Draw and voxelise one synthetic spine case.

    Args:
        rng: the case's random generator (everything about the case comes from it).
        params: phantom settings (vertebra count, fracture share and grades, voxel sizes, noise, orientations).
        case_id: the case's id.
    """
    layout = sample_spine(rng, params)
    low, high = params.spacing_mm_range
    in_plane = float(rng.uniform(low, high))
    spacing = (float(rng.uniform(low, high)), in_plane, in_plane)
    rendered = render_spine(layout, spacing, rng)
    affine = ipl_affine(spacing, origin_mm=np.array([layout.fov_mm[2] / 2, layout.fov_mm[1] / 2, 0.0]))
    return _noisy_case(rng, params, case_id, rendered, affine, truth_table(layout.vertebrae), layout, "drawn")


def _noisy_case(rng: np.random.Generator, params: PhantomParams, case_id: str, rendered: RenderedSpine,
                affine: np.ndarray, truth: pd.DataFrame, layout: SpineLayout | None, source: str) -> PhantomCase:
    """A :class:`PhantomCase` of a rendered spine: scanner noise (the same on the healthy twin), a storage orientation."""
    noise = rng.standard_normal(rendered.ct.shape, dtype=np.float32) * np.float32(params.noise_hu)
    return PhantomCase(
        case_id=case_id,
        ct=Volume(rendered.ct + noise, affine),
        labels=Volume(rendered.labels, affine),
        healthy_ct=Volume(rendered.healthy_ct + noise, affine),
        healthy_labels=Volume(rendered.healthy_labels, affine),
        truth=truth,
        layout=layout,
        storage_orientation=str(rng.choice(list(params.orientations))),
        source=source,
    )


def real_shape_case(rng: np.random.Generator, params: PhantomParams, source: RealShapeSource, spine_labels: Volume,
                    case_id: str) -> PhantomCase:
    """One case from a real spine (see :mod:`healthivert.phantom.real`): noise, grid and storage as a drawn case's."""
    rendered, truth, spacing = generate_real_case(rng, params, source, spine_labels, case_id)
    shape = rendered.ct.shape
    affine = ipl_affine(spacing, origin_mm=np.array([shape[2] * spacing[2] / 2, shape[1] * spacing[1] / 2, 0.0]))
    return _noisy_case(rng, params, case_id, rendered, affine, truth, None, "real-shape")


def _stored(volume: Volume, orientation: str, dtype: type) -> Volume:
    stored = reorient(volume, orientation)
    array = np.rint(stored.array) if np.dtype(dtype).kind == "i" else stored.array
    return Volume(array.astype(dtype), stored.affine)


def write_case(case: PhantomCase, root: str | os.PathLike[str]) -> dict[str, Path]:
    """Write a case in the VerSe layout under ``root`` (see docs/architecture.md), in its storage orientation.

    Returns:
        The written files by role (``ct``, ``mask``, ``centroids``, ``healthy_ct``, ``healthy_mask``, ``heights``).
    """
    root = Path(root)
    cid = case.case_id
    subject = cid.split("_")[0]
    raw, derivatives, truth = root / "rawdata" / subject, root / "derivatives" / subject, root / "truth" / subject
    orientation = case.storage_orientation
    mask = _stored(case.labels, orientation, np.uint8)
    paths = {
        "ct": save_volume(raw / f"{cid}_ct.nii.gz", _stored(case.ct, orientation, np.int16)),
        "mask": save_volume(derivatives / f"{cid}_seg-vert_msk.nii.gz", mask),
        "centroids": write_centroids(derivatives / f"{cid}_seg-subreg_ctd.json", centroids_from_labels(mask.array), mask),
        "healthy_ct": save_volume(truth / f"{cid}_healthy-ct.nii.gz", _stored(case.healthy_ct, orientation, np.int16)),
        "healthy_mask": save_volume(truth / f"{cid}_healthy-msk.nii.gz", _stored(case.healthy_labels, orientation, np.uint8)),
    }
    with atomic_path(truth / f"{cid}_heights.csv") as tmp:
        case.truth.assign(source=case.source).to_csv(tmp, index=False, float_format="%.4f")
    paths["heights"] = truth / f"{cid}_heights.csv"
    return paths


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of case ``index`` of a dataset (independent of how many cases are made)."""
    return np.random.default_rng([seed, index])


def _planned_cases(params: PhantomParams) -> list[tuple[str, RealShapeSource | None, np.random.Generator]]:
    """Every case of the dataset: its id, its real-shape source (``None`` when drawn) and its random generator.

    Drawn cases are ``sub-phantomNNN``; the cases of a real spine are ``sub-<name>_run-NNN``, one patient.
    """
    planned: list[tuple[str, RealShapeSource | None, np.random.Generator]] = [
        (f"sub-phantom{index:03d}", None, case_rng(params.seed, index)) for index in range(params.cases)]
    for number, source in enumerate(params.real_shapes, start=1):
        planned += [(f"sub-{source.name}_run-{run:03d}", source, np.random.default_rng([params.seed, number, run]))
                    for run in range(source.cases)]
    return planned


@dataclasses.dataclass(frozen=True)
class _CaseJob:
    """One case to generate and write (a worker process's input)."""

    case_id: str
    source: RealShapeSource | None
    rng: np.random.Generator
    params: PhantomParams
    spine: Volume | None
    root: Path


def _generate_and_write(job: _CaseJob) -> tuple[pd.DataFrame, float]:
    """Generate one case and write it under ``job.root``; returns its grades rows and the generation seconds."""
    start = time.perf_counter()
    if job.source is None:
        case = generate_case(job.rng, job.params, case_id=job.case_id)
    else:
        case = real_shape_case(job.rng, job.params, job.source, job.spine, job.case_id)
    seconds = time.perf_counter() - start
    write_case(case, job.root)
    logger.debug("%r", case)
    split = job.source.split if job.source is not None else None
    return case.truth[["vertebra", "grade"]].assign(case=case.case_id, split=split, source=case.source), seconds


def write_dataset(out: str | os.PathLike[str], params: PhantomParams) -> dict[str, float]:
    """Generate the drawn and the real-shape cases and write them, with ``grades.csv`` and ``params.yaml``, as one atomic folder.

    ``grades.csv`` has columns ``case, vertebra, grade, split``; ``split`` is set for the cases of a
    real-shape source with a fixed split (all cases of one source spine share it) and empty otherwise.

    Returns:
        Summary metrics: cases, vertebrae, fractures per grade, mean generation seconds per case, and the
        cases and vertebrae of each source (``drawn``, ``real_shape``).

    Raises:
        InputDataError: a real-shape label map is missing or unusable (before anything is written).
    """
    out = Path(out)
    spines = {source.name: load_real_spine(source) for source in params.real_shapes}
    with atomic_dir(out) as tmp:
        work = [_CaseJob(case_id, source, rng, params, spines.get(source.name) if source else None, tmp)
                for case_id, source, rng in _planned_cases(params)]
        done = list(map_cases(_generate_and_write, work, "phantom"))
        grades = [truth for truth, _ in done]
        seconds = [elapsed for _, elapsed in done]
        table = pd.concat(grades, ignore_index=True)
        table[["case", "vertebra", "grade", "split"]].to_csv(tmp / "grades.csv", index=False)
        (tmp / "params.yaml").write_text(yaml.safe_dump({"phantom": params.model_dump(mode="json")}, sort_keys=False))
    counts = table["grade"].value_counts()
    metrics = {"cases": float(table["case"].nunique()), "vertebrae": float(len(table)),
               "seconds_per_case": float(np.mean(seconds))}
    metrics |= {f"grade_{g}": float(counts.get(g, 0)) for g in range(4)}
    for source_name in ("drawn", "real-shape"):
        rows = table[table["source"] == source_name]
        key = source_name.replace("-", "_")
        metrics |= {f"{key}_cases": float(rows["case"].nunique()), f"{key}_vertebrae": float(len(rows))}
    logger.info("%s: %d cases (%d real-shape), %d vertebrae, grades %s", out, int(metrics["cases"]),
                int(metrics["real_shape_cases"]), len(table), {g: int(counts.get(g, 0)) for g in range(4)})
    return metrics
