"""Normalisation and activation factories used by every EMOv2 layer, and `norm_act`, the norm -> modulation ->
activation -> residual sequence that the layers share.

EMOv2 switches norms and activations per stage (BatchNorm + SiLU in the convolutional stages,
channel LayerNorm + GELU in the attention stages), so layers take them by name. Every op here is out of
place: a module's output is never overwritten later, so forward hooks, caches and autograd see what was computed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fused_norm import (
    activation_kind,
    channel_norm_kernel,
    fused_kernel_enabled,
    kernel_shapes_fit,
    kernel_takes_operands,
)

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


def make_act(kind: str) -> nn.Module:
    """'silu', 'gelu' (exact erf form, as the official code), 'relu' or 'none'."""
    if kind == "silu":
        return nn.SiLU()
    if kind == "gelu":
        return nn.GELU()
    if kind == "relu":
        return nn.ReLU()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Unknown activation {kind!r}; expected one of {ACT_TYPES}.")


def _takes_fused_kernel(
    x: torch.Tensor,
    norm: nn.Module,
    act_kind: Optional[str],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
) -> bool:
    """Whether `norm_act` may run the fused CUDA kernel: an affine channel LayerNorm, an activation the kernel
    implements, and the kernel's own conditions on the tensors (see `fused_norm`)."""
    return (
        isinstance(norm, LayerNorm2d)
        and norm.weight is not None
        and norm.bias is not None
        and act_kind is not None
        and fused_kernel_enabled()
        and kernel_shapes_fit(x, shift, scale, residual)
        and kernel_takes_operands(x, shift, scale, residual, norm.weight, norm.bias)
    )


def norm_act(
    x: torch.Tensor,
    norm: nn.Module,
    act: Optional[nn.Module] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`act(norm(x) * (1 + scale) + shift) + residual`, each part optional (shift and scale go together).

    In CUDA inference on large tensors the fused Triton kernel computes it in one pass (`layers.fused_norm`);
    everywhere else, and whenever autograd records, the eager ops below run. Both compute the same function.
    """
    if (shift is None) != (scale is None):
        raise ValueError("Pass both shift and scale, or neither.")
    kind = activation_kind(act)
    if _takes_fused_kernel(x, norm, kind, shift, scale, residual):
        return channel_norm_kernel(x, norm.weight, norm.bias, norm.eps, shift, scale, kind, residual)
    y = norm(x)
    if scale is not None:
        y = torch.addcmul(shift, y, 1 + scale)
    if act is not None:
        y = act(y)
    return y if residual is None else residual + y
