"""Phantom cases whose spine comes from a real vertebra label map: real bodies, drawn fractures, phantom tissue.

The drawn phantom's bodies are rounded boxes; real bodies have concave endplates, a waist and
neighbours of differing size and tilt. A real-shape case keeps a real label map's vertebrae as they
are (after a small random rotation and scale, so several cases come from one spine), straightens the
spine with the same code ``preprocess`` uses, applies each drawn fracture (wedge, biconcave, crush, of
a known grade) as a column-wise compression of the real body in straightened space, and maps the
result back. The CT is rendered with the phantom's tissue model. Truth heights are measured on the
straightened bodies with the shared height definition (:mod:`healthivert.geometry.morphometry`).

Arrays are in ``IPL`` axis order ``(z, y, x)`` = (superior -> inferior, anterior -> posterior,
right -> left); straightened arrays are ``(CC, AP, LR)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial.transform import Rotation

from healthivert.config import PhantomParams, RealShapeSource
from healthivert.errors import InputDataError
from healthivert.geometry.morphometry import NeighbourBaseline, heights_on, select_columns
from healthivert.geometry.spine import PreparedSpine, prepare_spine, spine_heights
from healthivert.geometry.straighten import StraightenMap
from healthivert.io.case import TRUTH_COLUMNS, load_mask_case
from healthivert.io.centroids import centroids_from_labels
from healthivert.io.labels import vertebra_name
from healthivert.io.nifti import Volume
from healthivert.phantom.anatomy import (
    CENTRAL_BAND,
    COLUMN_THRESHOLD,
    TOP_SHARE,
    Fracture,
    genant_grade,
)
from healthivert.phantom.render import DISC_HU, POSTERIOR_HU, RenderedSpine, soft_tissue, texture_waves, trabecular_texture
from healthivert.phantom.spine import draw_fracture

#: voxel size of the straightened grid the fractures are applied and the truth is measured on
STRAIGHT_SPACING_MM = 1.0
#: a source vertebra this much lower than its neighbours (any third, mask-only) may be fractured already
DEFORMED_SOURCE_LOSS = 0.20
#: ... and so may one whose middle third is under this share of its taller end (a biconcave deformity: Genant's
#: 20 %, less 2 % for the voxel size, a third of a 20 mm body being measured to +-0.5 mm). VerSe'19 0007's
#: L1-L3 measure 0.72-0.77, the other sample spines 0.80-1.0. A wedge (normal at the thoracolumbar junction
#: down to about 0.8) is judged against the neighbours only.
DEFORMED_SOURCE_SHAPE = 0.78
_REGION_MARGIN_MM = 8.0


def load_real_spine(source: RealShapeSource) -> Volume:
    """The source's vertebra labels (VerSe ids) in ``IPL`` orientation at their stored voxel size.

    Raises:
        InputDataError: the label map is missing or unreadable, or holds no vertebra.
    """
    mask = Path(source.mask)
    if not mask.is_file():
        raise InputDataError(mask, "real-shape label map not found",
                             f"phantom.real_shapes '{source.name}': fix its path or remove the source")
    return load_mask_case(mask, None, spacing_mm=None, label_scheme=source.label_scheme).labels


def axial_window(labels: Volume, fov_mm: tuple[float, float]) -> np.ndarray:
    """The label array cut to an axial field of ``fov_mm`` (AP, LR) centred on the labels (padded where smaller).

    Real label maps come with the scan's whole field (an abdominal CT is 35 cm wide); the phantom's
    cases have the field of view of a spine scan.
    """
    array = labels.array
    occupied = np.argwhere(array > 0)
    centre = (occupied.min(axis=0) + occupied.max(axis=0)) / 2.0
    out = np.zeros((array.shape[0], *(int(round(f / s)) for f, s in zip(fov_mm, labels.spacing_mm[1:]))), dtype=array.dtype)
    source, target = [slice(None)], [slice(None)]
    for axis, size in ((1, out.shape[1]), (2, out.shape[2])):
        start = int(round(centre[axis] - size / 2.0))
        lo, hi = max(start, 0), min(start + size, array.shape[axis])
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out[tuple(target)] = array[tuple(source)]
    return out


def jitter_labels(labels: np.ndarray, spacing_in: tuple[float, float, float], spacing_out: tuple[float, float, float],
                  rotation: np.ndarray, scale: float) -> np.ndarray:
    """Resample a label map onto a grid of ``spacing_out`` covering the same field, rotated and scaled about its centre.

    Each label is interpolated on its own (trilinear, kept where above 0.5), so a coarse label map
    (e.g. 3 mm) comes out with smooth surfaces rather than voxel steps.

    Args:
        labels: ``IPL`` label map.
        spacing_in, spacing_out: voxel sizes (mm) of the input and the output grid.
        rotation: ``(3, 3)`` rotation in ``IPL`` millimetres.
        scale: isotropic scale.

    Returns:
        uint8 labels on the output grid.
    """
    spacing_in_a, spacing_out_a = np.asarray(spacing_in, dtype=np.float64), np.asarray(spacing_out, dtype=np.float64)
    extent = np.asarray(labels.shape) * spacing_in_a
    shape_out = np.maximum(1, np.round(extent / spacing_out_a)).astype(int)
    centre_in, centre_out = (np.asarray(labels.shape) - 1) * spacing_in_a / 2, (shape_out - 1) * spacing_out_a / 2
    forward = scale * np.asarray(rotation, dtype=np.float64)
    inverse = np.linalg.inv(forward)
    matrix = np.diag(1.0 / spacing_in_a) @ inverse @ np.diag(spacing_out_a)  # output voxel -> input voxel
    offset = (centre_in - inverse @ centre_out) / spacing_in_a
    out = np.zeros(tuple(shape_out), dtype=np.uint8)
    best = np.zeros(tuple(shape_out), dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int64))):
        if box is None:
            continue
        lo = np.array([max(0, b.start - 2) for b in box])
        hi = np.array([min(n, b.stop + 2) for b, n in zip(box, labels.shape)])
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], dtype=np.float64)
        mapped = ((corners * spacing_in_a - centre_in) @ forward.T + centre_out) / spacing_out_a
        out_lo = np.clip(np.floor(mapped.min(axis=0)).astype(int) - 1, 0, shape_out)
        out_hi = np.clip(np.ceil(mapped.max(axis=0)).astype(int) + 2, 0, shape_out)
        if np.any(out_hi <= out_lo):
            continue
        source = (labels[tuple(slice(a, b) for a, b in zip(lo, hi))] == index + 1).astype(np.float32)
        values = ndimage.affine_transform(source, matrix, offset=matrix @ out_lo + offset - lo,
                                          output_shape=tuple(out_hi - out_lo), order=1, mode="constant", cval=0.0)
        region = tuple(slice(a, b) for a, b in zip(out_lo, out_hi))
        take = (values > 0.5) & (values > best[region])
        out[region][take] = index + 1
        best[region][take] = values[take]
    return out


def deformation_columns(body: np.ndarray, shape_kind: str, shape_param: float) -> np.ndarray:
    """Unscaled relative height loss (max about 1) of every ``(AP, LR)`` column of a straightened body.

    The same shapes as the drawn phantom's, on the real body's extent: a wedge loses most at the
    anterior wall (``shape_param`` of it left at the posterior wall), a crush loses evenly (``shape_param``
    less posteriorly), a biconcave body loses most at its centre and nothing at its rim.
    """
    occupied = body.any(axis=0)
    n_ap, n_lr = occupied.shape
    ap = np.arange(n_ap, dtype=np.float64)[:, None]
    lr = np.arange(n_lr, dtype=np.float64)[None, :]
    if shape_kind in ("wedge", "crush"):
        first = np.argmax(occupied, axis=0).astype(np.float64)
        last = (n_ap - 1 - np.argmax(occupied[::-1], axis=0)).astype(np.float64)
        t = np.clip((ap - first[None, :]) / np.maximum(last - first, 1.0)[None, :], 0.0, 1.0)  # 0 anterior, 1 posterior
        shape = (1.0 - t) + shape_param * t if shape_kind == "wedge" else 1.0 - shape_param * t
    elif shape_kind == "biconcave":
        aps, lrs = np.flatnonzero(occupied.any(axis=1)), np.flatnonzero(occupied.any(axis=0))
        half_ap, half_lr = (aps[-1] - aps[0] + 1) / 2.0, (lrs[-1] - lrs[0] + 1) / 2.0
        centre_ap, centre_lr = (aps[0] + aps[-1]) / 2.0, (lrs[0] + lrs[-1]) / 2.0
        shape = np.clip(1.0 - ((ap - centre_ap) / half_ap) ** 2 - ((lr - centre_lr) / half_lr) ** 2, 0.0, None)
    else:
        shape = np.zeros(occupied.shape)
    return np.where(occupied, shape, 0.0)


def compress_columns(body: np.ndarray, loss: np.ndarray, top_share: float) -> np.ndarray:
    """Shorten every column of a straightened body by ``loss`` (share of its span), endplates moving inwards.

    Each column's run between its superior and inferior endplate is squeezed linearly into a span
    ``(1 - loss)`` as long, the superior endplate moving down by ``top_share`` of the lost height and
    the inferior one up by the rest, so the endplates keep their shape and the neighbours stay put.

    Args:
        body: boolean ``(CC, AP, LR)``.
        loss: ``(AP, LR)`` relative loss per column, in ``[0, 1)``.
        top_share: share of the loss taken at the superior endplate.
    """
    occupied = body.any(axis=0)
    n_cc = body.shape[0]
    top = np.argmax(body, axis=0).astype(np.float64)
    bottom = (n_cc - np.argmax(body[::-1], axis=0)).astype(np.float64)  # one past the last row
    span = bottom - top
    new_span = span * (1.0 - np.clip(loss, 0.0, 0.95))
    new_top = top + top_share * (span - new_span)
    rows = np.arange(n_cc, dtype=np.float64)[:, None, None] + 0.5
    inside = (rows > new_top) & (rows < new_top + new_span) & occupied
    source = top + (rows - new_top) * span / np.maximum(new_span, 1e-6)
    source_row = np.clip(np.floor(source), 0, n_cc - 1).astype(np.int64)
    return inside & np.take_along_axis(body, source_row, axis=0)


def deformed_source(baseline: NeighbourBaseline) -> bool:
    """Whether a source vertebra may be fractured already: low against its neighbours, or biconcave."""
    if np.nanmax([baseline.loss_ant, baseline.loss_mid, baseline.loss_post, -np.inf]) >= DEFORMED_SOURCE_LOSS:
        return True
    ant, mid, post = baseline.heights.as_tuple()
    ends = max(ant, post)
    if not np.isfinite(mid) or not np.isfinite(ends) or ends <= 0:
        return False
    return bool(mid / ends < DEFORMED_SOURCE_SHAPE)


def _disc_map(bodies: np.ndarray, sequence: list[int]) -> np.ndarray:
    """Boolean straightened map of the discs: between consecutive bodies, on the columns both cover."""
    discs = np.zeros(bodies.shape, dtype=bool)
    boxes = ndimage.find_objects(bodies.astype(np.int64))
    rows = np.arange(bodies.shape[0])[:, None, None]
    for upper, lower in zip(sequence[:-1], sequence[1:]):
        box_u, box_l = boxes[upper - 1], boxes[lower - 1]
        region = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box_u, box_l))
        sub = bodies[region]
        is_u, is_l = sub == upper, sub == lower
        both = is_u.any(axis=0) & is_l.any(axis=0)
        last_u = sub.shape[0] - 1 - np.argmax(is_u[::-1], axis=0)
        first_l = np.argmax(is_l, axis=0)
        local_rows = rows[: sub.shape[0]]
        discs[region] |= both & (local_rows > last_u) & (local_rows < first_l)
    return discs


def _fracture_bodies(spine: PreparedSpine, graded: list[int], rng: np.random.Generator,
                     params: PhantomParams) -> tuple[np.ndarray, pd.DataFrame]:
    """Draw a fracture for each graded vertebra, apply it to its straightened body, and measure the truth."""
    bodies = spine.bodies
    fractured = bodies.copy()
    boxes = ndimage.find_objects(bodies.astype(np.int64))
    rows = []
    for vid in graded:
        box = boxes[vid - 1]
        body = bodies[box] == vid
        selection = select_columns(body, CENTRAL_BAND, COLUMN_THRESHOLD, STRAIGHT_SPACING_MM)
        healthy = np.asarray(heights_on(body, selection, STRAIGHT_SPACING_MM).as_tuple())
        fracture, target = draw_fracture(rng, params)
        deformed = body
        if target > 0.0:
            shape = deformation_columns(body, fracture.shape_kind, fracture.shape_param)
            counts = np.count_nonzero(body, axis=0).astype(np.float64)
            unit = max(float((counts * shape)[selection.thirds == k].sum() / counts[selection.thirds == k].sum())
                       for k in range(3) if np.any(selection.thirds == k))
            deformed = compress_columns(body, shape * (target / unit), TOP_SHARE[fracture.shape_kind])
            region = fractured[box]
            region[body] = 0
            region[deformed] = vid
        actual = np.asarray(heights_on(deformed, selection, STRAIGHT_SPACING_MM).as_tuple())
        loss = 1.0 - actual / healthy
        rows.append(_truth_row(vid, fracture, healthy, actual, loss))
    return fractured, pd.DataFrame(rows, columns=list(TRUTH_COLUMNS))


def _truth_row(vid: int, fracture: Fracture, healthy: np.ndarray, actual: np.ndarray, loss: np.ndarray) -> dict[str, object]:
    return {"vertebra": vid, "name": vertebra_name(vid), "grade": genant_grade(float(loss.max())),
            "fracture_type": fracture.kind,
            "healthy_h_ant_mm": healthy[0], "healthy_h_mid_mm": healthy[1], "healthy_h_post_mm": healthy[2],
            "h_ant_mm": actual[0], "h_mid_mm": actual[1], "h_post_mm": actual[2],
            "loss_ant": loss[0], "loss_mid": loss[1], "loss_post": loss[2]}


def straight_coordinates(smap: StraightenMap, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Straightened voxel coordinates ``(3, Z, Y, X)`` of the input voxels of the box ``[lo, hi)``.

    As :meth:`StraightenMap.to_straight`, without a nearest-point search per voxel: each axial slice
    starts from the curve sample at its height, one step along that sample's tangent corrects it to
    the sample of the voxel's own plane, and the voxel is offset in that sample's frame.
    """
    spacing_in = np.asarray(smap.input_spacing_mm)
    axes = [np.arange(a, b, dtype=np.float64) * s for a, b, s in zip(lo, hi, spacing_in)]
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    order = np.argsort(smap.points_mm[:, 0])
    start = order[np.clip(np.searchsorted(smap.points_mm[order, 0], axes[0]), 0, len(order) - 1)][:, None, None]
    last = len(smap.points_mm) - 1

    def along(rows: np.ndarray, frame: np.ndarray) -> np.ndarray:
        origin, vector = smap.points_mm[rows], frame[rows]
        return ((z - origin[..., 0]) * vector[..., 0] + (y - origin[..., 1]) * vector[..., 1]
                + (x - origin[..., 2]) * vector[..., 2])

    rows = np.clip(np.rint(start + along(start, smap.tangents) / smap.spacing_mm), 0, last).astype(np.int64)
    row = rows + along(rows, smap.tangents) / smap.spacing_mm
    column = smap.centre[0] + along(rows, smap.ap_axes) / smap.spacing_mm
    lr = smap.centre[1] + along(rows, smap.lr_axes) / smap.spacing_mm
    return np.stack(np.broadcast_arrays(row, column, lr))


def _render(labels: np.ndarray, spacing: tuple[float, float, float], spine: PreparedSpine, fractured_bodies: np.ndarray,
            graded: list[int], rng: np.random.Generator) -> RenderedSpine:
    """CT and labels (fractured and healthy) of a real spine with the phantom's tissue model (``graded`` may be fractured)."""
    spacing_a = np.asarray(spacing)
    shape = labels.shape
    occupied = np.argwhere(labels > 0)
    margin = np.ceil(_REGION_MARGIN_MM / spacing_a).astype(int)
    lo = np.maximum(occupied.min(axis=0) - margin, 0)
    hi = np.minimum(occupied.max(axis=0) + margin + 1, shape)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    local = labels[region]
    straight = straight_coordinates(spine.map, lo, hi)

    def sample(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, straight, order=0, mode="constant", cval=0)

    healthy_body = (local > 0) & (sample(spine.bodies) == local)
    fractured_ids = sample(fractured_bodies)
    fractured_labels, fractured_body = local.copy(), healthy_body.copy()
    collapsed = np.zeros(local.shape, dtype=bool)
    for vid in graded:
        was = healthy_body & (local == vid)
        now = (fractured_ids == vid) & ((local == vid) | (local == 0))
        if np.array_equal(was, now):
            continue
        collapsed |= was & ~now
        fractured_labels[was & ~now] = 0
        fractured_labels[now] = vid
        fractured_body = (fractured_body & ~(was & ~now)) | now
    arch = (local > 0) & ~healthy_body
    disc = sample(_disc_map(spine.bodies, spine.sequence)) & (local == 0)

    density = float(rng.uniform(120.0, 230.0))
    density_by_label = (density + rng.uniform(-12.0, 12.0, 256)).astype(np.float32)
    cortical_hu, shell_mm = float(rng.uniform(600.0, 1000.0)), float(rng.uniform(1.0, 1.6))
    world = tuple(np.arange(a, b, dtype=np.float32)[tuple(slice(None) if i == axis else None for i in range(3))] * np.float32(s)
                  for axis, (a, b, s) in enumerate(zip(lo, hi, spacing_a)))
    texture = trabecular_texture(world, texture_waves(rng))
    tissue = soft_tissue(shape, spacing, (shape[1] * spacing[1], shape[2] * spacing[2]))
    outputs = []
    for body, body_labels, extra_disc in ((fractured_body, fractured_labels, collapsed), (healthy_body, local, None)):
        ct = tissue.copy()
        part = ct[region]
        part[disc if extra_disc is None else disc | extra_disc] = DISC_HU
        part[arch] = POSTERIOR_HU + 80.0 * texture[arch]
        part[body] = density_by_label[body_labels[body]] + 45.0 * texture[body]
        shell = body & ~ndimage.binary_erosion(body, iterations=max(1, int(round(shell_mm / float(spacing_a.mean())))))
        part[shell] = cortical_hu + 60.0 * texture[shell]
        out_labels = np.zeros(shape, dtype=np.uint8)
        out_labels[region] = body_labels
        outputs.extend([ct, out_labels])
    return RenderedSpine(ct=outputs[0], labels=outputs[1], healthy_ct=outputs[2], healthy_labels=outputs[3])


def generate_real_case(rng: np.random.Generator, params: PhantomParams, source: RealShapeSource, spine_labels: Volume,
                       case_id: str) -> tuple[RenderedSpine, pd.DataFrame, tuple[float, float, float]]:
    """Render one real-shape case: the source spine jittered, fractures drawn, CT and truth.

    Every vertebra of the label map stays labelled (``preprocess`` needs at least two to straighten),
    but the end vertebrae of the map, those whose body the straightening finds cut by the field of
    view, and those deformed already (below) are not graded: no fracture, no truth row.

    A real spine may carry deformities of its own, ungraded: a vertebra that the mask-only baseline
    finds :data:`DEFORMED_SOURCE_LOSS` or more lower than its neighbours, or whose middle third is
    under :data:`DEFORMED_SOURCE_SHAPE` of its taller end, is kept as it is (it is not graded, so it is
    neither a healthy training target nor scored).

    Args:
        rng: the case's random generator.
        params: phantom settings (fracture share and grades, voxel sizes, jitter).
        source: where the spine comes from (named in errors).
        spine_labels: the source's labels, from :func:`load_real_spine`.
        case_id: the case's id (for messages).

    Returns:
        the rendered volumes (noise-free), the truth table and the voxel size.

    Raises:
        InputDataError: fewer than three whole vertebrae in the label map.
    """
    low, high = params.spacing_mm_range
    in_plane = float(rng.uniform(low, high))
    spacing = (float(rng.uniform(low, high)), in_plane, in_plane)
    angles = rng.uniform(-params.real_rotation_deg, params.real_rotation_deg, 3)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    labels = jitter_labels(axial_window(spine_labels, params.fov_mm), spine_labels.spacing_mm, spacing, rotation,
                           float(rng.uniform(*params.real_scale_range)))
    spine = prepare_spine(labels, spacing, centroids_from_labels(labels), spacing_mm=STRAIGHT_SPACING_MM)
    ends = {spine.sequence[0], spine.sequence[-1]} if spine.sequence else set()
    baseline = spine_heights(spine, CENTRAL_BAND, COLUMN_THRESHOLD)
    deformed = {vid for vid, b in baseline.items() if deformed_source(b)}
    graded = [vid for vid in spine.order if vid not in ends and vid not in deformed]
    if not graded:
        raise InputDataError(source.mask, f"{case_id}: no whole vertebra between the end vertebrae of the label map",
                             f"phantom.real_shapes '{source.name}' needs at least three consecutive whole vertebrae")
    fractured, truth = _fracture_bodies(spine, graded, rng, params)
    rendered = _render(labels, spacing, spine, fractured, graded, rng)
    return rendered, truth, spacing
