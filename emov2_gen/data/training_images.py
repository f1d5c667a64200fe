"""Images as diffusion-training tensors: resized, cropped, flipped and scaled to [-1, 1], reproducibly.

`TrainingImageDataset` wraps a `datasets.Dataset` from `load_image_dataset` for a `DataLoader`. It follows
the preprocessing of diffusers' `train_unconditional.py` (resize the shorter side, centre or random crop,
optional horizontal flip, normalise to [-1, 1]) but draws the random crop and flip of sample ``i`` in
epoch ``e`` from a generator seeded with ``(seed, e, i)``. A run that is interrupted and resumed therefore
sees exactly the augmentations of an uninterrupted run, whichever process or worker loads the sample and
however far the data loader had prefetched when the checkpoint was written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset
from PIL import Image
from torchvision.transforms.v2 import functional as TF

GREYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def derived_seed(seed: int, *parts: int) -> int:
    """A 32-bit seed mixed from ``seed`` and ``parts`` (e.g. epoch, index), independent for every combination."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def image_channels(image: Image.Image) -> int:
    """1 for a greyscale PIL mode (8/16/32-bit, with or without alpha), 3 otherwise."""
    return 1 if image.mode in GREYSCALE_MODES else 3


def num_classes(dataset: Dataset) -> int:
    """The number of classes of the ``label`` column: its `ClassLabel` size, else the largest label + 1."""
    if "label" not in dataset.column_names:
        raise ValueError("The dataset has no label column; class-conditional training needs one.")
    feature = dataset.features["label"]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return int(max(dataset["label"])) + 1


def image_to_tensor(image: Image.Image, channels: int, preserve_input_precision: bool = False) -> torch.Tensor:
    """A (channels, H, W) float tensor in [0, 1].

    16-bit greyscale images keep their full precision when ``preserve_input_precision`` is set (scaled by
    1/65535); otherwise every image goes through 8 bits, as `PIL.Image.convert("L" | "RGB")` does.
    """
    if channels not in (1, 3):
        raise ValueError(f"Images must have 1 (greyscale) or 3 (RGB) channels, got {channels}.")
    if preserve_input_precision and image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float32) / 65535.0
        tensor = torch.from_numpy(array)[None]
        return tensor.expand(channels, -1, -1).clone()
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


class TrainingImageDataset(torch.utils.data.Dataset):
    """Training samples ``{"images": (C, R, R) tensor in [-1, 1][, "class_labels": int]}`` from an image dataset.

    Call `set_epoch` before each epoch so that random crops and flips change from epoch to epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        resolution: int,
        channels: int,
        center_crop: bool = False,
        random_flip: bool = False,
        with_labels: bool = False,
        preserve_input_precision: bool = False,
        seed: int = 0,
    ):
        if with_labels and "label" not in dataset.column_names:
            raise ValueError("The dataset has no label column; class-conditional training needs one.")
        self.dataset = dataset
        self.resolution = resolution
        self.channels = channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.with_labels = with_labels
        self.preserve_input_precision = preserve_input_precision
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        image = image_to_tensor(example["image"], self.channels, self.preserve_input_precision)
        image = TF.resize(image, [self.resolution], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        height, width = image.shape[-2:]
        if self.center_crop:
            image = TF.center_crop(image, [self.resolution, self.resolution])
        else:
            top = int(torch.randint(height - self.resolution + 1, (1,), generator=generator))
            left = int(torch.randint(width - self.resolution + 1, (1,), generator=generator))
            image = TF.crop(image, top, left, self.resolution, self.resolution)
        if self.random_flip and torch.rand((), generator=generator) < 0.5:
            image = TF.horizontal_flip(image)
        sample = {"images": image * 2.0 - 1.0}
        if self.with_labels:
            sample["class_labels"] = int(example["label"])
        return sample
