"""train/train_ddpm.py in a VAE's latent space (`--vae_name_or_path`): a tiny random `AutoencoderKL`, tiny denoisers
of every class, a few steps on the offline digits (greyscale, so the VAE is too), temporary folders, in-process runs.

8px digits -> the VAE's 4x4x4 latents: the denoiser is built for, trained on and sampled in those; the saved pipeline
decodes them back to 8px images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image

from emov2_gen.data.image_datasets import load_image_dataset
from emov2_gen.data.training_images import derived_seed
from emov2_gen.models import EMOv2Transformer2DModel, EMOv2UNet2DModel
from emov2_gen.pipelines import EMOv2ImagePipeline
from script_runs import (
    assert_same_weights,
    checkpoint_names,
    load_script,
    run_script,
    run_until_checkpoint,
    tensorboard_scalars,
    weights,
)

REPO = Path(__file__).resolve().parents[1]
train_ddpm = load_script(REPO / "train" / "train_ddpm.py")
heldout_script = load_script(REPO / "eval" / "heldout_loss.py")
pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION, LATENT_CHANNELS, LATENT_SIZE = 8, 4, 4  # the VAE downsamples 2x
SCALING_FACTOR = 0.5


@pytest.fixture
def vae_dir(tmp_path) -> Path:
    """A randomly initialised 2-level AutoencoderKL for greyscale images (downscale 2, 4 latent channels)."""
    path = tmp_path / "tiny_vae"
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=LATENT_CHANNELS,
        norm_num_groups=4, layers_per_block=1, sample_size=RESOLUTION, scaling_factor=SCALING_FACTOR,
    ).save_pretrained(path)
    return path


def save_config(model_cls: type, path: Path, **config) -> Path:
    """Write the config.json of a `model_cls` built from `config` (the script fills in sizes and channels)."""
    model_cls.from_config(config).save_config(path)
    return path


@pytest.fixture
def unet2d_config(tmp_path) -> Path:
    """A 2-level UNet2DModel (downsampling factor 2); sample_size and channels are set by the script."""
    return save_config(
        UNet2DModel, tmp_path / "tiny_unet2d", block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )


@pytest.fixture
def emov2_unet_config(tmp_path) -> Path:
    """A 2-level EMOv2 UNet: conv i2RMBs at 4x4, SEW-MHSA (global windows) at 2x2."""
    return save_config(
        EMOv2UNet2DModel, tmp_path / "tiny_emov2_unet", block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("EMOv2DownBlock2D", "EMOv2AttnDownBlock2D"),
        up_block_types=("EMOv2AttnUpBlock2D", "EMOv2UpBlock2D"), expansion_ratios=2.0, attention_head_dim=8,
        window_sizes=-1,
    )


@pytest.fixture
def demo_config(tmp_path) -> Path:
    """A 2-block D-EMOv2 transformer with learned sigma (patch 2: a 2x2 token map of the 4x4 latents)."""
    return save_config(
        EMOv2Transformer2DModel, tmp_path / "tiny_demo", num_attention_heads=2, attention_head_dim=8, num_layers=2,
        window_size=-1, expansion_ratio=2.0, num_class_embeds=None,
    )


def quick_args(output_dir: Path, config: Path, vae: Path, *extra: str, steps: Optional[int] = 2) -> list[str]:
    """A tiny latent run: 20 digits at 8x8, batches of 4 (5 batches an epoch), 2-step previews of 2 images."""
    return [
        "--output_dir", str(output_dir), "--model_config_name_or_path", str(config), "--vae_name_or_path", str(vae),
        "--resolution", str(RESOLUTION), "--train_batch_size", "4", "--max_train_samples", "20",
        "--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2",
        "--lr_warmup_steps", "1", "--learning_rate", "1e-3",
        *(["--max_train_steps", str(steps)] if steps is not None else []), *extra,
    ]


def run_training(argv: list[str]) -> None:
    run_script(train_ddpm, argv)


def sample_by_hand(pipeline: EMOv2ImagePipeline) -> torch.Tensor:
    """Two DDIM-2 samples drawn as the pipeline should draw them: latents from torch.manual_seed(0), the prediction
    channels of the denoiser, then vae.decode(latents / scaling_factor) mapped from [-1, 1] to [0, 1]."""
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(2)
    latents = torch.randn((2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=torch.manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            prediction = pipeline.unet(latents, t).sample[:, :LATENT_CHANNELS]
            latents = scheduler.step(prediction, t, latents).prev_sample
        decoded = pipeline.vae.decode(latents / SCALING_FACTOR).sample
    return (decoded / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------ training runs


@pytest.mark.parametrize("config_name", ["unet2d_config", "emov2_unet_config", "demo_config"])
def test_trains_on_vae_latents_and_saves_a_pipeline_that_decodes_them(
    tmp_path, vae_dir, config_name, request, monkeypatch
):
    out = tmp_path / "latent"
    vaes, load_vae = [], train_ddpm.load_vae

    def recording_load_vae(*args) -> AutoencoderKL:
        vaes.append(load_vae(*args))
        return vaes[-1]

    monkeypatch.setattr(train_ddpm, "load_vae", recording_load_vae)
    run_training(quick_args(out, request.getfixturevalue(config_name), vae_dir, steps=3))

    # The VAE stayed frozen: eval mode, no parameter asked for or received a gradient.
    (vae,) = vaes
    assert not vae.training and all(not p.requires_grad and p.grad is None for p in vae.parameters())

    # The denoiser was built for (and so trained on) the latents, not the 1x8x8 images.
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == LATENT_CHANNELS and unet_config["sample_size"] == LATENT_SIZE
    learned_sigma = config_name == "demo_config"
    assert unet_config["out_channels"] == LATENT_CHANNELS * (2 if learned_sigma else 1)
    assert all(np.isfinite(tensorboard_scalars(out / "logs")["loss"]))

    # The saved pipeline holds the VAE, unchanged by training.
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "EMOv2ImagePipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert_same_weights(weights(vae_dir), weights(out / "vae"))

    # It loads (with its own scheduler, or another) and samples 8px images: the decoded latents, as drawn by hand.
    pipeline = EMOv2ImagePipeline.from_pretrained(out)
    assert isinstance(pipeline.vae, AutoencoderKL)
    ddim = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    reloaded = EMOv2ImagePipeline.from_pretrained(out, scheduler=ddim)
    reloaded.set_progress_bar_config(disable=True)
    images = reloaded(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(images, sample_by_hand(reloaded), rtol=1e-5, atol=1e-6)
    np_images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert np_images.shape == (2, RESOLUTION, RESOLUTION, 1) and np.isfinite(np_images).all()

    # The preview grid (after the only epoch) shows 8px images too: 2 side by side, 2px padding.
    (grid,) = (out / "samples").glob("*.png")
    assert Image.open(grid).size == (2 * (RESOLUTION + 2) + 2, RESOLUTION + 2 * 2)


def test_logged_loss_equals_a_recomputation_from_the_vae_latents(tmp_path, vae_dir, unet2d_config):
    """One digit, one step at learning rate 0 (so the saved model is the one that computed the loss); the VAE is
    loaded from a subfolder, as from a saved pipeline."""
    out = tmp_path / "loss"
    run_training(quick_args(out, unet2d_config, tmp_path, "--vae_subfolder", vae_dir.name, "--max_train_samples", "1",
                            "--center_crop", "--learning_rate", "0", steps=1))
    (logged,) = tensorboard_scalars(out / "logs")["loss"]

    dataset, _ = load_image_dataset()
    digit = dataset.shuffle(seed=0).select(range(1))[0]["image"]  # --max_train_samples 1, --seed 0
    pixels = torch.from_numpy(np.asarray(digit, dtype=np.float32) / 255.0 * 2.0 - 1.0)[None, None]
    assert pixels.shape == (1, 1, RESOLUTION, RESOLUTION)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    unet = UNet2DModel.from_pretrained(out, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    # Epoch 0, batch 0, process 0 of each stream, as the script's module docstring lays them out.
    latent_generator = torch.Generator().manual_seed(derived_seed(0, train_ddpm.LATENT_STREAM, 0, 0, 0))
    noise_generator = torch.Generator().manual_seed(derived_seed(0, train_ddpm.NOISE_STREAM, 0, 0, 0))
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(latent_generator) * SCALING_FACTOR
        noise = torch.randn(latents.shape, generator=noise_generator)
        timesteps = torch.randint(0, 50, (1,), generator=noise_generator)

        def loss(clean: torch.Tensor) -> float:
            prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
            assert prediction.shape == (1, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
            return F.mse_loss(prediction, noise).item()

        assert logged == pytest.approx(loss(latents), rel=1e-5)
        # Not the loss of the unscaled or of the mean latents: the recomputation pins the encoding.
        for wrong in (latents / SCALING_FACTOR, posterior.mode() * SCALING_FACTOR):
            assert logged != pytest.approx(loss(wrong), rel=1e-3)


def test_resume_reproduces_the_uninterrupted_latent_run(tmp_path, vae_dir, unet2d_config, monkeypatch):
    """7 steps in one go == 4 steps, an interruption, and a resume to 7 (crossing epochs, mid-epoch resume): the
    latent samples, like the noise, are a function of (seed, epoch, batch, process)."""
    common = ["--checkpointing_steps", "2", "--gradient_accumulation_steps", "2", "--random_flip", "--use_ema"]
    run_training(quick_args(tmp_path / "straight", unet2d_config, vae_dir, *common, steps=7))

    resumed = tmp_path / "resumed"
    run_until_checkpoint(train_ddpm, quick_args(resumed, unet2d_config, vae_dir, *common, steps=7), 4, monkeypatch)
    assert checkpoint_names(resumed) == ["checkpoint-2", "checkpoint-4"]
    run_training(quick_args(resumed, unet2d_config, vae_dir, *common, "--resume_from_checkpoint", "latest", steps=7))

    straight = tmp_path / "straight"
    for sub in ("unet", "checkpoint-6/unet", "checkpoint-6/unet_ema"):
        assert_same_weights(weights(straight / sub), weights(resumed / sub))
    # A run from another seed differs, so the equality above is not vacuous.
    run_training(quick_args(tmp_path / "other_seed", unet2d_config, vae_dir, *common, "--seed", "1", steps=7))
    other = weights(tmp_path / "other_seed" / "unet")
    assert any(not torch.allclose(other[k], v) for k, v in weights(straight / "unet").items())


def test_trains_in_bf16_with_the_vae_in_bf16(tmp_path, vae_dir, unet2d_config):
    """The frozen VAE runs (and is saved, as in diffusers' training scripts) in the mixed precision's dtype."""
    out = tmp_path / "bf16"
    run_training(quick_args(out, unet2d_config, vae_dir, "--mixed_precision", "bf16"))
    assert_same_weights({k: v.to(torch.bfloat16) for k, v in weights(vae_dir).items()}, weights(out / "vae"))
    pipeline = EMOv2ImagePipeline.from_pretrained(out)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------ building, failures


def test_the_demo_preset_is_built_for_the_latents():
    """`--model demo-s-2` gets the latents' channels and size, and keeps its learned sigma."""
    args = train_ddpm.parse_args(["--model", "demo-s-2", "--vae_name_or_path", "vae", "--resolution", "64"])
    with torch.device("meta"):
        model = train_ddpm.build_model(args, LATENT_CHANNELS, 8, None)
    assert isinstance(model, EMOv2Transformer2DModel)
    assert (model.config.in_channels, model.config.out_channels, model.config.sample_size) == (4, 8, 8)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "9"], r"--resolution 9 is not divisible by 2, the downsampling factor of the VAE"),
        (["--resolution", "10"], r"The latent size 5 of --resolution 10 is not divisible by 2.*multiple of 4\."),
        (["--in_channels", "3"], r"The VAE encodes 1-channel images, but --in_channels is 3"),
    ],
    ids=["vae-factor", "denoiser-factor", "channels"],
)
def test_bad_latent_input_fails_before_training(tmp_path, vae_dir, unet2d_config, extra, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_training(quick_args(out, unet2d_config, vae_dir, *extra))
    assert not out.exists() or not any(out.iterdir())


def test_vae_subfolder_needs_a_vae():
    with pytest.raises(ValueError, match="--vae_subfolder needs --vae_name_or_path"):
        train_ddpm.parse_args(["--vae_subfolder", "vae"])


def test_latent_held_out_loss_is_logged_and_reproduced_by_the_script(tmp_path, vae_dir, unet2d_config, mnist_dir):
    """With a VAE the held-out images are the VAE's latent means; eval/heldout_loss.py finds the pixel resolution
    from the latent size and the VAE's downsampling and reproduces the logged value."""
    out = tmp_path / "latent"
    run_training(quick_args(out, unet2d_config, vae_dir, "--dataset_name", str(mnist_dir), "--heldout_split", "test",
                            "--heldout_num_images", "8", "--heldout_steps", "2"))  # fmt: skip
    logged = tensorboard_scalars(out / "logs")["heldout_loss"]
    assert len(logged) == 1 and np.isfinite(logged[-1])
    (row,) = heldout_script.main(heldout_script.parse_args(
        ["--model_dirs", str(out), "--dataset_name", str(mnist_dir), "--num_images", "8"]))
    assert row["resolution"] == RESOLUTION and row["heldout_loss"] == pytest.approx(logged[-1], rel=1e-5)
