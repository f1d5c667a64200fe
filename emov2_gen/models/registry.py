"""Named denoiser presets: EMOv2 UNets, the D-EMOv2 (DEMO) transformers, and the diffusers `UNet2DModel` baselines.

`build_denoiser(name, ...)` is what the training, evaluation and benchmark scripts call, so that an
EMOv2 preset and a baseline are built (and compared) through one code path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from diffusers import UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from .transformer_2d import EMOV2_TRANSFORMER_PRESETS, EMOv2Transformer2DModel
from .unet_2d import EMOV2_UNET_PRESETS, EMOv2UNet2DModel

# Baseline UNet2DModel configs (resolution/channels are filled in by `build_denoiser`).
_DDPM_CIFAR_BLOCKS = dict(
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=None,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
)
BASELINE_UNET2D_PRESETS: dict[str, dict[str, Any]] = {
    # The DDPM CIFAR-10 layout scaled to ~5.1M parameters: parameter-matched to emov2-5m.
    "unet2d-5m": dict(_DDPM_CIFAR_BLOCKS, block_out_channels=(32, 64, 96, 128)),
    # The same layout at ~0.97M parameters: parameter-matched to emov2-1m (16 groups: 16 channels at level 0).
    "unet2d-1m": dict(_DDPM_CIFAR_BLOCKS, block_out_channels=(16, 32, 48, 48), norm_num_groups=16),
    # google/ddpm-cifar10-32 (35.7M parameters, Ho et al. 2020).
    "ddpm-cifar10-32": dict(_DDPM_CIFAR_BLOCKS, block_out_channels=(128, 256, 256, 256), dropout=0.1),
}

DENOISER_PRESETS = tuple(EMOV2_UNET_PRESETS) + tuple(EMOV2_TRANSFORMER_PRESETS) + tuple(BASELINE_UNET2D_PRESETS)
# What the size/speed tables show by default: the pixel-space UNets (the D-EMOv2 transformers are latent-space
# models of 25-493M parameters, listed on request).
UNET_DENOISER_PRESETS = tuple(EMOV2_UNET_PRESETS) + tuple(BASELINE_UNET2D_PRESETS)
DENOISER_CLASSES = {cls.__name__: cls for cls in (EMOv2UNet2DModel, EMOv2Transformer2DModel, UNet2DModel)}


def build_denoiser(
    name: str,
    sample_size: int = 32,
    in_channels: int = 3,
    out_channels: Optional[int] = None,
    num_class_embeds: Optional[int] = None,
    **overrides: Any,
) -> ModelMixin:
    """Build a randomly initialised denoiser from a preset name (EMOv2 UNet, D-EMOv2 transformer or baseline UNet2DModel).

    `out_channels=None` means the class's default: `in_channels` for the UNets; for the DEMO transformers the
    preset's learned sigma, 2 * `in_channels` ([epsilon, variance], DiT's convention; `learn_sigma=False` gives
    `in_channels`). `num_class_embeds` replaces the DEMO presets' 1001 ImageNet rows (None: unconditional).
    """
    if name in EMOV2_TRANSFORMER_PRESETS:
        fields = dict(sample_size=sample_size, in_channels=in_channels, num_class_embeds=num_class_embeds)
        if out_channels is not None:
            fields["out_channels"] = out_channels
        return EMOv2Transformer2DModel.from_preset(name, **fields, **overrides)
    common = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels if out_channels is not None else in_channels,
        num_class_embeds=num_class_embeds,
    )
    if name in EMOV2_UNET_PRESETS:
        return EMOv2UNet2DModel.from_preset(name, **common, **overrides)
    if name in BASELINE_UNET2D_PRESETS:
        return UNet2DModel(**{**BASELINE_UNET2D_PRESETS[name], **common, **overrides})
    raise ValueError(f"Unknown model preset {name!r}; valid presets are: {', '.join(DENOISER_PRESETS)}.")


def downsampling_factor(model: ModelMixin) -> int:
    """What H and W must be multiples of: the patch size of a DEMO transformer, else the UNet's total downsampling
    (one 2x step between consecutive levels). Attention windows are checked by the models' forward."""
    if isinstance(model, EMOv2Transformer2DModel):
        return model.config.patch_size
    return 2 ** (len(model.config.block_out_channels) - 1)


def denoiser_from_config(path: str | Path, **overrides: Any) -> ModelMixin:
    """Build a randomly initialised denoiser from a `config.json` of any denoiser class (file or folder).

    An `out_channels=None` override means the class's default, as in `build_denoiser`: `in_channels` for the UNets,
    re-derived from `learn_sigma` and `in_channels` for the DEMO transformer.
    """
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"No model config at {config_file}.")
    config = json.loads(config_file.read_text())
    class_name = config.get("_class_name")
    if class_name not in DENOISER_CLASSES:
        raise ValueError(
            f"{config_file} describes a {class_name!r}; expected one of {', '.join(DENOISER_CLASSES)}."
        )
    cls = DENOISER_CLASSES[class_name]
    config = {**config, **overrides}
    if config.get("out_channels") is None and cls is not EMOv2Transformer2DModel:
        config["out_channels"] = config.get("in_channels", 3)
    return cls.from_config(config)
