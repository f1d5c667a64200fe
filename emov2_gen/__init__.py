"""emov2-gen: EMOv2's i2RMB backbone for diffusers -- a UNet2DModel drop-in denoiser, its classifier backbone,
training/evaluation tooling and a segmentation UNet.

`ModelMixin` is re-exported on purpose: diffusers (>= 0.42.1) resolves a pipeline component saved as
`["emov2_gen...", "EMOv2UNet2DModel"]` by looking up its loading base classes in this module's namespace.
Import `emov2_gen` before `DiffusionPipeline.from_pretrained` on a folder that holds an EMOv2 UNet.
"""

from diffusers.models.modeling_utils import ModelMixin

from .models import (
    BASELINE_UNET2D_PRESETS,
    DENOISER_PRESETS,
    EMOV2_BACKBONE_PRESETS,
    EMOV2_UNET_PRESETS,
    EMOv2Backbone,
    EMOv2UNet2DModel,
    EMOv2UNetForSegmentation,
    build_denoiser,
    denoiser_from_config,
)

__version__ = "0.1.0"

__all__ = [
    "BASELINE_UNET2D_PRESETS",
    "DENOISER_PRESETS",
    "EMOV2_BACKBONE_PRESETS",
    "EMOV2_UNET_PRESETS",
    "EMOv2Backbone",
    "EMOv2UNet2DModel",
    "EMOv2UNetForSegmentation",
    "ModelMixin",
    "build_denoiser",
    "denoiser_from_config",
]
