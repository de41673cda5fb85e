"""Naive in-fillers the generator must beat: copy the nearer neighbour, or blend both neighbours.

Both work on a batch of closed-up samples (:func:`healthivert.data.samples.make_sample`), tensors
``(B, 1, H, W)`` with rows cranio-caudal (row 0 cranial), and return a :class:`Prediction` in the
frame of ``real_ct`` (the band re-assembled at the predicted height), exactly like the generator's
output, so the same metrics apply to all three.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from healthivert.data.samples import assemble


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A synthesised slice in the frame of ``real_ct``.

    Attributes:
        ct: ``(B, 1, H, W)`` CT in [-1, 1].
        seg: ``(B, 1, H, W)`` probability (or 0/1) of the target vertebra.
        height: ``(B,)`` predicted target height, rows.
    """

    ct: torch.Tensor
    seg: torch.Tensor
    height: torch.Tensor


def closed_context(real: torch.Tensor, band: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Undo the re-assembly: the closed-up context (as the network saw it) of a real-frame image.

    Args:
        real: ``(B, C, H, W)`` image in the frame of ``real_ct`` (target of ``height`` rows centred in the band).
        band: ``(B, 2)`` ``(b0, b1)``.
        height: ``(B,)`` real target heights, rows.

    Returns:
        ``(B, C, H, W)``: rows above ``b0`` and from ``b1`` on as in the closed-up input; band rows zero.
    """
    batch, channels, n_rows, n_cols = real.shape
    band = band.to(device=real.device, dtype=torch.long).reshape(batch, 2)
    h = torch.round(height).to(device=real.device, dtype=torch.long).reshape(batch, 1)
    rows = torch.arange(n_rows, device=real.device).unsqueeze(0)
    b0, b1 = band[:, :1], band[:, 1:2]
    c0 = b0 + torch.div(b1 - b0 - h, 2, rounding_mode="floor")
    source = torch.where(rows < b0, rows - b0 + c0, rows - b1 + c0 + h).clamp(0, n_rows - 1)
    out = torch.gather(real, 2, source[:, None, :, None].expand(batch, channels, n_rows, n_cols))
    inside = (rows >= b0) & (rows < b1)
    return out.masked_fill(inside[:, None, :, None], 0.0)


def _neighbour_spans(mask: np.ndarray, band: tuple[int, int]) -> list[tuple[int, int, np.ndarray]]:
    """The vertebrae just above and just below the band in a closed-up ``(H, W)`` neighbour mask.

    Each is a connected component (so a tilted neighbour is not merged with the next vertebra even
    where their rows overlap): the component above the band whose lowest row is closest to it, and
    the one below whose highest row is. Returns ``(r0, r1, component_mask)`` per neighbour found,
    rows half-open, cranial one first.
    """
    components, count = ndimage.label(mask > 0.5)
    b0, b1 = band
    above: tuple[int, int, np.ndarray] | None = None
    below: tuple[int, int, np.ndarray] | None = None
    for index, found in enumerate(ndimage.find_objects(components), start=1):
        if found is None:
            continue
        r0, r1 = found[0].start, found[0].stop
        centre = (r0 + r1) / 2
        if centre < b0 and (above is None or r1 > above[1]):
            above = (r0, r1, components == index)
        elif centre >= b1 and (below is None or r0 < below[0]):
            below = (r0, r1, components == index)
    return [span for span in (above, below) if span is not None]


def _resize_rows(patch: torch.Tensor, rows: int) -> torch.Tensor:
    """Linear resampling of a ``(C, h, W)`` patch to ``rows`` rows (columns unchanged)."""
    return F.interpolate(patch[None], size=(rows, patch.shape[-1]), mode="bilinear", align_corners=True)[0]


def neighbour_fill(ct: torch.Tensor, neighbours: torch.Tensor, band: torch.Tensor, max_height: int,
                   mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill each band with the neighbouring vertebrae of the closed-up context.

    Args:
        ct: ``(B, 1, H, W)`` closed-up CT in [-1, 1].
        neighbours: ``(B, 1, H, W)`` binary neighbour labels in the same closed-up frame.
        band: ``(B, 2)`` ``(b0, b1)``.
        max_height: band height, rows.
        mode: ``nearest`` (copy the neighbour whose body ends closer to the band) or ``interpolate``
            (both neighbours resampled to their mean height and averaged).

    Returns:
        ``(generated_ct, generated_seg, height)``: band images ``(B, 1, H, W)`` holding the filler
        centred on the band, and the filler's height ``(B,)``.
    """
    gen_ct = torch.zeros_like(ct)
    gen_seg = torch.zeros_like(ct)
    heights = torch.zeros(ct.shape[0], dtype=ct.dtype, device=ct.device)
    for i in range(ct.shape[0]):
        b0, b1 = (int(v) for v in band[i])
        spans = _neighbour_spans(neighbours[i, 0].detach().cpu().numpy(), (b0, b1))
        if not spans:
            continue
        patches = [(ct[i, :, r0:r1], torch.from_numpy(component[r0:r1]).to(ct)[None]) for r0, r1, component in spans]
        if mode == "nearest":
            gaps = [b0 - spans[0][1], spans[-1][0] - b1] if len(spans) == 2 else [0]
            patches = [patches[int(np.argmin(gaps))]]
        elif mode != "interpolate":
            raise ValueError(f"unknown baseline mode {mode!r}")
        h = min(max_height, round(sum(p[0].shape[1] for p in patches) / len(patches)))
        fill_ct = torch.stack([_resize_rows(p[0], h) for p in patches]).mean(dim=0)
        fill_seg = (torch.stack([_resize_rows(p[1], h) for p in patches]).mean(dim=0) > 0.5).to(ct.dtype)
        c0 = b0 + (b1 - b0 - h) // 2
        gen_ct[i, :, c0:c0 + h] = fill_ct
        gen_seg[i, :, c0:c0 + h] = fill_seg
        heights[i] = h
    return gen_ct, gen_seg, heights


def baseline_prediction(batch: dict[str, torch.Tensor], mode: str, max_height: int) -> Prediction:
    """A baseline's re-assembled prediction for a batch of samples (see :func:`neighbour_fill`).

    Only what the generator also sees is used: the closed-up CT and the closed-up neighbour labels
    (recovered from ``real_neighbours``); the real height serves only to undo the re-assembly frame.
    """
    context_neighbours = closed_context(batch["real_neighbours"], batch["band"], batch["height"])
    gen_ct, gen_seg, height = neighbour_fill(batch["ct"], context_neighbours, batch["band"], max_height, mode)
    ct = assemble(gen_ct, batch["ct"], batch["band"], height)
    seg = assemble(gen_seg, torch.zeros_like(gen_seg), batch["band"], height)
    return Prediction(ct=ct, seg=seg, height=height)

