"""The HealthiVert-GAN generator: coarse and fine inpainting networks (DeepFill v1 style) with SHRM heads.

Images are ``(B, C, H, W)`` slices, rows cranio-caudal (row 0 cranial), columns antero-posterior
(sagittal) or left-right (coronal); ``H`` and ``W`` must be multiples of 8 (16 with contextual
attention). The CT is in [-1, 1]; the mask is 1 on the fixed-height band to fill; the attention map is
``1 - Grad-CAM++`` of the fracture classifier (HGAM), closed up like the CT.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from healthivert.config import ModelParams
from healthivert.data.samples import assemble, kept_rows
from healthivert.models.contextual_attention import ContextualAttention

Stage = Literal["coarse", "fine"]


def conv_block(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
               activation: nn.Module | None = None) -> nn.Sequential:
    """Convolution with 'same'-style padding followed by ELU (DeepFill style, no normalisation).

    The ELU works in place on the convolution's fresh output: a new full-size output cost it twice
    the time on a CPU (its memory, not its arithmetic, is the cost).
    """
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation),
                         activation if activation is not None else nn.ELU(inplace=True))


def _dilated_stack(channels: int) -> nn.Sequential:
    """Four dilated 3x3 convolutions (rates 2, 4, 8, 16): a receptive field covering the whole slice."""
    return nn.Sequential(*(conv_block(channels, channels, dilation=rate) for rate in (2, 4, 8, 16)))


def _phase_taps(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 taps of ``weight`` along ``dim`` folded into 2 for the even and the odd output rows (or columns)
    of a 3-tap convolution of a nearest x2 upsampled input: even ones see input ``i - 1`` (tap 0) and
    ``i`` (taps 1 + 2), odd ones ``i`` (taps 0 + 1) and ``i + 1`` (tap 2)."""
    first, middle, last = weight.split(1, dim)
    return torch.cat([first, middle + last], dim), torch.cat([first + middle, last], dim)


def upsampled_conv(conv: nn.Conv2d, low: torch.Tensor, high: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(torch.cat([upsample_x2(low), high], 1))`` without building the upsampled copy or the concatenation.

    ``conv`` is a 3x3 convolution with stride 1 and padding 1, ``upsample_x2`` nearest; ``high`` has
    the output's size. The same numbers, computed at ``low``'s resolution: each of the 4 output
    phases (even/odd row, even/odd column) is a 2x2 convolution with folded taps (16 taps per low
    pixel instead of 36), and, the convolution being linear in its channels, ``high`` is convolved
    with its slice of the weight and added. At full size on a CPU (bf16, 4 slices) this takes the
    decoder's two upsamplings from 6.1 and 6.8 ms to 3.2 and 4.2 ms, and the copy of a 33-channel
    concatenation (32 features + the attention map) went with it.
    """
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation) != ((3, 3), (1, 1), (1, 1), (1, 1)):
        raise ValueError("upsampled_conv needs a 3x3 convolution with stride 1, padding 1 and no dilation")
    batch, channels, height, width = low.shape
    outputs = conv.out_channels
    rows = _phase_taps(conv.weight[:, :channels], 2)
    kernels = torch.cat([kernel for row_weight in rows for kernel in _phase_taps(row_weight, 3)])
    # one 2x2 convolution of the padded input for all 4 phases: phase (r, c) is its window at offset (r, c)
    phases = F.conv2d(F.pad(low, (1, 1, 1, 1)), kernels, None if conv.bias is None else conv.bias.repeat(4))
    layout = torch.channels_last if low.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((batch, outputs, 2 * height, 2 * width), dtype=phases.dtype, device=phases.device,
                      memory_format=layout)
    for index, (row, column) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, row::2, column::2] = phases[:, index * outputs:(index + 1) * outputs,
                                              row:row + height, column:column + width]
    if high is not None:
        out += F.conv2d(high, conv.weight[:, channels:], None, 1, 1)
    return out


class _Decoder(nn.Module):
    """Two nearest x2 upsamplings, each followed by convs that also see the resized attention map."""

    def __init__(self, cnum: int, attention_channels: int) -> None:
        super().__init__()
        self.up1 = nn.Sequential(conv_block(4 * cnum + attention_channels, 2 * cnum), conv_block(2 * cnum, 2 * cnum))
        self.up2 = nn.Sequential(conv_block(2 * cnum + attention_channels, cnum),
                                 conv_block(cnum, max(cnum // 2, 1)))
        self.attention_channels = attention_channels

    def _up(self, block: nn.Sequential, x: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """``block`` on ``x`` upsampled x2 (nearest), its first convolution also over the resized attention map."""
        size = (2 * x.shape[-2], 2 * x.shape[-1])
        resized = (F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
                   if self.attention_channels else None)
        first, activation = block[0]
        return block[1:](activation(upsampled_conv(first, x, resized)))

    def forward(self, x: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """``(B, 4c, H/4, W/4)`` features -> ``(B, c/2, H, W)``."""
        return self._up(self.up2, self._up(self.up1, x, attention), attention)


class HeightHead(nn.Module):
    """SHRM head: global average pooling -> linear -> sigmoid x ``max_height`` (healthy height in rows).

    With a prior (the coarse head: the neighbours' mean height,
    :func:`healthivert.data.samples.neighbour_prior`; the fine head: the coarse head's height), the
    linear output is added to the prior's logit, so the head learns a correction of the prior; it
    starts at the prior (zero-initialised linear), and the fine stage starts where the coarse ended.
    Where the prior is NaN or not given, the head predicts the height from the features alone, as the
    reference's does. With ``use_side`` (the coarse head) a learnt weight times the prior's side
    (:func:`healthivert.data.samples.neighbour_prior`: -1 only the vertebra above, +1 only the one
    below) is added too, so a one-sided prior's level step is corrected. Without ``correct_prior`` the
    features' correction is left out where the prior is known: the height is the prior (and the side
    term), and the features predict it only where the prior is NaN. The head runs in float32 (a
    bfloat16 sigmoid x 40 resolves heights to ~0.15 rows only).
    """

    def __init__(self, channels: int, max_height: float, use_prior: bool = False, use_side: bool = False,
                 correct_prior: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 1)
        self.max_height = float(max_height)
        self.use_prior = use_prior
        self.correct_prior = correct_prior
        if use_prior:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        self.side_weight = nn.Parameter(torch.zeros(1)) if use_prior and use_side else None

    def forward(self, features: torch.Tensor, prior: torch.Tensor | None = None,
                side: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, h, w)`` (and ``(B,)`` prior heights in rows and their sides) -> ``(B,)`` height in rows."""
        with torch.autocast(features.device.type, enabled=False):
            logit = self.linear(features.float().mean(dim=(2, 3))).squeeze(1)
            if self.use_prior and prior is not None:
                share = (prior.float() / self.max_height).clamp(0.02, 0.98)
                known = torch.isfinite(share)
                prior_logit = torch.logit(share)
                logit = (torch.where(known, logit + prior_logit, logit) if self.correct_prior
                         else torch.where(known, prior_logit, logit))
                if self.side_weight is not None and side is not None:
                    logit = logit + torch.where(known, self.side_weight * side.float(), torch.zeros_like(share))
            return torch.sigmoid(logit) * self.max_height


class CoarseGenerator(nn.Module):
    """Coarse stage: 3 inputs (CT, slice-ratio plane, mask) -> CT and healthy-vertebra segmentation.

    Args:
        cnum: base width (16 in the paper's network).
        use_attention: concatenate the HGAM attention map at both upsamplings.
    """

    def __init__(self, cnum: int, use_attention: bool = True) -> None:
        super().__init__()
        c = cnum
        self.encoder = nn.Sequential(
            conv_block(3, c, kernel=5), conv_block(c, 2 * c, stride=2), conv_block(2 * c, 2 * c),
            conv_block(2 * c, 4 * c, stride=2), conv_block(4 * c, 4 * c), conv_block(4 * c, 4 * c))
        self.dilated = _dilated_stack(4 * c)
        self.middle = nn.Sequential(conv_block(4 * c, 4 * c), conv_block(4 * c, 4 * c))
        # CT and segmentation get decoders of their own: through one shared decoder the L1 term
        # (weight 200) starves the segmentation of features and its Dice never falls
        self.decoder = _Decoder(c, 1 if use_attention else 0)
        self.seg_decoder = _Decoder(c, 1 if use_attention else 0)
        self.ct_head = nn.Conv2d(max(c // 2, 1), 1, 3, padding=1)
        self.seg_head = nn.Conv2d(max(c // 2, 1), 1, 3, padding=1)
        self.feature_channels = 4 * c

    def forward(self, x: torch.Tensor, attention: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` input -> CT in [-1, 1], segmentation in (0, 1), deepest features."""
        deep = self.dilated(self.encoder(x))
        middle = self.middle(deep)
        ct = self.ct_head(self.decoder(middle, attention)).clamp(-1.0, 1.0)
        seg = torch.sigmoid(self.seg_head(self.seg_decoder(middle, attention)))
        return ct, seg, deep


class FineGenerator(nn.Module):
    """Fine stage: a dilated 'hallucination' branch and a contextual-attention branch at 1/4 resolution.

    Inputs (4 channels): the coarse CT pasted into the masked slice, the coarse segmentation, the mask
    and the slice-ratio plane. The CT head also sees the coarse segmentation and the segmentation head
    the fine CT's correction (one extra channel each). The CT head predicts a correction of the pasted
    coarse CT and starts at zero, so a short fine stage cannot make the coarse result worse (a deviation:
    from scratch, 400 fine steps raised the masked MAE from 34.9 to 41.3 HU on the phantom). The
    segmentation head sees the correction rather than the whole CT: given the whole CT, the tiny
    configuration of the Kubeflow test never learnt to segment (fine Dice 0.004 after 80 steps).

    Args:
        cnum: base width.
        use_attention: concatenate the HGAM attention map at both upsamplings.
        contextual_attention: build the contextual-attention branch (off: dilated branch only).
    """

    def __init__(self, cnum: int, use_attention: bool = True, contextual_attention: bool = True) -> None:
        super().__init__()
        c = cnum
        self.hallucination = nn.Sequential(
            conv_block(4, c, kernel=5), conv_block(c, c, stride=2), conv_block(c, 2 * c),
            conv_block(2 * c, 2 * c, stride=2), conv_block(2 * c, 4 * c), conv_block(4 * c, 4 * c),
            _dilated_stack(4 * c))
        self.contextual = contextual_attention
        if contextual_attention:
            self.attention_encoder = nn.Sequential(
                conv_block(4, c, kernel=5), conv_block(c, c, stride=2), conv_block(c, 2 * c),
                conv_block(2 * c, 4 * c, stride=2), conv_block(4 * c, 4 * c),
                conv_block(4 * c, 4 * c, activation=nn.ReLU()))
            self.contextual_attention = ContextualAttention(patch_size=3, rate=2, fuse_k=3, softmax_scale=10.0)
            self.attention_decoder = nn.Sequential(conv_block(4 * c, 4 * c), conv_block(4 * c, 4 * c))
        merged = 8 * c if contextual_attention else 4 * c
        self.merge = nn.Sequential(conv_block(merged, 4 * c), conv_block(4 * c, 4 * c))
        self.decoder = _Decoder(c, 1 if use_attention else 0)
        self.seg_decoder = _Decoder(c, 1 if use_attention else 0)
        self.ct_head = nn.Conv2d(max(c // 2, 1) + 1, 1, 3, padding=1)
        nn.init.zeros_(self.ct_head.weight)
        nn.init.zeros_(self.ct_head.bias)
        self.seg_head = nn.Conv2d(max(c // 2, 1) + 1, 1, 3, padding=1)
        self.feature_channels = merged

    def forward(self, x: torch.Tensor, mask: torch.Tensor, attention: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, 4, H, W)`` input -> CT in [-1, 1], segmentation in (0, 1), merged deep features."""
        features = [self.hallucination(x)]
        if self.contextual:
            encoded = self.attention_encoder(x)
            filled = self.contextual_attention(encoded, encoded, mask)
            features.append(self.attention_decoder(filled))
        deep = torch.cat(features, 1)
        merged = self.merge(deep)
        # a correction of the coarse CT pasted in x[:, 0] (zero at start: fine training starts from the coarse result)
        correction = self.ct_head(torch.cat([self.decoder(merged, attention), x[:, 1:2]], 1))
        ct = (x[:, 0:1] + correction).clamp(-1.0, 1.0)
        seg = torch.sigmoid(self.seg_head(torch.cat([self.seg_decoder(merged, attention), correction], 1)))
        return ct, seg, deep


@dataclasses.dataclass
class GeneratorOutput:
    """What :class:`HealthiVertGenerator` returns; images ``(B, 1, H, W)``, heights ``(B,)`` in rows.

    Attributes:
        coarse_ct, coarse_seg: raw coarse outputs in the closed-up frame.
        fine_ct, fine_seg: raw fine outputs (``None`` in stage ``"coarse"``).
        coarse_height, fine_height: SHRM predictions (``None`` when the module is off or not run).
        coarse_ct_assembled, coarse_seg_assembled: the coarse outputs re-assembled.
        ct, seg: the final re-assembled outputs (the fine ones in stage ``"fine"``).
        height: the final predicted height; with SHRM off, the height assembled at (the given one, or
            the band height when the band is kept as is).
        kept_rows: ``(B,)`` long, the generated rows ``ct``/``seg`` keep, centred on the band: the
            height assembled at (raised to ``min_height``), rounded and clipped to the band.
    """

    coarse_ct: torch.Tensor
    coarse_seg: torch.Tensor
    fine_ct: torch.Tensor | None
    fine_seg: torch.Tensor | None
    coarse_height: torch.Tensor | None
    fine_height: torch.Tensor | None
    coarse_ct_assembled: torch.Tensor
    coarse_seg_assembled: torch.Tensor
    ct: torch.Tensor
    seg: torch.Tensor
    height: torch.Tensor
    kept_rows: torch.Tensor


def band_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` band mask -> ``(B, 2)`` long ``(b0, b1)``: first and one-past-last masked row."""
    rows = mask.detach().amax(dim=(1, 3)) > 0.5
    n_rows = rows.shape[1]
    first = rows.to(torch.uint8).argmax(dim=1)
    last = n_rows - rows.flip(1).to(torch.uint8).argmax(dim=1)
    return torch.stack([first, last], 1).long()


def _at_least(height: torch.Tensor | None, floor: torch.Tensor | None) -> torch.Tensor | None:
    """``height`` raised to ``floor`` where given (``None`` stays ``None``)."""
    if height is None or floor is None:
        return height
    return torch.maximum(height, floor.to(height))


class HealthiVertGenerator(nn.Module):
    """Coarse + fine generator with their SHRM heads, switched by :class:`ModelParams`.

    Args:
        model_params: sizes (``network.cnum``) and module switches (``attention_module``: HGAM input,
            ``height_module``: SHRM, ``contextual_attention``: fine attention branch).
    """

    def __init__(self, model_params: ModelParams) -> None:
        super().__init__()
        self.params = model_params
        cnum = model_params.network.cnum
        self.coarse = CoarseGenerator(cnum, model_params.attention_module)
        self.fine = FineGenerator(cnum, model_params.attention_module, model_params.contextual_attention)
        if model_params.height_module:
            self.coarse_height_head = HeightHead(self.coarse.feature_channels, model_params.max_height_px,
                                                 model_params.height_prior, use_side=True,
                                                 correct_prior=model_params.height_correction)
            self.fine_height_head = HeightHead(self.fine.feature_channels, model_params.max_height_px,
                                               model_params.height_prior, correct_prior=model_params.height_correction)

    def heights_from_prior(self) -> None:
        """Leave out the SHRM heads' learnt correction where the prior is known (as ``height_correction`` off)."""
        if self.params.height_module:
            self.coarse_height_head.correct_prior = self.fine_height_head.correct_prior = False

    def _finish(self, raw_ct: torch.Tensor, raw_seg: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                band: torch.Tensor, height: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Assemble at ``height``, or paste the whole band into the context when ``height`` is None."""
        if height is None:
            return raw_ct * mask + context * (1 - mask), raw_seg
        return assemble(raw_ct, context, band, height), assemble(raw_seg, raw_seg, band, height)

    def forward(self, ct: torch.Tensor, mask: torch.Tensor, slice_ratio: torch.Tensor,
                attention: torch.Tensor | None = None, stage: Stage = "fine",
                assemble_height: torch.Tensor | None = None, neighbour_height: torch.Tensor | None = None,
                min_height: torch.Tensor | None = None, neighbour_side: torch.Tensor | None = None) -> GeneratorOutput:
        """Inpaint the band of closed-up slices and re-assemble them at the healthy height.

        Args:
            ct: ``(B, 1, H, W)`` closed-up CT in [-1, 1] (band values are ignored).
            mask: ``(B, 1, H, W)``, 1 on the fixed-height band.
            slice_ratio: ``(B,)`` distance of each slice from its vertebra's centre (fraction of half-width).
            attention: ``(B, 1, H, W)`` ``1 - CAM`` closed up; ones are used when ``None``.
            stage: ``"coarse"`` runs the coarse network only.
            assemble_height: ``(B,)`` heights to assemble at instead of the predicted ones (e.g. the
                real height while training the pixel losses); also used when SHRM is off.
            neighbour_height: ``(B,)`` the SHRM prior in rows (NaN where unknown), used when
                ``height_prior`` is on.
            min_height: ``(B,)`` heights the predicted ones are raised to before assembling (the
                method keeps at least the vertebra's own height); ``height`` stays the prediction.
            neighbour_side: ``(B,)`` the side the prior comes from (-1 above only, +1 below only, 0 both).

        Returns:
            A :class:`GeneratorOutput`.
        """
        if stage not in ("coarse", "fine"):
            raise ValueError(f"stage must be 'coarse' or 'fine', not {stage!r}")
        batch = ct.shape[0]
        context = ct * (1 - mask)
        ratio = slice_ratio.to(ct).reshape(batch, 1, 1, 1).expand_as(ct)
        if not self.params.attention_module:
            attention = None
        elif attention is None:
            attention = torch.ones_like(ct)
        band = band_from_mask(mask)
        use_shrm = self.params.height_module

        coarse_ct, coarse_seg, coarse_deep = self.coarse(torch.cat([context, ratio, mask], 1), attention)
        coarse_height = self.coarse_height_head(coarse_deep, neighbour_height, neighbour_side) if use_shrm else None
        fine_ct = fine_seg = fine_height = None
        height_now = coarse_height
        if stage == "fine":
            pasted = coarse_ct * mask + context
            fine_ct, fine_seg, fine_deep = self.fine(torch.cat([pasted, coarse_seg, mask, ratio], 1), mask, attention)
            # the fine head corrects the coarse height (its prior); the coarse head learns from its own loss
            coarse_prior = None if coarse_height is None else coarse_height.detach()
            fine_height = self.fine_height_head(fine_deep, coarse_prior) if use_shrm else None
            height_now = fine_height

        kept_coarse = assemble_height if assemble_height is not None else _at_least(coarse_height, min_height)
        kept_final = assemble_height if assemble_height is not None else _at_least(height_now, min_height)
        coarse_ct_out, coarse_seg_out = self._finish(coarse_ct, coarse_seg, context, mask, band, kept_coarse)
        if stage == "fine":
            final_ct, final_seg = self._finish(fine_ct, fine_seg, context, mask, band, kept_final)
        else:
            final_ct, final_seg = coarse_ct_out, coarse_seg_out
        # with SHRM off and no height given, the whole band is kept
        assembled_at = kept_final if kept_final is not None else (band[:, 1] - band[:, 0]).to(ct.dtype)
        if height_now is None:
            height_now = assembled_at
        kept = kept_rows(assembled_at, band)
        return GeneratorOutput(coarse_ct=coarse_ct, coarse_seg=coarse_seg, fine_ct=fine_ct, fine_seg=fine_seg,
                               coarse_height=coarse_height, fine_height=fine_height,
                               coarse_ct_assembled=coarse_ct_out, coarse_seg_assembled=coarse_seg_out,
                               ct=final_ct, seg=final_seg, height=height_now, kept_rows=kept)
