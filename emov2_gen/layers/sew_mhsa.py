"""SEW-MHSA: EMOv2's spanning-window multi-head self-attention.

Queries and keys come from one 1x1 conv; the values are supplied by the caller -- in an i2RMB they are
the block's activated expansion, so attention adds only the q/k projection (2C^2 + 2C parameters).
The same q/k/v are attended in two partitions of the (zero-padded) token grid:

- local windows: contiguous w x w tiles;
- dilated ("spanning") windows: w x w grids with stride n = H_p / w that cover the whole map.

Each partition is soft-maxed on its own and the two outputs are summed (no learned mixing), so the
combined attention weights sum to 2 -- faithful to the official `EW_MHSA_Hybrid`. When the map side
equals w both partitions coincide and the output is exactly twice one global attention. Zero padding
to a multiple of w is not masked (padded tokens carry q/k = bias), again as in the official code.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

PARTITIONS = ("local", "dilated")


def _window_grid(height: int, width: int, window_size: int) -> tuple[int, int, int, int]:
    """Window height/width and the number of windows along H and W (after padding)."""
    wh = window_size if window_size > 0 else height
    ww = window_size if window_size > 0 else width
    return wh, ww, -(-height // wh), -(-width // ww)


def _window_view(t: torch.Tensor, heads: int, wh: int, ww: int, dilated: bool, groups: int = 1) -> torch.Tensor:
    """(B, groups*heads*d, n1*wh, n2*ww) -> view (groups, B, n1, n2, heads, wh, ww, d) in window order (no copy).

    `groups` splits the channels into consecutive tensors first (2 for the q/k projection's [q, k]). The
    split is taken on the NHWC view: autograd's inverse of the partition copy then writes the gradient
    channels-last like the activations (d-long contiguous runs), not NCHW (a transposing copy, then reorders
    in the convolutions' backward).
    """
    b, c, hp, wp = t.shape
    d, n1, n2 = c // (groups * heads), hp // wh, wp // ww
    nhwc = t.permute(0, 2, 3, 1)
    if dilated:  # row r = i*n1 + a belongs to window a (stride n1); likewise for columns
        return nhwc.view(b, wh, n1, ww, n2, groups, heads, d).permute(5, 0, 2, 4, 6, 1, 3, 7)
    # row r = a*wh + i belongs to window a (contiguous tile)
    return nhwc.view(b, n1, wh, n2, ww, groups, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)


def partition_windows(t: torch.Tensor, heads: int, wh: int, ww: int, dilated: bool, groups: int = 1) -> torch.Tensor:
    """(B, groups*heads*d, n1*wh, n2*ww) -> (groups*B*n1*n2, heads, wh*ww, d) tokens of each window, group-major."""
    w = _window_view(t, heads, wh, ww, dilated, groups)
    return w.reshape(-1, heads, wh * ww, w.shape[-1])


def partition_both_windows(t: torch.Tensor, heads: int, wh: int, ww: int, groups: int = 1) -> torch.Tensor:
    """Local then dilated windows of each group stacked in one copy: (groups*2*B*n1*n2, heads, wh*ww, d).

    One op instead of two per group, so both partitions then share a single attention call.
    """
    w = torch.stack([_window_view(t, heads, wh, ww, dilated, groups) for dilated in (False, True)], dim=1)
    return w.view(-1, heads, wh * ww, w.shape[-1])


def _pixel_view(t: torch.Tensor, batch: int, n1: int, n2: int, wh: int, ww: int, dilated: bool) -> torch.Tensor:
    """Windows (B*n1*n2, heads, wh*ww, d) as a 7-D view whose index order is the pixel grid's (no copy):
    (B, n1, wh, n2, ww, heads, d) for local windows, (B, wh, n1, ww, n2, heads, d) for dilated ones."""
    t = t.view(batch, n1, n2, t.shape[1], wh, ww, t.shape[-1])
    if dilated:  # pixel (i*n1 + a, j*n2 + b) of window (a, b)
        return t.permute(0, 4, 1, 5, 2, 3, 6)
    return t.permute(0, 1, 4, 2, 5, 3, 6)  # pixel (a*wh + i, b*ww + j) of window (a, b)


def merge_windows(t: torch.Tensor, batch: int, n1: int, n2: int, wh: int, ww: int, dilated: bool) -> torch.Tensor:
    """Inverse of `partition_windows`: (B*n1*n2, heads, wh*ww, d) -> (B, heads*d, n1*wh, n2*ww).

    The result is laid out channels-last (one copy, straight from the window order): the depth-wise
    conv that follows runs many times faster on channels-last input than on NCHW on CPU.
    """
    c = t.shape[1] * t.shape[-1]
    return _pixel_view(t, batch, n1, n2, wh, ww, dilated).reshape(batch, n1 * wh, n2 * ww, c).permute(0, 3, 1, 2)


def merge_both_windows(t: torch.Tensor, batch: int, n1: int, n2: int, wh: int, ww: int) -> torch.Tensor:
    """Sum of the merged local and dilated halves of `partition_both_windows`' layout, channels-last.

    The local half is merged with one copy and the dilated half added to it straight from window order (viewing
    the merged map in the dilated pixel order), so no second merge copy is made. Out of place: the merged tensor
    may be the attention output itself (one head, one window across), which SDPA keeps for backward.
    """
    local, dilated = t.chunk(2)
    merged = merge_windows(local, batch, n1, n2, wh, ww, dilated=False)  # (B, C, H, W), NHWC in memory
    nhwc = merged.permute(0, 2, 3, 1)
    grid = nhwc.view(batch, wh, n1, ww, n2, t.shape[1], t.shape[-1])
    dilated_pixels = _pixel_view(dilated, batch, n1, n2, wh, ww, True)
    return (grid + dilated_pixels).view(nhwc.shape).permute(0, 3, 1, 2)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_scale: float = 1.0) -> torch.Tensor:
    """out_scale * softmax(q k^T / sqrt(d)) v over the last two dims; values may be wider than queries (e * d_h).

    `scaled_dot_product_attention` everywhere except on CPU with a value width different from the
    query width: there SDPA has no fused kernel and its math fallback adds NaN-safe-softmax passes,
    about 2x slower than the same math written out (measured at 16x16 maps, 8x8 windows). That path
    folds 1/sqrt(d) and `out_scale` into the two batched products (`baddbmm`'s alpha), saving two passes.
    """
    if q.device.type == "cpu" and v.shape[-1] != q.shape[-1]:
        lead, (t, d), m = q.shape[:-2], q.shape[-2:], v.shape[-1]
        q3, k3, v3 = q.reshape(-1, t, d), k.reshape(-1, t, d), v.reshape(-1, t, m)
        ignored = q.new_zeros(())  # baddbmm's input, ignored with beta=0
        attn = torch.baddbmm(ignored, q3, k3.transpose(1, 2), beta=0, alpha=d**-0.5).softmax(dim=-1)
        return torch.baddbmm(ignored, attn, v3, beta=0, alpha=out_scale).view(*lead, t, m)
    out = F.scaled_dot_product_attention(q, k, v)
    return out if out_scale == 1.0 else out * out_scale


class SEWMHSA(nn.Module):
    """Spanning-window MHSA over an NCHW map; `partitions` selects EMOv2 (both) or ablations (one).

    Args:
        dim: input channels C.
        head_dim: query/key width per head (d_h). Values may be wider (e * d_h per head).
        num_heads: defaults to max(1, C // head_dim), the official rule; q and k then have
            heads * head_dim = C channels whenever C is a multiple of head_dim (every official config).
        window_size: w; w <= 0 attends over the whole map (one window).
        partitions: ("local", "dilated") for EMOv2's hybrid; ("dilated",) is EMOv1's EW-MHSA.
        qkv_bias: bias on the q/k projection (True in every official config).
    """

    def __init__(
        self,
        dim: int,
        head_dim: int = 32,
        window_size: int = 7,
        num_heads: Optional[int] = None,
        partitions: tuple[str, ...] = PARTITIONS,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        unknown = set(partitions) - set(PARTITIONS)
        if not partitions or unknown:
            raise ValueError(f"partitions must be a non-empty subset of {PARTITIONS}, got {partitions}.")
        self.dim, self.head_dim, self.num_heads = dim, head_dim, num_heads or max(1, dim // head_dim)
        self.window_size = window_size
        self.partitions = tuple(partitions)
        self.qk = nn.Conv2d(dim, 2 * self.num_heads * head_dim, kernel_size=1, bias=qkv_bias)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Optional[Callable] = None) -> None:
        """diffusers' `enable_xformers_memory_efficient_attention` hook: refused, so that the flag never silently does
        nothing. The windowed attention already runs `F.scaled_dot_product_attention`, which picks torch's fused
        (flash / memory-efficient) kernels itself; turning xformers off (`valid=False`) is a no-op."""
        if valid:
            raise NotImplementedError(
                "SEW-MHSA has no xformers path: it runs torch's scaled_dot_product_attention, which already selects "
                "flash / memory-efficient kernels; drop enable_xformers_memory_efficient_attention for EMOv2 models."
            )

    def forward(self, x: torch.Tensor, to_value: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Attend over `x` (B, C, H, W); `to_value` maps the padded input to values (B, M, H_p, W_p)."""
        b, _, h, w = x.shape
        wh, ww, n1, n2 = _window_grid(h, w, self.window_size)
        pad_h, pad_w = n1 * wh - h, n2 * ww - w
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        qk = self.qk(x)  # [q, k] along channels: partitioned together, one copy for both
        v = to_value(x)
        if v.shape[1] % self.num_heads != 0:
            raise ValueError(f"Value width {v.shape[1]} is not divisible by {self.num_heads} heads.")

        if len(self.partitions) == 2 and (n1 > 1 or n2 > 1):  # both partitions in one attention call
            qw, kw = partition_both_windows(qk, self.num_heads, wh, ww, groups=2).chunk(2)
            vw = partition_both_windows(v, self.num_heads, wh, ww)
            out = merge_both_windows(window_attention(qw, kw, vw), b, n1, n2, wh, ww)
        else:  # one partition; with a single window both partitions are the same tokens: attend once, x2
            dilated = self.partitions == ("dilated",)
            qw, kw = partition_windows(qk, self.num_heads, wh, ww, dilated, groups=2).chunk(2)
            vw = partition_windows(v, self.num_heads, wh, ww, dilated)
            o = window_attention(qw, kw, vw, out_scale=float(len(self.partitions)))
            out = merge_windows(o, b, n1, n2, wh, ww, dilated)
        if pad_h or pad_w:
            out = out[..., :h, :w]
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, window_size={self.window_size}, partitions={self.partitions}"
