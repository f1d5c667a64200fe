"""Sliding-window inference as mmsegmentation's "slide" test mode does it.

Windows of ``crop_size`` start every ``stride`` pixels; the last row/column of windows is shifted back
so it ends at the image border; the model's logits of all windows covering a pixel are averaged.
Images smaller than the window are zero-padded (zero = the mean colour after ImageNet normalisation)
at the bottom/right to the window size and the padding is cut off again, so a model that needs a fixed
input size (e.g. multiples of 16) always sees full windows.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F


def _pair(value: Union[int, tuple[int, int]], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width) pair, got {value}.")
    return pair


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window start offsets along one axis (``length >= crop``) as mmseg places them.

    A window every ``stride`` pixels; the last one is moved back so that it ends at the border.
    """
    num_windows = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(num_windows)]


@torch.no_grad()
def sliding_window_inference(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    crop_size: Union[int, tuple[int, int]],
    stride: Union[int, tuple[int, int]],
    num_classes: int,
    windows_per_batch: int = 8,
) -> torch.Tensor:
    """Logits (B, num_classes, H, W) for ``image`` (B, C, H, W) from overlapping windows.

    ``model_fn`` maps (N, C, h, w) -> (N, num_classes, h, w); windows from all images are sent through it
    ``windows_per_batch`` at a time. ``stride`` must not exceed ``crop_size`` (every pixel is covered).
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}.")
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {stride} larger than crop_size {crop_size} would leave pixels unpredicted.")
    batch, _, height, width = image.shape
    padded = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    padded_h, padded_w = padded.shape[-2:]

    windows = [
        (b, top, left)
        for b in range(batch)
        for top in window_starts(padded_h, crop_h, stride_h)
        for left in window_starts(padded_w, crop_w, stride_w)
    ]
    logits = torch.zeros(batch, num_classes, padded_h, padded_w, device=image.device, dtype=torch.float32)
    counts = torch.zeros(batch, 1, padded_h, padded_w, device=image.device, dtype=torch.float32)
    for first in range(0, len(windows), windows_per_batch):
        chunk = windows[first : first + windows_per_batch]
        crops = torch.stack([padded[b, :, top : top + crop_h, left : left + crop_w] for b, top, left in chunk])
        out = model_fn(crops)
        if out.shape != (len(chunk), num_classes, crop_h, crop_w):
            raise ValueError(
                f"model_fn returned shape {tuple(out.shape)} for windows {tuple(crops.shape)}; "
                f"expected {(len(chunk), num_classes, crop_h, crop_w)}."
            )
        for (b, top, left), window_logits in zip(chunk, out.float()):
            logits[b, :, top : top + crop_h, left : left + crop_w] += window_logits
            counts[b, :, top : top + crop_h, left : left + crop_w] += 1
    return (logits / counts)[:, :, :height, :width]
