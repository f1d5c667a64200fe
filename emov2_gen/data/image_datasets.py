"""One way to get an image dataset, shared by training and FID evaluation.

Every source ends up as a `datasets.Dataset` with an ``image`` column (PIL images) and, when the
source has one, a ``label`` column of ints:

- ``dataset_name``: a hub name (online users) or a local ``datasets`` directory/script, e.g.
  ``../shared/data/mnist`` -- the same ``load_dataset`` code path either way;
- ``train_data_dir``: a folder of images (``imagefolder``; sub-folder names become labels);
- neither: scikit-learn's bundled 8x8 digits, the offline default that exists on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, load_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "class", "fine_label")


def digits_dataset() -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits (values 0..16) as greyscale PIL images with labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"image": list(images), "label": digits.target.tolist()}, features=features)


def _check_image_dir(train_data_dir: str) -> None:
    path = Path(train_data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--train_data_dir {train_data_dir!r} does not exist or is not a directory.")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file()):
        raise ValueError(
            f"--train_data_dir {train_data_dir!r} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})."
        )


def _standardise_columns(dataset: Dataset, source: str) -> Dataset:
    """Rename the image/label columns to ``image``/``label`` and drop everything else."""
    image_column = next((c for c in IMAGE_COLUMN_CANDIDATES if c in dataset.column_names), None)
    if image_column is None:
        raise ValueError(f"{source} has no image column; columns are {dataset.column_names}.")
    label_column = next((c for c in LABEL_COLUMN_CANDIDATES if c in dataset.column_names), None)
    keep = {image_column: "image"}
    if label_column is not None:
        keep[label_column] = "label"
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    for old, new in keep.items():
        if old != new:
            dataset = dataset.rename_column(old, new)
    if not isinstance(dataset.features["image"], Image):
        dataset = dataset.cast_column("image", Image())
    if len(dataset) == 0:
        raise ValueError(f"{source} is empty.")
    return dataset


def load_image_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    split: str = "train",
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> tuple[Dataset, str]:
    """Load a split as a Dataset with ``image`` (and maybe ``label``) columns.

    Returns the dataset and a short human-readable description of where it came from.
    Raises FileNotFoundError/ValueError with a clear message for a missing or empty source.
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("Pass either dataset_name or train_data_dir, not both.")
    if train_data_dir is not None:
        _check_image_dir(train_data_dir)
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
        source = f"image folder {train_data_dir}"
    elif dataset_name is not None:
        if dataset_name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(dataset_name)):
            raise FileNotFoundError(f"Dataset directory {dataset_name!r} does not exist.")
        dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
        source = f"dataset {dataset_name} (split {split})"
    else:
        dataset = digits_dataset()
        source = "scikit-learn digits (offline default, 1,797 8x8 greyscale images)"
    return _standardise_columns(dataset, source), source
