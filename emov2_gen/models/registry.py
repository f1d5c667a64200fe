"""Named denoiser presets: EMOv2 UNets, the D-EMOv2 (DEMO) transformers, and the diffusers `UNet2DModel` and
`DiTTransformer2DModel` baselines.

`build_denoiser(name, ...)` is what the training, evaluation and benchmark scripts call, so that an
EMOv2 preset and a baseline are built (and compared) through one code path.

The DiT baselines are diffusers' `DiTTransformer2DModel` at the width and depth of a DEMO preset (`dit-s-2` beside
`demo-s-2`, `dit-b-2` beside `demo-b-2`, `dit-t-2` beside `demo-t-2`), otherwise as DiT's configs: patch 2, learned
sigma (out_channels = 2 * in_channels), adaLN-Zero. What diffusers' DiT does with labels, and what the registry
makes of it:

- Each of its blocks has its own timestep MLP and label table (`AdaLayerNormZero.emb`), where DiT shares one; the
  final layer reuses block 0's. So diffusers' DiT-S/2 and DiT-B/2 (32x32x4, 1000 classes) have 39,805,088 and
  147,439,904 parameters, not DiT's published 32,963,360 and 130,512,416 (33.0M / 130.5M): (depth - 1) extra
  copies of the d^2 + 258d timestep MLP and the 1001-row table, minus DiT's frozen 256-token position embedding,
  which diffusers keeps as a buffer (tested).
- Its label table has `num_embeds_ada_norm` + 1 rows: it adds a null row (index `num_embeds_ada_norm`) itself, and
  in training mode every block's table independently replaces each label by that null row with probability 0.1
  (a hard-coded `class_dropout_prob`; one draw per block, where DiT draws once per sample). The registry maps
  `num_class_embeds` (the table's rows, the last being the null class, as for the DEMO presets: 1001 = 1000
  ImageNet classes + null) to `num_embeds_ada_norm = num_class_embeds - 1`, and switches that in-model dropout
  off: label dropout is the training loop's job for both (`train_ddpm.py --class_dropout_prob`, one draw per
  sample, which is DiT's). A DiT reloaded with `from_pretrained` has diffusers' dropout again; it only acts in
  training mode. diffusers' DiT cannot be built or called without labels: `num_class_embeds` is required.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
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

# Transformer sizes for CPU experiments (MNIST 32x32x1, patch 2: a 16x16 token map). 6 blocks of width 128 (4 heads x
# 32): DEMO's 13d^2 + 119d per block is 0.23M here, DiT's 18d^2 + 15d 0.30M plus its per-block embedders.
_TINY_TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=32, num_layers=6)
# DEMO presets kept here: `demo-s-2` (patch 2, learned sigma, 8x8 windows) at another size.
SMALL_DEMO_PRESETS: dict[str, dict[str, Any]] = {"demo-t-2": _TINY_TRANSFORMER}
# diffusers' DiT at a DEMO preset's heads x head width and depth (see the module doc).
BASELINE_DIT_PRESETS: dict[str, dict[str, Any]] = {
    "dit-s-2": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=2),
    "dit-b-2": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12, patch_size=2),
    "dit-t-2": dict(_TINY_TRANSFORMER, patch_size=2),
}

DENOISER_PRESETS = (
    tuple(EMOV2_UNET_PRESETS) + tuple(EMOV2_TRANSFORMER_PRESETS) + tuple(SMALL_DEMO_PRESETS)
    + tuple(BASELINE_UNET2D_PRESETS) + tuple(BASELINE_DIT_PRESETS)
)
# What the size/speed tables show by default: the pixel-space UNets (the D-EMOv2 transformers are latent-space
# models of 25-493M parameters, listed on request).
UNET_DENOISER_PRESETS = tuple(EMOV2_UNET_PRESETS) + tuple(BASELINE_UNET2D_PRESETS)
DENOISER_CLASSES = {
    cls.__name__: cls for cls in (EMOv2UNet2DModel, EMOv2Transformer2DModel, UNet2DModel, DiTTransformer2DModel)
}


def build_denoiser(
    name: str,
    sample_size: int = 32,
    in_channels: int = 3,
    out_channels: Optional[int] = None,
    num_class_embeds: Optional[int] = None,
    **overrides: Any,
) -> ModelMixin:
    """Build a randomly initialised denoiser from a preset name (EMOv2 UNet, D-EMOv2 transformer or a baseline).

    `out_channels=None` means the class's default: `in_channels` for the UNets; for the transformers (DEMO and DiT)
    learned sigma, 2 * `in_channels` ([epsilon, variance], DiT's convention; DEMO's `learn_sigma=False` gives
    `in_channels`). `num_class_embeds` counts the label rows, the null class included (None: unconditional); it
    replaces the DEMO presets' 1001 ImageNet rows and is required by the DiT baselines (see the module doc).
    """
    if name in EMOV2_TRANSFORMER_PRESETS or name in SMALL_DEMO_PRESETS:
        base, size = (name, {}) if name in EMOV2_TRANSFORMER_PRESETS else ("demo-s-2", SMALL_DEMO_PRESETS[name])
        fields = dict(sample_size=sample_size, in_channels=in_channels, num_class_embeds=num_class_embeds)
        if out_channels is not None:
            fields["out_channels"] = out_channels
        return EMOv2Transformer2DModel.from_preset(base, **{**size, **fields, **overrides})
    if name in BASELINE_DIT_PRESETS:
        out_channels = 2 * in_channels if out_channels is None else out_channels
        config = dict(BASELINE_DIT_PRESETS[name], sample_size=sample_size, in_channels=in_channels,
                      out_channels=out_channels)
        return _build_dit({**config, **overrides}, num_class_embeds)
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


def _build_dit(config: dict[str, Any], num_class_embeds: Optional[int]) -> DiTTransformer2DModel:
    """diffusers' DiT with `num_class_embeds` label rows (the last is its null row) and its label dropout off."""
    if num_class_embeds is None or num_class_embeds < 1:
        raise ValueError(
            f"DiTTransformer2DModel is class-conditional: it needs num_class_embeds >= 1 label rows (the classes and "
            f"the null class, e.g. 1001 for ImageNet; train_ddpm.py: --class_conditional), got {num_class_embeds}."
        )
    model = DiTTransformer2DModel.from_config({**config, "num_embeds_ada_norm": num_class_embeds - 1})
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # the training loop drops labels, once per sample (module doc)
    return model


def downsampling_factor(model: ModelMixin) -> int:
    """What H and W must be multiples of: the patch size of a transformer (DEMO or DiT), else the UNet's (or a VAE
    encoder's) total downsampling (one 2x step between consecutive levels). Attention windows are checked by the
    models' forward."""
    if isinstance(model, (EMOv2Transformer2DModel, DiTTransformer2DModel)):
        return model.config.patch_size
    return 2 ** (len(model.config.block_out_channels) - 1)


def denoiser_from_config(path: str | Path, **overrides: Any) -> ModelMixin:
    """Build a randomly initialised denoiser from a `config.json` of any denoiser class (file or folder).

    An `out_channels=None` override means the class's default, as in `build_denoiser`: `in_channels` for the UNets,
    re-derived from `learn_sigma` and `in_channels` for the DEMO transformer, and for DiT (which has no
    `learn_sigma`) from whether the file's out_channels is 2 * its in_channels. For DiT, `num_class_embeds` (label
    rows, as in `build_denoiser`) defaults to the file's `num_embeds_ada_norm` + 1.
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
    merged = {**config, **overrides}
    if cls is DiTTransformer2DModel:
        if merged.get("out_channels") is None:
            learned_sigma = config.get("out_channels") == 2 * config["in_channels"]
            merged["out_channels"] = (2 if learned_sigma else 1) * merged["in_channels"]
        rows = merged.pop("num_class_embeds", config["num_embeds_ada_norm"] + 1)
        return _build_dit(merged, rows)
    if merged.get("out_channels") is None and cls is not EMOv2Transformer2DModel:
        merged["out_channels"] = merged.get("in_channels", 3)
    return cls.from_config(merged)
