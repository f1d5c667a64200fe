"""`EMOv2UNet2DModel`: a drop-in for diffusers' `UNet2DModel` built from i2RMB blocks.

Same constructor keys where they apply, same `forward(sample, timestep, class_labels=None,
return_dict=True) -> UNet2DOutput`, so it works unchanged with every diffusers scheduler and with
`DDPMPipeline`/`DDIMPipeline`. The time (and optional class) embedding comes from diffusers' own
embedding layers and enters every i2RMB through adaLN shift/scale/gate (see `layers.conditioning`).

Window sizes are config (`window_sizes`, one per level; `sample_size` is metadata, as in diffusers): the
presets attend in (8, 8, 8, 4) windows, which tile the 32/16/8/4 maps of a 32x32 input -- at 32x32 that is
16 local 8x8 tiles + 16 stride-4 dilated windows, at 8x8 a single window (both partitions coincide: twice
one global attention, as in the official code). A window size <= 0 attends over the whole map. The
denoiser never pads: an input whose map at some attention level is not a multiple of that level's window
raises a `ValueError` naming the sizes that work (the classifier and segmentation models keep the
official zero padding inside `SEWMHSA`). Configs saved before `window_sizes` existed (`window_size` and
`sample_size`) load with the windows they were built with (see `extract_init_dict`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin, get_parameter_dtype  # noqa: F401 (see aligned_loading)
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ..blocks.unet_2d_blocks import (
    DOWN_BLOCK_TYPES,
    MID_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    get_block,
)
from ..layers import make_norm, norm_act
from .aligned_loading import AlignedLoadingMixin

_DEFAULT_CHANNELS = (32, 64, 128, 160)
_ATTN_LEVELS = ("EMOv2DownBlock2D", "EMOv2AttnDownBlock2D", "EMOv2AttnDownBlock2D", "EMOv2AttnDownBlock2D")
_ATTN_UP = ("EMOv2AttnUpBlock2D", "EMOv2AttnUpBlock2D", "EMOv2AttnUpBlock2D", "EMOv2UpBlock2D")

PRESET_WINDOW = 8  # the presets' SEW-MHSA window, shrunk per level to the map at their sample_size (`fit_windows`)
# Four levels at 32/16/8/4 for 32x32 images: conv i2RMBs at full resolution, SEW-MHSA below it.
# Widths and expansions follow the EMOv2 classifier family's progression, sized to each budget, except emov2-1m's:
# its widths were 24/32/48/64 until the ablations (docs/benchmarks.md, "Generation: the fair protocol") found that
# moving 16 channels from the lowest-resolution level to the full-resolution one, at equal parameters (0.961M ->
# 0.967M), lowers the held-out loss at equal steps (-3.3%) and at equal CPU time (-1.6%), and FID 36.9 -> 29.5
# (MNIST 16x16, 2000 steps, each layout at its best rate). The i2RMB block itself is unchanged.
EMOV2_UNET_PRESETS: dict[str, dict[str, Any]] = {
    "emov2-1m": dict(block_out_channels=(32, 32, 48, 48), expansion_ratios=(2.0, 2.0, 2.5, 2.5), attention_head_dim=16),
    "emov2-2m": dict(block_out_channels=(24, 48, 80, 96), expansion_ratios=(2.0, 2.0, 2.5, 2.5), attention_head_dim=16),
    "emov2-5m": dict(block_out_channels=(32, 64, 128, 160), expansion_ratios=(2.0, 3.0, 3.0, 3.0), attention_head_dim=32),
    "emov2-20m": dict(block_out_channels=(64, 128, 256, 288), expansion_ratios=(2.0, 3.0, 4.0, 4.0), attention_head_dim=32),
}


def fit_windows(window_sizes: tuple[int, ...], sample_size: Any) -> tuple[int, ...]:
    """Each level's window shrunk to its map at `sample_size`, min(w_i, S / 2**i) (global windows, <= 0, kept).

    The rule the constructor applied before `window_sizes` was config (so old configs load through it), and what
    `from_preset` applies to the presets' windows at another `sample_size`.
    """
    if sample_size is None:
        return tuple(window_sizes)
    side = min(sample_size) if isinstance(sample_size, (tuple, list)) else sample_size
    return tuple(w if w <= 0 else max(1, min(w, side // 2**i)) for i, w in enumerate(window_sizes))


def _per_level(value: Union[int, float, tuple, list], levels: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * levels
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries for {levels} levels.")
    return values


class EMOv2UNet2DModel(AlignedLoadingMixin, ConfigMixin):
    """A 2D UNet denoiser of i2RMBs with the contract of `diffusers.UNet2DModel`.

    EMOv2-specific config: `expansion_ratios` (e per level), `attention_head_dim` (d_h; int or per
    level), `window_sizes` (SEW-MHSA window per level, or one for all; <= 0: the whole map), `kernel_size`
    (depth-wise), `drop_path_rate` (stochastic depth, linear over the encoder+mid+decoder blocks).
    `upsample_type` is UNet2DModel's key with EMOv2 values: 'interp_conv' (the official EMOv2 UNet's upsampler,
    default) or 'conv' (diffusers' `Upsample2D`).

    Ablation knobs (`eval/fair_compare.py` rows; the defaults are the design): `norm_type` 'ln' (channel LayerNorm,
    default) or 'gn' (GroupNorm, as UNet2DModel) for every norm; `resnet_time_scale_shift` is UNet2DModel's key for
    how the condition enters, with 'ada_norm_zero' (shift, scale and a zero-initialised gate; default), 'scale_shift'
    (no gate) or 'default' (an additive shift), see `layers.conditioning`.
    """

    _supports_gradient_checkpointing = True
    # Kept whole by `device_map` placement: an i2RMB adds its shortcut to its branch, an up block concatenates skips.
    _no_split_modules = ["I2RMB", "EMOv2UpBlock2D", "EMOv2AttnUpBlock2D"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, tuple[int, int]]] = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = _ATTN_LEVELS,
        mid_block_type: Optional[str] = "EMOv2MidBlock2D",
        up_block_types: tuple[str, ...] = _ATTN_UP,
        block_out_channels: tuple[int, ...] = _DEFAULT_CHANNELS,
        layers_per_block: int = 2,
        expansion_ratios: Union[float, tuple[float, ...]] = (2.0, 3.0, 3.0, 3.0),
        attention_head_dim: Union[int, tuple[int, ...]] = 32,
        window_sizes: Union[int, tuple[int, ...]] = (8, 8, 8, 4),
        kernel_size: int = 5,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        class_embed_type: Optional[str] = None,
        num_class_embeds: Optional[int] = None,
        num_train_timesteps: Optional[int] = None,
        upsample_type: str = "interp_conv",
        norm_type: str = "ln",
        resnet_time_scale_shift: str = "ada_norm_zero",
    ) -> None:
        super().__init__()
        levels = len(block_out_channels)
        if len(down_block_types) != levels or len(up_block_types) != levels:
            raise ValueError(
                f"down_block_types ({len(down_block_types)}) and up_block_types ({len(up_block_types)}) "
                f"must both have one entry per block_out_channels level ({levels})."
            )
        if mid_block_type is not None and mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"Unknown mid_block_type {mid_block_type!r}; expected one of {MID_BLOCK_TYPES} or None.")
        if norm_type not in ("ln", "gn"):
            raise ValueError(f"norm_type must be 'ln' or 'gn' (BatchNorm would mix noise levels), got {norm_type!r}.")
        expansions = _per_level(expansion_ratios, levels, "expansion_ratios")
        head_dims = _per_level(attention_head_dim, levels, "attention_head_dim")
        self.window_sizes = tuple(int(w) for w in _per_level(window_sizes, levels, "window_sizes"))
        attention_types = ("EMOv2AttnDownBlock2D", "EMOv2AttnUpBlock2D")
        self._attention_levels = sorted(
            {i for i, t in enumerate(down_block_types) if t in attention_types}
            | {levels - 1 - i for i, t in enumerate(up_block_types) if t in attention_types}
            | ({levels - 1} if mid_block_type else set())
        )
        ch0 = block_out_channels[0]

        # Time and class embeddings: diffusers' own layers, as in UNet2DModel.
        time_embed_dim = time_embedding_dim or ch0 * 4
        if time_embedding_type == "positional":
            self.time_proj = Timesteps(ch0, flip_sin_to_cos, freq_shift)
            timestep_input_dim = ch0
        elif time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=ch0, scale=16)
            timestep_input_dim = 2 * ch0
        elif time_embedding_type == "learned":
            if num_train_timesteps is None:
                raise ValueError("time_embedding_type='learned' needs num_train_timesteps.")
            self.time_proj = nn.Embedding(num_train_timesteps, ch0)
            timestep_input_dim = ch0
        else:
            raise ValueError(f"Unknown time_embedding_type {time_embedding_type!r}; use positional, fourier or learned.")
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"Unknown class_embed_type {class_embed_type!r}; use None, 'timestep' or 'identity'.")

        # Stochastic depth grows linearly over all conditioned i2RMBs in order (encoder, mid, decoder).
        mid_layers = 2 if mid_block_type else 0
        total_layers = levels * layers_per_block + mid_layers + levels * (layers_per_block + 1)
        drop_rates = iter(torch.linspace(0, drop_path_rate, total_layers).tolist())

        def kwargs_for(level: int, num_layers: int) -> dict[str, Any]:
            return dict(
                num_layers=num_layers, expansion=expansions[level], head_dim=head_dims[level],
                window_size=self.window_sizes[level], kernel_size=kernel_size, dropout=dropout, norm_eps=norm_eps,
                drop_path=[next(drop_rates) for _ in range(num_layers)], norm=norm_type, condition=resnet_time_scale_shift,
            )

        self.conv_in = nn.Conv2d(in_channels, ch0, kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                get_block(
                    block_type, DOWN_BLOCK_TYPES, block_out_channels[i - 1] if i else ch0, block_out_channels[i],
                    time_embed_dim, add_downsample=i < levels - 1, **kwargs_for(i, layers_per_block),
                )
            )
        self.mid_block = (
            get_block(mid_block_type, MID_BLOCK_TYPES, block_out_channels[-1], time_embed_dim, **kwargs_for(levels - 1, mid_layers))
            if mid_block_type
            else None
        )
        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        for i, block_type in enumerate(up_block_types):
            level = levels - 1 - i
            self.up_blocks.append(
                get_block(
                    block_type, UP_BLOCK_TYPES, reversed_channels[min(i + 1, levels - 1)],
                    reversed_channels[max(i - 1, 0)], reversed_channels[i], time_embed_dim,
                    add_upsample=i < levels - 1, upsample_type=upsample_type, **kwargs_for(level, layers_per_block + 1),
                )
            )
        self.conv_norm_out = make_norm(norm_type, ch0, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch0, out_channels, kernel_size=3, padding=1)

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this (one stride-2 block per level but the last), as in UNet2DModel."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> tuple:
        """Older configs load as the models they describe.

        - Without `upsample_type` (saved before it existed): `Upsample2D` models. Otherwise diffusers would build
          the new default upsampler and only warn that the saved upsampler weights are unused -- a silently wrong
          model.
        - With `window_size` and no `window_sizes`: the windows the old constructor derived from the saved
          `sample_size` (`fit_windows`), not from a `sample_size` passed to `from_pretrained`.
        """
        if "_class_name" in config_dict and "upsample_type" not in config_dict:
            config_dict = {**config_dict, "upsample_type": "conv"}
        if "window_size" in config_dict and "window_sizes" not in config_dict:
            config_dict = dict(config_dict)
            levels = len(config_dict.get("block_out_channels", _DEFAULT_CHANNELS))
            old_windows = (config_dict.pop("window_size"),) * levels
            config_dict["window_sizes"] = fit_windows(old_windows, config_dict.get("sample_size"))
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EMOv2UNet2DModel":
        """Build a preset (`emov2-1m`, `emov2-2m`, `emov2-5m`, `emov2-20m`); overrides win.

        `emov2-1m`'s widths are 32/32/48/48 (24/32/48/64 before the fair-protocol ablations; see
        `EMOV2_UNET_PRESETS`): `block_out_channels=(24, 32, 48, 64)` builds the earlier layout. Saved models keep
        their own config, so earlier checkpoints load unchanged.

        Unless `window_sizes` is given, the presets attend in 8x8 windows, each shrunk to its level's map at
        `sample_size` (`fit_windows`: (8, 8, 8, 4) at 32x32, (8, 8, 4, 2) at 16x16). The result is stored in the
        config, and loading it never re-derives it.
        """
        if name not in EMOV2_UNET_PRESETS:
            raise ValueError(f"Unknown EMOv2 UNet preset {name!r}; valid presets: {', '.join(EMOV2_UNET_PRESETS)}.")
        config = {"sample_size": 32, **EMOV2_UNET_PRESETS[name], **overrides}
        if "window_sizes" not in overrides:
            levels = len(config.get("block_out_channels", _DEFAULT_CHANNELS))
            config["window_sizes"] = fit_windows((PRESET_WINDOW,) * levels, config["sample_size"])
        return cls(**config)

    def _check_sample(self, sample: torch.Tensor) -> None:
        if sample.ndim != 4:
            raise ValueError(f"Expected a 4-D sample (B, {self.config.in_channels}, H, W), got shape {tuple(sample.shape)}.")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(f"Expected {self.config.in_channels} input channels, got {sample.shape[1]} (shape {tuple(sample.shape)}).")
        factor = self.downsample_factor
        height, width = sample.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(f"H and W must be multiples of {factor} for this model, got {(height, width)}.")
        for level in self._attention_levels:
            window = self.window_sizes[level]
            side_h, side_w = height // 2**level, width // 2**level
            if window > 0 and (side_h % window or side_w % window):
                windows = [self.window_sizes[i] * 2**i for i in self._attention_levels if self.window_sizes[i] > 0]
                multiple = math.lcm(factor, *windows)
                raise ValueError(
                    f"A {height}x{width} input gives level {level} a {side_h}x{side_w} map, which its {window}x{window} "
                    f"windows do not tile (window_sizes={self.window_sizes}; the denoiser does not pad). Use H and W "
                    f"that are multiples of {multiple}, or window_sizes that divide every attention level's map."
                )

    def _embed(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], class_labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning embedding, and the timesteps broadcast to the batch."""
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        # The dtype the time embedding computes in (its weights', or a layerwise-casting hook's compute dtype).
        # `self.dtype` answers the same for the whole model but walks every submodule on each call (~1.5 ms here).
        t_emb = self.time_proj(timesteps).to(dtype=get_parameter_dtype(self.time_embedding))
        emb = self.time_embedding(t_emb)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning.")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels were given but the model has no class embedding (num_class_embeds is None).")
        return emb, timesteps

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DOutput, tuple]:
        """Predict noise (or x0 / v) for `sample` (B, C, H, W) at `timestep` (int, float, 0-d or (B,))."""
        self._check_sample(sample)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb, timesteps = self._embed(sample, timestep, class_labels)

        # Channels-last activations: every channel LayerNorm then reads a contiguous NHWC view (no permute
        # copy) and mkldnn's convs skip their NCHW reorders; the output is returned NCHW-contiguous as before.
        hidden = self.conv_in(sample.contiguous(memory_format=torch.channels_last))
        skips = (hidden,)
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, emb)
            skips += block_skips
        if self.mid_block is not None:
            hidden = self.mid_block(hidden, emb)
        for block in self.up_blocks:
            n = len(block.layers)
            hidden = block(hidden, skips[-n:], emb)
            skips = skips[:-n]
        out = self.conv_out(norm_act(hidden, self.conv_norm_out, self.conv_act))
        if self.config.time_embedding_type == "fourier":  # score-SDE convention, as UNet2DModel
            out = out / timesteps.reshape(-1, 1, 1, 1).to(out.dtype)
        out = out.contiguous()
        return UNet2DOutput(sample=out) if return_dict else (out,)
