"""How a timestep/class embedding enters an i2RMB: adaptive-norm shift, scale and gate.

The paper's generator (DEMO, DiT with i2RMBs) conditions each block through DiT's adaLN path:
x <- x + gate * i2RMB_core(norm(x) * (1 + scale) + shift). The projection is zero-initialised
(adaLN-Zero), so every conditioned block starts as its shortcut and the gate plays the role of
EMOv2's layer scale.
"""

from __future__ import annotations

import torch
from torch import nn


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(temb -> 2*C_in + C_out), zero-initialised; returns (shift, scale, gate) as (B, C, 1, 1)."""

    def __init__(self, temb_channels: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.act = nn.SiLU()
        self.linear = nn.Linear(temb_channels, 2 * in_channels + out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params = self.linear(self.act(temb)).view(temb.shape[0], -1, 1, 1)  # one view op, not two unsqueezes
        return params.split((self.in_channels, self.in_channels, self.out_channels), dim=1)
