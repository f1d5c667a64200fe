"""EMOv2UNetForSegmentation: the paper's layout and sizes, odd input sizes, the loss, presets and save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from emov2_gen import EMOv2UNetForSegmentation
from emov2_gen.layers import I2RMB, ConvNormAct
from emov2_gen.models.segmentation import SEGMENTATION_PRESETS, CheckpointableUnits
from emov2_gen.models.segmentation_losses import cross_entropy_dice_loss, soft_dice_loss

pytestmark = pytest.mark.usefixtures("one_thread")
# A 3-level i2RMB UNet small enough for CPU tests (size divisor 4).
TINY = dict(base_channels=8, num_levels=3, head_dim=8, window_size=4, decode_head_channels=4, auxiliary_head_channels=4)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_model(**overrides) -> EMOv2UNetForSegmentation:
    torch.manual_seed(0)
    return EMOv2UNetForSegmentation(**{**TINY, **overrides})


# ------------------------------------------------------------------------------------------ paper layout


@pytest.fixture(scope="module")
def paper_model() -> EMOv2UNetForSegmentation:
    return EMOv2UNetForSegmentation.from_preset("unet-emov2-paper")


def test_paper_preset_has_the_official_parameter_counts(paper_model):
    # Architecture brief §3.1, measured on the official UNet_EMO2 + mmseg heads (BN in place of SyncBN).
    assert num_params(paper_model.encoder) + num_params(paper_model.decoder) == 21_281_728
    assert num_params(paper_model.decode_head) == 41_442
    assert num_params(paper_model.auxiliary_head) == 73_986
    assert num_params(paper_model) == 21_397_156
    per_level = [num_params(level) for level in paper_model.encoder]
    assert per_level == [38_848, 142_848, 547_840, 2_144_256, 8_482_816]
    assert [num_params(block) for block in paper_model.decoder] == [7_434_240, 1_882_112, 482_304, 126_464]


def test_plain_conv_baseline_is_mmseg_unet_s5_d16():
    model = EMOv2UNetForSegmentation.from_preset("unet-s5-d16")
    assert num_params(model.encoder) + num_params(model.decoder) == 28_949_568
    assert num_params(model) == 29_064_996
    assert not any(isinstance(m, I2RMB) for m in model.modules())


def test_paper_units_follow_the_official_block_rule(paper_model):
    level0 = list(paper_model.encoder[0][0])
    assert len(level0) == 2 and all(isinstance(u, ConvNormAct) for u in level0)
    assert [u.conv.kernel_size for u in level0] == [(3, 3), (3, 3)]
    assert all(isinstance(u.norm, torch.nn.BatchNorm2d) and type(u.act) is torch.nn.ReLU for u in level0)

    units = [u for level in paper_model.encoder[1:] for u in level[1]] + [u for b in paper_model.decoder for u in b.block]
    assert len(units) == 16 and all(isinstance(u, I2RMB) for u in units)
    for unit in units:
        assert unit.attn is not None and unit.attn.window_size == 10 and unit.attn.head_dim == 32
        assert unit.attn.num_heads == unit.in_channels // 32
        assert unit.mid_channels == 2 * unit.in_channels
        assert unit.dw[0].kernel_size == (5, 5)
        assert type(unit.norm).__name__ == "LayerNorm2d" and type(unit.dw[1]).__name__ == "LayerNorm2d"
        assert all(type(a) is torch.nn.GELU and a.approximate == "none" for a in (unit.expand[1], unit.dw[2]))
        assert unit.residual == (unit.in_channels == unit.out_channels)
    # Decoder: InterpConv = bilinear x2, then Conv1x1 (no bias) + BN + ReLU; first unit maps 2C -> C.
    up = paper_model.decoder[0].upsample
    assert up[0].mode == "bilinear" and up[0].scale_factor == 2
    assert up[1].conv.kernel_size == (1, 1) and up[1].conv.bias is None
    assert [(u.in_channels, u.out_channels) for u in paper_model.decoder[0].block] == [(1024, 512), (512, 512)]


def test_width_changing_units_start_with_unit_layer_scale_unless_faithful():
    x = torch.randn(2, 3, 16, 16)
    outputs = {}
    for init in (1.0, 1e-6):
        model = tiny_model(nonresidual_layer_scale_init=init).eval()
        first_unit = model.encoder[1][1][0]
        assert not first_unit.residual and torch.all(first_unit.layer_scale == init)
        assert torch.all(model.encoder[1][1][1].layer_scale == 1e-6)  # residual units keep the official 1e-6
        with torch.no_grad():
            outputs[init] = first_unit(model.encoder[0](x)).std().item()
    # gamma = 1e-6 on a unit without residual shrinks its output by ~1e6 (the official code's behaviour).
    assert outputs[1.0] > 0.05
    assert outputs[1e-6] < 1e-5
    assert outputs[1.0] / outputs[1e-6] == pytest.approx(1e6, rel=1e-3)


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("size", [(32, 32), (37, 50), (17, 9)])
def test_logits_have_the_input_size_for_any_height_and_width(size):
    model = tiny_model().eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size)).logits
    assert logits.shape == (2, 2, *size)


def test_odd_sizes_are_zero_padded_to_the_size_divisor_and_cropped():
    model = tiny_model().eval()
    assert model.size_divisor == 4
    x = torch.randn(1, 3, 13, 10)
    with torch.no_grad():
        logits = model(x).logits
        padded = model(F.pad(x, (0, 2, 0, 3))).logits
    torch.testing.assert_close(logits, padded[..., :13, :10])


@pytest.mark.parametrize("preset", sorted(SEGMENTATION_PRESETS))
def test_every_preset_builds_and_segments_an_odd_size(preset):
    torch.manual_seed(0)
    model = EMOv2UNetForSegmentation.from_preset(preset, num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 40, 33)).logits
    assert logits.shape == (1, 3, 40, 33) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("preset", "low", "high"), [("unet-emov2-5m", 4.5e6, 5.5e6), ("unet-emov2-1m", 0.9e6, 1.3e6)])
def test_mobile_presets_are_genuinely_their_size(preset, low, high):
    assert low < num_params(EMOv2UNetForSegmentation.from_preset(preset)) < high


def test_bad_input_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="labels"):
        model(torch.randn(1, 3, 16, 16), labels=torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="Unknown segmentation preset"):
        EMOv2UNetForSegmentation.from_preset("unet-emov2-3m")
    with pytest.raises(ValueError, match="block_type"):
        EMOv2UNetForSegmentation(block_type="resnet")
    with pytest.raises(ValueError, match="backbone_preset"):
        EMOv2UNetForSegmentation(backbone_preset="emov2-7m")
    with pytest.raises(ValueError, match="UNet encoder"):
        model.load_backbone_checkpoint("any.pth")


# ------------------------------------------------------------------------------------------ loss


def test_soft_dice_matches_a_hand_computed_case():
    # One image, 2 classes, 2 pixels; logits make p(class 1) = [0.8, 0.3] (pixel 3 is ignored).
    p1 = torch.tensor([0.8, 0.3, 0.5])
    logits = torch.stack([torch.zeros(3), torch.log(p1 / (1 - p1))]).view(1, 2, 1, 3)
    labels = torch.tensor([[[1, 0, 255]]])
    # class 1: t = [1, 0]; 2*0.8 + 1 = 2.6 over 0.64 + 0.09 + 1 + 1 = 2.73; class 0: p = [0.2, 0.7], t = [0, 1]:
    # 2*0.7 + 1 = 2.4 over 0.04 + 0.49 + 1 + 1 = 2.53.
    expected = ((1 - 2.6 / 2.73) + (1 - 2.4 / 2.53)) / 2
    assert soft_dice_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    ce = -(torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.7))) / 2
    total = cross_entropy_dice_loss(logits, labels, ce_weight=1.0, dice_weight=3.0)
    assert total.item() == pytest.approx(ce.item() + 3 * expected, rel=1e-5)


def test_loss_skips_ignore_index_pixels_and_is_zero_when_all_are_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16)
    labels = torch.randint(0, 2, (2, 16, 16))
    labels[:, :4] = 255
    loss = cross_entropy_dice_loss(logits, labels, ce_weight=1.0, dice_weight=3.0)
    on_labelled_rows = cross_entropy_dice_loss(logits[:, :, 4:], labels[:, 4:], ce_weight=1.0, dice_weight=3.0)
    torch.testing.assert_close(loss, on_labelled_rows)
    none_labelled = cross_entropy_dice_loss(logits, torch.full_like(labels, 255), ce_weight=1.0, dice_weight=3.0)
    assert none_labelled.item() == 0.0


def test_loss_combines_decode_and_auxiliary_heads():
    model = tiny_model().eval()
    x, labels = torch.randn(1, 3, 16, 16), torch.randint(0, 2, (1, 16, 16))
    with torch.no_grad():
        out = model(x, labels=labels)
        c = model.config
        decode = cross_entropy_dice_loss(out.logits, labels, c.ce_loss_weight, c.dice_loss_weight)
        auxiliary = cross_entropy_dice_loss(out.auxiliary_logits, labels, c.auxiliary_loss_weight)
    assert out.auxiliary_logits.shape == out.logits.shape
    torch.testing.assert_close(out.loss, decode + auxiliary)
    assert model(x).loss is None and model(x).auxiliary_logits is None


# ------------------------------------------------------------------------------------------ save / load


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = tiny_model(decode_head_type="fcn").eval()
    with torch.no_grad():  # move the BN statistics off their defaults so they must be saved too
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
    model.save_pretrained(tmp_path)
    loaded = EMOv2UNetForSegmentation.from_pretrained(tmp_path).eval()
    def public_config(m: EMOv2UNetForSegmentation) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in m.config.items() if not k.startswith("_")}

    assert public_config(loaded) == public_config(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.randn(1, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


# ------------------------------------------------------------------------------------------ EMOv2 encoder


def test_emov2_backbone_encoder_loads_official_weights_and_reproduces_them(shared_data_dir, tmp_path):
    reference = load_file(str(shared_data_dir / "reference" / "emov2_1m_224.safetensors"))
    official = {k.removeprefix("weights."): v for k, v in reference.items() if k.startswith("weights.")}
    path = tmp_path / "emov2_1m.pth"
    torch.save({"model": official}, path)
    model = EMOv2UNetForSegmentation.from_preset("emov2-1m-unet", backbone_checkpoint=path).eval()
    assert model.size_divisor == 32
    with torch.no_grad():
        features = model._encode(reference["input"])
        logits = model(reference["input"][:, :, :100, :90]).logits
    for stage in (1, 2, 3):
        torch.testing.assert_close(features[stage - 1], reference[f"features.stage{stage}"], atol=1e-4, rtol=0)
    assert logits.shape == (2, 2, 100, 90)
    with pytest.raises(ValueError, match="checkpoint"):
        EMOv2UNetForSegmentation.from_preset("emov2-5m-unet", backbone_checkpoint=path)  # 1M weights, 5M encoder


@pytest.mark.parametrize("dilation", [1, 2, 6])
def test_conv_norm_act_dilation_keeps_the_size_and_is_the_dilated_conv(dilation):
    # ASPP branches are ConvNormAct units with dilation d and padding d (mmseg's ASPPModule).
    unit = ConvNormAct(4, 6, 3, dilation=dilation, norm="none", act="none")
    x = torch.randn(2, 4, 13, 17)
    expected = F.conv2d(x, unit.conv.weight, padding=dilation, dilation=dilation)
    torch.testing.assert_close(unit(x), expected)


def test_gradient_checkpointing_recomputes_the_i2rmb_stacks_and_keeps_loss_and_gradients():
    torch.manual_seed(0)
    model = EMOv2UNetForSegmentation(**TINY).train()
    x, labels = torch.rand(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    unit_calls, bn_calls = [], []
    model.decoder[0].block[0].register_forward_hook(lambda *_: unit_calls.append(1))  # an i2RMB unit
    model.decoder[0].upsample.register_forward_hook(lambda *_: bn_calls.append(1))  # InterpConv with BatchNorm

    def loss_and_grads():
        torch.manual_seed(1)  # the same dropout draws
        loss = model(x, labels=labels).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return loss.detach(), grads

    expected_loss, expected = loss_and_grads()
    assert len(unit_calls) == 1 and len(bn_calls) == 1
    model.enable_gradient_checkpointing()
    assert all(m.gradient_checkpointing for m in model.modules() if isinstance(m, CheckpointableUnits))
    assert not any(isinstance(m, CheckpointableUnits) for level in model.encoder[:1] for m in level.modules())
    loss, grads = loss_and_grads()
    assert len(unit_calls) == 3 and len(bn_calls) == 2  # the i2RMB stack ran again in backward; BatchNorm did not
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_attention_levels_and_width_shortcut_options():
    model = tiny_model(attention_levels=(2,), width_shortcut=True)
    encoder_units = {i: list(level[1]) for i, level in enumerate(model.encoder) if i}
    assert all(u.attn is None for u in encoder_units[1]) and all(u.attn is not None for u in encoder_units[2])
    decoder_units = [u for block in model.decoder for u in block.block]  # deepest first: level 1, then level 0
    assert all(u.attn is None for u in decoder_units)
    width_changing = [u for units in [*encoder_units.values(), decoder_units] for u in units if u.in_channels != u.out_channels]
    assert width_changing and all(u.residual and isinstance(u.shortcut, torch.nn.Conv2d) for u in width_changing)
    faithful = tiny_model()
    assert all(not u.residual for level in list(faithful.encoder)[1:] for u in level[1] if u.in_channels != u.out_channels)


@pytest.mark.parametrize("preset", ["unet-emov2-1m", "unet-emov2-5m"])
def test_mobile_presets_shortcut_width_changes_and_attend_only_below_the_two_finest_levels(preset):
    model = EMOv2UNetForSegmentation.from_preset(preset)
    units = {i: list(level[1]) for i, level in enumerate(model.encoder) if i}
    for block, level in zip(model.decoder, (3, 2, 1, 0)):
        units.setdefault(level, []).extend(block.block)
    for level, level_units in units.items():
        assert all((u.attn is not None) == (level >= 2) for u in level_units), level
        assert all(u.residual for u in level_units)
    faithful = EMOv2UNetForSegmentation.from_preset(preset, width_shortcut=False, attention_levels=None)
    assert all(u.attn is not None for level in list(faithful.encoder)[1:] for u in level[1])
    assert EMOv2UNetForSegmentation.from_preset("unet-emov2-paper").config.width_shortcut is False
