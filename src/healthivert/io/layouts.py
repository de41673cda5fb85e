"""Dataset layouts on disk: find every case's files, whatever layout a dataset folder uses.

Recognised with no configuration:

- ``verse``: the VerSe'19/'20 BIDS-like release (and our phantom)::

    rawdata/sub-X/sub-X[_entities]_ct.nii.gz
    derivatives/sub-X/sub-X[_entities]_seg-vert_msk.nii.gz
    derivatives/sub-X/sub-X[_entities]_seg-subreg_ctd.json
    truth/sub-X/sub-X[_entities]_{heights.csv,healthy-ct.nii.gz,healthy-msk.nii.gz}   (phantom only)

- ``paper``: the HealthiVert-GAN raw layout, ``raw/<id>/<id>.nii.gz`` (CT, optional),
  ``<id>_msk.nii.gz`` and ``<id>.json`` or ``<id>_ctd.json`` (``root`` may be the ``raw`` folder itself);
- ``totalsegmentator``: a CT beside a TotalSegmentator multi-label output, ``<stem>.nii.gz`` or
  ``<stem>_ct.nii.gz`` + ``<stem>_seg*.nii.gz``, or ``ct.nii.gz`` + ``segmentations.nii.gz``
  (in ``root`` or its sub-folders).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

from healthivert.errors import InputDataError

logger = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")
_VERSE_MASK = re.compile(r"^(?P<case>sub-[^_]+(?:_[^_]+-[^_]+)*)_seg-vert_msk\.nii(?:\.gz)?$")


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """The files of one case, as found on disk.

    Attributes:
        case_id: unique scan id, e.g. ``"sub-verse500_dir-ax"``, ``"0007"``.
        subject: patient id (splits are made by patient), e.g. ``"sub-verse500"``.
        layout: ``verse``, ``paper`` or ``totalsegmentator``.
        mask: vertebra label map.
        ct: CT, or ``None`` (mask-only case).
        centroids: centroid JSON, or ``None`` (centroids are then computed from the mask).
        label_scheme: ``verse`` ids, or ``totalseg`` ids to be mapped to VerSe ids.
        truth_heights: phantom ground-truth ``heights.csv``, or ``None``.
        healthy_ct: phantom fracture-free CT, or ``None``.
        healthy_mask: phantom fracture-free labels, or ``None``.
    """

    case_id: str
    subject: str
    layout: str
    mask: Path
    ct: Path | None = None
    centroids: Path | None = None
    label_scheme: str = "verse"
    truth_heights: Path | None = None
    healthy_ct: Path | None = None
    healthy_mask: Path | None = None


def _existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _nifti(folder: Path, stem: str) -> Path | None:
    return _existing(*(folder / f"{stem}{ext}" for ext in _NIFTI))


def _discover_verse(root: Path) -> list[CaseFiles]:
    derivatives = root / "derivatives"
    rawdata = root / "rawdata"
    cases = []
    for mask in sorted(derivatives.rglob("*_seg-vert_msk.nii*")):
        match = _VERSE_MASK.match(mask.name)
        if not match:
            logger.warning("%s: name does not follow sub-<id>[_key-value]_seg-vert_msk.nii.gz; skipped", mask)
            continue
        case = match["case"]
        subject = case.split("_")[0]
        ct_candidates = [rawdata / subject / f"{case}_ct{ext}" for ext in _NIFTI]
        ct_candidates += [rawdata / f"{case}_ct{ext}" for ext in _NIFTI]
        truth = root / "truth" / subject
        ct = _existing(*ct_candidates)
        if ct is None and rawdata.is_dir():
            logger.warning("%s: no CT %s_ct.nii.gz under %s; read as a mask-only case", mask, case, rawdata)
        cases.append(CaseFiles(
            case_id=case,
            subject=subject,
            layout="verse",
            mask=mask,
            ct=ct,
            centroids=_existing(mask.parent / f"{case}_seg-subreg_ctd.json", mask.parent / f"{case}_seg-vert_ctd.json"),
            truth_heights=_existing(truth / f"{case}_heights.csv"),
            healthy_ct=_nifti(truth, f"{case}_healthy-ct"),
            healthy_mask=_nifti(truth, f"{case}_healthy-msk"),
        ))
    return cases


def _discover_paper(root: Path) -> list[CaseFiles]:
    raw = root / "raw" if (root / "raw").is_dir() else root
    cases = []
    for folder in sorted(p for p in raw.iterdir() if p.is_dir()):
        mask = _nifti(folder, f"{folder.name}_msk")
        if mask is None:
            continue
        cases.append(CaseFiles(
            case_id=folder.name,
            subject=folder.name,
            layout="paper",
            mask=mask,
            ct=_nifti(folder, folder.name),
            centroids=_existing(folder / f"{folder.name}_ctd.json", folder / f"{folder.name}.json"),
        ))
    return cases


def strip_nifti(name: str) -> str:
    """A file name without its ``.nii`` / ``.nii.gz`` extension."""
    for ext in _NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _discover_totalseg(root: Path) -> list[CaseFiles]:
    cases = []
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for folder in folders:
        segmentation = _nifti(folder, "segmentations")
        ct = _nifti(folder, "ct")
        if segmentation is not None and ct is not None:
            case = folder.name
            cases.append(CaseFiles(case, case, "totalsegmentator", segmentation, ct, label_scheme="totalseg"))
        for seg in sorted(folder.glob("*_seg*.nii*")):
            stem = strip_nifti(seg.name)
            base = stem[: stem.rfind("_seg")]
            ct = _nifti(folder, base) or _nifti(folder, f"{base}_ct")
            if ct is None:
                continue
            cases.append(CaseFiles(base, base, "totalsegmentator", seg, ct, label_scheme="totalseg"))
    return cases


def discover_cases(root: str | os.PathLike[str]) -> list[CaseFiles]:
    """Find every case under a dataset folder, recognising the layout from its files.

    Args:
        root: dataset folder (VerSe release root, the paper's ``raw`` folder or its parent,
            or a folder of TotalSegmentator outputs).

    Returns:
        One :class:`CaseFiles` per case, sorted by case id.

    Raises:
        InputDataError: the folder is missing, or no known layout matches its content, or two
            cases share an id.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputDataError(root, "dataset folder not found")
    if (root / "derivatives").is_dir():
        cases = _discover_verse(root)
    else:
        cases = _discover_paper(root) or _discover_totalseg(root)
    if not cases:
        raise InputDataError(
            root, "no cases found",
            "expected a VerSe layout (derivatives/sub-*/sub-*_seg-vert_msk.nii.gz), the paper's raw/<id>/<id>_msk.nii.gz, "
            "or TotalSegmentator outputs (<name>_ct.nii.gz + <name>_seg*.nii.gz)",
        )
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputDataError(case.mask, f"case id '{case.case_id}' also used by {seen[case.case_id]}")
        seen[case.case_id] = case.mask
    logger.info("%s: %d %s case(s)", root, len(cases), cases[0].layout)
    return sorted(cases, key=lambda c: c.case_id)
