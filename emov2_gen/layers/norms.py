"""Normalisation and activation factories used by every EMOv2 layer.

EMOv2 switches norms and activations per stage (BatchNorm + SiLU in the convolutional stages,
channel LayerNorm + GELU in the attention stages), so layers take them by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6  # the official code uses eps=1e-6 for both BatchNorm2d and LayerNorm2d


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (normalises each pixel's C values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


NORM_TYPES = ("bn", "ln", "gn", "none")
ACT_TYPES = ("silu", "gelu", "relu", "none")


def make_norm(kind: str, channels: int, eps: float = NORM_EPS, affine: bool = True) -> nn.Module:
    """'bn' BatchNorm2d, 'ln' channel LayerNorm, 'gn' GroupNorm(32 or fewer groups), 'none' identity."""
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=eps, affine=affine)
    if kind == "ln":
        return LayerNorm2d(channels, eps=eps, elementwise_affine=affine)
    if kind == "gn":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Unknown norm {kind!r}; expected one of {NORM_TYPES}.")


class InferenceInplaceAct(nn.Module):
    """SiLU, exact GELU or ReLU that overwrites its input whenever autograd is not recording it.

    For an activation straight after a conv or norm, whose output nothing else reads: in inference
    (and for inputs that need no gradient) it skips allocating and writing a second tensor of the
    block's widest activations. While autograd records, it runs out of place, so training and its
    gradients are exactly those of the plain module. The result is the same either way.
    """

    _FUNCTIONS = {
        "silu": (F.silu, torch.ops.aten.silu_),
        "gelu": (F.gelu, torch.ops.aten.gelu_),
        "relu": (F.relu, torch.relu_),
    }

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.function, self.function_ = self._FUNCTIONS[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.function(x)
        return self.function_(x)

    def extra_repr(self) -> str:
        return self.kind


def make_act(kind: str, inplace: bool = False) -> nn.Module:
    """'silu', 'gelu' (exact erf form, as the official code), 'relu' or 'none'.

    `inplace=True` gives an `InferenceInplaceAct`: only for inputs that are fresh temporaries.
    """
    if inplace and kind in InferenceInplaceAct._FUNCTIONS:
        return InferenceInplaceAct(kind)
    if kind == "silu":
        return nn.SiLU()
    if kind == "gelu":
        return nn.GELU()
    if kind == "relu":
        return nn.ReLU()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Unknown activation {kind!r}; expected one of {ACT_TYPES}.")
