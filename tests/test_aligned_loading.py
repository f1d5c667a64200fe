"""`AlignedLoadingMixin`: every model's `from_pretrained` reproduces the saved model bit for bit on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emov2_gen import EMOv2Backbone, EMOv2UNetForSegmentation
from emov2_gen.models import EMOv2Transformer2DModel
from emov2_gen.models.aligned_loading import ALIGNMENT_BYTES, realign_cpu_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_models(make_tiny_unet) -> dict[str, tuple[nn.Module, tuple]]:
    """(model, forward args) for each model class, seeded."""
    torch.manual_seed(0)
    seg = EMOv2UNetForSegmentation(
        base_channels=8, num_levels=3, head_dim=8, window_size=4, decode_head_channels=4, auxiliary_head_channels=0
    )
    torch.manual_seed(0)
    dit = EMOv2Transformer2DModel(
        sample_size=8, in_channels=4, num_class_embeds=11, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        window_size=2, expansion_ratio=2.0,
    )
    torch.manual_seed(0)
    backbone = EMOv2Backbone.from_preset("emov2-1m")
    return {
        "unet": (make_tiny_unet(), (torch.randn(2, 3, 16, 16), torch.tensor([3, 700]))),
        "segmentation": (seg, (torch.rand(1, 3, 40, 52),)),
        "transformer": (dit, (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10]))),
        "backbone": (backbone, (torch.rand(1, 3, 64, 64),)),
    }


def first_output(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))


def test_reloaded_models_have_aligned_weights_and_identical_outputs(make_tiny_unet, tmp_path):
    for name, (model, args) in tiny_models(make_tiny_unet).items():
        model.eval().save_pretrained(tmp_path / name)
        loaded = type(model).from_pretrained(tmp_path / name).eval()
        misaligned = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.data_ptr() % ALIGNMENT_BYTES]
        assert not misaligned, (name, misaligned[:3])
        with torch.no_grad():
            torch.testing.assert_close(first_output(loaded(*args)), first_output(model(*args)), rtol=0, atol=0, msg=name)


def test_output_loading_info_still_returns_the_pair(make_tiny_unet, tmp_path):
    model = make_tiny_unet()
    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert set(info) >= {"missing_keys", "unexpected_keys"} and not info["missing_keys"]
    assert all(p.data_ptr() % ALIGNMENT_BYTES == 0 for p in loaded.parameters())


def test_realign_copies_only_misaligned_tensors_and_keeps_their_values():
    layer = nn.Linear(3, 5)
    storage = torch.arange(16.0)
    layer.weight = nn.Parameter(storage[1:16].view(5, 3))  # 4 bytes past an aligned start
    aligned_bias = layer.bias.data_ptr()
    assert layer.weight.data_ptr() % ALIGNMENT_BYTES
    realign_cpu_tensors(layer)
    assert layer.weight.data_ptr() % ALIGNMENT_BYTES == 0 and isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight, torch.arange(1.0, 16.0).view(5, 3), rtol=0, atol=0)
    assert layer.bias.data_ptr() == aligned_bias  # untouched
