"""EMOv2UNet2DModel: the diffusers `UNet2DModel` contract, EMOv2 presets and adaLN conditioning."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
import torch.utils.checkpoint
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import Upsample2D

from emov2_gen import EMOv2UNet2DModel, build_denoiser
from emov2_gen.layers import I2RMB, SEWMHSA, AdaLNModulation, InterpConv

pytestmark = pytest.mark.usefixtures("one_thread")

# UNet2DModel constructor keys that configure its ResNet/GroupNorm/attention blocks and have no
# counterpart in an i2RMB UNet (LayerNorms, stride-2 i2RMB downsampling, SEW-MHSA levels by block type).
NOT_APPLICABLE_UNET2D_KEYS = {
    "act_fn", "add_attention", "attn_norm_num_groups", "downsample_padding", "downsample_type",
    "mid_block_scale_factor", "norm_num_groups",
}


def activate_conditioning(model: EMOv2UNet2DModel, seed: int = 0) -> EMOv2UNet2DModel:
    """Give every adaLN projection random weights (they start at zero), so conditioning reaches the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaLNModulation):
                module.linear.weight.normal_(0, 0.1)
                module.linear.bias.normal_(0, 0.1)
    return model


def conditioned_blocks(model: EMOv2UNet2DModel) -> list[I2RMB]:
    return [m for m in model.modules() if isinstance(m, I2RMB) and m.modulation is not None]


@pytest.fixture
def model(make_tiny_unet) -> EMOv2UNet2DModel:
    return activate_conditioning(make_tiny_unet())


@pytest.fixture
def sample() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def predict(model, sample, timestep=10, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(sample, timestep, **kwargs).sample


# ----------------------------------------------------------------------------------------------
# Forward contract


def test_timestep_as_int_float_0d_and_batch_tensor(model, sample):
    expected = predict(model, sample, 10)
    for timestep in (10.0, torch.tensor(10), torch.tensor([10, 10]), torch.tensor(10.0)):
        torch.testing.assert_close(predict(model, sample, timestep), expected)
    per_sample = predict(model, sample, torch.tensor([10, 500]))
    torch.testing.assert_close(per_sample[:1], expected[:1])
    torch.testing.assert_close(per_sample[1:], predict(model, sample[1:], 500))
    assert (per_sample[1:] - expected[1:]).abs().max() > 1e-3  # the timestep matters


def test_output_dataclass_and_tuple(model, sample):
    with torch.no_grad():
        output = model(sample, 3)
        as_tuple = model(sample, 3, return_dict=False)
    assert isinstance(output, UNet2DOutput)
    assert [f.name for f in dataclasses.fields(output)] == ["sample"]
    assert output.sample.shape == sample.shape
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], output.sample)


def test_out_channels_can_differ_from_in_channels(make_tiny_unet):
    model = make_tiny_unet(in_channels=1, out_channels=2)
    assert predict(model, torch.randn(2, 1, 16, 16)).shape == (2, 2, 16, 16)


def test_samples_in_a_batch_are_processed_independently(model, sample):
    batched = predict(model, sample)
    torch.testing.assert_close(batched[1:], predict(model, sample[1:]))


@pytest.mark.parametrize("size", [(32, 16), (48, 32), (16, 16)])  # multiples of 16: what (8, 8, 4, 2) windows tile
def test_non_square_and_other_sizes_work(model, size):
    sample = torch.randn(1, 3, *size)
    out = predict(model, sample)
    assert out.shape == sample.shape
    assert torch.isfinite(out).all()


def test_config_has_the_applicable_unet2dmodel_keys(model):
    unet2d_keys = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    missing = unet2d_keys - NOT_APPLICABLE_UNET2D_KEYS - set(model.config)
    assert not missing, f"UNet2DModel config keys missing from EMOv2UNet2DModel: {sorted(missing)}"
    assert model.config.sample_size == 16 and model.config.in_channels == 3  # what DDPM/DDIM pipelines read


def test_center_input_sample_maps_zero_one_input_to_minus_one_one(make_tiny_unet, sample):
    centred = activate_conditioning(make_tiny_unet(center_input_sample=True))
    plain = activate_conditioning(make_tiny_unet())
    torch.testing.assert_close(predict(centred, sample), predict(plain, 2 * sample - 1))


@pytest.mark.parametrize("kwargs", [{"time_embedding_type": "fourier"}, {"time_embedding_type": "learned", "num_train_timesteps": 100}])
def test_other_time_embeddings_run(make_tiny_unet, sample, kwargs):
    out = predict(make_tiny_unet(**kwargs), sample, torch.tensor([3, 7]))
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_learned_time_embedding_needs_num_train_timesteps(make_tiny_unet):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_tiny_unet(time_embedding_type="learned")


# ----------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 16, 16), r"Expected 3 input channels, got 1"),
        ((3, 16, 16), r"Expected a 4-D sample \(B, 3, H, W\)"),
        ((2, 3, 1, 16, 16), r"Expected a 4-D sample"),
        ((2, 3, 20, 16), r"H and W must be multiples of 8 for this model, got \(20, 16\)"),
        ((2, 3, 16, 12), r"multiples of 8"),
        # The tiny model's windows are (8, 8, 4, 2): level 1 of a 24x40 input is 12x20, of an 8x8 input 4x4.
        ((1, 3, 24, 40), r"level 1 a 12x20 map, which its 8x8 windows do not tile .* multiples of 16"),
        ((1, 3, 8, 8), r"level 1 a 4x4 map, which its 8x8 windows do not tile"),
    ],
)
def test_bad_samples_raise_with_what_is_expected(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape), 1)


# ----------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("preset, target", [("emov2-1m", 1e6), ("emov2-2m", 2e6), ("emov2-5m", 5e6), ("emov2-20m", 20e6)])
def test_presets_have_their_nominal_size(preset, target):
    params = EMOv2UNet2DModel.from_preset(preset, in_channels=3, out_channels=3).num_parameters()
    assert abs(params - target) <= 0.1 * target, f"{preset}: {params:,} parameters"


@pytest.mark.parametrize("pair", [("emov2-1m", "unet2d-1m"), ("emov2-5m", "unet2d-5m")])
def test_presets_are_parameter_matched_to_their_baselines(pair):
    emov2, baseline = (build_denoiser(name, sample_size=16, in_channels=1).num_parameters() for name in pair)
    assert abs(emov2 - baseline) <= 0.08 * baseline, f"{pair}: {emov2:,} vs {baseline:,}"


def test_emov2_1m_puts_its_width_at_full_resolution():
    """The fair-protocol ablations' adopted layout: 16 channels moved from the lowest level to the full-resolution
    one at equal parameters; the earlier layout stays one override away."""
    model = EMOv2UNet2DModel.from_preset("emov2-1m")
    assert model.config.block_out_channels == (32, 32, 48, 48)
    earlier = EMOv2UNet2DModel.from_preset("emov2-1m", block_out_channels=(24, 32, 48, 64))
    assert abs(model.num_parameters() - earlier.num_parameters()) <= 0.01 * earlier.num_parameters()
    assert model.conv_in.out_channels == 32  # the full-resolution maps are 32 wide


def test_upsample_type_selects_interp_conv_or_diffusers_upsample2d(make_tiny_unet, sample):
    default, diffusers_style = make_tiny_unet(), make_tiny_unet(upsample_type="conv")
    ups = [b.upsampler for b in default.up_blocks if b.upsampler is not None]
    assert ups and all(isinstance(u, InterpConv) and u.conv_first for u in ups)
    assert all(isinstance(b.upsampler, Upsample2D) for b in diffusers_style.up_blocks if b.upsampler is not None)
    assert default.num_parameters() < diffusers_style.num_parameters()  # 1x1 instead of 3x3 convs
    assert predict(diffusers_style, sample).shape == sample.shape
    with pytest.raises(ValueError, match="Unknown upsample_type 'pixel_shuffle'"):
        make_tiny_unet(upsample_type="pixel_shuffle")


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'emov2-3m'.*emov2-1m, emov2-2m, emov2-5m, emov2-20m"):
        EMOv2UNet2DModel.from_preset("emov2-3m")


def test_preset_attention_windows_need_no_padding_at_32px():
    torch.manual_seed(0)
    model = EMOv2UNet2DModel.from_preset("emov2-1m").eval()
    seen = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: seen.append((mod.window_size, tuple(args[0].shape[-2:]))))
        for m in model.modules()
        if isinstance(m, SEWMHSA)
    ]
    predict(model, torch.randn(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    assert {size for _, size in seen} == {(16, 16), (8, 8), (4, 4)}  # attention below the full-resolution level
    assert all(h % w == 0 and wd % w == 0 for w, (h, wd) in seen), seen


# ----------------------------------------------------------------------------------------------
# Conditioning


def test_adaln_gate_is_zero_initialised_so_blocks_start_as_their_shortcut(make_tiny_unet, sample):
    model = make_tiny_unet()
    blocks = conditioned_blocks(model)
    assert len(blocks) == 4 * 1 + 2 + 4 * 2  # encoder layers, mid block, decoder layers (+1 each)
    records = []
    handles = [b.register_forward_hook(lambda mod, args, out: records.append((mod, args[0], out))) for b in blocks]
    predict(model, sample)
    for handle in handles:
        handle.remove()
    assert len(records) == len(blocks)
    for block, hidden, out in records:
        torch.testing.assert_close(out, block.shortcut(hidden), rtol=0, atol=0)
    # Hence, at init, the timestep has no effect at all.
    torch.testing.assert_close(predict(model, sample, 999), predict(model, sample, 0))


@pytest.mark.parametrize("entry, outputs", [("ada_norm_zero", 3), ("scale_shift", 2), ("default", 1)])
def test_condition_entry_knob_sets_which_adaln_parameters_exist(make_tiny_unet, sample, entry, outputs):
    """resnet_time_scale_shift (an ablation knob): shift+scale+gate, shift+scale, or an additive shift only."""
    model = activate_conditioning(make_tiny_unet(resnet_time_scale_shift=entry))
    block = conditioned_blocks(model)[0]
    shift, scale, gate = block.modulation(torch.randn(2, model.config.block_out_channels[0] * 4))
    assert sum(part is not None for part in (shift, scale, gate)) == outputs
    if entry == "default":  # the pre-norm output plus the shift
        x = torch.randn(2, block.in_channels, 4, 4)
        temb = torch.randn(2, model.config.block_out_channels[0] * 4)
        expected = block.norm(x) + block.modulation(temb)[0]
        torch.testing.assert_close(block._pre_norm(x, temb)[0], expected)
    # The timestep reaches the output whatever the entry.
    assert not torch.allclose(predict(model, sample, 999), predict(model, sample, 0))
    with pytest.raises(ValueError, match="condition type"):
        make_tiny_unet(resnet_time_scale_shift="film")


def test_norm_type_knob_swaps_every_layernorm_for_groupnorm(make_tiny_unet, sample, tmp_path):
    from emov2_gen.layers.norms import LayerNorm2d

    model = make_tiny_unet(norm_type="gn")
    assert not any(isinstance(m, LayerNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) > 20
    assert sum(isinstance(m, LayerNorm2d) for m in make_tiny_unet().modules()) > 20
    model.save_pretrained(tmp_path)
    reloaded = EMOv2UNet2DModel.from_pretrained(tmp_path)
    assert reloaded.config.norm_type == "gn"
    torch.testing.assert_close(predict(reloaded, sample), predict(model, sample), rtol=0, atol=0)
    with pytest.raises(ValueError, match="norm_type"):
        make_tiny_unet(norm_type="bn")


def test_class_conditioning(make_tiny_unet, sample):
    model = activate_conditioning(make_tiny_unet(num_class_embeds=10))
    out_a = predict(model, sample, class_labels=torch.tensor([1, 2]))
    out_b = predict(model, sample, class_labels=torch.tensor([3, 2]))
    assert (out_a[0] - out_b[0]).abs().max() > 1e-3
    torch.testing.assert_close(out_a[1], out_b[1])
    with pytest.raises(ValueError, match="class_labels should be provided"):
        model(sample, 1)


def test_class_labels_without_class_embedding_raise(model, sample):
    with pytest.raises(ValueError, match="no class embedding"):
        model(sample, 1, class_labels=torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------------------
# Training features


def gradients(model, sample) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(sample, torch.tensor([5, 700])).sample.pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_routes_through_checkpoint_and_keeps_gradients(model, sample, monkeypatch):
    model.train()
    expected = gradients(model, sample)

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(args[0])
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    got = gradients(model, sample)
    assert len(calls) == len(conditioned_blocks(model))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)

    calls.clear()
    predict(model, sample)  # no graph, nothing to checkpoint
    model.disable_gradient_checkpointing()
    gradients(model, sample)
    assert not calls


def test_bfloat16_forward_is_close_to_float32(model, sample):
    expected = predict(model, sample)
    out = predict(model.to(torch.bfloat16), sample.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_sees_one_graph(training):
    """No graph breaks, in inference (in-place writes, the window merge's eager-only storage check) or training.
    16x16 with 4x4 windows: the attention levels merge both window partitions."""
    torch.manual_seed(0)
    model = EMOv2UNet2DModel.from_preset("emov2-1m", sample_size=16, window_sizes=(4, 4, 4, 2)).train(training)
    sample, timesteps = torch.randn(2, 3, 16, 16), torch.tensor([1, 500])
    with torch.inference_mode(not training):
        explanation = torch._dynamo.explain(model)(sample, timesteps)
    torch._dynamo.reset()
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_torch_compile_matches_eager_forward_and_gradients():
    """torch.compile (inductor, static shapes, as eval/benchmark.py --compile) gives the eager output and gradients,
    with the in-place inference activations inside the graph. Two levels at 8x8 keep the compile to about a minute."""
    torch.manual_seed(0)
    model = EMOv2UNet2DModel.from_preset(
        "emov2-1m", sample_size=8, block_out_channels=(8, 16), expansion_ratios=2.0, attention_head_dim=8,
        layers_per_block=1, down_block_types=("EMOv2DownBlock2D", "EMOv2AttnDownBlock2D"),
        up_block_types=("EMOv2AttnUpBlock2D", "EMOv2UpBlock2D"),
    )
    activate_conditioning(model).eval()
    compiled = torch.compile(model, dynamic=False)
    sample, timesteps = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    with torch.inference_mode():
        torch.testing.assert_close(compiled(sample, timesteps).sample, model(sample, timesteps).sample)
    model.train()
    params = list(model.parameters())
    eager = torch.autograd.grad(model(sample, timesteps).sample.square().mean(), params)
    graph = torch.autograd.grad(compiled(sample, timesteps).sample.square().mean(), params)
    for (name, _), expected, got in zip(model.named_parameters(), eager, graph):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_layerwise_casting_stores_bfloat16_and_computes_in_float32(model, sample):
    """diffusers' layerwise casting: the timestep embedding is cast to the hook's compute dtype, not the storage one."""
    expected = predict(model, sample)
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert model.time_embedding.linear_1.weight.dtype == torch.bfloat16
    out = predict(model, sample)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_save_and_load_pretrained_roundtrip(model, sample, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    loaded = EMOv2UNet2DModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is EMOv2UNet2DModel
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert {k: v for k, v in json.loads(loaded.to_json_string()).items() if k != "_name_or_path"} == saved_config
    assert saved_config["block_out_channels"] == list(model.config.block_out_channels)
    torch.testing.assert_close(predict(loaded, sample), predict(model, sample), rtol=0, atol=0)


def test_window_sizes_are_config_and_sample_size_is_metadata(model, sample, tmp_path):
    assert model.config.window_sizes == (8, 8, 4, 2)  # the 32x32 preset windows (8, 8, 8, 4) fitted to 16x16 maps
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["window_sizes"] == [8, 8, 4, 2]
    bigger = EMOv2UNet2DModel.from_pretrained(tmp_path, sample_size=64).eval()
    assert bigger.config.sample_size == 64 and tuple(bigger.config.window_sizes) == (8, 8, 4, 2)
    torch.testing.assert_close(predict(bigger, sample), predict(model, sample), rtol=0, atol=0)
    # from_preset fits the preset windows to its sample_size unless window_sizes is given
    assert EMOv2UNet2DModel.from_preset("emov2-1m").config.window_sizes == (8, 8, 8, 4)
    assert EMOv2UNet2DModel.from_preset("emov2-1m", sample_size=64).config.window_sizes == (8, 8, 8, 8)
    assert EMOv2UNet2DModel.from_preset("emov2-1m", sample_size=8).config.window_sizes == (8, 4, 2, 1)
    assert EMOv2UNet2DModel.from_preset("emov2-1m", sample_size=8, window_sizes=0).window_sizes == (0,) * 4
    with pytest.raises(ValueError, match="window_sizes"):
        EMOv2UNet2DModel.from_preset("emov2-1m", window_sizes=(8, 8))


def test_configs_saved_with_one_window_size_load_the_windows_they_were_built_with(make_tiny_unet, sample, tmp_path):
    """Before `window_sizes`, the constructor derived min(window_size, sample_size / 2**i) per level."""
    old = activate_conditioning(make_tiny_unet())
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["window_sizes"]
    config["window_size"] = 8  # what such a config held, with its sample_size 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = EMOv2UNet2DModel.from_pretrained(tmp_path, sample_size=64).eval()  # the saved sample_size decides
    assert tuple(loaded.config.window_sizes) == (8, 8, 4, 2) and "window_size" not in loaded.config
    torch.testing.assert_close(predict(loaded, sample), predict(old, sample), rtol=0, atol=0)


def test_configs_saved_before_upsample_type_load_their_upsample2d_weights(make_tiny_unet, sample, tmp_path):
    old = activate_conditioning(make_tiny_unet(upsample_type="conv"))
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["upsample_type"]  # what a pipeline saved before the key existed holds
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = EMOv2UNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.upsample_type == "conv"
    torch.testing.assert_close(predict(loaded, sample), predict(old, sample), rtol=0, atol=0)
    # A config written by hand (no `_class_name`) still gets the current default.
    del config["_class_name"]
    assert EMOv2UNet2DModel.from_config(config).config.upsample_type == "interp_conv"


def test_drop_path_rate_grows_linearly_over_every_conditioned_layer(make_tiny_unet):
    model = make_tiny_unet(drop_path_rate=0.2, layers_per_block=2)
    blocks = conditioned_blocks(model)  # in module order: encoder, mid block, decoder
    rates = [getattr(block.drop_path, "p", 0.0) for block in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, len(blocks)).tolist())


def test_drop_path_is_stochastic_in_train_mode_only(make_tiny_unet, sample):
    model = activate_conditioning(make_tiny_unet(drop_path_rate=0.5))
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(sample, 10).sample
        torch.manual_seed(2)
        second = model(sample, 10).sample
    assert (first - second).abs().max() > 1e-4
    model.eval()
    torch.testing.assert_close(predict(model, sample), predict(model, sample), rtol=0, atol=0)

    control = activate_conditioning(make_tiny_unet(drop_path_rate=0.0)).train()  # same model without drop path
    with torch.no_grad():
        torch.testing.assert_close(control(sample, 10).sample, control(sample, 10).sample, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# diffusers conventions a user will try


def test_xformers_is_refused_clearly_and_disabling_is_a_no_op(model, sample):
    expected = predict(model, sample)
    with pytest.raises(NotImplementedError, match="scaled_dot_product_attention"):
        model.enable_xformers_memory_efficient_attention()
    model.disable_xformers_memory_efficient_attention()
    torch.testing.assert_close(predict(model, sample), expected, rtol=0, atol=0)


def test_from_pretrained_torch_dtype_loads_weights_in_that_dtype(model, sample, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = EMOv2UNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for (name, p), (_, q) in zip(loaded.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(p, q.to(torch.bfloat16), rtol=0, atol=0, msg=name)  # the saved weights, cast
    out = predict(loaded, sample.to(torch.bfloat16))
    expected = predict(model, sample)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_no_split_modules_name_real_submodule_classes(model):
    classes = {type(m).__name__ for m in model.modules()}
    assert set(EMOv2UNet2DModel._no_split_modules) <= classes


def test_forward_hooks_on_every_module_keep_their_outputs_intact(model, sample):
    """A cached intermediate (feature extraction, caching pipelines) is never overwritten later in the forward."""
    kept, copies = [], []

    def keep(module, args, output):
        for tensor in output if isinstance(output, tuple) else (output,):
            if isinstance(tensor, torch.Tensor):
                kept.append(tensor)
                copies.append(tensor.clone())

    handles = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    with torch.inference_mode():
        model(sample, torch.tensor([3, 700]))
    for handle in handles:
        handle.remove()
    assert len(kept) > 100
    assert all(torch.equal(output, copy) for output, copy in zip(kept, copies))
