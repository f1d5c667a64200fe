"""i2RMB, EMOv2's Improved Inverted Residual Mobile Block (one residual, no FFN).

Stride-1 block, C_in -> C_out, expansion e, M = floor(C_in * e)::

    S = X
    Y = Norm(X)                                  pre-norm (adaLN-modulated when conditioned)
    Z = Act(Conv1x1(Y))                          conv variant: the expansion
      = SEW-MHSA(Y, values=Act(Conv1x1(Y)))      attention variant: the expansion IS the value projection
    Z = Z + DWNorm/Act(DWConv_k(Z))              local mixing with inner residual
    O = gamma * Conv1x1_{M->C_out}(Dropout(Z))   projection (no bias), layer scale
    X' = S + DropPath(O)

The stride-2 variant (first block of every classifier stage) has no residual of either kind, uses the
conv mixer, and applies the depth-wise conv with stride 2; the official code still multiplies its
output by gamma (init 1e-6) although nothing is added to it. That is kept when `layer_scale_init` is
given (faithful, needed to reproduce the official classifiers); the diffusion UNet passes
`layer_scale_init=None` for such blocks and a 1x1 `conv_shortcut` where channels change, so no block
shrinks its signal by 1e6 at init (brief, oddity 1).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from .conditioning import AdaLNModulation
from .norms import NORM_EPS, make_act, make_norm, norm_act
from .sew_mhsa import PARTITIONS, SEWMHSA


class I2RMB(nn.Module):
    """One i2RMB.

    Args:
        in_channels, out_channels: C_in, C_out (out defaults to in).
        expansion: e; the mid width is floor(C_in * e). Down blocks of the classifier pass 2e.
        mid_channels: explicit mid width instead (a UNet decoder sizes it from C_out, not from the
            concatenated [hidden, skip] input).
        stride: 1, or 2 for the downsampling variant (conv mixer only, no residual).
        attention: use SEW-MHSA as the mixer (stride 1 only); otherwise the 1x1 conv expansion.
        head_dim, num_heads, window_size, partitions, qkv_bias: SEW-MHSA settings (see `SEWMHSA`;
            heads default to C_in // head_dim as officially).
        kernel_size: depth-wise kernel (5 in every EMOv2 config).
        norm, act: pre-norm and expansion/value activation ('bn'/'ln'/'gn', 'silu'/'gelu').
        dw_norm, dw_act: after the depth-wise conv (classifier: bn/silu; seg-UNet copy: ln/gelu).
        dropout: before the projection. drop_path: stochastic depth on the residual branch.
        layer_scale_init: gamma init (1e-6 officially); None disables the layer scale.
        residual: outer residual; None means "stride 1 and (C_in == C_out or conv_shortcut)".
        conv_shortcut: 1x1 conv on the shortcut when C_in != C_out (diffusion UNet choice).
        temb_channels: if set, the block is conditioned through `AdaLNModulation` and forward needs
            `temb`; the zero-initialised gate replaces the layer scale.
        condition: how `temb` enters (`layers.conditioning.CONDITION_TYPES`; default adaLN-Zero).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        *,
        expansion: float = 4.0,
        mid_channels: Optional[int] = None,
        stride: int = 1,
        attention: bool = False,
        head_dim: int = 32,
        num_heads: Optional[int] = None,
        window_size: int = 7,
        partitions: tuple[str, ...] = PARTITIONS,
        qkv_bias: bool = True,
        kernel_size: int = 5,
        norm: str = "bn",
        act: str = "silu",
        dw_norm: str = "bn",
        dw_act: str = "silu",
        norm_eps: float = NORM_EPS,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: Optional[float] = 1e-6,
        residual: Optional[bool] = None,
        conv_shortcut: bool = False,
        temb_channels: Optional[int] = None,
        condition: str = "ada_norm_zero",
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}.")
        if attention and stride != 1:
            raise ValueError("The stride-2 i2RMB uses the conv mixer; attention needs stride 1.")
        if residual is None:
            residual = stride == 1 and (in_channels == out_channels or conv_shortcut)
        if residual and stride != 1:
            raise ValueError("A stride-2 i2RMB has no residual.")
        if residual and in_channels != out_channels and not conv_shortcut:
            raise ValueError("A residual between different widths needs conv_shortcut=True.")
        mid = mid_channels or int(in_channels * expansion)
        num_heads = num_heads or max(1, in_channels // head_dim)
        if attention and mid % num_heads:
            raise ValueError(f"The value width {mid} must split evenly over {num_heads} attention heads.")
        self.in_channels, self.out_channels, self.mid_channels = in_channels, out_channels, mid
        self.stride, self.residual = stride, residual

        self.norm = make_norm(norm, in_channels, eps=norm_eps)
        self.modulation = AdaLNModulation(temb_channels, in_channels, out_channels, condition) if temb_channels else None
        # The expansion; in the attention variant it doubles as the value projection.
        self.expand = nn.Sequential(nn.Conv2d(in_channels, mid, kernel_size=1, bias=True), make_act(act))
        self.attn = (
            SEWMHSA(in_channels, head_dim, window_size, num_heads, partitions=partitions, qkv_bias=qkv_bias) if attention else None
        )
        self.dw = nn.Sequential(
            nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=kernel_size // 2, groups=mid, bias=False),
            make_norm(dw_norm, mid, eps=norm_eps),
            make_act(dw_act),
        )
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Conv2d(mid, out_channels, kernel_size=1, bias=False)
        use_layer_scale = layer_scale_init is not None and self.modulation is None
        self.layer_scale = nn.Parameter(torch.full((out_channels,), float(layer_scale_init))) if use_layer_scale else None
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if residual and in_channels != out_channels else nn.Identity()
        )
        self.drop_path = StochasticDepth(drop_path, mode="row") if residual and drop_path > 0 else nn.Identity()

    def _pre_norm(self, x: torch.Tensor, temb: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Norm(x), adaLN-modulated when conditioned; returns it and the adaLN gate (None if unconditioned)."""
        if self.modulation is None:
            return norm_act(x, self.norm), None
        if temb is None:
            raise ValueError("This i2RMB is conditioned (temb_channels set); pass `temb`.")
        shift, scale, gate = self.modulation(temb)
        if scale is None:  # the additive "default" entry
            return norm_act(x, self.norm) + shift, gate
        return norm_act(x, self.norm, shift=shift, scale=scale), gate

    def _local_mix(self, z: torch.Tensor) -> torch.Tensor:
        """Depth-wise conv, norm and activation, plus the inner residual in stride-1 blocks."""
        conv, norm, act = self.dw
        return norm_act(conv(z), norm, act, residual=z if self.residual else None)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        y, gate = self._pre_norm(x, temb)
        z = self.attn(y, self.expand) if self.attn is not None else self.expand(y)
        z = self.proj(self.dropout(self._local_mix(z)))
        scale = gate  # adaLN gate, else the layer scale, else none
        if scale is None and self.layer_scale is not None:
            scale = self.layer_scale.view(1, -1, 1, 1)
        if self.residual and scale is not None and isinstance(self.drop_path, nn.Identity):
            return torch.addcmul(self.shortcut(x), z, scale)  # one pass for the scaled residual add
        if scale is not None:
            z = z * scale
        if not self.residual:
            return z
        return self.shortcut(x) + self.drop_path(z)
