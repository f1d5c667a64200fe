"""Retinal-vessel segmentation data: image/mask(/field-of-view) pairs and the mmseg-style transforms.

Sources, all ending up as rows ``{"image", "mask"[, "fov"][, "name"]}`` (PIL images or uint8 arrays):

- a folder in one of the public layouts (:data:`SEGMENTATION_LAYOUTS`: HRF, DRIVE, CHASE_DB1, STARE) or
  a custom :class:`SegmentationLayout`; files are paired by a key taken from their names;
- a ``datasets`` data set (hub name or local directory) with image and mask columns;
- neither: :class:`~emov2_gen.data.synthetic_vessels.SyntheticVesselDataset`, the offline default.

:class:`SegmentationDataset` turns such rows into model inputs with a torchvision ``transforms.v2``
pipeline that moves image, mask and field of view together. :func:`build_train_transform` reproduces
the mmseg HRF recipe (random rescale 0.5-2.0, random crop, flip, photometric distortion, ImageNet
normalisation; masks use nearest interpolation and padding is labelled :data:`IGNORE_INDEX`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from datasets import Dataset, Image, load_dataset
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms import v2

from .image_datasets import IMAGE_COLUMN_CANDIDATES, IMAGE_EXTENSIONS
from .synthetic_vessels import SyntheticVesselDataset

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEGMENTATION_FILE_EXTENSIONS = IMAGE_EXTENSIONS + (".gif", ".ppm")  # DRIVE masks are GIFs, STARE uses PPM
MASK_COLUMN_CANDIDATES = ("mask", "label", "labels", "annotation", "segmentation_mask", "semantic_segmentation")
FOV_COLUMN_CANDIDATES = ("fov", "fov_mask")


@dataclass(frozen=True)
class SegmentationLayout:
    """Where a data set keeps its files and how their names pair up.

    Directories are relative to the data root. A pattern is a case-insensitive file name in which
    ``{key}`` marks the part shared by an image and its masks and ``*`` matches anything, e.g. DRIVE's
    ``21_training.tif`` / ``21_manual1.gif`` / ``21_training_mask.gif`` pair up through
    ``{key}_*.*`` / ``{key}_manual1.*`` / ``{key}_*_mask.*`` with key ``21``. ``fov_dir=None`` means the
    data set has no field-of-view masks. ``scale`` is mmseg's base (width, height) for random rescaling.
    """

    image_dir: str = "images"
    mask_dir: str = "manual1"
    fov_dir: Optional[str] = "mask"
    image_pattern: str = "{key}.*"
    mask_pattern: str = "{key}.*"
    fov_pattern: str = "{key}_mask.*"
    scale: Optional[tuple[int, int]] = None


# The layouts of the unpacked public archives (the root is the folder holding the listed sub-folders).
SEGMENTATION_LAYOUTS: dict[str, SegmentationLayout] = {
    "hrf": SegmentationLayout(scale=(3504, 2336)),
    "drive": SegmentationLayout(
        mask_dir="1st_manual", image_pattern="{key}_*.*", mask_pattern="{key}_manual1.*",
        fov_pattern="{key}_*_mask.*", scale=(565, 584),
    ),
    "chase_db1": SegmentationLayout(
        image_dir=".", mask_dir=".", fov_dir=None, image_pattern="{key}.jpg", mask_pattern="{key}_1stHO.png",
        scale=(999, 960),
    ),
    "stare": SegmentationLayout(
        image_dir="stare-images", mask_dir="labels-ah", fov_dir=None, image_pattern="{key}.ppm",
        mask_pattern="{key}.ah.ppm", scale=(700, 605),
    ),
}


def _pattern_regex(pattern: str) -> re.Pattern:
    if pattern.count("{key}") != 1:
        raise ValueError(f"File pattern {pattern!r} must contain '{{key}}' exactly once.")
    prefix, suffix = (re.escape(part).replace(r"\*", ".*") for part in pattern.split("{key}"))
    return re.compile(f"{prefix}(?P<key>.+?){suffix}", re.IGNORECASE)


def _files_by_key(directory: Path, pattern: str, what: str) -> dict[str, Path]:
    """Map key -> file for the image files in ``directory`` whose names match ``pattern``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory {str(directory)!r} does not exist.")
    regex = _pattern_regex(pattern)
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        match = regex.fullmatch(path.name)
        if match is None or not path.is_file() or path.suffix.lower() not in SEGMENTATION_FILE_EXTENSIONS:
            continue
        key = match.group("key")
        if key in files:
            raise ValueError(
                f"{what} files {files[key].name!r} and {path.name!r} both match {pattern!r} with key {key!r}."
            )
        files[key] = path
    if not files:
        raise ValueError(f"{what} directory {str(directory)!r} has no image files matching {pattern!r}.")
    return files


def segmentation_folder_dataset(data_dir: Union[str, Path], layout: Union[str, SegmentationLayout] = "hrf") -> Dataset:
    """Pair the images, vessel masks and (if the layout has them) FOV masks under ``data_dir``.

    Returns a ``datasets.Dataset`` with ``name`` (the pairing key), ``image``, ``mask`` and maybe ``fov``
    columns; images are decoded lazily from their paths. Raises FileNotFoundError for a missing folder
    and ValueError for an empty folder or any image without a mask (or mask without an image).
    """
    if isinstance(layout, str):
        if layout not in SEGMENTATION_LAYOUTS:
            raise ValueError(
                f"Unknown layout {layout!r}; choose one of {sorted(SEGMENTATION_LAYOUTS)} or pass a SegmentationLayout."
            )
        layout = SEGMENTATION_LAYOUTS[layout]
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Segmentation data directory {str(root)!r} does not exist.")
    columns = {
        "image": _files_by_key(root / layout.image_dir, layout.image_pattern, "Image"),
        "mask": _files_by_key(root / layout.mask_dir, layout.mask_pattern, "Mask"),
    }
    if layout.fov_dir is not None:
        columns["fov"] = _files_by_key(root / layout.fov_dir, layout.fov_pattern, "Field-of-view")
    # Where images and masks share a folder, a mask file also matches a loose image pattern: drop those.
    mask_paths = {path for column, files in columns.items() if column != "image" for path in files.values()}
    columns["image"] = {key: path for key, path in columns["image"].items() if path not in mask_paths}
    keys = sorted(columns["image"])
    for column, files in columns.items():
        unmatched = sorted(set(files) ^ set(keys))
        if unmatched:
            raise ValueError(
                f"Images and {column} files under {str(root)!r} do not pair up; keys without a partner: "
                f"{unmatched[:10]}{' ...' if len(unmatched) > 10 else ''}. Check the layout's patterns ({layout})."
            )
    data = {"name": keys, **{column: [str(files[key]) for key in keys] for column, files in columns.items()}}
    dataset = Dataset.from_dict(data)
    for column in columns:
        dataset = dataset.cast_column(column, Image())
    return dataset


def hrf_mmseg_split(dataset: Dataset, split: str) -> Dataset:
    """mmseg's HRF split of a folder data set: images 01-05 of each group (dr, g, h) train, 06-15 validate.

    That is 15 training and 30 validation images, as in mmseg's ``tools/dataset_converters/hrf.py``.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    numbers = []
    for name in dataset["name"]:
        match = re.fullmatch(r"(\d+)_(dr|g|h)", name, re.IGNORECASE)
        if match is None:
            raise ValueError(f"{name!r} is not an HRF image name like '01_dr', '07_g' or '15_h'.")
        numbers.append(int(match.group(1)))
    keep = [i for i, number in enumerate(numbers) if (number <= 5) == (split == "train")]
    return dataset.select(keep)


def _standardise_segmentation_columns(
    dataset: Dataset, source: str, image_column: Optional[str], mask_column: Optional[str], fov_column: Optional[str]
) -> Dataset:
    """Keep only the image/mask(/fov) columns of a ``datasets`` data set, renamed to ``image``/``mask``/``fov``."""

    def pick(explicit: Optional[str], candidates: Sequence[str], what: str, required: bool) -> Optional[str]:
        if explicit is not None:
            if explicit not in dataset.column_names:
                raise ValueError(f"{source} has no {what} column {explicit!r}; columns are {dataset.column_names}.")
            return explicit
        found = next((c for c in candidates if c in dataset.column_names), None)
        if found is None and required:
            raise ValueError(
                f"{source} has no {what} column (looked for {candidates}); columns are {dataset.column_names}."
            )
        return found

    chosen = {
        "image": pick(image_column, IMAGE_COLUMN_CANDIDATES, "image", True),
        "mask": pick(mask_column, MASK_COLUMN_CANDIDATES, "mask", True),
        "fov": pick(fov_column, FOV_COLUMN_CANDIDATES, "field-of-view", False),
    }
    renames = {old: new for new, old in chosen.items() if old is not None}
    dataset = dataset.select_columns(list(renames)).rename_columns({o: n for o, n in renames.items() if o != n})
    if len(dataset) == 0:
        raise ValueError(f"{source} is empty.")
    return dataset


def load_segmentation_dataset(
    dataset_name: Optional[str] = None,
    data_dir: Optional[str] = None,
    layout: Union[str, SegmentationLayout] = "hrf",
    split: str = "train",
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    mask_column: Optional[str] = None,
    fov_column: Optional[str] = None,
    num_synthetic_samples: int = 20,
    synthetic_size: tuple[int, int] = (512, 512),
    seed: int = 0,
) -> tuple[Union[Dataset, SyntheticVesselDataset], str]:
    """Raw vessel-segmentation samples from a ``datasets`` data set, a folder, or (neither) synthetic fundi.

    Returns the samples and a short description of their source. ``split`` selects the ``datasets`` split
    and the synthetic stream (different splits never share synthetic samples); a folder holds one split.
    """
    if dataset_name is not None and data_dir is not None:
        raise ValueError("Pass either dataset_name or data_dir, not both.")
    if data_dir is not None:
        layout_name = layout if isinstance(layout, str) else "custom"
        return segmentation_folder_dataset(data_dir, layout), f"folder {data_dir} ({layout_name} layout)"
    if dataset_name is not None:
        if dataset_name.startswith((".", "/", "~")) and not Path(dataset_name).expanduser().exists():
            raise FileNotFoundError(f"Dataset directory {dataset_name!r} does not exist.")
        source = f"dataset {dataset_name} (split {split})"
        dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
        return _standardise_segmentation_columns(dataset, source, image_column, mask_column, fov_column), source
    samples = SyntheticVesselDataset(num_synthetic_samples, synthetic_size, seed=seed, split=split)
    height, width = synthetic_size
    return samples, f"synthetic fundus images (offline default, {num_synthetic_samples} x {height}x{width}, {split})"


def binary_mask(mask: Union[PILImage.Image, np.ndarray], what: str = "mask") -> np.ndarray:
    """A 0/1 uint8 (H, W) array from a vessel or FOV mask stored as 0/1 or 0/255 (any mode, JPEG noise tolerated).

    Values <= 1 are taken as class ids; masks whose maximum is >= 128 are thresholded at 128 (so 255 -> 1);
    anything else (e.g. a multi-class label map) raises instead of being silently binarised.
    """
    if isinstance(mask, PILImage.Image):
        mask = mask.convert("L")
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"Expected a 2-D {what}, got shape {array.shape}.")
    peak = int(array.max()) if array.size else 0
    if peak <= 1:
        return array.astype(np.uint8)
    if peak >= 128:
        return (array >= 128).astype(np.uint8)
    raise ValueError(f"{what} has values up to {peak}: not a binary 0/1 or 0/255 vessel mask.")


def _mask_tensor(mask: Union[PILImage.Image, np.ndarray], what: str) -> tv_tensors.Mask:
    return tv_tensors.Mask(torch.from_numpy(binary_mask(mask, what)))


class SegmentationDataset(torch.utils.data.Dataset):
    """Model inputs from raw samples: ``{"pixel_values": (3,H,W), "labels": long (H,W)[, "fov": bool (H,W)]}``.

    ``samples`` is anything indexable that yields ``{"image", "mask"[, "fov"]}`` rows (a ``datasets.Dataset``
    from :func:`load_segmentation_dataset`, a :class:`SyntheticVesselDataset`, ...). ``transform`` is a
    ``transforms.v2`` pipeline applied jointly to the tv_tensors ``image`` (Image), ``labels`` and ``fov``
    (Masks); labels are 0 background / 1 vessel / :data:`IGNORE_INDEX` where transforms padded, and pixels
    the transforms padded are outside the field of view. Without a transform the image stays uint8.
    """

    def __init__(self, samples: Any, transform: Optional[v2.Transform] = None, use_fov: bool = True):
        if len(samples) == 0:
            raise ValueError("SegmentationDataset needs at least one sample.")
        self.samples, self.transform, self.use_fov = samples, transform, use_fov

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.samples[index]
        image = row["image"].convert("RGB") if isinstance(row["image"], PILImage.Image) else row["image"]
        item: dict[str, Any] = {"image": v2.functional.to_image(image), "labels": _mask_tensor(row["mask"], "mask")}
        if self.use_fov and row.get("fov") is not None:
            item["fov"] = _mask_tensor(row["fov"], "field-of-view mask")
        image_size = tuple(item["image"].shape[-2:])
        for key in ("labels", "fov"):
            if key in item and tuple(item[key].shape) != image_size:
                raise ValueError(
                    f"Sample {index}: {key} has size {tuple(item[key].shape)} but the image is {image_size}."
                )
        if self.transform is not None:
            item = self.transform(item)
        output = {
            "pixel_values": item["image"].as_subclass(torch.Tensor),
            "labels": item["labels"].as_subclass(torch.Tensor).long(),
        }
        if "fov" in item:
            output["fov"] = item["fov"].as_subclass(torch.Tensor) == 1  # padding (255) is outside the field of view
        return output


def photometric_distortion() -> v2.Transform:
    """mmseg's PhotoMetricDistortion from torchvision parts, each step applied with probability 0.5.

    Brightness +-32/255 (multiplicative here, additive in mmseg), contrast and saturation 0.5-1.5, hue
    +-18/180 of the circle. Unlike torchvision's SSD-style RandomPhotometricDistort it never shuffles
    colour channels, which would destroy the red/green structure of fundus images.
    """
    jitters = (
        v2.ColorJitter(brightness=32 / 255),
        v2.ColorJitter(contrast=(0.5, 1.5)),
        v2.ColorJitter(saturation=(0.5, 1.5)),
        v2.ColorJitter(hue=18 / 180),
    )
    return v2.Compose([v2.RandomApply([jitter], p=0.5) for jitter in jitters])


def normalize_transform() -> v2.Transform:
    """uint8 image -> float in [0, 1] -> ImageNet mean/std; masks pass through unchanged."""
    to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    return v2.Compose([to_float, v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_train_transform(
    scale: tuple[int, int],
    crop_size: Union[int, tuple[int, int]] = 256,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    flip_prob: float = 0.5,
    photometric: bool = True,
) -> v2.Transform:
    """The mmseg HRF training pipeline on image + masks; ``scale`` is the base (width, height) (see the layouts).

    RandomResize(scale, ratio_range, keep_ratio) -> RandomCrop(crop_size; smaller images are padded with
    black and IGNORE_INDEX labels) -> horizontal flip -> photometric distortion -> ImageNet normalisation.
    Masks are resized with nearest interpolation (torchvision does that for Mask). mmseg's crop option
    cat_max_ratio=0.75 is left out: on vessel data the background always exceeds 75%, so it never acts.
    """
    if not 0 < ratio_range[0] <= ratio_range[1]:
        raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range}.")
    steps: list[v2.Transform] = [
        v2.ScaleJitter(target_size=tuple(scale), scale_range=tuple(ratio_range)),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if photometric:
        steps.append(photometric_distortion())
    steps.append(normalize_transform())
    return v2.Compose(steps)


def build_eval_transform() -> v2.Transform:
    """Evaluation keeps the full image (scored with sliding-window inference): normalisation only."""
    return normalize_transform()
