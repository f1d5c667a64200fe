"""D-EMOv2 (`EMOv2Transformer2DModel`): parameter counts, the DiT forward contract, DiTPipeline, save/load, gradient
checkpointing, input checks, adaLN-Zero at init, the registry, the image pipeline's learned-sigma split and the
training script (pixel and latent runs). Tiny models only; the four presets are counted on the meta device."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from emov2_gen.models import EMOV2_TRANSFORMER_PRESETS, EMOv2Transformer2DModel, build_denoiser, denoiser_from_config
from emov2_gen.models.registry import DENOISER_PRESETS, downsampling_factor
from emov2_gen.models.transformer_2d import demo_parameter_count, fit_window
from emov2_gen.pipelines import EMOv2ImagePipeline

pytestmark = pytest.mark.usefixtures("one_thread")

# The logged DEMO counts (architecture brief §4), at 32x32x4 latents, patch 2, 1000 classes + 1 null class.
LOGGED_COUNTS = {"demo-s-2": 24_596_000, "demo-b-2": 96_082_976, "demo-l-2": 334_831_648, "demo-xl-2": 492_692_000}
TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, window_size=2, expansion_ratio=2.0)


def tiny_model(seed: int = 0, **overrides) -> EMOv2Transformer2DModel:
    torch.manual_seed(seed)
    config = {"sample_size": 8, "in_channels": 4, "num_class_embeds": 11, **TINY, **overrides}
    return EMOv2Transformer2DModel(**config).eval()


def randomize(model: nn.Module, seed: int = 1, std: float = 0.2) -> nn.Module:
    """Overwrite every trainable parameter (the zero-initialised gates and output layer included) with noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def inputs(batch: int = 2, channels: int = 4, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    return x, torch.tensor([3, 700][:batch]), torch.tensor([1, 10][:batch])


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A randomly initialised 2-level AutoencoderKL (downscale 2, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=16,
    ).eval()


# ------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", list(LOGGED_COUNTS))
def test_presets_have_the_logged_parameter_counts(name):
    with torch.device("meta"):
        model = EMOv2Transformer2DModel.from_preset(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == LOGGED_COUNTS[name]
    assert model.num_parameters() == count
    assert count == demo_parameter_count(model.hidden_size, model.config.num_layers)
    assert model.config.out_channels == 8 and model.config.window_size == 8  # learned sigma; 8x8 windows on 16x16
    # The per-block share is exactly 13 d^2 + 119 d: 3d^2 + 3d adaLN + 10d^2 + 116d i2RMB.
    d = model.hidden_size
    block = model.transformer_blocks[0]
    assert sum(p.numel() for p in block.parameters()) == 13 * d * d + 119 * d
    assert sum(p.numel() for p in block.modulation.parameters()) == 3 * d * d + 3 * d


def test_unknown_preset_and_inconsistent_out_channels_raise():
    with pytest.raises(ValueError, match="Unknown D-EMOv2 preset 'demo-m-2'.*demo-s-2"):
        EMOv2Transformer2DModel.from_preset("demo-m-2")
    with pytest.raises(ValueError, match="out_channels must be 2 \\* in_channels = 8"):
        tiny_model(out_channels=4)
    assert tiny_model(out_channels=4, learn_sigma=False).config.out_channels == 4


def test_from_preset_fits_the_window_to_small_inputs():
    assert fit_window(8, 32, 2) == 8 and fit_window(8, 8, 2) == 4 and fit_window(8, 24, 2) == 6
    assert fit_window(-1, 8, 2) == -1
    with torch.device("meta"):
        model = EMOv2Transformer2DModel.from_preset("demo-s-2", sample_size=8, in_channels=1, num_class_embeds=None)
        explicit = EMOv2Transformer2DModel.from_preset("demo-s-2", window_size=16)
    assert model.config.window_size == 4 and model.config.out_channels == 2
    assert explicit.config.window_size == 16


# ------------------------------------------------------------------------------------------ forward contract


def test_forward_shapes_learned_sigma_and_dit_contract():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        norm_num_groups=8,
    ).eval()
    model = randomize(tiny_model())
    x, t, y = inputs()
    with torch.no_grad():
        ours, theirs = model(x, t, y), dit(x, t, y)  # what DiTPipeline passes: (B,) timesteps and labels
        assert isinstance(ours, Transformer2DModelOutput) and isinstance(theirs, Transformer2DModelOutput)
        assert ours.sample.shape == theirs.sample.shape == (2, 8, 8, 8)
        assert dit(x, t, y, return_dict=False)[0].shape == model(x, t, y, return_dict=False)[0].shape
        for timestep in (5, torch.tensor(5), 5.0):  # also an int, a 0-d tensor or a float (UNet2DModel's contract)
            assert model(x, timestep, y).sample.shape == (2, 8, 8, 8)
        assert model(x, 5, y).sample.equal(model(x, torch.tensor([5, 5]), y).sample)
        as_tuple = model(x, timestep=t, class_labels=y, cross_attention_kwargs=None, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and as_tuple[0].equal(model(x, t, y).sample)
        # Learned sigma: the variance half is a separate output, not a copy of epsilon; without it C_out = C_in.
        eps, variance = model(x, t, y).sample.chunk(2, dim=1)
        assert not torch.allclose(eps, variance)
        plain = randomize(tiny_model(learn_sigma=False))
        assert plain(x, t, y).sample.shape == (2, 4, 8, 8) and plain.config.out_channels == 4
        # Other sizes (non-square, larger) get an interpolated position embedding, as diffusers' PatchEmbed.
        assert model(torch.randn(1, 4, 16, 8), 3, y[:1]).sample.shape == (1, 8, 16, 8)
        # Timestep and label change the output (both enter through adaLN).
        assert not torch.allclose(model(x, t, y).sample, model(x, t + 100, y).sample)
        assert not torch.allclose(model(x, t, y).sample, model(x, t, y.flip(0)).sample)


def test_unconditional_model_and_label_checks():
    x, t, y = inputs()
    unconditional = randomize(tiny_model(num_class_embeds=None))
    assert unconditional.class_embedder is None
    assert unconditional(x, t).sample.shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, y)
    with pytest.raises(ValueError, match="class_labels are required"):
        tiny_model()(x, t)
    with pytest.raises(ValueError, match="3 class labels for a batch of 2"):
        tiny_model()(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="timestep is required"):
        tiny_model()(x, class_labels=y)
    with pytest.raises(ValueError, match="no attention processors"):
        tiny_model()(x, t, y, cross_attention_kwargs={"scale": 0.5})


def test_in_model_label_dropout_only_in_training():
    model = randomize(tiny_model(class_dropout_prob=0.5))
    x, t, _ = inputs()
    y, null = torch.tensor([1, 2]), torch.tensor([10, 10])
    with torch.no_grad():
        assert model(x, t, y).sample.equal(model(x, t, y).sample)  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        outputs = [model(x, t, y).sample for _ in range(24)]
        model.eval()
        conditional, unconditional = model(x, t, y).sample, model(x, t, null).sample
    for i in range(2):  # each sample is either its conditional or its null-class prediction, and both occur
        kinds = {"cond" if torch.allclose(o[i], conditional[i]) else "null" if torch.allclose(o[i], unconditional[i])
                 else "?" for o in outputs}
        assert kinds == {"cond", "null"}


@pytest.mark.parametrize(
    "size, message",
    [(9, "multiples of the patch size 2"), (12, "6x6 token map .* 4x4 SEW-MHSA windows do not tile")],
)
def test_input_that_does_not_tile_raises(size, message):
    model = tiny_model(window_size=4)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 4, size, size), 1, torch.tensor([0]))
    with pytest.raises(ValueError, match="shape \\(B, 4, H, W\\)"):
        model(torch.randn(1, 3, 8, 8), 1, torch.tensor([0]))


# ------------------------------------------------------------------------------------------ adaLN-Zero


def test_zero_init_gate_makes_every_block_the_identity():
    model = tiny_model(num_layers=3)
    for block in model.transformer_blocks:
        assert not block.modulation.linear.weight.any() and not block.modulation.linear.bias.any()
    # DiT's zero-initialised output layer makes the prediction 0; give it weights to see through it.
    randomize(model.proj_out_1)
    randomize(model.proj_out_2, seed=2)
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out)))
             for b in model.transformer_blocks]
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y).sample
        no_blocks = copy.deepcopy(model)
        no_blocks.transformer_blocks = nn.ModuleList()  # the final layer applied to the embeddings alone
        assert out.abs().max() > 0
        torch.testing.assert_close(out, no_blocks(x, t, y).sample, rtol=0, atol=0)
    for hook in hooks:
        hook.remove()
    assert seen == [True] * 3
    # The identity comes from the gate: a non-zero modulation makes the blocks act.
    randomize(model.transformer_blocks)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y).sample, out)


# ------------------------------------------------------------------------------------------ save / load, checkpointing


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = randomize(tiny_model(num_class_embeds=1001))
    model.save_pretrained(tmp_path / "demo")
    assert (tmp_path / "demo" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["_class_name"] == "EMOv2Transformer2DModel" and config["out_channels"] == 8
    loaded = EMOv2Transformer2DModel.from_pretrained(tmp_path / "demo").eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    assert not loaded.pos_embed.requires_grad and loaded.pos_embed.equal(model.pos_embed)
    x, t, y = inputs()
    with torch.no_grad():
        assert loaded(x, t, y).sample.equal(model(x, t, y).sample)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = randomize(tiny_model(num_layers=3)).train()
    x, t, y = inputs()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x, t, y).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    reference = gradients()
    calls = []

    def counting_checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
    assert model.gradient_checkpointing
    checkpointed = gradients()
    assert calls == ["I2RMB"] * 3
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(reference[name].abs().max() > 0 for name in reference if "transformer_blocks.0.attn" in name)


# ------------------------------------------------------------------------------------------ pipelines


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_runs_inside_dit_pipeline_with_guidance(scheduler_cls):
    vae = tiny_vae()
    # 1001 label rows: DiTPipeline's guidance passes the null class 1000.
    transformer = randomize(tiny_model(num_class_embeds=1001), std=0.05)
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler_cls())
    pipeline.set_progress_bar_config(disable=True)
    for guidance_scale in (1.0, 4.0):
        images = pipeline(class_labels=[1, 999], guidance_scale=guidance_scale, num_inference_steps=2,
                          generator=torch.manual_seed(0), output_type="np").images
        assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1


def test_image_pipeline_samples_with_the_epsilon_half_of_a_learned_sigma_output():
    model = randomize(tiny_model(in_channels=1, num_class_embeds=None), std=0.05)
    assert model.config.out_channels == 2
    changed = copy.deepcopy(model)
    with torch.no_grad():  # rows of the variance channel (c = 1 of each patch's (p, q, c) outputs)
        changed.proj_out_2.weight[1::2] += 5.0
        changed.proj_out_2.bias[1::2] -= 3.0

    def sample(denoiser, scheduler):
        pipeline = EMOv2ImagePipeline(unet=denoiser, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images

    for scheduler in (DDIMScheduler(num_train_timesteps=50), DDPMScheduler(num_train_timesteps=50)):
        images = sample(model, scheduler)
        assert images.shape == (2, 8, 8, 1)
        np.testing.assert_array_equal(images, sample(changed, scheduler))  # the variance half is not epsilon
    # A scheduler with a learned variance receives (and uses) both halves.
    learned = DDPMScheduler(num_train_timesteps=50, variance_type="learned_range")
    assert not np.array_equal(sample(model, learned), sample(changed, learned))


# ------------------------------------------------------------------------------------------ registry


def test_registry_builds_the_presets():
    assert set(EMOV2_TRANSFORMER_PRESETS) <= set(DENOISER_PRESETS)
    with torch.device("meta"):
        model = build_denoiser("demo-s-2", sample_size=32, in_channels=1)
        conditional = build_denoiser("demo-s-2", sample_size=32, in_channels=4, num_class_embeds=1001)
        no_sigma = build_denoiser("demo-b-2", sample_size=16, in_channels=3, out_channels=3, learn_sigma=False)
    assert isinstance(model, EMOv2Transformer2DModel)
    assert (model.hidden_size, model.config.num_layers, model.config.out_channels) == (384, 12, 2)
    assert model.config.num_class_embeds is None and downsampling_factor(model) == 2
    assert conditional.num_parameters() == LOGGED_COUNTS["demo-s-2"]
    assert no_sigma.config.out_channels == 3 and no_sigma.config.window_size == 8


def test_denoiser_from_config_rederives_out_channels(tmp_path):
    tiny_model().save_config(tmp_path / "demo")
    model = denoiser_from_config(tmp_path / "demo", in_channels=1, out_channels=None, num_class_embeds=None)
    assert isinstance(model, EMOv2Transformer2DModel)
    assert (model.config.in_channels, model.config.out_channels, model.config.num_class_embeds) == (1, 2, None)
