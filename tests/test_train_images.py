"""emov2_gen.data.training_images: image -> training tensor conversion and reproducible augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image

from emov2_gen.data.image_datasets import digits_dataset
from emov2_gen.data.training_images import (
    TrainingImageDataset,
    derived_seed,
    image_channels,
    image_to_tensor,
    num_classes,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def ramp_image(width: int, height: int) -> Image.Image:
    """A greyscale image whose value grows left to right, so flips and crops are visible."""
    row = np.linspace(0, 255, width).round().astype(np.uint8)
    return Image.fromarray(np.tile(row, (height, 1)), "L")


def test_channels_follow_the_image_mode():
    assert image_channels(Image.new("L", (4, 4))) == 1
    assert image_channels(Image.new("I;16", (4, 4))) == 1
    assert image_channels(Image.new("RGB", (4, 4))) == 3
    assert image_channels(Image.new("P", (4, 4))) == 3


def test_image_to_tensor_scales_8_bit_images_to_unit_range():
    rgb = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5, "RGB")
    tensor = image_to_tensor(rgb, channels=3)
    assert tensor.shape == (3, 4, 4)
    torch.testing.assert_close(tensor[:, 1, 2], torch.tensor(np.asarray(rgb)[1, 2] / 255.0, dtype=torch.float32))
    grey = image_to_tensor(rgb, channels=1)
    assert grey.shape == (1, 4, 4)
    rgb_from_grey = image_to_tensor(ramp_image(4, 4), channels=3)
    torch.testing.assert_close(rgb_from_grey[0], rgb_from_grey[2])
    with pytest.raises(ValueError, match="1 \\(greyscale\\) or 3"):
        image_to_tensor(rgb, channels=2)


def test_sixteen_bit_precision_is_kept_only_when_asked(tmp_path):
    values = np.array([[0, 1000], [1001, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = Image.open(path)
    precise = image_to_tensor(image, channels=1, preserve_input_precision=True)
    torch.testing.assert_close(precise[0], torch.tensor(values / 65535.0, dtype=torch.float32))
    assert precise[0, 0, 1] != precise[0, 1, 0]  # 1000 and 1001 stay distinct
    eight_bit = image_to_tensor(image, channels=1)
    assert torch.all(eight_bit * 255 == torch.round(eight_bit * 255))


def test_digits_are_upscaled_and_normalised():
    dataset = TrainingImageDataset(digits_dataset(), resolution=16, channels=1, with_labels=True)
    sample = dataset[5]
    assert sample["images"].shape == (1, 16, 16)
    assert -1 <= sample["images"].min() < sample["images"].max() <= 1
    assert sample["class_labels"] == digits_dataset()[5]["label"]


def test_random_crop_and_flip_depend_only_on_seed_epoch_and_index():
    images = Dataset.from_dict({"image": [ramp_image(24, 16)] * 4}, features=Features({"image": ImageFeature()}))
    dataset = TrainingImageDataset(images, resolution=16, channels=1, random_flip=True, seed=3)
    views = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        first = dataset[1]["images"]
        torch.testing.assert_close(dataset[1]["images"], first, rtol=0, atol=0)  # same epoch, same sample
        views.add(first.numpy().tobytes())
    assert len(views) > 2  # crops (9 offsets) and flips vary over the epochs
    dataset.set_epoch(2)
    other_seed = TrainingImageDataset(images, resolution=16, channels=1, random_flip=True, seed=4)
    other_seed.set_epoch(2)
    assert any(not torch.equal(dataset[i]["images"], other_seed[i]["images"]) for i in range(4))


def test_center_crop_is_deterministic_and_centred():
    images = Dataset.from_dict({"image": [ramp_image(24, 16)]}, features=Features({"image": ImageFeature()}))
    dataset = TrainingImageDataset(images, resolution=16, channels=1, center_crop=True)
    crops = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        crops.append(dataset[0]["images"])
    assert all(torch.equal(crops[0], crop) for crop in crops)
    row = crops[0][0, 0]
    torch.testing.assert_close(row + row.flip(0), torch.zeros_like(row), atol=0.02, rtol=0)  # symmetric around 0


def test_labels_are_required_for_class_conditional_samples():
    images = Dataset.from_dict({"image": [ramp_image(8, 8)]}, features=Features({"image": ImageFeature()}))
    with pytest.raises(ValueError, match="no label column"):
        TrainingImageDataset(images, resolution=8, channels=1, with_labels=True)
    with pytest.raises(ValueError, match="no label column"):
        num_classes(images)


def test_num_classes_from_class_label_or_integer_labels():
    assert num_classes(digits_dataset()) == 10
    plain = Dataset.from_dict({"label": [0, 4, 2]}, features=Features({"label": Value("int64")}))
    assert num_classes(plain) == 5


def test_derived_seeds_are_stable_and_distinct():
    assert derived_seed(0, 1, 2) == derived_seed(0, 1, 2)
    seeds = {derived_seed(seed, epoch, index) for seed in range(3) for epoch in range(3) for index in range(3)}
    assert len(seeds) == 27
