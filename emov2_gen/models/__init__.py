"""Models: the EMOv2 classifier backbone, the diffusion UNet, the D-EMOv2 transformer, and the preset registry."""

from .backbone import EMOV2_BACKBONE_PRESETS, EMOv2Backbone
from .registry import BASELINE_UNET2D_PRESETS, DENOISER_PRESETS, build_denoiser, denoiser_from_config
from .segmentation import EMOv2UNetForSegmentation
from .transformer_2d import EMOV2_TRANSFORMER_PRESETS, EMOv2Transformer2DModel
from .unet_2d import EMOV2_UNET_PRESETS, EMOv2UNet2DModel

__all__ = [
    "BASELINE_UNET2D_PRESETS",
    "DENOISER_PRESETS",
    "EMOV2_BACKBONE_PRESETS",
    "EMOV2_TRANSFORMER_PRESETS",
    "EMOV2_UNET_PRESETS",
    "EMOv2Backbone",
    "EMOv2Transformer2DModel",
    "EMOv2UNet2DModel",
    "EMOv2UNetForSegmentation",
    "build_denoiser",
    "denoiser_from_config",
]
