"""Normalisation and activation factories used by every EMOv2 layer, and the inference-time in-place rules.

EMOv2 switches norms and activations per stage (BatchNorm + SiLU in the convolutional stages,
channel LayerNorm + GELU in the attention stages), so layers take them by name. Where autograd does not
record, activations and a few elementwise ops write into the fresh tensors they were given
(`InferenceInplaceAct`, `can_overwrite`) instead of allocating more of the block's widest tensors.
"""

from __future__ import annotations

import functools
from typing import Optional

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


def autograd_records(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record an op on `tensors`: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def can_overwrite(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """Whether an elementwise op on `inputs` may write its result into `out` (`out=`), a fresh temporary that nothing
    else reads: autograd does not record the op, and every input has `out`'s dtype and rank and broadcasts to its shape
    (stricter than needed, and cheap: layers ask this per call, 44 times per emov2-5m forward).

    In inference this saves allocating and writing one more tensor the size of a block's activations per op; while
    autograd records, callers run the out-of-place op, so training and its gradients are unchanged.
    """
    shape = out.shape
    return not autograd_records(*inputs) and all(
        t is out or (t.dtype == out.dtype and (t.shape == shape or _broadcasts_within(t.shape, shape))) for t in inputs
    )


@functools.lru_cache(maxsize=1024)
def _broadcasts_within(shape: torch.Size, target: torch.Size) -> bool:
    """Same rank, and every size 1 or `target`'s (cached: a model asks about the same few shapes on every call)."""
    return len(shape) == len(target) and all(s == 1 or s == n for s, n in zip(shape, target))


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
        if autograd_records(x):
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
