"""Conv -> Norm -> Act, the plain unit of EMOv2's stem and of the segmentation UNet's first level."""

from __future__ import annotations

import torch
from torch import nn

from .norms import NORM_EPS, make_act, make_norm, norm_act


class ConvNormAct(nn.Sequential):
    """`conv`, `norm`, `act` children; `groups=-1` means depth-wise. Padding keeps the size at stride 1 (any dilation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
        norm: str = "bn",
        act: str = "silu",
        eps: float = NORM_EPS,
    ) -> None:
        groups = in_channels if groups == -1 else groups
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.norm = make_norm(norm, out_channels, eps=eps)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act(self.conv(x), self.norm, self.act)
