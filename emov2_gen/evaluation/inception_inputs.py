"""Images in the form torch-fidelity's Inception reads: a Dataset of uint8 (3, H, W) tensors."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to uint8, rounding like diffusers' `numpy_to_pil` (so PNGs of the samples hold the same)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def to_three_channels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) with C = 1 (replicated, as greyscale is for Inception) or 3 -> (..., 3, H, W)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"Expected uint8 images, got {images.dtype}.")
    channels = images.shape[-3]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    raise ValueError(f"Images must have 1 or 3 channels for Inception, got {channels}.")


class ImageTensorDataset(Dataset):
    """A uint8 (N, C, H, W) tensor (C = 1 or 3) served as (3, H, W) images."""

    def __init__(self, images: torch.Tensor):
        if images.dim() != 4 or len(images) == 0:
            raise ValueError(f"Expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}.")
        self.images = to_three_channels(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]
