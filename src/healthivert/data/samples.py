"""Training samples of the inpainting generator: close-up around a fixed-height gap, and re-assembly.

All images are 2D slices with rows = cranio-caudal (row 0 cranial); columns are antero-posterior for
sagittal slices and left-right for coronal ones. Batched tensors are ``(B, C, H, W)`` in that order.

The target vertebra occupies rows ``[x1, x2)`` of a slice. It is cut out and the image is *closed up*
around a band of exactly ``max_height`` rows ``[b0, b1)`` centred where the target was: rows above the
band show the image just above ``x1``, rows from ``b1`` on the image just below ``x2``. The network
never sees the real height; it fills the band and predicts the healthy height ``h``, and
:func:`assemble` keeps ``h`` generated rows centred on the band while shifting the context above and
below to meet them. Assembling the real slice at the real height gives ``real_ct`` exactly.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def fixed_band(target_rows: tuple[int, int], max_height: int, n_rows: int) -> tuple[int, int]:
    """The ``max_height``-row band ``[b0, b1)`` centred on the target rows, kept inside the image.

    Args:
        target_rows: first row and one past the last row of the target, ``(x1, x2)``.
        max_height: band height in rows.
        n_rows: number of rows of the image.

    Returns:
        ``(b0, b1)`` with ``b1 - b0 == max_height`` and ``0 <= b0``, ``b1 <= n_rows``.
    """
    if max_height > n_rows:
        raise ValueError(f"band of {max_height} rows does not fit an image of {n_rows} rows")
    x1, x2 = target_rows
    b0 = (x1 + x2 - max_height) // 2
    b0 = min(max(b0, 0), n_rows - max_height)
    return b0, b0 + max_height


def close_up(image: np.ndarray, target_rows: tuple[int, int], band: tuple[int, int],
             fill: float = 0.0) -> np.ndarray:
    """Remove the target's rows and close the image up around a fixed-height gap.

    Args:
        image: array whose axis 0 is cranio-caudal (row 0 cranial), e.g. ``(H, W)``.
        target_rows: ``(x1, x2)``, the rows removed.
        band: ``(b0, b1)``, the rows of the result that form the gap (filled with ``fill``).
        fill: value of the gap rows.

    Returns:
        Array of the same shape and dtype: rows ``r < b0`` hold image row ``x1 - (b0 - r)``, rows
        ``r >= b1`` hold image row ``x2 + (r - b1)``; indices beyond the image repeat its edge row.
    """
    x1, x2 = target_rows
    b0, b1 = band
    rows = np.arange(image.shape[0])
    source = np.where(rows < b0, x1 - (b0 - rows), x2 + (rows - b1))
    out = image[np.clip(source, 0, image.shape[0] - 1)].copy()
    out[b0:b1] = fill
    return out


def _shift_rows(image: np.ndarray, shift: int) -> np.ndarray:
    """Shift ``image`` down by ``shift`` rows along axis 0 (up when negative), repeating edge rows."""
    rows = np.arange(image.shape[0]) - shift
    return image[np.clip(rows, 0, image.shape[0] - 1)]


def assembly_rows(n_rows: int, band: torch.Tensor, height: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample row sources of the re-assembly at an integer height.

    Args:
        n_rows: image height ``H``.
        band: ``(B, 2)`` integer ``(b0, b1)`` per sample.
        height: ``(B,)`` integer kept heights, ``0 <= height <= b1 - b0``.

    Returns:
        ``(context_rows, from_generated)``, both ``(B, H)``: the row of the closed-up context each
        output row copies (clipped to the image), and whether the row comes from the generated image
        instead (the ``height`` rows centred on the band).
    """
    rows = torch.arange(n_rows, device=band.device).unsqueeze(0)
    b0, b1 = band[:, :1], band[:, 1:2]
    h = height.unsqueeze(1)
    c0 = b0 + torch.div(b1 - b0 - h, 2, rounding_mode="floor")
    above = rows < c0
    context_rows = torch.where(above, b0 - (c0 - rows), b1 + (rows - c0 - h)).clamp(0, n_rows - 1)
    from_generated = (rows >= c0) & (rows < c0 + h)
    return context_rows, from_generated


def kept_rows(height: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """``(B,)`` long: the generated rows an assembly at ``height`` keeps, ``round(height)`` within ``[0, b1 - b0]``."""
    kept = torch.round(height.detach().reshape(-1)).to(torch.long).clamp(min=0)
    return torch.minimum(kept, (band[:, 1] - band[:, 0]).to(kept.device))


def assemble(generated: torch.Tensor, context: torch.Tensor, band: torch.Tensor,
             height: torch.Tensor) -> torch.Tensor:
    """Re-assemble a slice at a given height (SHRM): generated band centre + shifted context.

    The ``round(height)`` generated rows centred on the band are kept; the closed-up context above
    and below is shifted to meet them. The operation is a gather with per-sample integer shifts, so
    no gradient reaches ``height`` (the height is trained by its own loss).

    Args:
        generated: ``(B, C, H, W)`` network output in the closed-up frame.
        context: ``(B, C, H, W)`` closed-up input (its band rows are not used).
        band: ``(B, 2)`` integer ``(b0, b1)`` per sample.
        height: ``(B,)`` heights in rows (rounded, clipped to ``[0, b1 - b0]``).

    Returns:
        ``(B, C, H, W)`` tensor, rows cranio-caudal like the inputs.
    """
    batch, channels, n_rows, n_cols = generated.shape
    band = band.to(device=generated.device, dtype=torch.long).reshape(batch, 2)
    context_rows, from_generated = assembly_rows(n_rows, band, kept_rows(height, band))
    index = context_rows[:, None, :, None].expand(batch, channels, n_rows, n_cols)
    shifted = torch.gather(context, 2, index)
    return torch.where(from_generated[:, None, :, None], generated, shifted)


def _assemble_np(generated: np.ndarray, context: np.ndarray, band: tuple[int, int],
                 height: int) -> np.ndarray:
    """:func:`assemble` of one ``(H, W)`` numpy slice (the same code path, so round trips are exact)."""
    out = assemble(torch.from_numpy(np.ascontiguousarray(generated, dtype=np.float32))[None, None],
                   torch.from_numpy(np.ascontiguousarray(context, dtype=np.float32))[None, None],
                   torch.tensor([band]), torch.tensor([float(height)]))
    return out[0, 0].numpy()


def neighbour_prior(label_slice: np.ndarray, target_id: int, max_height: int) -> tuple[float, float]:
    """The SHRM's prior in a slice: the neighbours' mean row extent, and the side it comes from.

    A neighbour is the label met first above the target's rows (below them); one touching the image
    border is cut by the crop and not used.

    Args:
        label_slice: ``(H, W)`` VerSe ids, rows cranio-caudal.
        target_id: VerSe id of the target (present in the slice).
        max_height: heights are clipped to this.

    Returns:
        ``(height, side)``: the mean row extent of the whole neighbours (NaN when neither is whole), and
        ``-1`` when only the vertebra above is whole, ``+1`` when only the one below is, else ``0``.
        Heights grow down the spine, so a one-sided mean is biased by about a level's step; the side
        lets the height head learn that correction.
    """
    target_rows = np.flatnonzero((label_slice == target_id).any(axis=1))
    x1, x2 = int(target_rows[0]), int(target_rows[-1]) + 1
    n_rows = label_slice.shape[0]
    present = np.where(label_slice == target_id, 0, label_slice).max(axis=1)
    extents: dict[int, float] = {}
    for side, rows in ((-1, np.arange(x1 - 1, -1, -1)), (1, np.arange(x2, n_rows))):
        ids = present[rows]
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        found = np.flatnonzero((label_slice == ids[0]).any(axis=1))
        if found[0] > 0 and found[-1] < n_rows - 1:
            extents[side] = min(float(found[-1] + 1 - found[0]), float(max_height))
    if not extents:
        return float("nan"), 0.0
    side = next(iter(extents)) if len(extents) == 1 else 0
    return float(np.mean(list(extents.values()))), float(side)


def make_sample(ct_slice_u8: np.ndarray, label_slice: np.ndarray, target_id: int,
                attention_slice: np.ndarray | None, slice_ratio: float,
                max_height: int) -> dict[str, np.ndarray] | None:
    """Build one training/inference sample around a target vertebra of a 2D slice.

    Args:
        ct_slice_u8: ``(H, W)`` windowed CT (0..255), rows cranio-caudal (row 0 cranial).
        label_slice: ``(H, W)`` VerSe ids of the vertebral bodies.
        target_id: VerSe id of the target vertebra.
        attention_slice: ``(H, W)`` Grad-CAM++ map in [0, 1] (high = looks fractured), or ``None``.
        slice_ratio: distance of the slice from the vertebra's centre, fraction of its half-width.
        max_height: gap height in rows (``model.max_height_px``).

    Returns:
        ``None`` when the target is absent from the slice, else float32 arrays, images ``(1, H, W)``:
        ``ct`` (closed-up CT in [-1, 1], band zeroed), ``mask`` (1 on the band), ``slice_ratio`` (scalar),
        ``attention`` (``1 - cam`` closed up, band set to 1; ones when no map), ``real_ct`` (the real
        slice with the target centred in the band and its context shifted to meet it: what a perfect
        generator assembles), ``real_target`` and ``real_neighbours`` (target and other vertebrae
        labels, binary, in that frame), ``height`` (target height in rows, scalar; clipped to
        ``max_height``), ``neighbour_height`` and ``neighbour_side`` (:func:`neighbour_prior`; the
        height NaN when unknown) and ``band`` (int64 ``(b0, b1)``).
    """
    rows = np.flatnonzero((label_slice == target_id).any(axis=1))
    if rows.size == 0:
        return None
    n_rows = ct_slice_u8.shape[0]
    x1, x2 = int(rows[0]), int(rows[-1]) + 1
    if x2 - x1 > max_height:
        logger.warning("vertebra %d is %d rows high in this slice, more than max_height %d: clipped to "
                       "its central %d rows", target_id, x2 - x1, max_height, max_height)
        x1 += (x2 - x1 - max_height) // 2
        x2 = x1 + max_height
    height = x2 - x1
    band = fixed_band((x1, x2), max_height, n_rows)
    b0, b1 = band
    shift = b0 + (max_height - height) // 2 - x1

    ct = ct_slice_u8.astype(np.float32) / 127.5 - 1.0
    target = (label_slice == target_id).astype(np.float32)
    neighbours = ((label_slice != 0) & (label_slice != target_id)).astype(np.float32)
    cam = np.zeros_like(ct) if attention_slice is None else np.asarray(attention_slice, np.float32)

    closed_ct = close_up(ct, (x1, x2), band)
    closed_attention = close_up(1.0 - cam, (x1, x2), band, fill=1.0)
    real = {name: _assemble_np(_shift_rows(image, shift), close_up(image, (x1, x2), band), band, height)
            for name, image in (("real_ct", ct), ("real_target", target), ("real_neighbours", neighbours))}
    mask = np.zeros_like(ct)
    mask[b0:b1] = 1.0
    prior_height, prior_side = neighbour_prior(label_slice, target_id, max_height)
    return {
        "ct": closed_ct[None],
        "mask": mask[None],
        "slice_ratio": np.array(slice_ratio, dtype=np.float32),
        "attention": closed_attention[None],
        "real_ct": real["real_ct"][None],
        "real_target": real["real_target"][None],
        "real_neighbours": real["real_neighbours"][None],
        "height": np.array(height, dtype=np.float32),
        "neighbour_height": np.array(prior_height, dtype=np.float32),
        "neighbour_side": np.array(prior_side, dtype=np.float32),
        "band": np.array(band, dtype=np.int64),
    }
