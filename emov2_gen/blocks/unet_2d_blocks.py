"""i2RMB down, mid and up blocks for a diffusers-style UNet (the EMOv2 counterparts of `unet_2d_blocks`).

Choices for diffusion (documented deviations from the classifier, see the architecture brief §6):
- norms are channel LayerNorms everywhere (no BatchNorm: its batch statistics would mix noise levels);
  the depth-wise conv is followed by LayerNorm + GELU, the flavour of the official seg/UNet copy;
- conv-mixer blocks use SiLU and SEW-MHSA blocks GELU for the expansion/value, as the classifier stages;
- every stride-1 block is conditioned by adaLN shift/scale/gate from the time(+class) embedding and
  keeps its residual, with a 1x1 conv shortcut where the width changes (skip concatenation);
- downsampling is EMOv2's stride-2 conv i2RMB (expansion doubled, no residual, no layer scale);
  upsampling is the official EMOv2 UNet's `InterpConv` (bilinear x2, Conv1x1, here LayerNorm + ReLU),
  with the conv run before the interpolation (same function, a quarter of the cost); diffusers'
  nearest x2 + 3x3 conv `Upsample2D` remains available as `upsample_type="conv"` (its 3x3 convs at
  the upsampled size were about a quarter of the EMOv2-5M UNet's FLOPs at 32x32).
Blocks return/consume skip tensors exactly like diffusers' `DownBlock2D`/`UpBlock2D`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ..layers import I2RMB, InterpConv

DOWN_BLOCK_TYPES = ("EMOv2DownBlock2D", "EMOv2AttnDownBlock2D")
UP_BLOCK_TYPES = ("EMOv2UpBlock2D", "EMOv2AttnUpBlock2D")
MID_BLOCK_TYPES = ("EMOv2MidBlock2D",)
UPSAMPLE_TYPES = ("interp_conv", "conv")


def conditioned_i2rmb(
    in_channels: int,
    out_channels: int,
    temb_channels: int,
    attention: bool,
    expansion: float,
    head_dim: int,
    window_size: int,
    mid_channels: Optional[int] = None,
    num_heads: Optional[int] = None,
    kernel_size: int = 5,
    dropout: float = 0.0,
    drop_path: float = 0.0,
    norm_eps: float = 1e-6,
    norm: str = "ln",
    condition: str = "ada_norm_zero",
) -> I2RMB:
    """The stride-1, time-conditioned i2RMB used throughout the denoiser (`norm` and `condition` are ablation knobs:
    the defaults are the denoiser's design, see the module docstring)."""
    return I2RMB(
        in_channels,
        out_channels,
        expansion=expansion,
        mid_channels=mid_channels,
        attention=attention,
        head_dim=head_dim,
        num_heads=num_heads,
        window_size=window_size,
        kernel_size=kernel_size,
        norm=norm,
        act="gelu" if attention else "silu",
        dw_norm=norm,
        dw_act="gelu",
        norm_eps=norm_eps,
        dropout=dropout,
        drop_path=drop_path,
        conv_shortcut=True,
        temb_channels=temb_channels,
        condition=condition,
    )


def make_upsampler(upsample_type: str, channels: int, norm_eps: float = 1e-6, norm: str = "ln") -> nn.Module:
    """x2 upsampling at constant width: 'interp_conv' (official EMOv2 UNet) or 'conv' (diffusers' Upsample2D)."""
    if upsample_type == "interp_conv":
        return InterpConv(channels, channels, norm=norm, act="relu", eps=norm_eps, conv_first=True)
    if upsample_type == "conv":
        return Upsample2D(channels, use_conv=True, out_channels=channels)
    raise ValueError(f"Unknown upsample_type {upsample_type!r}; expected one of {UPSAMPLE_TYPES}.")


def layer_drop_paths(drop_path: Union[float, Sequence[float]], num_layers: int) -> list[float]:
    """One stochastic-depth rate per layer of a block: a sequence as given, or one rate for all."""
    rates = [float(drop_path)] * num_layers if isinstance(drop_path, (int, float)) else [float(r) for r in drop_path]
    if len(rates) != num_layers:
        raise ValueError(f"Got {len(rates)} drop-path rates for {num_layers} layers.")
    return rates


class _CheckpointedLayers(nn.Module):
    """Runs conditioned layers, through diffusers' gradient-checkpointing function when enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def _run(self, layer: nn.Module, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(layer, hidden, temb)
        return layer(hidden, temb)


class EMOv2DownBlock2D(_CheckpointedLayers):
    """`num_layers` conditioned i2RMBs (conv mixer, or SEW-MHSA when `attention`) + optional stride-2 i2RMB."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 2,
        add_downsample: bool = True,
        attention: bool = False,
        drop_path: Union[float, Sequence[float]] = 0.0,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            conditioned_i2rmb(
                in_channels if i == 0 else out_channels, out_channels, temb_channels, attention, drop_path=rate, **block_kwargs
            )
            for i, rate in enumerate(layer_drop_paths(drop_path, num_layers))
        )
        self.downsampler = (
            I2RMB(
                out_channels, out_channels, expansion=2 * block_kwargs["expansion"], stride=2,
                kernel_size=block_kwargs.get("kernel_size", 5), norm=block_kwargs.get("norm", "ln"), act="silu",
                dw_norm=block_kwargs.get("norm", "ln"), dw_act="gelu",
                norm_eps=block_kwargs.get("norm_eps", 1e-6), layer_scale_init=None,
            )
            if add_downsample
            else None
        )

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = ()
        for layer in self.layers:
            hidden = self._run(layer, hidden, temb)
            skips += (hidden,)
        if self.downsampler is not None:
            hidden = self.downsampler(hidden)
            skips += (hidden,)
        return hidden, skips


class EMOv2AttnDownBlock2D(EMOv2DownBlock2D):
    """`EMOv2DownBlock2D` whose i2RMBs mix tokens with SEW-MHSA."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, attention=True, **kwargs)


class EMOv2MidBlock2D(_CheckpointedLayers):
    """Two SEW-MHSA i2RMBs at the lowest resolution (the counterpart of `UNetMidBlock2D`)."""

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        num_layers: int = 2,
        drop_path: Union[float, Sequence[float]] = 0.0,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            conditioned_i2rmb(channels, channels, temb_channels, True, drop_path=rate, **block_kwargs)
            for rate in layer_drop_paths(drop_path, num_layers)
        )

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = self._run(layer, hidden, temb)
        return hidden


class EMOv2UpBlock2D(_CheckpointedLayers):
    """`num_layers` conditioned i2RMBs, each fed [hidden, skip] concatenated, + optional x2 upsampling (`make_upsampler`).

    The mid width is e * C_out and the heads C_out // d_h (not sized from the concatenation's C_in),
    so each head keeps EMOv2's value width e * d_h and the decoder costs about what the encoder does.
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 3,
        add_upsample: bool = True,
        attention: bool = False,
        drop_path: Union[float, Sequence[float]] = 0.0,
        upsample_type: str = "interp_conv",
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        layers = []
        for i, rate in enumerate(layer_drop_paths(drop_path, num_layers)):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            layer_in = prev_output_channel if i == 0 else out_channels
            layers.append(
                conditioned_i2rmb(
                    layer_in + skip_channels, out_channels, temb_channels, attention,
                    mid_channels=int(out_channels * block_kwargs["expansion"]),
                    num_heads=max(1, out_channels // block_kwargs["head_dim"]), drop_path=rate, **block_kwargs,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.upsampler = (
            make_upsampler(upsample_type, out_channels, block_kwargs.get("norm_eps", 1e-6), block_kwargs.get("norm", "ln"))
            if add_upsample
            else None
        )

    def forward(
        self, hidden: torch.Tensor, skips: tuple[torch.Tensor, ...], temb: torch.Tensor
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden = torch.cat([hidden, skips[-1]], dim=1)
            skips = skips[:-1]
            hidden = self._run(layer, hidden, temb)
        if self.upsampler is not None:
            hidden = self.upsampler(hidden)
        return hidden


class EMOv2AttnUpBlock2D(EMOv2UpBlock2D):
    """`EMOv2UpBlock2D` whose i2RMBs mix tokens with SEW-MHSA."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, attention=True, **kwargs)


_BLOCKS = {
    cls.__name__: cls
    for cls in (EMOv2DownBlock2D, EMOv2AttnDownBlock2D, EMOv2MidBlock2D, EMOv2UpBlock2D, EMOv2AttnUpBlock2D)
}


def get_block(block_type: str, valid: tuple[str, ...], *args: Any, **kwargs: Any) -> nn.Module:
    """Instantiate a block by its diffusers-style type name, with a clear error for unknown names."""
    if block_type not in valid:
        raise ValueError(f"Unknown block type {block_type!r}; expected one of {valid}.")
    return _BLOCKS[block_type](*args, **kwargs)

