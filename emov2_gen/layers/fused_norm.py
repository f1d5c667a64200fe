"""One-pass channel LayerNorm for CUDA inference: LayerNorm2d [-> adaLN modulation] [-> activation] [+ residual].

Why: at batch 256 on an H100 the EMOv2-5M UNet's forward spent 7.1 of 18.9 ms of GPU time in PyTorch's
LayerNorm (`eval/profile_ops.py --device cuda --batch_size 256`). Its kernel gives each row its own thread
block; a channel LayerNorm has millions of rows of 32-480 values, so most threads idle. The modulation,
activation and inner-residual add that follow each take another pass over the block's widest tensors.

`channel_norm_kernel` does all of it in one Triton kernel: each program normalises a tile of rows (pixels) of a
channels-last tensor in float32 and writes the result once, into a new tensor. `layers.norms.norm_act` calls it only
where it is exact to float rounding, needs no backward and pays off (`kernel_takes_operands`): CUDA tensors of at
least `MIN_FUSED_NUMEL` elements, Triton importable, no autograd recording, no autocast, not inside torch.compile.
Otherwise the eager ops run, so CPU runs, training and gradients are untouched. It is off when the environment sets
EMOV2_GEN_FUSED_NORM=0 (read at each call), and inside `fused_norm_enabled(False)` (for A/B timing and debugging).
This module knows nothing of the norm modules (they live in `layers.norms`, which imports it).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager path is used
    triton = None

# Smaller tensors keep the eager ops. Measured on an H100 (eval/fused_norm_check.py, eval/benchmark.py): a Triton
# launch costs ~40 us more host time than the aten ops it replaces, which slowed the launch-bound batch-1/16 forward
# by 18%, while below ~2M elements the kernel saves under 0.06 ms of GPU time.
MIN_FUSED_NUMEL = 1 << 21

# The kernel's activation codes.
ACT_CODES = {"none": 0, "gelu": 1, "silu": 2, "relu": 3}
_ACT_MODULES = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "none"}

_override: Optional[bool] = None  # set by `fused_norm_enabled`; None: the environment decides


@contextlib.contextmanager
def fused_norm_enabled(enabled: bool) -> Iterator[None]:
    """Turn the fused kernel on or off inside the block, whatever EMOV2_GEN_FUSED_NORM says."""
    global _override
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous


def fused_kernel_enabled() -> bool:
    """Triton importable, and the kernel not switched off (`fused_norm_enabled`, else EMOV2_GEN_FUSED_NORM != "0")."""
    if triton is None:
        return False
    return _override if _override is not None else os.environ.get("EMOV2_GEN_FUSED_NORM", "1") != "0"


def activation_kind(act: Optional[nn.Module]) -> Optional[str]:
    """The kernel's name for an activation module (an allowlist), or None if the kernel does not implement it."""
    if act is None:
        return "none"
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else None
    return _ACT_MODULES.get(type(act))


def kernel_takes_operands(x: torch.Tensor, *operands: Optional[torch.Tensor]) -> bool:
    """The kernel's conditions on the tensors: CUDA (or Triton's CPU interpreter, TRITON_INTERPRET=1, which the tests
    use), at least `MIN_FUSED_NUMEL` elements, a float dtype, no autocast, not compiling (inductor fuses the eager ops
    itself) and no autograd recording on `x` or any operand (the kernel has no backward)."""
    return (
        (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and x.numel() >= MIN_FUSED_NUMEL
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *operands)))
    )

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


def kernel_shapes_fit(
    x: torch.Tensor, shift: Optional[torch.Tensor], scale: Optional[torch.Tensor], residual: Optional[torch.Tensor]
) -> bool:
    """Whether the kernel computes what eager broadcasting would: a 4-D `x`, shift/scale of shape (1 or B, C, 1, 1)
    and a residual of `x`'s shape (anything else -- e.g. a modulation that would broadcast `x` -- runs eager)."""
    if x.ndim != 4 or (residual is not None and residual.shape != x.shape):
        return False
    b, c = x.shape[:2]
    return all(t.shape in ((1, c, 1, 1), (b, c, 1, 1)) for t in (shift, scale) if t is not None)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _per_sample(t: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """A (1 or B, C, 1, 1) modulation as a (B, C) view with unit channel stride (batch 1 broadcast with stride 0)."""
    if t.ndim != 4 or t.shape[0] not in (1, batch) or t.shape[1:] != (channels, 1, 1):
        raise ValueError(f"shift/scale must have shape (1 or {batch}, {channels}, 1, 1), got {tuple(t.shape)}.")
    t = t.reshape(t.shape[0], channels).expand(batch, channels)
    return t if t.stride(1) == 1 else t.contiguous()


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
    """Run the Triton kernel on (B, C, H, W) `x`; shift/scale (1 or B, C, 1, 1); residual like `x`. Returns a new
    channels-last tensor, computed on `x`'s device.

    No eligibility checks beyond shapes (see `kernel_takes_operands`): the tests call it directly, on CPU
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
        scale, shift = _per_sample(scale, b, c), _per_sample(shift, b, c)
        if scale.stride(0) != shift.stride(0):
            scale, shift = scale.contiguous(), shift.contiguous()
        modulation_stride = scale.stride(0)
    residual = _channels_last(residual) if residual is not None else None
    block_c = triton.next_power_of_2(c)
    block_rows = max(1, min(128, 4096 // block_c))
    rows = b * h * w
    # Triton launches on the current CUDA device: make it x's (a model on cuda:1 while cuda:0 is current).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _channel_norm_kernel[(triton.cdiv(rows, block_rows),)](
            x, weight, bias, scale if scale is not None else x, shift if shift is not None else x,
            residual if residual is not None else x, out, rows, c, h * w, modulation_stride, eps,
            HAS_MODULATION=scale is not None, ACT=ACT_CODES[act], HAS_RESIDUAL=residual is not None,
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=4 if block_c * block_rows <= 4096 else 8,
        )  # fmt: skip
    return out
