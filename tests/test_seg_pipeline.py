"""EMOv2SegmentationPipeline: input types, normalisation, sliding windows, output types, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emov2_gen import EMOv2UNetForSegmentation
from emov2_gen.data.synthetic_vessels import generate_vessel_sample
from emov2_gen.pipelines.pipeline_emov2_segmentation import EMOv2SegmentationPipeline

TINY = dict(base_channels=8, num_levels=3, head_dim=8, window_size=4, decode_head_channels=4, auxiliary_head_channels=0)
pytestmark = pytest.mark.usefixtures("one_thread")
IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture
def pipeline() -> EMOv2SegmentationPipeline:
    torch.manual_seed(0)
    model = EMOv2UNetForSegmentation(**TINY).eval()
    pipe = EMOv2SegmentationPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def fundus() -> np.ndarray:
    return generate_vessel_sample((40, 52), seed=0)[0]


def test_whole_image_output_is_the_softmax_of_the_model_on_imagenet_normalised_pixels(pipeline, fundus):
    out = pipeline(fundus)
    pixels = (torch.from_numpy(fundus).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    with torch.no_grad():
        expected = pipeline.model(pixels[None]).logits.softmax(dim=1)[0]
    np.testing.assert_allclose(out.probabilities[0], expected.numpy(), atol=1e-5)
    assert out.masks[0].dtype == np.uint8 and out.masks[0].shape == (40, 52)
    np.testing.assert_array_equal(out.masks[0], out.probabilities[0].argmax(axis=0))
    np.testing.assert_allclose(out.probabilities[0].sum(axis=0), 1.0, atol=1e-5)


def test_every_input_type_gives_the_same_segmentation(pipeline, fundus):
    reference = pipeline(fundus).probabilities[0]
    as_float_tensor = torch.from_numpy(fundus).permute(2, 0, 1).float() / 255
    for image in (Image.fromarray(fundus), torch.from_numpy(fundus).permute(2, 0, 1), as_float_tensor):
        np.testing.assert_allclose(pipeline(image).probabilities[0], reference, atol=1e-5)
    batch = pipeline(torch.stack([as_float_tensor, as_float_tensor.flip(-1)]))
    assert len(batch.masks) == 2
    np.testing.assert_allclose(batch.probabilities[0], reference, atol=1e-5)
    grey = pipeline(fundus[..., 1])  # (H, W) greyscale -> replicated to RGB
    assert grey.probabilities[0].shape == (2, 40, 52)


def test_large_images_are_segmented_in_overlapping_crop_sized_windows(pipeline, monkeypatch):
    seen = []
    forward = pipeline.model.forward

    def recording_forward(pixel_values, *args, **kwargs):
        seen.append(tuple(pixel_values.shape))
        return forward(pixel_values, *args, **kwargs)

    monkeypatch.setattr(pipeline.model, "forward", recording_forward)
    image = generate_vessel_sample((70, 50), seed=1)[0]
    out = pipeline([image, image[:20, :24]], crop_size=32, stride=16, windows_per_batch=4)
    assert out.masks[0].shape == (70, 50) and out.masks[1].shape == (20, 24)
    assert all(shape[1:] == (3, 32, 32) for shape in seen)
    # 70 x 50 with 32-px windows every 16 px: 4 x 3 windows (the last ones moved back to the border); 1 for the small image.
    assert sum(shape[0] for shape in seen) == 4 * 3 + 1


def test_window_settings_are_saved_with_the_pipeline_and_reload_to_identical_output(pipeline, fundus, tmp_path):
    windowed = EMOv2SegmentationPipeline(pipeline.model, crop_size=32, stride=24)
    windowed.set_progress_bar_config(disable=True)
    windowed.save_pretrained(tmp_path)
    loaded = EMOv2SegmentationPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.crop_size == 32 and loaded.config.stride == 24
    np.testing.assert_array_equal(loaded(fundus).probabilities[0], windowed(fundus).probabilities[0])
    whole = pipeline(fundus).probabilities[0]
    assert not np.allclose(windowed(fundus).probabilities[0], whole)  # the windows really were used


def test_output_types(pipeline, fundus):
    pil = pipeline(fundus, output_type="pil")
    assert isinstance(pil.masks[0], Image.Image) and pil.masks[0].size == (52, 40)
    assert set(np.unique(np.asarray(pil.masks[0]))) <= {0, 255}
    np.testing.assert_array_equal(np.asarray(pil.masks[0]) // 255, pipeline(fundus).masks[0])
    pt = pipeline(fundus, output_type="pt")
    assert pt.masks[0].dtype == torch.long and pt.probabilities[0].shape == (2, 40, 52)
    masks, probabilities = pipeline(fundus, return_dict=False)
    assert masks[0].shape == (40, 52) and probabilities[0].shape == (2, 40, 52)


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "message"),
    [
        (np.zeros((8, 8, 3), np.uint8), {"output_type": "latent"}, ValueError, "output_type"),
        (np.full((8, 8, 3), 2.0, np.float32), {}, ValueError, r"\[0, 1\]"),
        (np.zeros((8, 8, 4), np.uint8), {}, ValueError, "numpy image"),
        (torch.zeros(8, 8, 3), {}, ValueError, "tensor image"),
        (np.zeros((8, 8, 3), np.int32), {}, ValueError, "uint8"),
        ("image.png", {}, TypeError, "Unsupported image type"),
        ([], {}, ValueError, "No images"),
    ],
)
def test_bad_input_raises(pipeline, images, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipeline(images, **kwargs)
