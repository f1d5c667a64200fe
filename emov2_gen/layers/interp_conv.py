"""InterpConv, the official EMOv2 UNet's upsampler: bilinear x2, then Conv1x1 (no bias) + Norm + Act.

mmseg's `InterpConv` as used by `unet_emo2.py`; the segmentation UNet uses it with BN + ReLU, the
denoiser with LayerNorm + ReLU (its no-BatchNorm rule).
"""

from __future__ import annotations

import torch
from torch import nn

from .conv_norm_act import ConvNormAct
from .norms import norm_act
from .norms import NORM_EPS


class InterpConv(nn.Sequential):
    """Children `0` (bilinear x2 `nn.Upsample`, align_corners=False) and `1` (`ConvNormAct`, 1x1), in the official order.

    `conv_first=True` applies the 1x1 conv before the upsampling. Bilinear interpolation mixes
    neighbouring pixels with weights that sum to one and a bias-free 1x1 conv mixes channels per pixel,
    so the two commute: the same function (up to float rounding) with the conv on a quarter of the
    pixels. The segmentation model keeps the official order (its reported runs used it); the denoiser
    takes the cheaper one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str = "bn",
        act: str = "relu",
        eps: float = NORM_EPS,
        conv_first: bool = False,
    ) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ConvNormAct(in_channels, out_channels, 1, norm=norm, act=act, eps=eps),
        )
        self.conv_first = conv_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.conv_first:
            return super().forward(x)
        upsample, unit = self
        return norm_act(upsample(unit.conv(x)), unit.norm, unit.act)
