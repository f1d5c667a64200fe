"""Blocks: i2RMB down/mid/up blocks assembled into diffusers-style UNets."""

from .unet_2d_blocks import (
    EMOv2AttnDownBlock2D,
    EMOv2AttnUpBlock2D,
    EMOv2DownBlock2D,
    EMOv2MidBlock2D,
    EMOv2UpBlock2D,
)

__all__ = ["EMOv2AttnDownBlock2D", "EMOv2AttnUpBlock2D", "EMOv2DownBlock2D", "EMOv2MidBlock2D", "EMOv2UpBlock2D"]
