"""`EMOv2UNetForSegmentation`: EMOv2's UNet-style segmentation model (U-EMOv2), its mobile presets, the
plain convolutional mmseg UNet it is compared with, and an `EMOv2Backbone`-encoder variant.

UNet layout (mmseg `UNet`, the paper's model when `block_type="i2rmb"`, see the architecture brief §3.1):
`num_levels` levels of width `base_channels * 2**i`; level i > 0 starts with MaxPool2d(2); each level is
one block of `units_per_block` units (first unit C_in -> C_out, the others C_out -> C_out). The decoder,
deepest first, upsamples with InterpConv (bilinear x2, then Conv1x1 no bias + BN + ReLU), concatenates
[skip, up] and applies a block 2C -> C. Units are i2RMBs (the shared `layers.I2RMB`: SEW-MHSA, LN/GELU,
depth-wise conv followed by LN + GELU) except in encoder level 0, whose input is the image: there they
are Conv3x3 + BN + ReLU, as the official `in_channels < 64` rule gives for base width 64.
`block_type="conv"` makes every unit Conv3x3 + BN + ReLU: mmseg's UNet-S5-D16, the baseline.
Heads: ASPP (DeepLabV3) or FCN decode head on the finest decoder map, FCN auxiliary head (loss weight
0.4, training only) on the next one.

Width-changing i2RMB units (first unit of every block but encoder level 0) have no residual. The
official code still scales their output by the layer scale gamma = 1e-6, which shrinks the signal
about 1e6x at each of them at initialisation (brief §6.1). Here such units start with gamma = 1
(`nonresidual_layer_scale_init=1.0`): same parameters, same state-dict layout, no 1e6 shrink; pass
`nonresidual_layer_scale_init=1e-6` for the official initialisation. Residual units keep gamma = 1e-6.
The mobile presets (`unet-emov2-1m`, `-5m`) also give those units a 1x1 conv shortcut and attend only at
levels 2-4 (`MOBILE_FIXES`: with the paper's layout they did not learn from scratch); `unet-emov2-paper` is
the paper's layout.

Input size: any H, W. The input is zero-padded on the right/bottom to a multiple of `size_divisor`
(16 for five UNet levels, 32 with an EMOv2 backbone) and the logits are cropped back to H x W.
Initialisation follows mmseg: Kaiming (fan-out, ReLU) for every conv, N(0, 0.01) classifiers; an EMOv2
backbone keeps its own initialisation or its ImageNet weights (`backbone_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (see aligned_loading)
from diffusers.utils import BaseOutput
from torch import nn

from ..layers import I2RMB, ConvNormAct, InterpConv
from .aligned_loading import AlignedLoadingMixin
from .backbone import EMOV2_BACKBONE_PRESETS, EMOv2Backbone
from .segmentation_heads import ASPPHead, FCNHead
from .segmentation_losses import cross_entropy_dice_loss

BLOCK_TYPES = ("i2rmb", "conv")
DECODE_HEAD_TYPES = ("aspp", "fcn")

# The mobile presets' two departures from the paper's layout (issue 16, `eval/seg_diagnose.py`). With the paper's
# layout, `unet-emov2-1m` trained from scratch (CE + Dice, AdamW 2e-3, batch 8, 64px synthetic crops) still
# predicted no vessel pixel after 200 steps (vessel Dice 0.0, loss 1.41) while a plain UNet of 1.8M reached 74.1
# (loss 0.80). Its full-resolution decoder map had lost the pixel-scale detail a 1-px vessel needs (high-frequency
# share of dec0 0.003 vs the plain UNet's 0.057): the width-changing first unit of each decoder block has no
# residual, so the skip's detail reaches the next level only through SEW-MHSA, whose near-uniform attention at
# initialisation averages values over 8x8 and dilated windows. A 1x1 conv shortcut on those units (69.8 at step
# 200) or no attention at the two finest levels (60.3, 3x faster per step) each fixed it; both together reached
# 71.0 with loss 0.79. Attention stays at levels 2-4, where the maps are 16x16 or smaller on 64px crops.
MOBILE_FIXES: dict[str, Any] = dict(width_shortcut=True, attention_levels=(2, 3, 4))

SEGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's U-EMOv2 ("UNet_5M" in the official repo): 21,281,728 + 41,442 + 73,986 = 21,397,156 parameters.
    "unet-emov2-paper": dict(base_channels=64, window_size=10, head_dim=32),
    # Mobile sizes (5,308,196 and 1,265,700 parameters for 2 classes): narrower, expansion trimmed to land on the
    # size; windows of 8 tile the power-of-two maps of 64/128/256 crops exactly. Unlike the paper preset they learn
    # from scratch on small data (see MOBILE_FIXES); `width_shortcut=False, attention_levels=None` restores the paper's.
    "unet-emov2-5m": dict(base_channels=32, expansion=1.75, window_size=8, head_dim=16, auxiliary_head_channels=32, **MOBILE_FIXES),
    "unet-emov2-1m": dict(base_channels=16, expansion=1.5, window_size=8, head_dim=16, auxiliary_head_channels=16, **MOBILE_FIXES),
    # ImageNet EMOv2 classifiers as encoders (strides 4-32), an i2RMB decoder to stride 4, logits upsampled x4.
    "emov2-1m-unet": dict(backbone_preset="emov2-1m", window_size=8, head_dim=16, auxiliary_head_channels=32),
    "emov2-5m-unet": dict(backbone_preset="emov2-5m", window_size=8, head_dim=16, auxiliary_head_channels=48),
    # Plain convolutional baselines: mmseg UNet-S5-D16 + ASPP (29,064,996 parameters) and narrower copies.
    "unet-s5-d16": dict(block_type="conv", base_channels=64),
    "unet-s5-d16-base32": dict(block_type="conv", base_channels=32, auxiliary_head_channels=32),
    "unet-s5-d16-base16": dict(block_type="conv", base_channels=16, auxiliary_head_channels=16),
}


@dataclass
class SegmentationOutput(BaseOutput):
    """`logits` (B, num_classes, H, W) at the input size; `loss` and `auxiliary_logits` when `labels` were given."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    auxiliary_logits: Optional[torch.Tensor] = None


def _conv_unit(in_channels: int, out_channels: int) -> ConvNormAct:
    """mmseg ConvModule: Conv3x3 (no bias) + BN + ReLU."""
    return ConvNormAct(in_channels, out_channels, 3, norm="bn", act="relu")


class CheckpointableUnits(nn.Sequential):
    """The units of one i2RMB block, recomputed in the backward pass under gradient checkpointing.

    Only stacks without BatchNorm are built as this class (`make_block`): recomputing a BatchNorm in training mode
    would update its running statistics twice per step. So the plain Conv+BN units (encoder level 0, the conv
    baselines) and the BN upsamplers always keep their activations; the i2RMB stacks, which hold the expanded
    (e x C) tensors, are what checkpointing saves.
    """

    def __init__(self, *units: nn.Module) -> None:
        super().__init__(*units)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(super().forward, x)
        return super().forward(x)


class UpConvBlock(nn.Module):
    """mmseg `UpConvBlock`: InterpConv the deeper map to the skip's width, concat [skip, up], apply `block`."""

    def __init__(self, deep_channels: int, skip_channels: int, block: nn.Module) -> None:
        super().__init__()
        self.upsample = InterpConv(deep_channels, skip_channels, norm="bn", act="relu")
        self.block = block

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, self.upsample(x)], dim=1))


class EMOv2UNetForSegmentation(AlignedLoadingMixin, ConfigMixin):
    """UNet-style semantic segmentation with i2RMB (or plain conv) blocks; `from_preset` lists the layouts.

    `model(pixel_values, labels=None)` returns a `SegmentationOutput`; with `labels` (B, H, W) of class ids
    (`ignore_index` for unlabelled pixels) the loss is `ce_loss_weight` * CE + `dice_loss_weight` * soft
    Dice on the decode head plus `auxiliary_loss_weight` * CE on the auxiliary head. The defaults are
    mmseg's "CE 1.0 + Dice 3.0" UNet recipe; the paper trained with CE only (`dice_loss_weight=0`).

    Config highlights: `block_type` ("i2rmb" | "conv"), `base_channels`, `num_levels`,
    `units_per_block`, i2RMB settings (`expansion`, `kernel_size`, `head_dim`, `window_size`,
    `attention`, `norm`/`act`, `dw_norm`/`dw_act`, `layer_scale_init`, `nonresidual_layer_scale_init`,
    `drop_path_rate`; `attention_levels`: the levels whose units attend, None for all; `width_shortcut`: a 1x1
    conv shortcut, hence a residual, on width-changing units, as in the diffusion UNet), heads (`decode_head_type`, `decode_head_channels`, `aspp_dilations`,
    `auxiliary_head_channels`, 0 for none), and `backbone_preset` (an `EMOv2Backbone` preset name as the
    encoder; `base_channels`/`num_levels`/`block_type` then do not apply).

    `enable_gradient_checkpointing()` recomputes the i2RMB stacks in the backward pass (see `CheckpointableUnits`).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        block_type: str = "i2rmb",
        base_channels: int = 64,
        num_levels: int = 5,
        units_per_block: int = 2,
        backbone_preset: Optional[str] = None,
        expansion: float = 2.0,
        kernel_size: int = 5,
        head_dim: int = 32,
        window_size: int = 10,
        attention: bool = True,
        attention_levels: Optional[tuple[int, ...]] = None,
        width_shortcut: bool = False,
        norm: str = "ln",
        act: str = "gelu",
        dw_norm: str = "ln",
        dw_act: str = "gelu",
        layer_scale_init: float = 1e-6,
        nonresidual_layer_scale_init: float = 1.0,
        drop_path_rate: float = 0.0,
        decode_head_type: str = "aspp",
        decode_head_channels: int = 16,
        aspp_dilations: tuple[int, ...] = (1, 12, 24, 36),
        head_dropout: float = 0.1,
        auxiliary_head_channels: int = 64,
        auxiliary_loss_weight: float = 0.4,
        ce_loss_weight: float = 1.0,
        dice_loss_weight: float = 3.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"Unknown block_type {block_type!r}; expected one of {BLOCK_TYPES}.")
        if decode_head_type not in DECODE_HEAD_TYPES:
            raise ValueError(f"Unknown decode_head_type {decode_head_type!r}; expected one of {DECODE_HEAD_TYPES}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background included), got {num_classes}.")
        if units_per_block < 1:
            raise ValueError(f"units_per_block must be at least 1, got {units_per_block}.")

        if backbone_preset is not None:
            if backbone_preset not in EMOV2_BACKBONE_PRESETS:
                raise ValueError(f"Unknown backbone_preset {backbone_preset!r}; valid: {', '.join(EMOV2_BACKBONE_PRESETS)}.")
            self.encoder = EMOv2Backbone.from_preset(backbone_preset, in_channels=in_channels, num_classes=0)
            widths = list(self.encoder.config.widths)
            self.size_divisor = 32
            encoder_specs: list[tuple[int, int]] = []
        else:
            if num_levels < 2:
                raise ValueError(f"A UNet needs at least 2 levels, got num_levels={num_levels}.")
            widths = [base_channels * 2**i for i in range(num_levels)]
            self.size_divisor = 2 ** (num_levels - 1)
            encoder_specs = [(in_channels, widths[0])] + list(zip(widths, widths[1:]))
        decoder_specs = [(widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1))]  # (deep, skip), deepest first

        # Stochastic depth grows linearly over the i2RMB units in order (encoder, then decoder).
        i2rmb_blocks = 0 if block_type == "conv" else max(len(encoder_specs) - 1, 0) + len(decoder_specs)
        drop_rates = iter(torch.linspace(0, drop_path_rate, i2rmb_blocks * units_per_block).tolist())

        def make_block(in_ch: int, out_ch: int, plain: bool, level: int) -> nn.Sequential:
            widths_in = [in_ch] + [out_ch] * (units_per_block - 1)
            if plain:
                return nn.Sequential(*(_conv_unit(c, out_ch) for c in widths_in))
            attend = attention and (attention_levels is None or level in attention_levels)
            units = [
                I2RMB(
                    c, out_ch, expansion=expansion, attention=attend, head_dim=head_dim, window_size=window_size,
                    kernel_size=kernel_size, norm=norm, act=act, dw_norm=dw_norm, dw_act=dw_act,
                    layer_scale_init=layer_scale_init if c == out_ch or width_shortcut else nonresidual_layer_scale_init,
                    conv_shortcut=width_shortcut and c != out_ch, drop_path=next(drop_rates),
                )
                for c in widths_in
            ]
            has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for unit in units for m in unit.modules())
            return nn.Sequential(*units) if has_batch_norm else CheckpointableUnits(*units)

        plain = block_type == "conv"
        if backbone_preset is None:
            self.encoder = nn.ModuleList(
                nn.Sequential(*([nn.MaxPool2d(2)] if i else []), make_block(a, b, plain=plain or i == 0, level=i))
                for i, (a, b) in enumerate(encoder_specs)
            )
        self.decoder = nn.ModuleList(
            UpConvBlock(deep, skip, make_block(2 * skip, skip, plain, level=widths.index(skip))) for deep, skip in decoder_specs
        )
        if decode_head_type == "aspp":
            self.decode_head = ASPPHead(widths[0], decode_head_channels, num_classes, tuple(aspp_dilations), head_dropout)
        else:
            self.decode_head = FCNHead(widths[0], decode_head_channels, num_classes, dropout=head_dropout)
        self.auxiliary_head = (
            FCNHead(widths[1], auxiliary_head_channels, num_classes, dropout=head_dropout) if auxiliary_head_channels else None
        )
        self._init_weights(backbone_preset is None)

    def _init_weights(self, init_encoder: bool) -> None:
        """mmseg init: Kaiming normal (fan-out, ReLU) for convs, except the classifiers and a pretrained-able backbone."""
        heads = [self.decode_head] + ([self.auxiliary_head] if self.auxiliary_head is not None else [])
        classifiers = {head.classifier for head in heads}
        parts = ([self.encoder] if init_encoder else []) + [self.decoder] + heads
        for part in parts:
            for module in part.modules():
                if isinstance(module, nn.Conv2d) and module not in classifiers:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    @classmethod
    def from_preset(
        cls, name: str, num_classes: int = 2, backbone_checkpoint: Optional[Union[str, Path]] = None, **overrides: Any
    ) -> "EMOv2UNetForSegmentation":
        """Build a preset (see `SEGMENTATION_PRESETS`); `backbone_checkpoint` loads official EMOv2 ImageNet weights."""
        if name not in SEGMENTATION_PRESETS:
            raise ValueError(f"Unknown segmentation preset {name!r}; valid presets: {', '.join(SEGMENTATION_PRESETS)}.")
        model = cls(**{**SEGMENTATION_PRESETS[name], "num_classes": num_classes, **overrides})
        if backbone_checkpoint is not None:
            model.load_backbone_checkpoint(backbone_checkpoint)
        return model

    def load_backbone_checkpoint(self, path: Union[str, Path]) -> None:
        """Load a released EMOv2 ImageNet checkpoint into the encoder (through `EMOv2Backbone`'s strict loader)."""
        preset = self.config.backbone_preset
        if preset is None:
            raise ValueError("This model has a UNet encoder; official EMOv2 weights need a `backbone_preset`.")
        pretrained = EMOv2Backbone.from_official_checkpoint(path, preset, num_classes=0, in_channels=self.config.in_channels)
        self.encoder.load_state_dict(pretrained.state_dict())

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps, finest first."""
        if isinstance(self.encoder, EMOv2Backbone):
            features = self.encoder.forward_features(x)
            features[-1] = self.encoder.norm(features[-1])  # the classifier's final LN: its pretrained deepest features
            return features
        features = []
        for level in self.encoder:
            x = level(x)
            features.append(x)
        return features

    def _decode(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder maps, finest first (the deepest encoder map last)."""
        x = features[-1]
        decoded = [x]
        for block, skip in zip(self.decoder, reversed(features[:-1])):
            x = block(x, skip)
            decoded.append(x)
        return decoded[::-1]

    def _to_input_size(self, logits: torch.Tensor, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        if logits.shape[-2:] != padded:
            logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return logits[..., : size[0], : size[1]]

    def forward(
        self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, return_dict: bool = True
    ) -> Union[SegmentationOutput, tuple]:
        """Segment `pixel_values` (B, in_channels, H, W), any H and W; `labels` (B, H, W) adds the loss.

        With `return_dict=False`: `(logits,)`, or `(logits, loss[, auxiliary_logits])` when `labels` are given.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(f"Expected pixel_values (B, {self.config.in_channels}, H, W), got {tuple(pixel_values.shape)}.")
        size = tuple(pixel_values.shape[-2:])
        if labels is not None and tuple(labels.shape) != (pixel_values.shape[0], *size):
            raise ValueError(f"labels must have shape (B, H, W) = {(pixel_values.shape[0], *size)}, got {tuple(labels.shape)}.")
        pad_h, pad_w = (-s % self.size_divisor for s in size)
        x = F.pad(pixel_values, (0, pad_w, 0, pad_h)) if pad_h or pad_w else pixel_values
        padded = tuple(x.shape[-2:])
        decoded = self._decode(self._encode(x))
        logits = self._to_input_size(self.decode_head(decoded[0]), padded, size)

        loss = auxiliary_logits = None
        if labels is not None:
            config = self.config
            loss = cross_entropy_dice_loss(logits, labels, config.ce_loss_weight, config.dice_loss_weight, config.ignore_index)
            if self.auxiliary_head is not None:
                auxiliary_logits = self._to_input_size(self.auxiliary_head(decoded[1]), padded, size)
                loss = loss + cross_entropy_dice_loss(
                    auxiliary_logits, labels, config.auxiliary_loss_weight, ignore_index=config.ignore_index
                )
        if not return_dict:
            return tuple(v for v in (logits, loss, auxiliary_logits) if v is not None)
        return SegmentationOutput(logits=logits, loss=loss, auxiliary_logits=auxiliary_logits)
