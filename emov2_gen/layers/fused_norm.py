"""One-pass channel LayerNorm for CUDA inference: LayerNorm2d [-> adaLN modulation] [-> activation] [+ residual].

Why: at batch 256 on an H100 the EMOv2-5M UNet's forward spent 7.1 of 18.9 ms of GPU time in PyTorch's
LayerNorm (`eval/profile_ops.py --device cuda --batch_size 256`). Its kernel gives each row its own thread
block; a channel LayerNorm has millions of rows of 32-480 values, so most threads idle. The modulation,
activation and inner-residual add that follow each take another pass over the block's widest tensors.

`norm_act` does all of it in one Triton kernel: each program normalises a tile of rows (pixels) of a
channels-last tensor in float32 and writes the result once. It is used only where it is exact to float
rounding, needs no backward and pays off (`kernel_applies`): CUDA tensors of at least `MIN_FUSED_NUMEL`
elements, Triton importable, no autograd recording, no autocast, not inside torch.compile, a `LayerNorm2d`
with affine weights and an activation it knows. Otherwise `norm_act` runs the eager ops, so CPU runs,
training and gradients are untouched. It is off when the environment sets EMOV2_GEN_FUSED_NORM=0, and
inside `fused_norm_enabled(False)` (for A/B timing and debugging).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import nn

from .norms import InferenceInplaceAct, LayerNorm2d, autograd_records, can_overwrite

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager path is used
    triton = None

_enabled = os.environ.get("EMOV2_GEN_FUSED_NORM", "1") != "0"
# Smaller tensors keep the eager ops. Measured on an H100 (eval/fused_norm_check.py, eval/benchmark.py): a Triton
# launch costs ~40 us more host time than the aten ops it replaces, which slowed the launch-bound batch-1/16 forward
# by 18%, while below ~2M elements the kernel saves under 0.06 ms of GPU time.
MIN_FUSED_NUMEL = 1 << 21
# Triton's interpreter (TRITON_INTERPRET=1, its debugging mode) runs kernels on CPU tensors: the tests use it.
_interpreted = os.environ.get("TRITON_INTERPRET") == "1"

# The kernel's activation codes.
ACT_CODES = {"none": 0, "gelu": 1, "silu": 2, "relu": 3}


@contextlib.contextmanager
def fused_norm_enabled(enabled: bool) -> Iterator[None]:
    """Turn the fused kernel on or off inside the block (it is on by default)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def fused_norm_available() -> bool:
    """Whether CUDA inference can take the kernel here: Triton importable and the kernel not switched off."""
    return _enabled and triton is not None


def activation_kind(act: Optional[nn.Module]) -> Optional[str]:
    """The kernel's name for an activation module, or None if the kernel does not implement it."""
    if act is None or isinstance(act, nn.Identity):
        return "none"
    if isinstance(act, InferenceInplaceAct):
        return act.kind
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else None
    return {nn.SiLU: "silu", nn.ReLU: "relu"}.get(type(act))


if triton is not None:

    @triton.jit
    def _channel_norm_kernel(
        x_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, residual_ptr, out_ptr,
        rows, channels, pixels_per_sample, modulation_stride, eps,
        HAS_MODULATION: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        col = tl.arange(0, BLOCK_C)
        col_ok = col < channels
        mask = (row < rows)[:, None] & col_ok[None, :]
        offsets = row[:, None] * channels + col[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / channels
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + eps)
        weight = tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * weight[None, :] + bias[None, :]
        if HAS_MODULATION:  # y * (1 + scale[b]) + shift[b], b the sample of each row
            at = (row // pixels_per_sample)[:, None] * modulation_stride + col[None, :]
            scale = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + at, mask=mask, other=0.0).to(tl.float32)
            y = y * (1.0 + scale) + shift
        if ACT == 1:  # exact (erf) GELU
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACT == 2:
            y = y * tl.sigmoid(y)
        elif ACT == 3:
            y = tl.maximum(y, 0.0)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def channel_norm_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    act: str = "none",
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the Triton kernel on (B, C, H, W) `x`; shift/scale (B, C, 1, 1); residual like `x`. Returns channels-last.

    No eligibility checks beyond shapes (see `kernel_applies`): the tests call it directly, on CPU
    tensors under TRITON_INTERPRET=1.
    """
    b, c, h, w = x.shape
    if (shift is None) != (scale is None):
        raise ValueError("Pass both shift and scale, or neither.")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}.")
    x = _channels_last(x)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    modulation_stride = 0
    if scale is not None:
        # The modulation's split views keep unit channel stride; any other layout is copied to (B, C).
        scale, shift = (t.reshape(b, c) for t in (scale, shift))
        if scale.stride(1) != 1 or shift.stride(1) != 1 or scale.stride(0) != shift.stride(0):
            scale, shift = scale.contiguous(), shift.contiguous()
        modulation_stride = scale.stride(0)
    residual = _channels_last(residual) if residual is not None else None
    block_c = triton.next_power_of_2(c)
    block_rows = max(1, min(128, 4096 // block_c))
    rows = b * h * w
    _channel_norm_kernel[(triton.cdiv(rows, block_rows),)](
        x, weight, bias, scale if scale is not None else x, shift if shift is not None else x,
        residual if residual is not None else x, out, rows, c, h * w, modulation_stride, eps,
        HAS_MODULATION=scale is not None, ACT=ACT_CODES[act], HAS_RESIDUAL=residual is not None,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4 if block_c * block_rows <= 4096 else 8,
    )  # fmt: skip
    return out


def kernel_applies(
    x: torch.Tensor, norm: nn.Module, act_kind: Optional[str], *operands: Optional[torch.Tensor]
) -> bool:
    """Whether `norm_act` runs the kernel for `x`, `norm`, an activation of `activation_kind` `act_kind` and the
    optional shift/scale/residual `operands` (where not, it runs the eager ops, which compute the same function)."""
    return (
        fused_norm_available()
        and (x.is_cuda or _interpreted)
        and x.numel() >= MIN_FUSED_NUMEL
        and isinstance(norm, LayerNorm2d)
        and norm.weight is not None
        and norm.bias is not None
        and act_kind is not None
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()  # inductor fuses the eager ops itself
        and not autograd_records(x, *operands, norm.weight, norm.bias)
    )


def norm_act(
    x: torch.Tensor,
    norm: nn.Module,
    act: Optional[nn.Module] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`act(norm(x) * (1 + scale) + shift) + residual` (each part optional): the fused kernel where it applies,
    else the eager ops, for any norm and activation.

    The eager path writes the modulation into the norm's output where `can_overwrite` allows (inference), and the
    residual add into the activation's output in place (one large temporary less each), except after ReLU, whose
    output autograd keeps for its backward.
    """
    kind = activation_kind(act)
    if kernel_applies(x, norm, kind, shift, scale, residual):
        return channel_norm_kernel(x, norm.weight, norm.bias, norm.eps, shift, scale, kind, residual)
    y = norm(x)
    if scale is not None:
        # Into the norm's fresh output where allowed; an identity norm returns `x` itself, which must stay intact.
        y = torch.addcmul(shift, y, 1 + scale, out=y if y is not x and can_overwrite(y, shift, y, scale) else None)
    if act is not None:
        y = act(y)
    if residual is None:
        return y
    return residual + y if kind == "relu" else y.add_(residual)
