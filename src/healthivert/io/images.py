"""Read a CT or a label map given as a file or a folder: NIfTI, a DICOM series, TotalSegmentator's mask folder.

Only geometry and the modality are read from DICOM headers; nothing that identifies a patient is kept.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from healthivert.errors import InputDataError
from healthivert.io.labels import VERSE_IDS
from healthivert.io.nifti import Volume, load_volume

log = logging.getLogger(__name__)

#: DICOM tag of the modality.
MODALITY_TAG = "0008|0060"
#: from ITK's LPS world to NIfTI's RAS world.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def load_dicom_series(folder: Path) -> Volume:
    """The CT of a DICOM series folder as a float32 volume in HU with a NIfTI (RAS) affine.

    Raises:
        InputDataError: no DICOM image in the folder, several series (listed), or not a CT.
    """
    import SimpleITK as sitk  # imported here: only DICOM input needs it

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputDataError(folder, "no DICOM image in the folder", "give a NIfTI file or a folder of one DICOM series")
    if len(series) > 1:
        raise InputDataError(folder, f"holds {len(series)} DICOM series ({', '.join(series)})",
                             "give the folder of one series")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    header = sitk.ImageFileReader()
    header.SetFileName(files[0])
    header.ReadImageInformation()
    modality = header.GetMetaData(MODALITY_TAG).strip() if header.HasMetaDataKey(MODALITY_TAG) else "unknown"
    if modality != "CT":
        raise InputDataError(folder, f"DICOM modality is {modality}, not CT", "grading needs a CT series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputDataError(folder, "unreadable DICOM series", str(exc).strip().splitlines()[-1]) from exc
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)).astype(np.float32)  # (z, y, x) -> (x, y, z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin())
    log.info("%s: DICOM CT series of %d slices, %s voxels", folder, len(files), "x".join(map(str, array.shape)))
    return Volume(array, affine, folder)


def load_mask_folder(folder: Path) -> Volume:
    """TotalSegmentator's folder of per-structure masks (``vertebrae_L1.nii.gz``, ...) as one VerSe-id label map.

    Raises:
        InputDataError: no vertebra mask in the folder, or masks of different grids.
    """
    masks = sorted(folder.glob("vertebrae_*.nii*"))
    if not masks:
        raise InputDataError(folder, "no vertebrae_*.nii.gz mask in the folder",
                             "give a label map file or TotalSegmentator's segmentations folder")
    combined: Volume | None = None
    for path in masks:
        name = path.name.split(".")[0].removeprefix("vertebrae_")
        if name not in VERSE_IDS:
            log.warning("%s: %s is not a vertebra name; ignored", path, name)
            continue
        mask = load_volume(path, label=True)
        if combined is None:
            combined = mask.with_array(np.zeros(mask.shape, dtype=np.int32))
        elif mask.shape != combined.shape or not np.allclose(mask.affine, combined.affine, atol=1e-3):
            raise InputDataError(path, f"grid differs from that of {masks[0].name}", "all masks must share one grid")
        combined.array[mask.array > 0] = VERSE_IDS[name]
    if combined is None:
        raise InputDataError(folder, "no vertebra mask in the folder")
    return Volume(combined.array, combined.affine, folder)


def read_image(path: str | os.PathLike[str]) -> Volume:
    """A CT from a NIfTI file or a DICOM series folder (float32 HU)."""
    path = Path(path)
    return load_dicom_series(path) if path.is_dir() else load_volume(path)


def read_label_map(path: str | os.PathLike[str]) -> Volume:
    """A label map from a NIfTI file or TotalSegmentator's folder of per-structure masks (int32)."""
    path = Path(path)
    return load_mask_folder(path) if path.is_dir() else load_volume(path, label=True)
