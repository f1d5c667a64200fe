"""How a timestep/class embedding enters an i2RMB: adaptive-norm shift, scale and gate.

The paper's generator (DEMO, DiT with i2RMBs) conditions each block through DiT's adaLN path
("ada_norm_zero", the default): x <- x + gate * i2RMB_core(norm(x) * (1 + scale) + shift). The projection is
zero-initialised (adaLN-Zero), so every conditioned block starts as its shortcut and the gate plays the role of
EMOv2's layer scale. Two weaker entries exist for the denoiser's ablations, named after `UNet2DModel`'s
`resnet_time_scale_shift`: "scale_shift" (shift and scale, no gate) and "default" (an additive shift only).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


CONDITION_TYPES = ("ada_norm_zero", "scale_shift", "default")


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(temb -> parameters), zero-initialised; returns (shift, scale, gate) as (B, C, 1, 1) tensors.

    "ada_norm_zero": all three (2*C_in + C_out outputs); "scale_shift": gate None; "default": scale and gate None.
    """

    def __init__(self, temb_channels: int, in_channels: int, out_channels: int, condition: str = "ada_norm_zero") -> None:
        super().__init__()
        if condition not in CONDITION_TYPES:
            raise ValueError(f"Unknown condition type {condition!r}; expected one of {CONDITION_TYPES}.")
        self.widths = {"ada_norm_zero": (in_channels, in_channels, out_channels), "scale_shift": (in_channels,) * 2,
                       "default": (in_channels,)}[condition]
        self.act = nn.SiLU()
        self.linear = nn.Linear(temb_channels, sum(self.widths))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        params = self.linear(self.act(temb)).view(temb.shape[0], -1, 1, 1)  # one view op, not two unsqueezes
        parts = params.split(self.widths, dim=1)
        return parts + (None,) * (3 - len(parts))
