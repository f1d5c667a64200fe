import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation, distance_transform_edt
from skimage.measure import label

from emov2_gen.data.synthetic_vessels import (
    SyntheticVesselDataset,
    generate_vessel_sample,
    sample_seed,
    write_synthetic_vessel_folder,
)


@pytest.fixture(scope="module")
def sample():
    return generate_vessel_sample((384, 416), seed=3)


def test_sample_types_and_values(sample):
    image, mask, fov = sample
    assert image.shape == (384, 416, 3) and image.dtype == np.uint8
    assert mask.shape == fov.shape == (384, 416) and mask.dtype == fov.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and set(np.unique(fov)) == {0, 1}
    assert not np.any(mask & (1 - fov)), "vessel pixels outside the field of view"


def test_same_seed_same_sample_other_seed_differs(sample):
    again = generate_vessel_sample((384, 416), seed=3)
    other = generate_vessel_sample((384, 416), seed=4)
    for a, b in zip(sample, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(sample[1], other[1])


def test_field_of_view_is_a_centred_disc(sample):
    _, _, fov = sample
    short = 384
    area = fov.sum() / short**2
    assert np.pi * 0.43**2 < area < np.pi * 0.49**2  # radius 0.44..0.48 of the short side
    rows, cols = np.nonzero(fov)
    assert abs(rows.mean() - 192) < 0.03 * short and abs(cols.mean() - 208) < 0.03 * short
    image = sample[0]
    assert image[fov == 0].mean() < 5  # dark surround, like a real fundus photo


def test_vessels_are_darker_than_the_background_around_them(sample):
    image, mask, fov = sample
    vessel = mask.astype(bool)
    ring = binary_dilation(vessel, iterations=4) & ~binary_dilation(vessel, iterations=1) & fov.astype(bool)
    green = image[..., 1].astype(float)
    assert green[vessel].mean() < green[ring].mean() - 5
    red_contrast = image[..., 0][ring].mean() - image[..., 0][vessel].mean()
    assert red_contrast < green[ring].mean() - green[vessel].mean()  # vessels show best in green, as in fundus photos


def test_vessel_tree_is_connected_and_tapers():
    _, mask, _ = generate_vessel_sample((512, 512), seed=7)
    components = label(mask, connectivity=2)
    sizes = np.bincount(components.ravel())[1:]
    assert sizes.max() > 0.8 * mask.sum(), "vessels should form trees grown from the optic disc"
    radius = distance_transform_edt(mask)
    assert radius.max() >= 2.5, "trunks near the disc should be several pixels wide"
    thin = (radius > 0) & (radius <= 1.0) & ~binary_dilation(radius > 1.0, iterations=2)
    assert thin.sum() > 0.15 * mask.sum(), "most of the tree length should be ~1-2 px wide capillaries"


def test_rejects_tiny_size():
    with pytest.raises(ValueError, match="at least 32x32"):
        generate_vessel_sample((16, 64), seed=0)


def test_dataset_items_and_split_streams():
    train = SyntheticVesselDataset(3, (96, 96), seed=5)
    validation = SyntheticVesselDataset(3, (96, 96), seed=5, split="validation")
    assert len(train) == 3
    item = train[1]
    expected = generate_vessel_sample((96, 96), sample_seed(5, "train", 1))
    for key, array in zip(("image", "mask", "fov"), expected):
        np.testing.assert_array_equal(item[key], array)
    np.testing.assert_array_equal(train[-1]["image"], train[2]["image"])
    assert not np.array_equal(train[0]["image"], train[1]["image"])
    assert not np.array_equal(train[0]["image"], validation[0]["image"])
    with pytest.raises(IndexError):
        train[3]
    with pytest.raises(ValueError, match="positive"):
        SyntheticVesselDataset(0)


def test_write_folder_in_hrf_layout(tmp_path):
    root = write_synthetic_vessel_folder(tmp_path / "hrf", 2, (64, 80), seed=1)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["000.png", "001.png"]
    assert sorted(p.name for p in (root / "mask").iterdir()) == ["000_mask.png", "001_mask.png"]
    sample = SyntheticVesselDataset(2, (64, 80), seed=1)[1]
    np.testing.assert_array_equal(np.asarray(Image.open(root / "images" / "001.png")), sample["image"])
    np.testing.assert_array_equal(np.asarray(Image.open(root / "manual1" / "001.png")), sample["mask"] * 255)
    np.testing.assert_array_equal(np.asarray(Image.open(root / "mask" / "001_mask.png")), sample["fov"] * 255)
