"""EMOv2Backbone: the official classifier, checked against the golden vector made with the official code."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from emov2_gen import EMOV2_BACKBONE_PRESETS, EMOv2Backbone
from emov2_gen.layers import SEWMHSA
from emov2_gen.models.backbone import read_official_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE_FILE = "reference/emov2_1m_224.safetensors"


@pytest.fixture(scope="module")
def reference(shared_data_dir) -> dict[str, torch.Tensor]:
    return load_file(str(shared_data_dir / REFERENCE_FILE))


@pytest.fixture(scope="module")
def official_weights(reference) -> dict[str, torch.Tensor]:
    return {key.removeprefix("weights."): value for key, value in reference.items() if key.startswith("weights.")}


@pytest.fixture(scope="module")
def reference_model(official_weights) -> EMOv2Backbone:
    model = EMOv2Backbone.from_preset("emov2-1m")
    model.load_official_state_dict(official_weights)
    return model.eval()


def to_official_layout(model: EMOv2Backbone) -> dict[str, torch.Tensor]:
    """This package's state dict under the official EMOv2 key names (the inverse of the loader's mapping).

    Written from the official module tree, not from the loader: the stem is `stage0`, stages are
    1-based, the official LayerNorm2d wraps an `nn.LayerNorm` as `.norm`, mixers live in `eops.0`
    (`net` = conv expansion, `v` = value projection, `qk`), convs are wrapped as `.conv`, the depth-wise
    unit is `conv_local` and the layer scale is `ls.gamma` of shape (1, C, 1, 1).
    """
    official = {}
    for key, value in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if isinstance(model.get_submodule(path), nn.LayerNorm):
            path += ".norm"
        if leaf == "layer_scale":
            path, leaf, value = f"{path}.ls", "gamma", value.view(1, -1, 1, 1)
        if path.endswith(".expand.0"):
            block = model.get_submodule(path.removesuffix(".expand.0"))
            path = path.replace(".expand.0", ".eops.0.v.conv" if block.attn is not None else ".eops.0.net.conv")
        path = re.sub(r"^stem\.", "stage0.", path)
        path = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", path)
        path = path.replace(".attn.qk", ".eops.0.qk.conv").replace(".dw.0", ".conv_local.conv")
        path = path.replace(".dw.1", ".conv_local.norm")
        path = re.sub(r"\.proj$", ".proj.conv", path)
        official[f"{path}.{leaf}"] = value.clone()
    return official


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every tensor (layer scales, norm affines, running statistics) so each one shows in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn_like(tensor))
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Golden reference (official code, EMOv2-1M, 224x224)


def test_reference_logits_and_stage_outputs_match_official_code(reference, reference_model):
    with torch.no_grad():
        features = reference_model.forward_features(reference["input"])
        logits = reference_model(reference["input"])
    assert len(features) == 4
    for i, feature in enumerate(features, start=1):
        expected = reference[f"features.stage{i}"]
        assert feature.shape == expected.shape
        assert (feature - expected).abs().max() < 1e-4, f"stage {i}"
    assert (logits - reference["logits"]).abs().max() < 1e-4


def test_headless_model_returns_the_pooled_features(reference, official_weights, reference_model):
    headless = EMOv2Backbone.from_preset("emov2-1m", num_classes=0).eval()
    headless.load_official_state_dict({k: v for k, v in official_weights.items() if not k.startswith("head.")})
    with torch.no_grad():
        pooled = headless(reference["input"])
        assert pooled.shape == (2, 180)
        assert (reference_model.head(pooled) - reference["logits"]).abs().max() < 1e-4


def test_inverse_key_mapping_reproduces_the_official_layout(official_weights):
    converted = to_official_layout(EMOv2Backbone.from_preset("emov2-1m"))
    assert sorted(converted) == sorted(official_weights)
    assert all(converted[k].shape == official_weights[k].shape for k in converted)


@pytest.mark.parametrize("preset", ["emov2-2m", "emov2-5m", "emov2-20m"])
def test_other_presets_load_their_official_layout(preset, tmp_path):
    torch.manual_seed(0)
    source = randomise(EMOv2Backbone.from_preset(preset), seed=1)
    path = tmp_path / f"{preset}.pth"
    torch.save({"model": to_official_layout(source)}, path)
    loaded = EMOv2Backbone.from_official_checkpoint(path, preset).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, out = source(x), loaded(x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Other input sizes: SEW-MHSA pads to a multiple of the window (w=7) and crops back


def test_non_224_input_runs_and_padded_attention_matches_reference(reference_model, sew_mhsa_reference):
    captured = []

    def capture(module, args, output):
        captured.append((module, args[0], args[1], output))

    attention_layers = [m for m in reference_model.modules() if isinstance(m, SEWMHSA)]
    handles = [m.register_forward_hook(capture) for m in attention_layers]
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            features = reference_model.forward_features(torch.randn(1, 3, 160, 160))
    finally:
        for handle in handles:
            handle.remove()
    assert [f.shape[-1] for f in features] == [40, 20, 10, 5]  # 10 -> 14 and 5 -> 7 with w = 7
    assert len(captured) == len(attention_layers) == 7 + 2
    with torch.no_grad():
        for module, x, to_value, output in captured:
            torch.testing.assert_close(output, sew_mhsa_reference(module, x, to_value), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Presets, init, schedule


@pytest.mark.parametrize(
    "preset, expected",
    [("emov2-1m", 1_460_844), ("emov2-2m", 2_384_312), ("emov2-5m", 5_126_440), ("emov2-20m", 20_195_208)],
)
def test_preset_parameter_counts_match_official(preset, expected):
    assert EMOv2Backbone.from_preset(preset).num_parameters() == expected


def test_every_norm_uses_the_official_epsilon():
    # eps 1e-5 instead of 1e-6 moves the golden outputs by only ~4e-5, under the reference tolerance.
    norms = [m for m in EMOv2Backbone.from_preset("emov2-1m").modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    assert norms and {m.eps for m in norms} == {1e-6}


def test_stage_outputs_at_init_are_tiny_because_down_blocks_keep_layer_scale():
    torch.manual_seed(0)
    model = EMOv2Backbone.from_preset("emov2-5m").eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 64, 64))
    for i, feature in enumerate(features, start=1):
        assert 1e-9 < feature.std() < 1e-6, f"stage {i}: std {feature.std():.2e}, expected ~1e-8"


def test_stochastic_depth_grows_linearly_over_all_blocks_including_down_blocks():
    model = EMOv2Backbone.from_preset("emov2-1m")
    blocks = [block for stage in model.stages for block in stage]
    rate = EMOV2_BACKBONE_PRESETS["emov2-1m"]["drop_path_rate"]
    expected = torch.linspace(0, rate, len(blocks)).tolist()
    for i, block in enumerate(blocks):
        if block.residual:
            assert block.drop_path.p == pytest.approx(expected[i]), f"block {i}"
        else:  # down blocks consume a rate but have no residual to drop
            assert not hasattr(block.drop_path, "p")


def test_unknown_preset_and_bad_input_raise():
    with pytest.raises(ValueError, match="emov2-1m, emov2-2m, emov2-5m, emov2-20m"):
        EMOv2Backbone.from_preset("emov2-3m")
    model = EMOv2Backbone.from_preset("emov2-1m")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.forward_features(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))


# ----------------------------------------------------------------------------------------------
# Loading official checkpoints


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("stage3.1.eops.0.qk.conv.weight"), r"missing \(1\): stages\.2\.1\.attn\.qk\.weight"),
        (lambda sd: sd.update({"stage3.1.extra.weight": torch.zeros(1)}), r"unexpected \(1\): stages\.2\.1\.extra\.weight"),
        (
            lambda sd: sd.update({"head.weight": torch.zeros(10, 180)}),
            r"shape mismatch \(1\): head\.weight: checkpoint \(10, 180\) vs model \(1000, 180\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_loader_names_missing_unexpected_and_misshaped_keys(official_weights, edit, message):
    weights = dict(official_weights)
    edit(weights)
    model = EMOv2Backbone.from_preset("emov2-1m")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        model.load_official_state_dict(weights)
    # Nothing was loaded half-way.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["model-wrapper", "state_dict-with-module-prefix", "module-prefix"],
)
def test_released_checkpoint_layouts_load_and_reproduce_the_reference(tmp_path, reference, official_weights, wrap):
    path = tmp_path / "emo2_1m.pth"
    torch.save(wrap(official_weights), path)
    state = read_official_checkpoint(path)
    assert sorted(state) == sorted(official_weights)
    model = EMOv2Backbone.from_official_checkpoint(path, "emov2-1m").eval()
    with torch.no_grad():
        assert (model(reference["input"]) - reference["logits"]).abs().max() < 1e-4


def test_unreadable_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        read_official_checkpoint(tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(ValueError, match="Could not read checkpoint .*corrupt.pth"):
        read_official_checkpoint(corrupt)
    corrupt_safetensors = tmp_path / "corrupt.safetensors"
    corrupt_safetensors.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="Could not read checkpoint"):
        read_official_checkpoint(corrupt_safetensors)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_official_checkpoint(not_a_state_dict)
