"""Analytic anatomy of the phantom spine: vertebra sizes, the spine curve, body shapes, fractures, truth heights.

Positions are in mm in the phantom's canonical frame ``(z, y, x)`` = (superior -> inferior,
anterior -> posterior, right -> left), the axis order of an ``IPL`` volume. Each vertebra has a local
frame: ``u`` along the spine curve (towards inferior, the body's height direction), ``v`` antero-posterior
(towards posterior, 0 at the body's centre) and ``w`` left-right; bodies are perpendicular to the curve.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from healthivert.io.labels import vertebra_name

FractureType = Literal["none", "wedge", "biconcave", "crush"]

#: Genant bands with margins, from which a fractured vertebra's target loss is drawn.
GRADE_LOSS_RANGES: dict[int, tuple[float, float]] = {1: (0.205, 0.245), 2: (0.27, 0.38), 3: (0.43, 0.55)}
#: Largest height loss of a grade-0 vertebra's natural deformity.
NORMAL_MAX_LOSS = 0.09
FRACTURE_TYPE_WEIGHTS: dict[str, float] = {"wedge": 0.5, "biconcave": 0.3, "crush": 0.2}

# Share of the deformation taken from the superior endplate (the rest from the inferior one).
TOP_SHARE: dict[str, float] = {"none": 1.0, "wedge": 1.0, "biconcave": 0.5, "crush": 0.65}
_SUPERELLIPSE = 2.6  # exponent of the body's cross-section (2: ellipse, larger: squarer)
_EDGE_START = 0.75  # normalised radius where the rim of the body starts to round off
_EDGE_MIN = 0.55  # height at the rim, relative to the centre
CENTRAL_BAND = 0.2  # columns within +-width/5 of the centre are measured
COLUMN_THRESHOLD = 0.7  # columns lower than this share of the central height are edges


@dataclasses.dataclass(frozen=True)
class Fracture:
    """How a vertebral body is deformed (``kind="none"`` with ``scale=0`` for an intact body).

    Attributes:
        kind: ``none`` (intact or natural deformity), ``wedge``, ``biconcave`` or ``crush``.
        grade: Genant grade 0-3 of the resulting loss.
        scale: amplitude ``k`` of the deformation field (height lost = ``k * shape`` of the healthy height).
        shape_param: wedge: relative loss left at the posterior wall; crush: anterior excess; biconcave: unused.
        deformity: for ``kind="none"``, the shape of a natural deformity (``none`` when the body is intact).
    """

    kind: FractureType = "none"
    grade: int = 0
    scale: float = 0.0
    shape_param: float = 0.0
    deformity: FractureType = "none"

    @property
    def shape_kind(self) -> FractureType:
        """The deformation shape in use (the fracture type, or the natural deformity's)."""
        return self.kind if self.kind != "none" else self.deformity


@dataclasses.dataclass(frozen=True)
class VertebraSpec:
    """One phantom vertebra: size, pose and deformation.

    Attributes:
        vertebra: VerSe id.
        height_mm: healthy body height at the rim of the endplates' cup (the central column is
            ``1 - concavity`` of it).
        depth_mm: antero-posterior depth of the body.
        width_mm: left-right width of the body.
        tilt: natural antero-posterior height gradient (relative height change from centre to posterior wall).
        centre_mm: body centre ``(z, y, x)`` in the canonical frame.
        axes: rows ``e_u`` (height, inferior), ``e_v`` (AP, posterior), ``e_w`` (LR) of the local frame.
        fracture: the deformation of the body.
        disc_below_mm: thickness of the disc below (0 for the last vertebra).
        density_hu: mean trabecular HU.
        concavity: depth of the endplates' cup, both endplates together, as a share of the height
            (0 for flat endplates): real bodies are shorter in the middle than at their walls.
    """

    vertebra: int
    height_mm: float
    depth_mm: float
    width_mm: float
    tilt: float
    centre_mm: np.ndarray
    axes: np.ndarray
    fracture: Fracture
    disc_below_mm: float
    density_hu: float
    concavity: float = 0.0

    @property
    def name(self) -> str:
        """Vertebra name, e.g. ``"L1"``."""
        return vertebra_name(self.vertebra)


def cross_section_radius(v: np.ndarray, w: np.ndarray, depth_mm: float, width_mm: float) -> np.ndarray:
    """Normalised superellipse radius of the body's cross-section (``<= 1`` inside), ``v`` AP, ``w`` LR in mm."""
    a, b = depth_mm / 2.0, width_mm / 2.0
    p = _SUPERELLIPSE
    return (np.abs(v / a) ** p + np.abs(w / b) ** p) ** (1.0 / p)


def ap_half_extent(w: np.ndarray, depth_mm: float, width_mm: float) -> np.ndarray:
    """Half the body's AP extent at left-right offset ``w`` (mm); 0 outside the body."""
    rel = np.clip(1.0 - np.abs(w / (width_mm / 2.0)) ** _SUPERELLIPSE, 0.0, None)
    return depth_mm / 2.0 * rel ** (1.0 / _SUPERELLIPSE)


def healthy_height(v: np.ndarray, w: np.ndarray, spec: VertebraSpec) -> np.ndarray:
    """Healthy body height (mm) at column ``(v, w)`` of the local frame; 0 outside the cross-section."""
    rho = cross_section_radius(v, w, spec.depth_mm, spec.width_mm)
    excess = np.clip((rho - _EDGE_START) / (1.0 - _EDGE_START), 0.0, None)
    edge = np.sqrt(np.clip(1.0 - (1.0 - _EDGE_MIN**2) * excess**2, 0.0, None))
    cup = 1.0 - spec.concavity * np.clip(1.0 - rho**2, 0.0, None) ** 2
    height = spec.height_mm * edge * cup * (1.0 + spec.tilt * v / (spec.depth_mm / 2.0))
    return np.where(rho <= 1.0, height, 0.0)


def deformation_shape(v: np.ndarray, w: np.ndarray, spec: VertebraSpec) -> np.ndarray:
    """Unscaled relative height loss at column ``(v, w)`` for the vertebra's deformation type (max about 1)."""
    kind = spec.fracture.shape_kind
    t = np.clip((v + spec.depth_mm / 2.0) / spec.depth_mm, 0.0, 1.0)  # 0 anterior wall, 1 posterior wall
    if kind == "wedge":
        return (1.0 - t) + spec.fracture.shape_param * t
    if kind == "biconcave":
        rho = cross_section_radius(v, w, spec.depth_mm, spec.width_mm)
        return np.clip(1.0 - rho**2, 0.0, None)
    if kind == "crush":
        return 1.0 - spec.fracture.shape_param * t
    return np.zeros(np.broadcast(v, w).shape)


def body_bounds(v: np.ndarray, w: np.ndarray, spec: VertebraSpec, fractured: bool) -> tuple[np.ndarray, np.ndarray]:
    """Superior and inferior endplate positions ``u`` (mm, along the height axis) at column ``(v, w)``.

    The healthy body spans ``[-H/2, H/2]``; a deformation lowers the superior endplate by the share
    ``top`` of the lost height and raises the inferior one by the rest, so neighbours stay in place.
    """
    height = healthy_height(v, w, spec)
    top, bottom = -height / 2.0, height / 2.0
    if fractured and spec.fracture.scale > 0.0:
        lost = height * spec.fracture.scale * deformation_shape(v, w, spec)
        share = TOP_SHARE[spec.fracture.shape_kind]
        top, bottom = top + share * lost, bottom - (1.0 - share) * lost
    return top, bottom


def _measurement_columns(spec: VertebraSpec, step_mm: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns ``(v, w)`` of the height definition and their third (0 anterior, 1 middle, 2 posterior)."""
    half_band = CENTRAL_BAND * spec.width_mm
    w = np.arange(-half_band, half_band + step_mm / 2, step_mm)
    n = int(np.ceil(spec.depth_mm / step_mm))
    frac = (np.arange(n) + 0.5) / n  # position across the slice's AP extent, 0 anterior .. 1 posterior
    half = ap_half_extent(w, spec.depth_mm, spec.width_mm)
    v = (-half[:, None] + 2.0 * half[:, None] * frac[None, :])
    third = np.minimum((frac * 3).astype(int), 2)
    return v, np.broadcast_to(w[:, None], v.shape), np.broadcast_to(third[None, :], v.shape)


def third_heights(spec: VertebraSpec, fractured: bool) -> np.ndarray:
    """Mean body height (mm) of the anterior, middle and posterior thirds, by the shared height definition.

    Columns: within ``+-width/5`` of the centre left-right, each slice's AP extent split in thirds, kept
    when their healthy height is at least 0.7 x the healthy height of the slice's central column.
    """
    v, w, third = _measurement_columns(spec)
    healthy = healthy_height(v, w, spec)
    keep = healthy >= COLUMN_THRESHOLD * healthy_height(np.zeros_like(w), w, spec)
    top, bottom = body_bounds(v, w, spec, fractured)
    heights = bottom - top
    return np.array([heights[keep & (third == k)].mean() for k in range(3)])


def relative_losses(spec: VertebraSpec, scale: float) -> np.ndarray:
    """Height loss of each third (anterior, middle, posterior) for a deformation of amplitude ``scale``."""
    trial = dataclasses.replace(spec, fracture=dataclasses.replace(spec.fracture, scale=scale))
    healthy = third_heights(trial, fractured=False)
    return 1.0 - third_heights(trial, fractured=True) / healthy


def scale_for_loss(spec: VertebraSpec, target_loss: float) -> float:
    """Deformation amplitude whose largest third loss is exactly ``target_loss`` (loss is linear in it)."""
    unit = relative_losses(spec, 1.0).max()
    return float(target_loss / unit)


def genant_grade(loss: float) -> int:
    """Genant grade of a relative height loss: <0.20 -> 0, <0.25 -> 1, <=0.40 -> 2, else 3."""
    if loss < 0.20:
        return 0
    if loss < 0.25:
        return 1
    return 2 if loss <= 0.40 else 3
