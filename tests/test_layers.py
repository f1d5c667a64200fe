"""SEW-MHSA and i2RMB against their definitions (architecture brief §1, §5.1, §5.3, §6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emov2_gen.layers import I2RMB, SEWMHSA, AdaLNModulation, InterpConv, LayerNorm2d, make_act, make_norm
from emov2_gen.layers.sew_mhsa import merge_windows, partition_both_windows, partition_windows, window_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def value_projection(dim: int, mid: int) -> nn.Module:
    """An i2RMB-style value projection (1x1 conv with bias + GELU), so padded zero tokens get non-zero values."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(dim, mid, 1), nn.GELU())


def attention_and_values(
    dim: int = 16, mid: int = 48, head_dim: int = 8, window_size: int = 4, **kwargs
) -> tuple[SEWMHSA, nn.Module]:
    """A seeded SEW-MHSA (2 heads of q/k width 8) and values 3x wider than the input, as in an i2RMB with e=3."""
    torch.manual_seed(0)
    attn = SEWMHSA(dim, head_dim=head_dim, window_size=window_size, **kwargs)
    return attn, value_projection(dim, mid)


# ----------------------------------------------------------------------------------------------
# SEW-MHSA


@pytest.mark.parametrize("size", [(12, 12), (10, 14)])
def test_hybrid_is_sum_of_local_and_dilated_with_shared_weights(size):
    hybrid, to_value = attention_and_values()
    local, _ = attention_and_values(partitions=("local",))
    dilated, _ = attention_and_values(partitions=("dilated",))
    local.load_state_dict(hybrid.state_dict())
    dilated.load_state_dict(hybrid.state_dict())
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        out_local, out_dilated = local(x, to_value), dilated(x, to_value)
        torch.testing.assert_close(hybrid(x, to_value), out_local + out_dilated)
    # The two partitions must really be different token sets on these maps.
    assert (out_local - out_dilated).abs().max() > 1e-2


def test_map_side_equal_to_window_doubles_one_attention():
    hybrid, to_value = attention_and_values(window_size=7)
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        out = hybrid(x, to_value)
        for partition in ("local", "dilated"):
            single, _ = attention_and_values(window_size=7, partitions=(partition,))
            single.load_state_dict(hybrid.state_dict())
            torch.testing.assert_close(out, 2 * single(x, to_value))
        whole_map, _ = attention_and_values(window_size=0, partitions=("local",))
        whole_map.load_state_dict(hybrid.state_dict())
        torch.testing.assert_close(out, 2 * whole_map(x, to_value))


def test_padding_returns_the_input_size():
    attn, to_value = attention_and_values(window_size=4)
    with torch.no_grad():
        out = attn(torch.randn(2, 16, 10, 10), to_value)  # padded to 12x12 inside, cropped back
    assert out.shape == (2, 48, 10, 10)


@pytest.mark.parametrize(
    "size, window_size, kwargs",
    [
        ((8, 8), 4, {}),  # square, no padding (2x2 tiles, stride-2 grids)
        ((12, 12), 4, {}),  # square, stride 3 != w
        ((10, 10), 4, {}),  # padded to 12x12
        ((6, 9), 3, {}),  # non-square, no padding
        ((5, 11), 4, {}),  # non-square, padded to 8x12
        ((7, 5), 0, {}),  # w <= 0: one window over the whole map
        ((6, 6), -1, {}),
        ((10, 6), 4, {"partitions": ("dilated",)}),  # EMOv1's single dilated window
        ((9, 9), 4, {"qkv_bias": False}),
    ],
)
def test_matches_naive_per_token_reference(size, window_size, kwargs, sew_mhsa_reference):
    attn, to_value = attention_and_values(window_size=window_size, **kwargs)
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, to_value), sew_mhsa_reference(attn, x, to_value), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value_dim", [32, 96])
def test_window_attention_equals_sdpa(value_dim):
    # On CPU, wider values take the written-out path; equal widths go through SDPA itself.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 3, 64, 32, generator=g).unbind(0)
    v = torch.randn(6, 3, 64, value_dim, generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(window_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(8, 4), (8, 12)])
def test_merged_partitions_with_one_head_match_the_reference_forward_and_backward(size, sew_mhsa_reference):
    """One head and equal q/v widths (SDPA, which keeps its output for backward). At 8 x 4 with 4 x 4 windows the
    local merge is a view of that output, which the dilated half must then not be added into."""
    attn, to_value = attention_and_values(dim=8, mid=8, head_dim=8, window_size=4)
    x = torch.randn(2, 8, *size)
    leaf, reference_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = attn(leaf, to_value), sew_mhsa_reference(attn, reference_leaf, to_value)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out)
    (got,), (want,) = torch.autograd.grad(out, leaf, grad), torch.autograd.grad(expected, reference_leaf, grad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(attn(x, to_value), out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dilated", [False, True])
def test_merge_windows_inverts_partition_and_returns_channels_last(dilated):
    x = torch.randn(2, 12, 8, 12)  # 3 heads of width 4; windows of 4 x 3 on an 8 x 12 map (n1=2, n2=4)
    windows = partition_windows(x, heads=3, wh=4, ww=3, dilated=dilated)
    assert windows.shape == (2 * 2 * 4, 3, 12, 4)
    merged = merge_windows(windows, batch=2, n1=2, n2=4, wh=4, ww=3, dilated=dilated)
    torch.testing.assert_close(merged, x, rtol=0, atol=0)
    assert merged.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("groups", [1, 2])
def test_partition_gradient_is_channels_last_like_its_input(groups):
    """The backward of the partition copy writes the gradient NHWC, as the activations are laid out (training speed)."""
    x = torch.randn(2, groups * 12, 8, 12)
    grad = torch.randn(groups * 2 * 2 * 2 * 4, 3, 12, 4)  # (groups*2*B*n1*n2, heads, wh*ww, d)

    def partition(t: torch.Tensor) -> torch.Tensor:
        return partition_both_windows(t, heads=3, wh=4, ww=3, groups=groups)

    leaf = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    activation = leaf * 1  # a non-leaf, as in the model: its gradient is seen as autograd produced it
    produced = []
    activation.register_hook(produced.append)
    partition(activation).backward(grad)
    assert produced[0].is_contiguous(memory_format=torch.channels_last)
    _, expected = torch.autograd.functional.vjp(partition, x, grad)  # same values from an NCHW input
    torch.testing.assert_close(produced[0], expected, rtol=0, atol=0)


def test_invalid_partitions_raise():
    with pytest.raises(ValueError, match="partitions"):
        SEWMHSA(16, partitions=("global",))
    with pytest.raises(ValueError, match="partitions"):
        SEWMHSA(16, partitions=())


# ----------------------------------------------------------------------------------------------
# i2RMB parameter counts (brief §1.4 formulas, §5.1 table of the official modules)


def sew_block_formula(c: int, e: float, k: int = 5) -> float:
    return (2 + 2 * e) * c**2 + (5 + 3 * e + e * k**2) * c


def conv_block_formula(c: int, e: float, k: int = 5) -> float:
    return 2 * e * c**2 + (3 + 3 * e + e * k**2) * c


def down_block_formula(c_in: int, c_out: int, e: float, k: int = 5) -> int:
    m = int(2 * e * c_in)
    return 2 * c_in + c_in * m + m + m * k**2 + 2 * m + m * c_out + c_out


def count(*parts) -> int:
    """Parameters of the given modules / parameter tensors (None counts 0)."""
    params = [p for part in parts if part is not None for p in (part.parameters() if isinstance(part, nn.Module) else [part])]
    return sum(p.numel() for p in params)


@pytest.mark.parametrize(
    "channels, expansion, variant, expected, breakdown",
    [
        (64, 4, "sew", 48_448, (128, 24_960, 6_912, 16_384, 64)),
        (64, 4, "conv", 40_128, (128, 16_640, 6_912, 16_384, 64)),
        (80, 3, "sew", 58_320, (160, 32_400, 6_480, 19_200, 80)),
        (80, 3, "conv", 45_360, None),
        (128, 2, "sew", 106_112, (256, 66_048, 6_912, 32_768, 128)),
        (128, 2, "conv", 73_088, None),
        (160, 4, "sew", 274_720, (320, 154_560, 17_280, 102_400, 160)),
        (160, 4, "conv", 223_200, None),
        (180, 3.5, "sew", 310_140, (360, 179_190, 17_010, 113_400, 180)),
        (288, 4, "sew", 863_136, (576, 499_392, 31_104, 331_776, 288)),
        (288, 4, "conv", 696_672, None),
        (320, 4, "sew", 1_061_440, None),
        (384, 4, "sew", 1_519_488, (768, 887_040, 41_472, 589_824, 384)),
        (384, 4, "conv", 1_223_808, None),
    ],
)
def test_block_parameters_match_official_table_and_formula(channels, expansion, variant, expected, breakdown):
    sew = variant == "sew"
    head_dim = 20 if channels in (80, 180) else 32  # the official d_h of those widths (EMOv2-1M)
    block = I2RMB(
        channels, expansion=expansion, attention=sew, head_dim=head_dim,
        norm="ln" if sew else "bn", act="gelu" if sew else "silu",
    )
    formula = sew_block_formula if sew else conv_block_formula
    assert formula(channels, expansion) == expected
    assert count(block) == expected
    if breakdown is not None:
        parts = ((block.norm,), (block.expand, block.attn), (block.dw,), (block.proj,), (block.layer_scale,))
        assert tuple(count(*part) for part in parts) == breakdown


@pytest.mark.parametrize(
    "c_in, c_out, expansion, mid, expected",
    [(24, 48, 2, 96, 9_696), (48, 72, 3, 288, 42_792), (72, 160, 4, 576, 150_064), (160, 288, 4, 1280, 609_888)],
)
def test_down_block_parameters_match_emov2_5m(c_in, c_out, expansion, mid, expected):
    block = I2RMB(c_in, c_out, expansion=2 * expansion, stride=2)
    assert block.mid_channels == mid
    assert down_block_formula(c_in, c_out, expansion) == expected
    assert count(block) == expected


def test_attention_adds_only_the_qk_projection():
    c, e = 96, 3
    sew = I2RMB(c, expansion=e, attention=True, head_dim=32)
    conv = I2RMB(c, expansion=e)
    assert count(sew) - count(conv) == 2 * c**2 + 2 * c == count(sew.attn)


# ----------------------------------------------------------------------------------------------
# i2RMB structure: residual rules, errors, stochastic depth


def randomise(block: nn.Module) -> nn.Module:
    """Non-trivial layer scale and norm statistics, so every operation shows in the output."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, tensor in block.state_dict().items():
            if name.endswith(("layer_scale", "running_var")):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif name.endswith("running_mean"):
                tensor.normal_(0, 0.1)
    return block.eval()


@pytest.mark.parametrize(
    "in_ch, out_ch, kwargs, outer_residual",
    [
        (16, 16, {}, True),
        (16, 16, {"attention": True, "head_dim": 8, "window_size": 4}, True),
        (16, 24, {}, False),  # widths differ and no shortcut conv: no residual
        (16, 24, {"conv_shortcut": True}, True),
        (16, 24, {"stride": 2}, False),
        (16, 16, {"residual": False}, False),
    ],
)
def test_forward_follows_block_definition(in_ch, out_ch, kwargs, outer_residual):
    block = randomise(I2RMB(in_ch, out_ch, expansion=2, **kwargs))
    assert block.residual is outer_residual
    x = torch.randn(2, in_ch, 8, 8)
    with torch.no_grad():
        y = block.norm(x)
        z = block.attn(y, block.expand) if block.attn is not None else block.expand(y)
        # The inner residual around the depth-wise conv exists exactly when the outer one does.
        z = z + block.dw(z) if outer_residual else block.dw(z)
        branch = block.layer_scale.view(1, -1, 1, 1) * block.proj(z)
        expected = block.shortcut(x) + branch if outer_residual else branch
        out = block(x)
    stride = kwargs.get("stride", 1)
    assert out.shape == (2, out_ch, 8 // stride, 8 // stride)
    torch.testing.assert_close(out, expected)


def test_official_down_block_keeps_layer_scale_and_shrinks_the_signal():
    block = I2RMB(16, 32, expansion=4, stride=2).eval()  # layer scale 1e-6, as officially
    with torch.no_grad():
        out = block(torch.randn(2, 16, 8, 8))
    assert 0 < out.std() < 1e-5


def test_invalid_block_configurations_raise():
    with pytest.raises(ValueError, match="attention needs stride 1"):
        I2RMB(16, 32, stride=2, attention=True)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        I2RMB(16, stride=3)
    with pytest.raises(ValueError, match="no residual"):
        I2RMB(16, 16, stride=2, residual=True)
    with pytest.raises(ValueError, match="conv_shortcut"):
        I2RMB(16, 24, residual=True)
    with pytest.raises(ValueError, match="split evenly"):
        I2RMB(16, expansion=2.5, attention=True, head_dim=4, num_heads=3)


def layer_norm_block(**kwargs) -> I2RMB:
    """A block without BatchNorm (its batch statistics would differ between train and eval)."""
    torch.manual_seed(0)
    return I2RMB(16, expansion=2, norm="ln", dw_norm="ln", layer_scale_init=1.0, **kwargs)


def test_drop_path_is_active_only_in_train_mode():
    block = layer_norm_block(drop_path=0.5)
    x = torch.randn(64, 16, 4, 4)
    with torch.no_grad():
        block.eval()
        eval_out = block(x)
        torch.testing.assert_close(block(x), eval_out)
        branch = eval_out - x
        block.train()
        train_out = block(x)
    dropped = (train_out == x).flatten(1).all(dim=1)
    assert 0 < dropped.sum() < len(x)  # p=0.5 over 64 rows: some dropped, some kept
    # Kept rows carry the branch rescaled by 1 / (1 - p).
    torch.testing.assert_close(train_out[~dropped], x[~dropped] + 2 * branch[~dropped])
    assert (eval_out - x).abs().flatten(1).amax(dim=1).min() > 0  # eval drops nothing


def test_drop_path_is_not_applied_without_residual():
    block = layer_norm_block(drop_path=0.5, residual=False)
    x = torch.randn(64, 16, 4, 4)
    with torch.no_grad():
        train_out = block.train()(x)
        torch.testing.assert_close(train_out, block.eval()(x))


def test_conditioned_block_needs_temb_and_starts_as_its_shortcut():
    block = I2RMB(16, 24, expansion=2, conv_shortcut=True, temb_channels=32).eval()
    x = torch.randn(2, 16, 8, 8)
    with pytest.raises(ValueError, match="temb"):
        block(x)
    with torch.no_grad():
        torch.testing.assert_close(block(x, torch.randn(2, 32)), block.shortcut(x))


def test_adaln_modulation_is_zero_initialised_with_block_shapes():
    modulation = AdaLNModulation(32, in_channels=16, out_channels=24)
    shift, scale, gate = modulation(torch.randn(3, 32))
    assert (shift.shape, scale.shape, gate.shape) == ((3, 16, 1, 1), (3, 16, 1, 1), (3, 24, 1, 1))
    assert all(torch.count_nonzero(t) == 0 for t in (shift, scale, gate))


# ----------------------------------------------------------------------------------------------
# InterpConv


@pytest.mark.parametrize("size", [(4, 4), (5, 3), (1, 6)])
@pytest.mark.parametrize("norm", ["ln", "bn"])
def test_interp_conv_conv_first_computes_the_official_order(size, norm):
    """1x1 conv then bilinear x2 == bilinear x2 then 1x1 conv (the official order), borders included."""
    torch.manual_seed(0)
    official = InterpConv(6, 4, norm=norm, act="relu").eval()
    with torch.no_grad():
        official[1].norm.weight.normal_()
        official[1].norm.bias.normal_()
        x = torch.randn(2, 6, *size)
        expected = nn.functional.relu(official[1].norm(official[1].conv(nn.functional.interpolate(x, scale_factor=2, mode="bilinear"))))
        official_out = official(x)
        official.conv_first = True
        fast_out = official(x)
    assert fast_out.shape == (2, 4, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(official_out, expected)
    torch.testing.assert_close(fast_out, expected, rtol=1e-5, atol=1e-5)


def test_interp_conv_keeps_the_sequential_state_dict_keys():
    assert sorted(InterpConv(6, 4, norm="ln").state_dict()) == ["1.conv.weight", "1.norm.bias", "1.norm.weight"]


# ----------------------------------------------------------------------------------------------
# Norm / activation factories


def test_layer_norm_2d_normalises_each_pixel_over_channels():
    norm = LayerNorm2d(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        x = torch.randn(2, 8, 5, 3) * 3 + 1
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        expected = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("out_channels, norm", [(24, "ln"), (16, "ln"), (16, "none")])
def test_i2rmb_inference_equals_the_autograd_forward(attention, out_channels, norm):
    """Inference computes exactly what the recorded forward does and leaves the input intact (with an identity
    shortcut the residual is `x` itself, and with no pre-norm the modulation's operand is too)."""
    torch.manual_seed(0)
    block = I2RMB(16, out_channels, expansion=3, attention=attention, head_dim=8, window_size=2,
                  norm=norm, act="gelu", dw_norm="ln", dw_act="gelu", layer_scale_init=None,
                  conv_shortcut=True, temb_channels=12).eval()
    x, temb = torch.randn(2, 16, 5, 6), torch.randn(2, 12)
    with torch.no_grad():
        block.modulation.linear.weight.normal_()  # a live gate, so the branch reaches the output
    recorded = block(x, temb)
    assert recorded.requires_grad
    untouched = x.clone()
    with torch.inference_mode():
        inferred = block(x, temb)
    assert torch.equal(inferred, recorded.detach())
    assert torch.equal(x, untouched)


def test_unknown_norm_or_activation_raises():
    with pytest.raises(ValueError, match="Unknown norm 'batch'"):
        make_norm("batch", 8)
    with pytest.raises(ValueError, match="Unknown activation 'tanh'"):
        make_act("tanh")


def conditioned_attention_block() -> I2RMB:
    """An i2RMB with every path live: attention, adaLN modulation (non-zero), inner and outer residual."""
    torch.manual_seed(0)
    block = I2RMB(16, expansion=2, attention=True, head_dim=8, window_size=2, norm="ln", act="gelu",
                  dw_norm="ln", dw_act="gelu", layer_scale_init=0.5, temb_channels=12)
    with torch.no_grad():
        block.modulation.linear.weight.normal_(std=0.5)
    return block.eval()


def test_forward_hooks_that_keep_outputs_see_them_unchanged_after_the_forward():
    """Feature extraction / caching: an output a hook keeps is never written into later in the forward."""
    block = conditioned_attention_block()
    kept, copies = [], []

    def keep(module, inputs, output):
        for tensor in output if isinstance(output, tuple) else (output,):  # AdaLNModulation returns a tuple
            kept.append(tensor)
            copies.append(tensor.clone())

    for module in block.modules():
        if module is not block:
            module.register_forward_hook(keep)
    x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 12)
    with torch.inference_mode():
        block(x, temb)
    assert len(kept) >= 8
    for output, copy in zip(kept, copies):
        assert torch.equal(output, copy)


def test_forward_mode_ad_through_a_frozen_block_matches_finite_differences():
    """`torch.func.jvp` (forward-mode AD) works through every op of the block and gives the directional derivative."""
    block = conditioned_attention_block().double().requires_grad_(False)
    x, temb = torch.randn(2, 16, 6, 6, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    direction = torch.randn_like(x)
    out, tangent = torch.func.jvp(lambda inp: block(inp, temb), (x,), (direction,))
    eps = 1e-6
    finite = (block(x + eps * direction, temb) - block(x - eps * direction, temb)) / (2 * eps)
    torch.testing.assert_close(out, block(x, temb))
    torch.testing.assert_close(tangent, finite, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_gives_the_plain_gradients(use_reentrant):
    block = conditioned_attention_block().train()  # LayerNorm only: train and eval compute the same
    x, temb = torch.randn(2, 16, 6, 6, requires_grad=True), torch.randn(2, 12)
    block(x, temb).square().sum().backward()
    plain = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    x.grad = None
    checkpointed = torch.utils.checkpoint.checkpoint(block, x, temb, use_reentrant=use_reentrant)
    checkpointed.square().sum().backward()
    for got, want in zip([x.grad] + [p.grad for p in block.parameters()], plain):
        torch.testing.assert_close(got, want)
