import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Image
from PIL import Image as PILImage

from emov2_gen.data.segmentation_datasets import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationDataset,
    SegmentationLayout,
    binary_mask,
    build_eval_transform,
    build_train_transform,
    hrf_mmseg_split,
    load_segmentation_dataset,
    photometric_distortion,
    segmentation_folder_dataset,
)
from emov2_gen.data.synthetic_vessels import SyntheticVesselDataset, write_synthetic_vessel_folder


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(array).save(path)


def _random_blocks(height, width, cell, seed=0):
    """A random 0/1 block pattern: unlike a checkerboard, no flip or shift maps it onto itself."""
    blocks = np.random.default_rng(seed).integers(0, 2, (height // cell + 1, width // cell + 1), dtype=np.uint8)
    return np.kron(blocks, np.ones((cell, cell), np.uint8))[:height, :width]


@pytest.fixture(scope="module")
def hrf_folder(tmp_path_factory):
    return write_synthetic_vessel_folder(tmp_path_factory.mktemp("hrf"), 3, (64, 96), seed=2)


def test_folder_pairs_images_masks_and_fov(hrf_folder):
    dataset = segmentation_folder_dataset(hrf_folder, "hrf")
    assert dataset.column_names == ["name", "image", "mask", "fov"]
    assert dataset["name"] == ["000", "001", "002"]
    expected = SyntheticVesselDataset(3, (64, 96), seed=2)[2]
    row = dataset[2]
    np.testing.assert_array_equal(np.asarray(row["image"]), expected["image"])
    np.testing.assert_array_equal(binary_mask(row["mask"]), expected["mask"])
    np.testing.assert_array_equal(binary_mask(row["fov"]), expected["fov"])


def test_drive_chase_and_stare_layouts(tmp_path):
    rgb, mask = np.full((8, 8, 3), 90, np.uint8), np.zeros((8, 8), np.uint8)
    mask[2:4] = 255
    drive = tmp_path / "drive"
    for key, split in (("21", "training"), ("22", "training")):
        _save(drive / "images" / f"{key}_{split}.tif", rgb)
        _save(drive / "1st_manual" / f"{key}_manual1.gif", mask)
        _save(drive / "mask" / f"{key}_{split}_mask.gif", np.full((8, 8), 255, np.uint8))
    dataset = segmentation_folder_dataset(drive, "drive")
    assert dataset["name"] == ["21", "22"]
    np.testing.assert_array_equal(binary_mask(dataset[0]["mask"]), mask // 255)

    chase = tmp_path / "chase"  # images and both observers' masks share one folder
    _save(chase / "Image_01L.jpg", rgb)
    _save(chase / "Image_01L_1stHO.png", mask)
    _save(chase / "Image_01L_2ndHO.png", mask)
    dataset = segmentation_folder_dataset(chase, "chase_db1")
    assert dataset["name"] == ["Image_01L"] and dataset.column_names == ["name", "image", "mask"]

    stare = tmp_path / "stare"
    _save(stare / "stare-images" / "im0001.ppm", rgb)
    _save(stare / "labels-ah" / "im0001.ah.ppm", np.repeat(mask[..., None], 3, axis=-1))
    dataset = segmentation_folder_dataset(stare, "stare")
    np.testing.assert_array_equal(binary_mask(dataset[0]["mask"]), mask // 255)


def test_custom_layout_with_one_folder_for_images_and_masks(tmp_path):
    _save(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "a_seg.png", np.zeros((4, 4), np.uint8))
    layout = SegmentationLayout(
        image_dir=".", mask_dir=".", fov_dir=None, image_pattern="{key}.png", mask_pattern="{key}_seg.png"
    )
    assert segmentation_folder_dataset(tmp_path, layout)["name"] == ["a"]  # a_seg.png is a mask, not a second image


def test_folder_errors(tmp_path, hrf_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        segmentation_folder_dataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        segmentation_folder_dataset(tmp_path / "empty")
    _save(tmp_path / "empty" / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="Mask directory"):
        segmentation_folder_dataset(tmp_path / "empty")
    (hrf_folder / "manual1" / "001.png").rename(tmp_path / "moved.png")
    try:
        with pytest.raises(ValueError, match=r"do not pair up.*'001'"):
            segmentation_folder_dataset(hrf_folder)
    finally:
        (tmp_path / "moved.png").rename(hrf_folder / "manual1" / "001.png")
    with pytest.raises(ValueError, match="Unknown layout"):
        segmentation_folder_dataset(hrf_folder, "drivee")
    with pytest.raises(ValueError, match="exactly once"):
        segmentation_folder_dataset(hrf_folder, SegmentationLayout(image_pattern="*.png"))


def test_hrf_mmseg_split(tmp_path):
    for group in ("dr", "g", "h"):
        for number in range(1, 16):
            _save(tmp_path / "images" / f"{number:02d}_{group}.jpg", np.zeros((4, 4, 3), np.uint8))
            _save(tmp_path / "manual1" / f"{number:02d}_{group}.tif", np.zeros((4, 4), np.uint8))
            _save(tmp_path / "mask" / f"{number:02d}_{group}_mask.tif", np.zeros((4, 4), np.uint8))
    dataset = segmentation_folder_dataset(tmp_path, "hrf")
    train, validation = hrf_mmseg_split(dataset, "train"), hrf_mmseg_split(dataset, "validation")
    assert len(train) == 15 and len(validation) == 30
    assert sorted(train["name"])[:6] == ["01_dr", "01_g", "01_h", "02_dr", "02_g", "02_h"]
    assert "05_h" in train["name"] and "06_dr" in validation["name"] and "15_g" in validation["name"]
    with pytest.raises(ValueError, match="not an HRF image name"):
        hrf_mmseg_split(dataset.remove_columns("name").add_column("name", ["bad"] * 45), "train")
    with pytest.raises(ValueError, match="split must be"):
        hrf_mmseg_split(dataset, "test")


def test_hub_style_dataset_columns(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    masks = [(rng.random((8, 8)) > 0.5).astype(np.uint8) * 255 for _ in range(2)]
    features = Features({"img": Image(), "annotation": Image(), "extra": Image()})
    hub_dir = tmp_path / "hub"  # the hub's parquet layout; split names come from the file names
    (hub_dir / "data").mkdir(parents=True)
    Dataset.from_dict({"img": images, "annotation": masks, "extra": masks}, features=features).to_parquet(
        str(hub_dir / "data" / "train-00000-of-00001.parquet")
    )
    dataset, source = load_segmentation_dataset(dataset_name=str(hub_dir), cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["image", "mask"] and "split train" in source
    np.testing.assert_array_equal(binary_mask(dataset[1]["mask"]), masks[1] // 255)
    explicit, _ = load_segmentation_dataset(
        dataset_name=str(hub_dir), mask_column="extra", fov_column="annotation", cache_dir=str(tmp_path / "cache")
    )
    assert explicit.column_names == ["image", "mask", "fov"]
    with pytest.raises(ValueError, match="no mask column 'missing'"):
        load_segmentation_dataset(dataset_name=str(hub_dir), mask_column="missing", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError):
        load_segmentation_dataset(dataset_name=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="either"):
        load_segmentation_dataset(dataset_name="x", data_dir="y")


def test_synthetic_default_and_its_splits():
    options = dict(num_synthetic_samples=2, synthetic_size=(64, 64), seed=1)
    train, source = load_segmentation_dataset(**options)
    validation, _ = load_segmentation_dataset(split="validation", **options)
    assert isinstance(train, SyntheticVesselDataset) and len(train) == 2 and "synthetic" in source
    assert not np.array_equal(train[0]["image"], validation[0]["image"])


def test_binary_mask_conversions():
    np.testing.assert_array_equal(binary_mask(np.array([[0, 255], [255, 0]], np.uint8)), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(binary_mask(np.array([[0, 1]], np.uint8)), [[0, 1]])
    np.testing.assert_array_equal(binary_mask(np.array([[3, 250, 127, 128]], np.uint8)), [[0, 1, 0, 1]])  # JPEG noise
    rgb = PILImage.fromarray(np.stack([np.array([[0, 255]], np.uint8)] * 3, axis=-1))
    np.testing.assert_array_equal(binary_mask(rgb), [[0, 1]])
    with pytest.raises(ValueError, match="not a binary"):
        binary_mask(np.array([[0, 1, 2, 5]], np.uint8))


def test_eval_transform_only_normalises():
    sample = SyntheticVesselDataset(1, (48, 40), seed=0)[0]
    item = SegmentationDataset([sample], build_eval_transform())[0]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    expected = (torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(item["pixel_values"], expected)
    assert torch.equal(item["labels"], torch.from_numpy(sample["mask"]).long())
    assert torch.equal(item["fov"], torch.from_numpy(sample["fov"]).bool())
    assert "fov" not in SegmentationDataset([sample], build_eval_transform(), use_fov=False)[0]


def test_train_transform_moves_image_and_masks_together():
    blocks = _random_blocks(120, 100, 12)
    sample = {"image": np.repeat(blocks[..., None] * 255, 3, axis=-1), "mask": blocks, "fov": np.ones_like(blocks)}
    dataset = SegmentationDataset([sample], build_train_transform(scale=(100, 120), crop_size=64, photometric=False))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.manual_seed(0)
    for _ in range(10):
        item = dataset[0]
        labels = item["labels"]
        assert item["pixel_values"].shape == (3, 64, 64) and labels.shape == (64, 64)
        assert set(labels.unique().tolist()) <= {0, 1, IGNORE_INDEX}  # nearest interpolation only
        brightness = (item["pixel_values"] * std + mean).mean(0)
        # Compare away from label edges (where bilinear and nearest resizing legitimately differ).
        as_float = labels.float()[None, None]
        uniform = (F.max_pool2d(as_float, 5, 1, 2) == -F.max_pool2d(-as_float, 5, 1, 2))[0, 0]
        uniform &= labels != IGNORE_INDEX
        assert uniform.float().mean() > 0.3
        assert torch.equal((brightness > 0.5)[uniform], (labels == 1)[uniform]), "image and mask moved differently"
        assert torch.equal(item["fov"], labels != IGNORE_INDEX)


def test_train_transform_pads_small_images_with_ignore_index():
    ones = np.ones((20, 30), np.uint8)
    sample = {"image": np.full((20, 30, 3), 200, np.uint8), "mask": ones, "fov": ones}
    dataset = SegmentationDataset([sample], build_train_transform(scale=(30, 20), crop_size=64, ratio_range=(1.0, 1.0)))
    item = dataset[0]
    assert item["labels"].shape == (64, 64)
    assert (item["labels"] == 1).sum() == 20 * 30 and (item["labels"] == IGNORE_INDEX).sum() == 64 * 64 - 600
    assert torch.equal(item["fov"], item["labels"] == 1)


def test_photometric_distortion_keeps_channel_order():
    red = torch.zeros(3, 16, 16, dtype=torch.uint8)
    red[0], red[1], red[2] = 200, 60, 20
    torch.manual_seed(0)
    distort = photometric_distortion()
    outputs = [distort(red).float().mean(dim=(1, 2)) for _ in range(40)]
    assert all(out[0] > out[1:].max() for out in outputs)  # hue moves at most 36 degrees: red stays the top channel
    assert len({tuple(out.tolist()) for out in outputs}) > 10, "the distortion should actually vary"


def test_dataset_rejects_mismatched_sizes():
    sample = {"image": np.zeros((8, 8, 3), np.uint8), "mask": np.zeros((8, 9), np.uint8)}
    with pytest.raises(ValueError, match="labels has size"):
        SegmentationDataset([sample])[0]
    with pytest.raises(ValueError, match="at least one"):
        SegmentationDataset([])
