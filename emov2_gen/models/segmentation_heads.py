"""Decode heads of the segmentation UNet, with mmsegmentation's layouts and parameter counts.

- `FCNHead`: `num_convs` Conv3x3+BN+ReLU units, Dropout2d, a 1x1 classifier (mmseg `FCNHead`,
  `concat_input=False`); the auxiliary head of the paper's model (in 128, channels 64, 1 conv: 73,986
  parameters for 2 classes).
- `ASPPHead`: DeepLabV3's atrous spatial pyramid pooling (mmseg `ASPPHead`): an image-pooling branch
  plus one 1x1 and several dilated 3x3 branches, concatenated, fused by a Conv3x3+BN+ReLU, Dropout2d,
  1x1 classifier; the decode head of the paper's model (in 64, channels 16, dilations 1/12/24/36:
  41,442 parameters for 2 classes).

Both return logits at the resolution of their input. BN stands where mmseg configs use SyncBN (same
parameters). The classifier is initialised N(0, 0.01) with zero bias, as mmseg's `BaseDecodeHead`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import ConvNormAct


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class FCNHead(nn.Module):
    """`num_convs` x (Conv3x3 + BN + ReLU) -> Dropout2d -> Conv1x1 to `num_classes`."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs at least one conv, got num_convs={num_convs}.")
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvNormAct(a, b, 3, norm="bn", act="relu") for a, b in zip(widths, widths[1:])))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class ASPPHead(nn.Module):
    """DeepLabV3 head: [image pool, 1x1 (dilation 1), 3x3 at each other dilation] -> concat -> Conv3x3 -> classifier."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dilations: tuple[int, ...] = (1, 12, 24, 36),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(in_channels, channels, 1, norm="bn", act="relu"))
        self.branches = nn.ModuleList(
            ConvNormAct(in_channels, channels, 1 if d == 1 else 3, dilation=d, norm="bn", act="relu") for d in dilations
        )
        self.bottleneck = ConvNormAct((len(dilations) + 1) * channels, channels, 3, norm="bn", act="relu")
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])  # bilinear resize of a 1x1 map = broadcast
        features = torch.cat([pooled] + [branch(x) for branch in self.branches], dim=1)
        return self.classifier(self.dropout(self.bottleneck(features)))
