"""Random phantom spines: which vertebrae, their sizes, the curve they sit on and their fractures.

Positions are in mm in the canonical frame ``(z, y, x)`` = (superior -> inferior, anterior -> posterior,
right -> left), origin at the first voxel of the phantom's field of view.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from healthivert.config import PhantomParams
from healthivert.phantom.anatomy import (
    FRACTURE_TYPE_WEIGHTS,
    GRADE_LOSS_RANGES,
    NORMAL_MAX_LOSS,
    Fracture,
    VertebraSpec,
    scale_for_loss,
)

FIRST_VERTEBRA = (13, 17)  # T6 .. T10: the cranial end of a phantom spine
LAST_VERTEBRA = 24  # L5
_BEYOND_MM = 80.0  # the centre line is followed this far beyond the field of view
#: share of an unlabelled context vertebra's height inside the field of view (the scan cuts through it)
_CONTEXT_IN_VIEW = (0.3, 0.8)


@dataclasses.dataclass(frozen=True)
class SpineCurve:
    """A smooth spine centre line ``(y(z), x(z))``: sagittal kyphosis/lordosis, slight coronal scoliosis.

    Attributes:
        y0: AP position of the line at the thoracolumbar inflection (mm).
        sagittal_amp: kyphosis/lordosis amplitude (mm); posterior bow above ``z_inflection``, anterior below.
        sagittal_wavelength: wavelength of the sagittal wave (mm).
        z_inflection: where the sagittal curve changes from kyphosis to lordosis (mm).
        x0: LR position of the line (mm).
        coronal_amp: scoliosis amplitude (mm).
        coronal_wavelength: wavelength of the coronal wave (mm).
        coronal_phase: phase of the coronal wave (rad).
    """

    y0: float
    sagittal_amp: float
    sagittal_wavelength: float
    z_inflection: float
    x0: float
    coronal_amp: float
    coronal_wavelength: float
    coronal_phase: float

    def point(self, z: np.ndarray) -> np.ndarray:
        """Points ``(N, 3)`` ``(z, y, x)`` of the centre line at heights ``z`` (mm)."""
        z = np.atleast_1d(np.asarray(z, dtype=np.float64))
        y = self.y0 - self.sagittal_amp * np.sin(2 * np.pi * (z - self.z_inflection) / self.sagittal_wavelength)
        x = self.x0 + self.coronal_amp * np.sin(2 * np.pi * z / self.coronal_wavelength + self.coronal_phase)
        return np.stack([z, y, x], axis=1)

    def tangent(self, z: np.ndarray) -> np.ndarray:
        """Unit tangents ``(N, 3)`` of the centre line at ``z``, pointing inferior."""
        z = np.atleast_1d(np.asarray(z, dtype=np.float64))
        k_s = 2 * np.pi / self.sagittal_wavelength
        k_c = 2 * np.pi / self.coronal_wavelength
        dy = -self.sagittal_amp * k_s * np.cos(k_s * (z - self.z_inflection))
        dx = self.coronal_amp * k_c * np.cos(k_c * z + self.coronal_phase)
        t = np.stack([np.ones_like(z), dy, dx], axis=1)
        return t / np.linalg.norm(t, axis=1, keepdims=True)

    def frame(self, z: float) -> np.ndarray:
        """Local frame at ``z``: rows ``e_u`` (tangent, inferior), ``e_v`` (posterior), ``e_w`` (left)."""
        e_u = self.tangent(z)[0]
        e_v = np.array([0.0, 1.0, 0.0]) - e_u[1] * e_u
        e_v /= np.linalg.norm(e_v)
        e_w = np.cross(e_u, e_v)
        if e_w[2] < 0:
            e_w = -e_w
        return np.stack([e_u, e_v, e_w])

    def z_at_arclength(self, s: np.ndarray, z_max: float) -> np.ndarray:
        """Heights ``z`` where the arc length measured from ``z = 0`` equals ``s`` (mm; negative above ``z = 0``)."""
        z = np.linspace(-_BEYOND_MM, z_max + _BEYOND_MM, int((z_max + 2 * _BEYOND_MM) * 10) + 2)
        steps = np.linalg.norm(np.diff(self.point(z), axis=0), axis=1)
        arclength = np.r_[0.0, np.cumsum(steps)]
        return np.interp(np.asarray(s) + np.interp(0.0, z, arclength), arclength, z)


@dataclasses.dataclass(frozen=True)
class SpineLayout:
    """A sampled spine: its vertebrae (cranial first), centre line and field of view.

    Attributes:
        vertebrae: one spec per labelled vertebra, cranial to caudal.
        context: the unlabelled vertebra just above and the one just below them, cut by the field of
            view (a scan shows more spine than is labelled and graded): rendered, never labelled.
        curve: the centre line.
        fov_mm: field of view ``(z, y, x)`` in mm.
        cortical_hu: HU of the cortical shell.
        shell_mm: cortical shell thickness.
    """

    vertebrae: list[VertebraSpec]
    context: list[VertebraSpec]
    curve: SpineCurve
    fov_mm: tuple[float, float, float]
    cortical_hu: float
    shell_mm: float


def draw_fracture(rng: np.random.Generator, params: PhantomParams) -> tuple[Fracture, float]:
    """A fracture (or none, possibly with a natural deformity) and its target max loss."""
    if rng.random() < params.fracture_share:
        weights = np.asarray(params.grade_weights, dtype=float)
        grade = int(rng.choice([1, 2, 3], p=weights / weights.sum()))
        kinds = list(FRACTURE_TYPE_WEIGHTS)
        kind = str(rng.choice(kinds, p=np.array(list(FRACTURE_TYPE_WEIGHTS.values()))))
        shape_param = {"wedge": rng.uniform(0.0, 0.15), "crush": rng.uniform(0.0, 0.3)}.get(kind, 0.0)
        return Fracture(kind=kind, grade=grade, shape_param=shape_param), float(rng.uniform(*GRADE_LOSS_RANGES[grade]))  # type: ignore[arg-type]
    if rng.random() < params.normal_deformity_share:
        kind = str(rng.choice(list(FRACTURE_TYPE_WEIGHTS)))
        return Fracture(deformity=kind, shape_param=rng.uniform(0.0, 0.15)), float(rng.uniform(0.01, NORMAL_MAX_LOSS))  # type: ignore[arg-type]
    return Fracture(), 0.0


def sample_spine(rng: np.random.Generator, params: PhantomParams) -> SpineLayout:
    """Draw a phantom spine: consecutive thoracolumbar vertebrae with realistic, smoothly varying sizes.

    Body heights grow from about 18 mm (T6) to 28 mm (L5), depths from 28 to 38 mm, widths from 35 to
    49 mm, discs from 5 to 9 mm; a patient scale and small per-vertebra jitter vary them. The endplates
    are cupped by a patient's concavity (``params.endplate_concavity_range``), +-0.02 per vertebra. One
    unlabelled vertebra continues the spine at each end (below L5 it stands in for the sacrum's
    body), and the field of view cuts through it.
    """
    low, high = params.vertebrae_per_case
    count = int(rng.integers(low, high + 1))
    first = int(rng.integers(FIRST_VERTEBRA[0], min(FIRST_VERTEBRA[1], LAST_VERTEBRA - count + 1) + 1))
    ids = list(range(first - 1, first + count + 1))  # the labelled vertebrae and a context one at each end
    count = len(ids)
    patient = rng.uniform(0.95, 1.05)
    density = rng.uniform(120.0, 230.0)
    concavity = rng.uniform(*params.endplate_concavity_range)
    rank = (np.asarray(ids) - FIRST_VERTEBRA[0]) / (LAST_VERTEBRA - FIRST_VERTEBRA[0])
    heights = patient * (18.3 + 9.7 * rank + rng.uniform(-0.5, 0.5, count))
    depths = patient * (28.5 + 9.5 * rank + rng.uniform(-1.0, 1.0, count))
    widths = patient * (35.5 + 13.5 * rank + rng.uniform(-1.0, 1.0, count))
    discs = 5.2 + 3.6 * rank + rng.uniform(-0.6, 0.6, count)
    in_view = rng.uniform(*_CONTEXT_IN_VIEW, 2) * heights[[0, -1]]
    length = float(in_view.sum() + heights[1:-1].sum() + discs[:-1].sum())
    fov = (length, params.fov_mm[0], params.fov_mm[1])
    # arc length from the top of the field of view to the top of each body
    tops = in_view[0] - heights[0] + np.r_[0.0, np.cumsum(heights[:-1] + discs[:-1])]
    curve = SpineCurve(
        y0=0.46 * fov[1] + rng.uniform(-3.0, 3.0),
        sagittal_amp=rng.uniform(5.0, 12.0),
        sagittal_wavelength=rng.uniform(320.0, 420.0),
        z_inflection=float(tops[min(max(0, 20 - ids[0]), count - 1)]),
        x0=fov[2] / 2 + rng.uniform(-3.0, 3.0),
        coronal_amp=rng.uniform(0.0, 5.0),
        coronal_wavelength=rng.uniform(300.0, 500.0),
        coronal_phase=rng.uniform(0.0, 2 * np.pi),
    )
    # Body centres along the curve, by arc length from the top of the field of view.
    z_centres = curve.z_at_arclength(tops + heights / 2, fov[0])
    vertebrae = []
    for n, vid in enumerate(ids):
        tilt = rng.uniform(0.02, 0.06) if vid <= 19 else (rng.uniform(-0.02, 0.03) if vid <= 22 else rng.uniform(-0.06, 0.0))
        fracture, target = draw_fracture(rng, params) if 0 < n < count - 1 else (Fracture(), 0.0)
        spec = VertebraSpec(
            vertebra=vid,
            height_mm=float(heights[n]),
            depth_mm=float(depths[n]),
            width_mm=float(widths[n]),
            tilt=float(tilt),
            centre_mm=curve.point(z_centres[n])[0],
            axes=curve.frame(float(z_centres[n])),
            fracture=fracture,
            disc_below_mm=float(discs[n]) if n < count - 1 else 0.0,
            density_hu=float(density + rng.uniform(-12.0, 12.0)),
            concavity=float(max(0.0, concavity + rng.uniform(-0.02, 0.02))),
        )
        if target > 0.0:
            spec = dataclasses.replace(spec, fracture=dataclasses.replace(fracture, scale=scale_for_loss(spec, target)))
        vertebrae.append(spec)
    return SpineLayout(vertebrae[1:-1], [vertebrae[0], vertebrae[-1]], curve, fov,
                       cortical_hu=float(rng.uniform(600.0, 1000.0)),
                       shell_mm=float(rng.uniform(1.0, 1.6)))
