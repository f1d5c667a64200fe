import pytest
import torch

from emov2_gen.evaluation.sliding_window import sliding_window_inference, window_starts


@pytest.fixture
def pointwise_model():
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 2, kernel_size=1)  # translation-equivariant per pixel: windows must not matter


def test_window_starts_match_mmseg_grid():
    # (length - crop + stride - 1) // stride + 1 windows, the last one moved back to end at the border.
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(256, 256, 170) == [0]
    assert window_starts(584, 256, 170) == [0, 170, 328]


@pytest.mark.parametrize("size", [(37, 53), (33, 16), (64, 64)])
def test_pointwise_model_gives_the_whole_image_result(pointwise_model, size):
    image = torch.randn(2, 3, *size)
    logits = sliding_window_inference(pointwise_model, image, crop_size=(16, 24), stride=(11, 13), num_classes=2)
    assert logits.shape == (2, 2, *size)
    with torch.no_grad():
        torch.testing.assert_close(logits, pointwise_model(image))


def test_image_smaller_than_the_crop_is_padded_and_cropped_back(pointwise_model):
    seen_shapes = []

    def fixed_size_model(x):
        seen_shapes.append(tuple(x.shape[-2:]))
        return pointwise_model(x)

    image = torch.randn(1, 3, 10, 7)
    logits = sliding_window_inference(fixed_size_model, image, crop_size=16, stride=8, num_classes=2)
    assert logits.shape == (1, 2, 10, 7) and seen_shapes == [(16, 16)]
    with torch.no_grad():
        torch.testing.assert_close(logits, pointwise_model(image))


def test_overlapping_windows_are_averaged():
    image = torch.arange(6.0).reshape(1, 1, 1, 6)

    def window_mean(x):
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)

    # Windows [0:4] (mean 1.5) and [2:6] (mean 3.5); pixels 2-3 lie in both -> 2.5.
    logits = sliding_window_inference(window_mean, image, crop_size=(1, 4), stride=(1, 2), num_classes=1)
    torch.testing.assert_close(logits.flatten(), torch.tensor([1.5, 1.5, 2.5, 2.5, 3.5, 3.5]))


def test_window_batching_does_not_change_the_result():
    torch.manual_seed(1)
    model = torch.nn.Conv2d(3, 2, kernel_size=3, padding=1)  # sees window borders, so the grid matters
    image = torch.randn(2, 3, 30, 41)
    one_by_one = sliding_window_inference(model, image, 16, 10, num_classes=2, windows_per_batch=1)
    batched = sliding_window_inference(model, image, 16, 10, num_classes=2, windows_per_batch=7)
    torch.testing.assert_close(one_by_one, batched)
    with torch.no_grad():
        assert not torch.allclose(one_by_one, model(image), atol=1e-4)


def test_bad_arguments_raise(pointwise_model):
    image = torch.randn(1, 3, 20, 20)
    with pytest.raises(ValueError, match="leave pixels unpredicted"):
        sliding_window_inference(pointwise_model, image, crop_size=8, stride=9, num_classes=2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sliding_window_inference(pointwise_model, image[0], crop_size=8, stride=4, num_classes=2)
    with pytest.raises(ValueError, match="model_fn returned shape"):
        sliding_window_inference(pointwise_model, image, crop_size=8, stride=4, num_classes=3)
    with pytest.raises(ValueError, match="model_fn returned shape"):
        downsampling = torch.nn.Conv2d(3, 2, kernel_size=2, stride=2)
        sliding_window_inference(downsampling, image, crop_size=8, stride=4, num_classes=2)
    with pytest.raises(ValueError, match="positive"):
        sliding_window_inference(pointwise_model, image, crop_size=0, stride=4, num_classes=2)
