"""Spine straightening: resample a scan on planes orthogonal to a smooth curve through the centroids.

Input volumes are canonical ``IPL`` arrays (axis 0 superior -> inferior, axis 1 anterior -> posterior,
axis 2 right -> left) with any voxel size. The curve is a cubic smoothing spline through the vertebra
centroids (refitted with outlying centroids down-weighted: a fracture moves its vertebra's centroid),
parametrised by arc length and continued in a straight line beyond the end vertebrae. The
straightened grid has ``spacing_mm`` voxels in the same ``IPL`` order: axis 0 = arc length (cranial
first), axis 1 = the local anterior -> posterior axis, axis 2 = the local right -> left axis, the curve
running through the grid's central AP column and LR slice.

The moving frame is rotation-minimising: at the curve's midpoint its AP axis is the scan's AP axis
(projected onto the plane normal to the curve) and its LR axis the scan's right -> left axis; from
there it is parallel-transported along the curve in both directions. It is not the Frenet frame:
the Frenet normal points to the centre of curvature, so it flips by 180 degrees at every inflection
point of the spine (cervico-thoracic and thoraco-lumbar junctions) and is undefined where the spine
is straight.

We implement the curve ourselves rather than depending on the neuro-ml ``straighten`` package on PyPI
(0.2.0, a single 2022 release for Python <= 3.10 whose default local basis is Frenet-Serret and which
interpolates the centroids without smoothing): the method needs only scipy and is a few dozen lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from scipy import interpolate, ndimage, spatial

#: rows resampled per call of ``map_coordinates`` (bounds the memory of the coordinate arrays).
_CHUNK_ROWS = 48
#: input voxels mapped back per step of :func:`unstraighten` (bounds its memory).
_UNSTRAIGHTEN_CHUNK_VOXELS = 1 << 17
#: curve samples beyond a box's rows that :func:`unstraighten` considers as nearest samples.
_UNSTRAIGHTEN_MARGIN_ROWS = 16
#: reweighted refits of the spine curve (robust to centroids displaced by fractures).
_ROBUST_REFITS = 3


@dataclasses.dataclass(frozen=True, eq=False)
class StraightenMap:
    """Where every voxel of a straightened grid comes from in the input grid.

    Row ``r`` of the grid is the plane through ``points_mm[r]`` orthogonal to ``tangents[r]``; column
    ``c`` and slice ``s`` lie ``(c - centre[0]) * spacing_mm`` along ``ap_axes[r]`` and
    ``(s - centre[1]) * spacing_mm`` along ``lr_axes[r]``. Positions are in input millimetres
    (input voxel index x input voxel size, axes ``IPL``).

    Attributes:
        points_mm: ``(rows, 3)`` curve points, ``spacing_mm`` apart along the curve, cranial first.
        tangents: ``(rows, 3)`` unit tangents (pointing caudally).
        ap_axes: ``(rows, 3)`` unit local antero-posterior axes (pointing posteriorly).
        lr_axes: ``(rows, 3)`` unit local right -> left axes (``tangent x ap``).
        spacing_mm: voxel size of the straightened grid.
        width: number of AP columns and LR slices of the grid.
        input_spacing_mm: voxel size of the input grid ``(I, P, L)``.
        arc_start_mm: arc length of row 0 measured from the most cranial centroid's foot point
            (negative: the grid starts above it).
    """

    points_mm: np.ndarray
    tangents: np.ndarray
    ap_axes: np.ndarray
    lr_axes: np.ndarray
    spacing_mm: float
    width: tuple[int, int]
    input_spacing_mm: tuple[float, float, float]
    arc_start_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the straightened grid ``(arc, AP, LR)``."""
        return (len(self.points_mm), *self.width)

    @property
    def centre(self) -> tuple[float, float]:
        """AP column and LR slice (fractional) through which the curve runs."""
        return (self.width[0] - 1) / 2.0, (self.width[1] - 1) / 2.0

    def affine(self) -> np.ndarray:
        """A voxel-to-world matrix of the straightened grid with ``IPL`` axis codes and its voxel size."""
        s = self.spacing_mm
        affine = np.eye(4)
        affine[:3, :3] = [[0.0, 0.0, -s], [0.0, -s, 0.0], [-s, 0.0, 0.0]]
        return affine

    def coordinates(self, rows: slice = slice(None), ap_range: slice = slice(None),
                    lr_range: slice = slice(None)) -> np.ndarray:
        """Input voxel coordinates of the grid voxels ``[rows, ap_range, lr_range]``: float32 ``(3, rows, AP, LR)``."""
        scale = 1.0 / np.asarray(self.input_spacing_mm)
        ap = ((np.arange(self.width[0])[ap_range] - self.centre[0]) * self.spacing_mm).astype(np.float32)
        lr = ((np.arange(self.width[1])[lr_range] - self.centre[1]) * self.spacing_mm).astype(np.float32)
        points = (self.points_mm[rows] * scale).T.astype(np.float32)  # (3, n) in input voxels
        ap_axes = (self.ap_axes[rows] * scale).T.astype(np.float32)
        lr_axes = (self.lr_axes[rows] * scale).T.astype(np.float32)
        coordinates = np.empty((3, points.shape[1], len(ap), len(lr)), dtype=np.float32)
        for axis in range(3):
            np.add(points[axis][:, None, None] + ap_axes[axis][:, None, None] * ap[None, :, None],
                   lr_axes[axis][:, None, None] * lr[None, None, :], out=coordinates[axis])
        return coordinates

    def to_input(self, straight: np.ndarray) -> np.ndarray:
        """Input voxel coordinates ``(N, 3)`` of straightened voxel indices ``(N, 3)`` (rows rounded)."""
        straight = np.atleast_2d(np.asarray(straight, dtype=np.float64))
        rows = np.clip(np.rint(straight[:, 0]).astype(np.int64), 0, len(self.points_mm) - 1)
        positions = (self.points_mm[rows]
                     + ((straight[:, 1] - self.centre[0]) * self.spacing_mm)[:, None] * self.ap_axes[rows]
                     + ((straight[:, 2] - self.centre[1]) * self.spacing_mm)[:, None] * self.lr_axes[rows])
        return positions / np.asarray(self.input_spacing_mm)

    def to_straight(self, voxels: np.ndarray) -> np.ndarray:
        """Straightened voxel coordinates ``(N, 3)`` of input voxel coordinates ``(N, 3)``.

        Each point is assigned to its nearest curve sample and then offset along that sample's frame,
        which is exact for points in the sampled plane and accurate to the curve's bending otherwise.
        """
        voxels = np.atleast_2d(np.asarray(voxels, dtype=np.float64))
        positions = voxels * np.asarray(self.input_spacing_mm)
        _, nearest = spatial.cKDTree(self.points_mm).query(positions)
        offset = positions - self.points_mm[nearest]
        row = nearest + np.einsum("ij,ij->i", offset, self.tangents[nearest]) / self.spacing_mm
        col = self.centre[0] + np.einsum("ij,ij->i", offset, self.ap_axes[nearest]) / self.spacing_mm
        sl = self.centre[1] + np.einsum("ij,ij->i", offset, self.lr_axes[nearest]) / self.spacing_mm
        return np.stack([row, col, sl], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class StraightenedSpine:
    """A straightened scan (axes arc length, AP, LR; ``spacing_mm`` voxels).

    Attributes:
        labels: int32 vertebra labels.
        ct: float32 HU (air outside the scan), or ``None`` for a mask-only case.
        centroids: VerSe id -> straightened voxel coordinates ``(row, AP, LR)``.
        map: the sampling map, to resample further volumes of the same scan identically.
    """

    labels: np.ndarray
    ct: np.ndarray | None
    centroids: dict[int, np.ndarray]
    map: StraightenMap


def _parallel_transport(tangents: np.ndarray, start: int, first_axis: np.ndarray) -> np.ndarray:
    """Carry ``first_axis`` (orthogonal to ``tangents[start]``) along the curve with minimal rotation.

    Each step rotates the axis by the rotation taking one tangent to the next (Rodrigues' formula),
    so the frame never twists about the curve. Returns ``(rows, 3)`` unit axes.
    """
    axes = np.empty_like(tangents)
    axes[start] = first_axis
    for order in (range(start, len(tangents) - 1), range(start, 0, -1)):
        for i in order:
            j = i + 1 if order.step == 1 else i - 1
            a, b, v = tangents[i], tangents[j], axes[i]
            cross = np.cross(a, b)
            cos = float(np.dot(a, b))
            # rotation of v about a x b by the angle between a and b
            v = v * cos + np.cross(cross, v) + cross * np.dot(cross, v) / (1.0 + cos)
            v -= np.dot(v, b) * b
            axes[j] = v / np.linalg.norm(v)
    return axes


def _fit_curve(centroids_mm: np.ndarray, chord: np.ndarray, degree: int, smoothing_mm: float) -> tuple:
    """Smoothing spline ``(t, c, k)`` through the centroids, refitted with outlying centroids down-weighted.

    A fractured vertebra's centroid moves (its body loses volume in front), and a curve drawn through
    it would kink exactly there, bending the sampling planes through that vertebra. Centroids far from
    the fit (Cauchy weights on the residual over a robust scale) pull less on the next fit.
    """
    n = len(centroids_mm)
    tck, _ = interpolate.splprep(centroids_mm.T, u=chord, k=degree, s=n * smoothing_mm**2)
    for _ in range(_ROBUST_REFITS):
        residual = np.linalg.norm(np.stack(interpolate.splev(chord, tck), axis=1) - centroids_mm, axis=1)
        scale = max(1.4826 * float(np.median(residual)), smoothing_mm, 1e-3)
        weights = 1.0 / (1.0 + (residual / (2.0 * scale)) ** 2)
        tck, _ = interpolate.splprep(centroids_mm.T, w=weights, u=chord, k=degree, s=n * smoothing_mm**2)
    return tck


def _curve_samples(centroids_mm: np.ndarray, spacing_mm: float, margin_mm: float,
                   smoothing_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Points and unit tangents ``spacing_mm`` apart along a smoothing spline through the centroids.

    Returns ``(points (rows, 3), tangents (rows, 3), arc length of row 0 from the first centroid)``.
    """
    n = len(centroids_mm)
    steps = np.linalg.norm(np.diff(centroids_mm, axis=0), axis=1)
    if np.any(steps < 1e-6):
        raise ValueError("two centroids coincide")
    chord = np.concatenate([[0.0], np.cumsum(steps)])
    degree = min(3, n - 1)
    tck = _fit_curve(centroids_mm, chord, degree, smoothing_mm)
    # arc length of the spline on a fine grid, then uniform samples by inverse interpolation
    fine = np.linspace(0.0, chord[-1], max(200, int(chord[-1] / 0.25)))
    fine_points = np.stack(interpolate.splev(fine, tck), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(fine_points, axis=0), axis=1))])
    length = arc[-1]
    targets = np.arange(-margin_mm, length + margin_mm + 1e-9, spacing_mm)
    inside = np.interp(np.clip(targets, 0.0, length), arc, fine)
    points = np.stack(interpolate.splev(inside, tck), axis=1)
    tangents = np.stack(interpolate.splev(inside, tck, der=1), axis=1)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    # straight continuation along the end tangents
    before, after = targets < 0.0, targets > length
    points[before] += targets[before, None] * tangents[before]
    points[after] += (targets[after] - length)[:, None] * tangents[after]
    return points, tangents, float(targets[0])


def straighten_map(centroids: Mapping[int, np.ndarray], input_spacing_mm: tuple[float, float, float],
                   spacing_mm: float = 1.0, width: tuple[int, int] = (192, 96), margin_mm: float = 64.0,
                   smoothing_mm: float = 0.5) -> StraightenMap:
    """Fit the spine curve and its rotation-minimising frame.

    Args:
        centroids: VerSe id -> voxel coordinates ``(I, P, L)`` in the input grid (at least two).
        input_spacing_mm: input voxel size along ``(I, P, L)``.
        spacing_mm: voxel size of the straightened grid.
        width: AP columns and LR slices of the straightened grid (centred on the curve).
        margin_mm: how far the curve is continued beyond the end centroids.
        smoothing_mm: typical distance the spline may pass from a centroid (0 interpolates).

    Raises:
        ValueError: fewer than two centroids, or two at the same place.
    """
    if len(centroids) < 2:
        raise ValueError(f"need at least two vertebra centroids to straighten, got {len(centroids)}")
    spacing_in = np.asarray(input_spacing_mm, dtype=np.float64)
    ordered = sorted(centroids.values(), key=lambda c: float(c[0]))
    centroids_mm = np.asarray(ordered, dtype=np.float64) * spacing_in
    points, tangents, arc_start = _curve_samples(centroids_mm, spacing_mm, margin_mm, smoothing_mm)
    middle = len(points) // 2
    scan_ap = np.array([0.0, 1.0, 0.0])
    first_ap = scan_ap - np.dot(scan_ap, tangents[middle]) * tangents[middle]
    if np.linalg.norm(first_ap) < 1e-3:
        raise ValueError("the spine runs along the scan's antero-posterior axis; is the orientation IPL?")
    ap_axes = _parallel_transport(tangents, middle, first_ap / np.linalg.norm(first_ap))
    lr_axes = np.cross(tangents, ap_axes)
    return StraightenMap(points, tangents, ap_axes, lr_axes, float(spacing_mm), (int(width[0]), int(width[1])),
                         tuple(float(s) for s in spacing_in), arc_start)  # type: ignore[arg-type]


def resample(array: np.ndarray, smap: StraightenMap, *, label: bool, cval: float = 0.0,
             window: tuple[slice, slice] | None = None) -> np.ndarray:
    """Resample an input ``IPL`` volume onto the straightened grid.

    Args:
        array: volume on the input grid the map was fitted on.
        smap: from :func:`straighten_map`.
        label: nearest neighbour (labels keep their dtype) instead of trilinear (returns float32).
        cval: value outside the input (e.g. -1024 HU for CT).
        window: optionally only these ``(AP, LR)`` ranges of the grid are sampled; the rest is ``cval``.

    Returns:
        array of shape ``smap.shape`` (arc, AP, LR).
    """
    return resample_many(smap, [(array, label, cval)], window)[0]


def resample_many(smap: StraightenMap, volumes: list[tuple[np.ndarray, bool, float]],
                  window: tuple[slice, slice] | None = None) -> list[np.ndarray]:
    """Resample several volumes of one input grid, computing the sampling coordinates once.

    Args:
        smap: from :func:`straighten_map`.
        volumes: ``(array, label, cval)`` per volume, as in :func:`resample`.
        window: ``(AP, LR)`` ranges of the grid to sample (default: all); the rest is ``cval``.

    Returns:
        the straightened arrays, in the order given.
    """
    ap_range, lr_range = window if window is not None else (slice(None), slice(None))
    outputs = [np.full(smap.shape, cval, dtype=array.dtype if label else np.float32) for array, label, cval in volumes]
    sources = [array if label else array.astype(np.float32, copy=False) for array, label, _ in volumes]
    for start in range(0, smap.shape[0], _CHUNK_ROWS):
        rows = slice(start, min(start + _CHUNK_ROWS, smap.shape[0]))
        coordinates = smap.coordinates(rows, ap_range, lr_range)
        for source, out, (_, label, cval) in zip(sources, outputs, volumes):
            sampled = ndimage.map_coordinates(source, coordinates, order=0 if label else 1, mode="grid-constant",
                                              cval=cval, prefilter=False, output=out.dtype)
            out[rows, ap_range, lr_range] = sampled
    return outputs


def unstraighten(volume: np.ndarray, smap: StraightenMap, origin: tuple[int, int, int],
                 input_shape: tuple[int, int, int], *, label: bool,
                 cval: float = 0.0) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Map a box of the straightened grid (e.g. a vertebra's crop) back onto the input grid: the inverse of :func:`resample`.

    Every input voxel near the box is placed on its nearest curve sample and offset along that
    sample's frame (as :meth:`StraightenMap.to_straight`), then the box is sampled there.

    Args:
        volume: ``(CC, AP, LR)`` values on the straightened grid from ``origin`` (straightened index of
            its voxel ``(0, 0, 0)``, may be negative).
        smap: the map the box was straightened with.
        origin: see ``volume``.
        input_shape: shape of the input ``IPL`` grid the map was fitted on.
        label: nearest neighbour (labels keep their dtype) instead of trilinear (float32).
        cval: value where an input voxel falls outside the box.

    Returns:
        ``(box, values, inside)``: the input-grid box the volume covers, the values there, and where
        an input voxel falls inside ``volume`` (elsewhere ``values`` is ``cval``).
    """
    box, (values,), inside = unstraighten_many(smap, [(volume, label, cval)], origin, input_shape)
    return box, values, inside


def unstraighten_many(smap: StraightenMap, volumes: list[tuple[np.ndarray, bool, float]], origin: tuple[int, int, int],
                      input_shape: tuple[int, int, int]
                      ) -> tuple[tuple[slice, slice, slice], list[np.ndarray], np.ndarray]:
    """:func:`unstraighten` several volumes of one straightened box, placing the input voxels once.

    Args:
        smap: the map the box was straightened with.
        volumes: ``(array, label, cval)`` per volume, as in :func:`unstraighten`; all of one shape.
        origin: straightened index of the box's voxel ``(0, 0, 0)``.
        input_shape: shape of the input ``IPL`` grid the map was fitted on.

    Returns:
        ``(box, values, inside)`` as :func:`unstraighten`, ``values`` in the order given.
    """
    shape = np.asarray(volumes[0][0].shape)
    if any(array.shape != volumes[0][0].shape for array, _, _ in volumes):
        raise ValueError("unstraighten_many needs volumes of one shape")
    step = max(1, int(shape.min()) // 8)
    lattice = np.stack(np.meshgrid(*[np.r_[np.arange(0, n, step), n - 1] for n in shape], indexing="ij"), -1)
    corners = smap.to_input(lattice.reshape(-1, 3) + np.asarray(origin))
    low = np.clip(np.floor(corners.min(axis=0)).astype(int) - 2, 0, input_shape)
    high = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 3, 0, input_shape)
    box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))
    box_shape = tuple(int(hi - lo) for lo, hi in zip(low, high))
    outputs = [np.full(box_shape, cval, dtype=array.dtype if label else np.float32) for array, label, cval in volumes]
    inside = np.zeros(box_shape, dtype=bool)
    if not all(box_shape):
        return box, outputs, inside  # type: ignore[return-value]
    # only the curve samples near the box's rows can be nearest to its voxels
    first = max(int(origin[0]) - _UNSTRAIGHTEN_MARGIN_ROWS, 0)
    last = min(int(origin[0]) + int(shape[0]) + _UNSTRAIGHTEN_MARGIN_ROWS, len(smap.points_mm))
    tree = spatial.cKDTree(smap.points_mm[first:last])
    sources = [array if label else array.astype(np.float32, copy=False) for array, label, _ in volumes]
    grid_j, grid_k = np.meshgrid(np.arange(low[1], high[1]), np.arange(low[2], high[2]), indexing="ij")
    rows_per_chunk = max(1, _UNSTRAIGHTEN_CHUNK_VOXELS // grid_j.size)
    for start in range(0, box_shape[0], rows_per_chunk):
        rows = np.arange(start, min(start + rows_per_chunk, box_shape[0]))
        voxels = np.stack(np.broadcast_arrays((low[0] + rows)[:, None], grid_j.ravel()[None], grid_k.ravel()[None]),
                          axis=-1).reshape(-1, 3)
        positions = voxels * np.asarray(smap.input_spacing_mm)
        nearest = first + tree.query(positions)[1]
        offset = positions - smap.points_mm[nearest]
        straight = np.stack([
            nearest + np.einsum("ij,ij->i", offset, smap.tangents[nearest]) / smap.spacing_mm,
            smap.centre[0] + np.einsum("ij,ij->i", offset, smap.ap_axes[nearest]) / smap.spacing_mm,
            smap.centre[1] + np.einsum("ij,ij->i", offset, smap.lr_axes[nearest]) / smap.spacing_mm,
        ]) - np.asarray(origin, dtype=np.float64)[:, None]
        within = np.all((straight > -0.5) & (straight < shape[:, None] - 0.5), axis=0)
        inside[rows] = within.reshape(len(rows), *grid_j.shape)
        for source, out, (_, label, cval) in zip(sources, outputs, volumes):
            sampled = ndimage.map_coordinates(source, straight, order=0 if label else 1, mode="nearest",
                                              prefilter=False)
            out[rows] = np.where(within, sampled, cval).reshape(len(rows), *grid_j.shape)
    return box, outputs, inside  # type: ignore[return-value]


def straighten(labels: np.ndarray, input_spacing_mm: tuple[float, float, float],
               centroids: Mapping[int, np.ndarray], ct: np.ndarray | None = None, *,
               spacing_mm: float = 1.0, width: tuple[int, int] = (192, 96), margin_mm: float = 64.0,
               smoothing_mm: float = 0.5, air_hu: float = -1024.0) -> StraightenedSpine:
    """Straighten a spine's labels (and CT) along the curve through its vertebra centroids.

    Args:
        labels: ``IPL`` label volume (VerSe ids).
        input_spacing_mm: its voxel size along ``(I, P, L)``.
        centroids: VerSe id -> voxel coordinates ``(I, P, L)``.
        ct: ``IPL`` HU volume on the same grid, optional.
        spacing_mm, width, margin_mm, smoothing_mm: see :func:`straighten_map`.
        air_hu: CT value outside the scan.
    """
    smap = straighten_map(centroids, input_spacing_mm, spacing_mm, width, margin_mm, smoothing_mm)
    if ct is None:
        straight_labels, straight_ct = resample(labels, smap, label=True), None
    else:
        straight_labels, straight_ct = resample_many(smap, [(labels, True, 0.0), (ct, False, air_hu)])
    ids = list(centroids)
    positions = smap.to_straight(np.asarray([centroids[i] for i in ids], dtype=np.float64))
    return StraightenedSpine(straight_labels, straight_ct, dict(zip(ids, positions)), smap)
