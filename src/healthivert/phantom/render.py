"""Voxelise a phantom spine: CT (HU) and vertebra labels, fractured and fracture-free, on one grid.

Arrays are in ``IPL`` axis order ``(z, y, x)`` = (superior -> inferior, anterior -> posterior,
right -> left) with voxel size ``spacing_mm`` per axis; voxel ``(i, j, k)`` is centred at
``(i * sz, j * sy, k * sx)`` mm. Every structure is an implicit shape evaluated in the local frame of
its vertebra, only inside that vertebra's bounding box.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from healthivert.phantom.anatomy import VertebraSpec, body_bounds, cross_section_radius
from healthivert.phantom.spine import SpineLayout

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
DISC_HU = 80.0
CANAL_HU = 15.0
POSTERIOR_HU = 420.0
_FAT_LAYER_MM = 12.0


@dataclasses.dataclass(frozen=True)
class RenderedSpine:
    """Voxels of one phantom, ``IPL`` axis order, before noise.

    Attributes:
        ct: HU with fractures.
        labels: VerSe ids with fractures (``uint8``).
        healthy_ct: HU of the same spine without fractures.
        healthy_labels: its VerSe ids.
    """

    ct: np.ndarray
    labels: np.ndarray
    healthy_ct: np.ndarray
    healthy_labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Posterior:
    """Sizes of a vertebra's posterior elements (mm), derived from its body."""

    canal_centre: float
    canal_ap: float
    canal_lr: float
    pedicle_w: float
    pedicle_u: float
    lamina: float
    spinous_length: float
    transverse_length: float

    @classmethod
    def of(cls, spec: VertebraSpec) -> "_Posterior":
        scale = spec.width_mm / 45.0
        canal_ap, canal_lr = 7.5 * scale, 10.0 * scale
        return cls(
            canal_centre=spec.depth_mm / 2 + 1.0 + canal_ap,
            canal_ap=canal_ap,
            canal_lr=canal_lr,
            pedicle_w=3.8 * scale,
            pedicle_u=0.3 * spec.height_mm,
            lamina=4.0,
            spinous_length=22.0 * scale,
            transverse_length=14.0 * scale,
        )

    @property
    def posterior_reach(self) -> float:
        """Largest ``v`` of the posterior elements."""
        return self.canal_centre + self.canal_ap + self.lamina + self.spinous_length + 2.0


def soft_tissue(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float],
                fov_mm: tuple[float, float]) -> np.ndarray:
    """HU of the tissue around the spine on an ``IPL`` grid: an elliptic body outline filling the
    axial field of view ``fov_mm`` (AP, LR; air outside), a fat layer under its skin, soft tissue
    inside; constant along z."""
    y = np.arange(shape[1]) * spacing_mm[1]
    x = np.arange(shape[2]) * spacing_mm[2]
    cy, cx = fov_mm[0] / 2, fov_mm[1] / 2
    ry, rx = cy - 4.0, cx - 3.0
    radius = np.sqrt(((y[:, None] - cy) / ry) ** 2 + ((x[None, :] - cx) / rx) ** 2)
    inner = np.sqrt(((y[:, None] - cy) / (ry - _FAT_LAYER_MM)) ** 2 + ((x[None, :] - cx) / (rx - _FAT_LAYER_MM)) ** 2)
    plane = np.where(radius > 1.0, AIR_HU, np.where(inner > 1.0, FAT_HU, SOFT_TISSUE_HU)).astype(np.float32)
    return np.broadcast_to(plane, shape).copy()


def texture_waves(rng: np.random.Generator) -> np.ndarray:
    """Eight random plane waves ``(kz, ky, kx, phase)`` of 2.5-5 mm wavelength for :func:`trabecular_texture`."""
    waves = np.c_[rng.normal(0.0, 1.0, (8, 3)), rng.uniform(0, 2 * np.pi, 8)]
    waves[:, :3] *= (2 * np.pi / rng.uniform(2.5, 5.0, 8) / np.linalg.norm(waves[:, :3], axis=1))[:, None]
    return waves


def trabecular_texture(points: tuple[np.ndarray, np.ndarray, np.ndarray], waves: np.ndarray) -> np.ndarray:
    """Trabecular-like texture in ``[-1, 1]``: a sum of plane waves of world position (mm)."""
    z, y, x = points
    total = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for kz, ky, kx, phase in waves:
        total += np.cos(kz * z + ky * y + kx * x + phase).astype(np.float32)
    return total / np.sqrt(len(waves) / 2.0)


class _Box:
    """A bounding box of a local frame on the voxel grid, with local coordinates ``u, v, w`` there."""

    def __init__(self, centre: np.ndarray, axes: np.ndarray, extent: np.ndarray, spacing: np.ndarray,
                 shape: tuple[int, int, int]) -> None:
        corners = np.array([[a, b, c] for a in extent[0] for b in extent[1] for c in extent[2]])
        world = centre + corners @ axes
        lo = np.clip(np.floor(world.min(axis=0) / spacing).astype(int), 0, shape)
        hi = np.clip(np.ceil(world.max(axis=0) / spacing).astype(int) + 1, 0, shape)
        self.slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grids = [np.arange(a, b, dtype=np.float32) * np.float32(s) for a, b, s in zip(lo, hi, spacing)]
        self.world = (grids[0][:, None, None], grids[1][None, :, None], grids[2][None, None, :])
        rel = [g - np.float32(c) for g, c in zip(self.world, centre)]
        self.u, self.v, self.w = (rel[0] * np.float32(e[0]) + rel[1] * np.float32(e[1]) + rel[2] * np.float32(e[2]) for e in axes)
        self.empty = any(b <= a for a, b in zip(lo, hi))


def _posterior_elements(box: _Box, spec: VertebraSpec, post: _Posterior) -> np.ndarray:
    """Pedicles, laminae, spinous and transverse processes (boolean, in ``box``)."""
    u, v, w = box.u, box.v, box.w
    uc = -0.12 * spec.height_mm
    pedicle_offset = post.canal_lr + post.pedicle_w * 0.8
    pedicles = (
        ((np.abs(w) - pedicle_offset) / post.pedicle_w) ** 2 + ((u - uc) / post.pedicle_u) ** 2 <= 1.0
    ) & (v >= 0.3 * spec.depth_mm) & (v <= post.canal_centre)
    q_in = ((v - post.canal_centre) / post.canal_ap) ** 2 + (w / post.canal_lr) ** 2
    q_out = ((v - post.canal_centre) / (post.canal_ap + post.lamina)) ** 2 + (w / (post.canal_lr + post.lamina)) ** 2
    lamina = (q_in > 1.0) & (q_out <= 1.0) & (v >= post.canal_centre - 2.0) & (np.abs(u - uc) <= 0.35 * spec.height_mm)
    start = post.canal_centre + post.canal_ap + post.lamina - 1.0
    along = v - start
    spinous = (along >= 0) & (along <= post.spinous_length) & (np.abs(w) <= 2.5) & (
        np.abs(u - uc - 0.45 * along) <= 4.5 - 1.5 * along / post.spinous_length)
    lateral = np.abs(w) - (post.canal_lr + post.lamina - 1.0)
    transverse = (lateral >= 0) & (lateral <= post.transverse_length) & (
        np.abs(v - post.canal_centre) <= 3.5) & (np.abs(u - uc) <= 4.0)
    return pedicles | lamina | spinous | transverse


def _body(box: _Box, spec: VertebraSpec, fractured: bool, shell_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The vertebral body (boolean) and its cortical shell (boolean), in ``box``."""
    top, bottom = body_bounds(box.v, box.w, spec, fractured)
    rho = cross_section_radius(box.v, box.w, spec.depth_mm, spec.width_mm)
    body = (rho <= 1.0) & (box.u >= top) & (box.u <= bottom)
    in_plane = (1.0 - rho) * min(spec.depth_mm, spec.width_mm) / 2.0
    vertical = np.minimum(box.u - top, bottom - box.u)
    shell = body & (np.minimum(in_plane, vertical) < shell_mm)
    return body, shell


def render_spine(layout: SpineLayout, spacing_mm: tuple[float, float, float], rng: np.random.Generator) -> RenderedSpine:
    """Voxelise a spine layout (fractured and fracture-free) on a grid of the given voxel size.

    Args:
        layout: the sampled spine.
        spacing_mm: voxel size along ``(z, y, x)`` (IPL axes).
        rng: random generator (texture).

    Returns:
        The four volumes, noise-free, in ``IPL`` axis order.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    shape = tuple(int(np.ceil(f / s)) for f, s in zip(layout.fov_mm, spacing))
    ct = soft_tissue(shape, spacing_mm, layout.fov_mm[1:])
    labels = np.zeros(shape, dtype=np.uint8)
    waves = texture_waves(rng)

    specs = [layout.context[0], *layout.vertebrae, layout.context[-1]]
    labelled = {spec.vertebra for spec in layout.vertebrae}
    posts = [_Posterior.of(spec) for spec in specs]
    # Canal and discs first: bone is painted over them.
    for spec, post in zip(specs, posts):
        reach = spec.height_mm / 2 + spec.disc_below_mm + 2.0
        extent = np.array([[-reach, reach], [post.canal_centre - post.canal_ap, post.canal_centre + post.canal_ap],
                           [-post.canal_lr, post.canal_lr]])
        box = _Box(spec.centre_mm, spec.axes, extent, spacing, shape)
        if not box.empty:
            canal = ((box.v - post.canal_centre) / post.canal_ap) ** 2 + (box.w / post.canal_lr) ** 2 <= 1.0
            ct[box.slices][canal] = CANAL_HU
    for upper, lower in zip(specs[:-1], specs[1:]):
        centre = (upper.centre_mm + lower.centre_mm) / 2
        axes = upper.axes + lower.axes
        axes /= np.linalg.norm(axes, axis=1, keepdims=True)
        depth, width = (upper.depth_mm + lower.depth_mm) / 2, (upper.width_mm + lower.width_mm) / 2
        half = upper.disc_below_mm / 2 + 0.25 * min(upper.height_mm, lower.height_mm)
        extent = np.array([[-half, half], [-depth / 2, depth / 2], [-width / 2, width / 2]])
        box = _Box(centre, axes, extent, spacing, shape)
        if not box.empty:
            disc = cross_section_radius(box.v, box.w, depth, width) <= 0.97
            ct[box.slices][disc] = DISC_HU

    healthy_ct, healthy_labels = ct.copy(), labels.copy()
    for spec, post in zip(specs, posts):
        reach = spec.height_mm / 2 + 0.45 * post.spinous_length + 6.0
        extent = np.array([[-reach, reach], [-spec.depth_mm / 2 - 1.0, post.posterior_reach],
                           [-(post.canal_lr + post.lamina + post.transverse_length + 1.0),
                            post.canal_lr + post.lamina + post.transverse_length + 1.0]])
        box = _Box(spec.centre_mm, spec.axes, extent, spacing, shape)
        if box.empty:
            continue
        texture = trabecular_texture(box.world, waves)
        trabecular = spec.density_hu + 45.0 * texture
        posterior = _posterior_elements(box, spec, post)
        posterior_hu = POSTERIOR_HU + 80.0 * texture
        healthy_body, healthy_shell = _body(box, spec, fractured=False, shell_mm=layout.shell_mm)
        for volume, label_map, fractured in ((ct, labels, True), (healthy_ct, healthy_labels, False)):
            body, shell = (_body(box, spec, True, layout.shell_mm) if fractured and spec.fracture.scale > 0
                           else (healthy_body, healthy_shell))
            region, region_labels = volume[box.slices], label_map[box.slices]
            if fractured and spec.fracture.scale > 0:
                collapsed = healthy_body & ~body  # the space the body lost is filled by disc tissue
                region[collapsed] = DISC_HU
            region[posterior] = posterior_hu[posterior]
            region[body] = trabecular[body]
            region[shell] = layout.cortical_hu + 60.0 * texture[shell]
            if spec.vertebra in labelled:
                region_labels[posterior | body] = spec.vertebra
    return RenderedSpine(ct, labels, healthy_ct, healthy_labels)
