"""diffusers' `DiTTransformer2DModel` as a registered baseline beside D-EMOv2: preset sizes (diffusers' own DiT counts,
and how they differ from DiT's published ones), labels and the null class, `build_denoiser`/`downsampling_factor`/
`denoiser_from_config`, GFLOPs with attention, and sampling/save/load through `EMOv2ImagePipeline`. Tiny models only;
the S/B presets are counted on the meta device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from emov2_gen.evaluation.benchmark import NullClassDenoiser
from emov2_gen.evaluation.flops import count_gflops
from emov2_gen.models import EMOV2_TRANSFORMER_PRESETS, EMOv2Transformer2DModel
from emov2_gen.models.registry import (
    BASELINE_DIT_PRESETS,
    DENOISER_PRESETS,
    build_denoiser,
    denoiser_from_config,
    downsampling_factor,
)
from emov2_gen.models.transformer_2d import demo_parameter_count
from emov2_gen.pipelines import EMOv2ImagePipeline
from emov2_gen.pipelines.pipeline_emov2_image import class_label_rows
from script_runs import load_script, run_script, tensorboard_scalars

train_ddpm = load_script(Path(__file__).resolve().parents[1] / "train" / "train_ddpm.py")
heldout_script = load_script(Path(__file__).resolve().parents[1] / "eval" / "heldout_loss.py")

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE_KEYS = ("num_attention_heads", "attention_head_dim", "num_layers", "patch_size")
# DiT's published sizes (Peebles & Xie, DiT-S/2 33.0M and DiT-B/2 130.5M): DiT's own count, depth * (18d^2 + 15d) +
# 3d^2 + 1566d + 32 at 32x32x4, patch 2, 1000 classes + null, learned sigma (position embedding included).
PUBLISHED_DIT = {"dit-s-2": 32_963_360, "dit-b-2": 130_512_416}


def dit_published_count(d: int, depth: int) -> int:
    return depth * (18 * d * d + 15 * d) + 3 * d * d + 1566 * d + 32


def tiny_dit(num_class_embeds: int = 11, in_channels: int = 1, seed: int = 0, **overrides) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    fields = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, **overrides)
    return build_denoiser("dit-t-2", 8, in_channels, num_class_embeds=num_class_embeds, **fields).eval()


# ------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name, demo", [("dit-s-2", "demo-s-2"), ("dit-b-2", "demo-b-2")])
def test_dit_presets_count_as_diffusers_own_dit(name, demo):
    with torch.device("meta"):
        model = build_denoiser(name, 32, 4, num_class_embeds=1001)
        heads = EMOV2_TRANSFORMER_PRESETS[demo]["num_attention_heads"]
        direct = DiTTransformer2DModel(  # DiT-X/2 as DiT's configs, built directly
            num_attention_heads=heads, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
        )
    assert isinstance(model, DiTTransformer2DModel)
    assert {key: model.config[key] for key in SIZE_KEYS} == {key: EMOV2_TRANSFORMER_PRESETS[demo][key] for key in SIZE_KEYS}
    assert model.config.out_channels == 8 and model.config.num_embeds_ada_norm == 1000
    count = model.num_parameters()
    assert count == direct.num_parameters() == sum(p.numel() for p in model.parameters())
    # Not DiT's published size: diffusers gives each block its own timestep MLP (d^2 + 258d) and 1001-row label
    # table, and keeps the 256-token position embedding as a buffer.
    d, depth = model.inner_dim, model.config.num_layers
    assert dit_published_count(d, depth) == PUBLISHED_DIT[name]
    assert count == PUBLISHED_DIT[name] - 256 * d + (depth - 1) * (d * d + 258 * d + 1001 * d)
    assert count > PUBLISHED_DIT[name]


def test_the_tiny_pair_has_one_size_and_demo_blocks_are_smaller():
    assert {"demo-t-2", "dit-t-2", "dit-s-2", "dit-b-2"} <= set(DENOISER_PRESETS)
    demo = build_denoiser("demo-t-2", 32, 1, num_class_embeds=11)
    dit = build_denoiser("dit-t-2", 32, 1, num_class_embeds=11)
    assert isinstance(demo, EMOv2Transformer2DModel)
    assert {k: demo.config[k] for k in SIZE_KEYS} == {k: dit.config[k] for k in SIZE_KEYS} == {
        "num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 6, "patch_size": 2,
    }
    assert demo.config.window_size == 8 and demo.config.out_channels == dit.config.out_channels == 2
    d = 128
    demo_block = sum(p.numel() for p in demo.transformer_blocks[0].parameters())
    dit_block = sum(p.numel() for p in dit.transformer_blocks[0].parameters())
    assert demo_block == 13 * d * d + 119 * d  # adaLN + i2RMB
    assert dit_block == 18 * d * d + 15 * d + (d * d + 258 * d + 11 * d)  # attention + MLP + adaLN + its embedders
    assert (demo.num_parameters(), dit.num_parameters()) == (1_487_880, 2_120_584)
    # DEMO's logged formula is at 1001 label rows, 4 input and 8 output channels: here 11 rows, 1 in, 2 out.
    patch_in, patch_out = 2 * 2 * (1 - 4) * d, 2 * 2 * (2 - 8) * (d + 1)
    assert demo.num_parameters() == demo_parameter_count(d, 6) + (11 - 1001) * d + patch_in + patch_out


# ------------------------------------------------------------------------------------------ registry


def test_build_denoiser_maps_label_rows_and_turns_dit_label_dropout_off():
    model = tiny_dit(num_class_embeds=11)
    assert model.config.num_embeds_ada_norm == 10 and class_label_rows(model) == 11  # 10 classes + null row 10
    tables = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    assert len(tables) == 2 and all(t.embedding_table.num_embeddings == 11 for t in tables)  # one per block
    assert (model.config.in_channels, model.config.out_channels, downsampling_factor(model)) == (1, 2, 2)
    assert build_denoiser("dit-t-2", 8, 3, out_channels=3, num_class_embeds=1).config.out_channels == 3

    # Training mode: diffusers would drop each label to row 10 with p 0.1 in every block; here labels pass as given.
    x, t, y = torch.randn(32, 1, 8, 8), torch.randint(0, 1000, (32,)), torch.randint(0, 10, (32,))
    with torch.no_grad():
        expected = model(x, t, class_labels=y).sample
        model.train()
        torch.manual_seed(0)
        trained = model(x, t, class_labels=y).sample
        default = DiTTransformer2DModel.from_config(model.config)  # diffusers' own label dropout
        default.load_state_dict(model.state_dict())
        torch.manual_seed(0)
        dropped = default.train()(x, t, class_labels=y).sample
    assert torch.equal(trained, expected)
    assert not torch.allclose(dropped, expected)


def test_dit_needs_label_rows_and_unknown_names_raise():
    with pytest.raises(ValueError, match="class-conditional: it needs num_class_embeds >= 1.*--class_conditional"):
        build_denoiser("dit-t-2", 32, 1)
    with pytest.raises(ValueError, match="got 0"):
        build_denoiser("dit-t-2", 32, 1, num_class_embeds=0)
    with pytest.raises(ValueError, match="Unknown model preset 'dit-l-2'; valid presets are: .*dit-s-2, dit-b-2"):
        build_denoiser("dit-l-2")
    assert set(BASELINE_DIT_PRESETS) == {"dit-s-2", "dit-b-2", "dit-t-2"}


def test_denoiser_from_config_loads_a_dit(tmp_path):
    tiny_dit(num_class_embeds=11, in_channels=4).save_config(tmp_path / "dit")
    same = denoiser_from_config(tmp_path / "dit")
    assert isinstance(same, DiTTransformer2DModel)
    assert (same.config.in_channels, same.config.out_channels, class_label_rows(same)) == (4, 8, 11)
    # train_ddpm.py's overrides: the data's channels and label rows; out_channels=None keeps the learned sigma.
    model = denoiser_from_config(tmp_path / "dit", sample_size=16, in_channels=3, out_channels=None, num_class_embeds=5)
    assert (model.config.sample_size, model.config.in_channels, model.config.out_channels) == (16, 3, 6)
    assert model.config.num_embeds_ada_norm == 4
    assert all(m.dropout_prob == 0 for m in model.modules() if isinstance(m, LabelEmbedding))
    assert downsampling_factor(model) == 2
    tiny_dit(in_channels=4, out_channels=4).save_config(tmp_path / "no-sigma")
    assert denoiser_from_config(tmp_path / "no-sigma", in_channels=1, out_channels=None).config.out_channels == 1
    with pytest.raises(ValueError, match="needs num_class_embeds"):
        denoiser_from_config(tmp_path / "dit", num_class_embeds=None)


# ------------------------------------------------------------------------------------------ FLOPs


def test_gflops_count_dit_attention():
    """By hand: 2 FLOPs per multiply-add of the patch conv, every Linear (per token, or per image for the adaLN and
    the timestep MLPs: one per block plus the final layer's) and both attention matmuls (2 T^2 d per block)."""
    model = tiny_dit(num_class_embeds=5, in_channels=4)
    d, depth, p, c_in, c_out, side = 16, 2, 2, 4, 8, 8
    tokens = (side // p) ** 2
    per_token = p * p * c_in * d + depth * (4 * d * d + 8 * d * d) + d * p * p * c_out
    per_image = depth * (6 * d * d) + (depth + 1) * (256 * d + d * d) + 2 * d * d
    attention = depth * 2 * tokens * tokens * d
    gflops = count_gflops(NullClassDenoiser(model), side, c_in)
    assert gflops * 1e9 == pytest.approx(2 * (tokens * per_token + per_image + attention))
    assert 2 * attention / (gflops * 1e9) > 0.05  # the attention share is not lost in the tolerance


# ------------------------------------------------------------------------------------------ pipeline


def sample(pipeline: EMOv2ImagePipeline, scheduler, **kwargs) -> np.ndarray:
    pipeline.scheduler = scheduler
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(num_inference_steps=3, generator=torch.manual_seed(0), output_type="np", **kwargs).images


def test_image_pipeline_samples_saves_and_reloads_a_dit(tmp_path):
    model = tiny_dit(num_class_embeds=11)
    pipeline = EMOv2ImagePipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=50), null_class_label=10)
    assert pipeline.num_classes == 10
    ddim = DDIMScheduler(num_train_timesteps=50)
    guided = sample(pipeline, ddim, class_labels=[3, 7], guidance_scale=3.0)
    unconditional = sample(pipeline, ddim, batch_size=2)  # the null class
    assert guided.shape == unconditional.shape == (2, 8, 8, 1) and not np.array_equal(guided, unconditional)
    with pytest.raises(ValueError, match=r"Class labels must lie in \[0, 9\]"):
        sample(pipeline, ddim, class_labels=[10])

    # The prediction half drives DDIM: changing the variance half of the output changes nothing.
    changed = tiny_dit(num_class_embeds=11)
    with torch.no_grad():
        changed.proj_out_2.bias[1::2] -= 3.0  # (p, q, c) order, c_out = 2: odd entries are the variance channel
    other = EMOv2ImagePipeline(unet=changed, scheduler=ddim, null_class_label=10)
    np.testing.assert_array_equal(sample(other, ddim, class_labels=[3, 7], guidance_scale=3.0), guided)

    pipeline.save_pretrained(tmp_path / "pipe")
    reloaded = EMOv2ImagePipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(reloaded.unet, DiTTransformer2DModel) and reloaded.config.null_class_label == 10
    ddim = DDIMScheduler(num_train_timesteps=50)
    np.testing.assert_array_equal(sample(reloaded, ddim, class_labels=[3, 7], guidance_scale=3.0), guided)
    ddpm = DDPMScheduler(num_train_timesteps=50)
    np.testing.assert_array_equal(sample(reloaded, ddpm, batch_size=2), sample(pipeline, ddpm, batch_size=2))


def test_train_ddpm_trains_a_class_conditional_dit_with_the_held_out_loss(tmp_path, mnist_dir):
    """`train_ddpm.py --model dit-t-2 --class_conditional` (the DEMO vs DiT comparison's baseline run): labels from
    MNIST, the held-out loss on labelled test digits, and an `EMOv2ImagePipeline` holding the DiT."""
    config = tmp_path / "dit"
    tiny_dit().save_config(config)
    out = tmp_path / "run"
    run_script(train_ddpm, [
        "--model_config_name_or_path", str(config), "--dataset_name", str(mnist_dir), "--resolution", "8",
        "--class_conditional", "--train_batch_size", "4", "--max_train_samples", "16", "--max_train_steps", "2",
        "--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2", "--lr_warmup_steps", "1",
        "--heldout_split", "test", "--heldout_num_images", "8", "--heldout_steps", "1", "--output_dir", str(out),
    ])  # fmt: skip
    pipeline = EMOv2ImagePipeline.from_pretrained(out)
    assert isinstance(pipeline.unet, DiTTransformer2DModel) and pipeline.num_classes == 10
    assert class_label_rows(pipeline.unet) == 11 and pipeline.config.null_class_label == 10
    heldout = tensorboard_scalars(out / "logs")["heldout_loss"]
    assert len(heldout) == 2 and all(np.isfinite(heldout))
    # eval/heldout_loss.py scores the saved DiT on the same labelled test digits (no EMA: the trained weights).
    (row,) = heldout_script.main(heldout_script.parse_args(
        ["--model_dirs", str(out), "--dataset_name", str(mnist_dir), "--num_images", "8"]))
    assert row["model_class"] == "DiTTransformer2DModel" and row["heldout_loss"] == pytest.approx(heldout[-1], rel=1e-5)
