"""The real images FID is measured against: a fixed subset of a dataset, preprocessed as for training.

The reference can be a folder of images, a local `datasets` directory (e.g. ``../shared/data/mnist``) or a hub
dataset name; all go through `emov2_gen.data.image_datasets.load_image_dataset`, as training does. The subset
(the same N images for every model and run) is drawn with a fixed seed. Each image goes through the training
preprocessing (`TrainingImageDataset` with a centre crop and no flip: the model's resolution and channel count)
and the same uint8 rounding as the generated samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.image_datasets import IMAGE_EXTENSIONS, load_image_dataset
from ..data.training_images import TrainingImageDataset
from .inception_inputs import to_three_channels, unit_to_uint8

REFERENCE_SUBSET_SEED = 0
COLOUR_MODES = {1: "L", 3: "RGB"}


def _is_image_folder(path: Path) -> bool:
    """A directory holding image files (or nothing at all, so the loader reports it as empty)."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return not files or any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files)


class ReferenceImages(Dataset):
    """Reference images as uint8 (3, H, W) tensors, decoded lazily so a feature-cache hit never decodes them."""

    def __init__(self, dataset, key: str, resolution: tuple[int, int], num_channels: int):
        height, width = resolution
        if height != width:
            raise ValueError(f"Only square models can be scored against a reference, got {height}x{width}.")
        self.key = key
        self.images = TrainingImageDataset(dataset, resolution=height, channels=num_channels, center_crop=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_three_channels(unit_to_uint8(self.images[index]["images"] / 2 + 0.5))


class ReferenceSet:
    """A fixed subset of `num_images` images of a reference dataset split (all of it when it is smaller)."""

    def __init__(self, reference: str, split: str = "train", num_images: int = 1000):
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}.")
        path = Path(reference).expanduser()
        if path.is_dir() and _is_image_folder(path):
            dataset, self.description = load_image_dataset(train_data_dir=str(path), split=split)
        else:
            dataset, self.description = load_image_dataset(dataset_name=reference, split=split)
        self.reference = os.path.abspath(path) if path.exists() else reference
        self.split = split
        rng = np.random.default_rng(REFERENCE_SUBSET_SEED)
        indices = np.sort(rng.permutation(len(dataset))[:num_images])
        self.dataset = dataset.select(indices.tolist())

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, resolution: tuple[int, int], num_channels: int) -> str:
        """What the reference statistics depend on: source, split, N, resolution and colour mode."""
        height, width = resolution
        mode = COLOUR_MODES.get(num_channels, f"{num_channels}ch")
        return f"{self.reference}|split={self.split}|n={len(self)}|{height}x{width}|{mode}"

    def images(self, resolution: tuple[int, int], num_channels: int) -> ReferenceImages:
        """The subset at a model's resolution and channel count."""
        return ReferenceImages(self.dataset, self.key(resolution, num_channels), resolution, num_channels)
