"""The held-out denoising loss: fixed inputs, the training objective, and its logging during training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from diffusers import DDPMScheduler, UNet2DModel

from emov2_gen.diffusion_loss import diffusion_loss
from emov2_gen.evaluation.heldout_loss import HeldOutSet, heldout_images, heldout_loss, timestep_grid
from emov2_gen.training_utils import TrainingClock
from script_runs import load_script, run_script, tensorboard_scalars

train_ddpm = load_script(Path(__file__).resolve().parents[1] / "train" / "train_ddpm.py")
heldout_script = load_script(Path(__file__).resolve().parents[1] / "eval" / "heldout_loss.py")
pytestmark = pytest.mark.usefixtures("one_thread")


class Constant(torch.nn.Module):
    """A 'denoiser' that predicts `value` everywhere (UNet2DOutput-like), to check the loss by hand."""

    def __init__(self, value: float, channels: int = 1) -> None:
        super().__init__()
        self.value, self.channels = value, channels
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, sample, timestep, class_labels=None):
        return type("Out", (), {"sample": torch.full((len(sample), self.channels, *sample.shape[2:]), self.value)})


def test_grid_is_the_bin_centres():
    assert timestep_grid(1000, 4) == [125, 375, 625, 875]
    assert timestep_grid(10, 10) == list(range(10)) and timestep_grid(1000, 1) == [500]
    with pytest.raises(ValueError):
        timestep_grid(1000, 0)


def test_set_is_fixed_by_its_seed_and_cycles_the_grid():
    images = torch.rand(10, 1, 4, 4) * 2 - 1
    a, b = HeldOutSet.build(images, 1000, 4, seed=3), HeldOutSet.build(images, 1000, 4, seed=3)
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, HeldOutSet.build(images, 1000, 4, seed=4).noise)
    assert a.timesteps.tolist() == [125, 375, 625, 875] * 2 + [125, 375]
    with pytest.raises(ValueError, match="cannot cover"):
        HeldOutSet.build(images[:3], 1000, 4)
    with pytest.raises(ValueError, match="class labels"):
        HeldOutSet.build(images, 1000, 4, class_labels=torch.zeros(3, dtype=torch.long))


def test_loss_is_the_training_objective_averaged_per_timestep():
    """A zero predictor's epsilon loss is the mean squared noise; grouped by timestep, then averaged over the grid."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    heldout = HeldOutSet.build(torch.zeros(6, 1, 4, 4), 1000, 4, seed=0)  # timesteps 125, 375, 625, 875, 125, 375
    result = heldout_loss(Constant(0.0), heldout, scheduler, batch_size=4)  # two batches
    per_image = heldout.noise.pow(2).mean(dim=(1, 2, 3)).double()
    assert result.per_timestep[125] == pytest.approx((per_image[0] + per_image[4]).item() / 2)
    assert result.per_timestep[875] == pytest.approx(per_image[3].item())
    assert result.mean == pytest.approx(sum(result.per_timestep.values()) / 4)
    # The same objective as training, to the last bit, for a real model and a non-default prediction type.
    model = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                        layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    images = torch.rand(4, 1, 4, 4) * 2 - 1
    heldout = HeldOutSet.build(images, 1000, 4, seed=1)
    noisy = v_scheduler.add_noise(heldout.images, heldout.noise, heldout.timesteps)
    with torch.no_grad():
        expected = diffusion_loss(model(noisy, heldout.timesteps).sample, heldout.images, heldout.noise,
                                  heldout.timesteps, v_scheduler, "v_prediction")
    model.train()
    assert heldout_loss(model, heldout, v_scheduler).mean == pytest.approx(expected.item(), rel=1e-6)
    assert model.training  # the mode is restored
    assert set(heldout_loss(model, heldout, v_scheduler).scalars()) == {
        "heldout_loss", "heldout_loss_t0125", "heldout_loss_t0375", "heldout_loss_t0625", "heldout_loss_t0875"}


def test_learned_sigma_output_is_scored_on_its_prediction_half():
    heldout = HeldOutSet.build(torch.zeros(4, 1, 4, 4), 1000, 4)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    assert heldout_loss(Constant(0.0, channels=2), heldout, scheduler).mean == pytest.approx(
        heldout_loss(Constant(0.0), heldout, scheduler).mean)


def test_heldout_images_are_the_first_images_centre_cropped(mnist_dir):
    test_split = load_dataset(str(mnist_dir), split="test")
    images, labels = heldout_images(test_split, resolution=32, channels=1, num_images=5, with_labels=True)
    assert images.shape == (5, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert labels.tolist() == test_split["label"][:5]
    again, _ = heldout_images(test_split, resolution=32, channels=1, num_images=5)
    assert torch.equal(images, again)
    with pytest.raises(ValueError, match="only"):
        heldout_images(test_split.select(range(3)), 32, 1, num_images=4)


def test_clock_counts_only_running_stretches_and_restores_from_state():
    clock = TrainingClock()
    clock.start()
    clock.stop()
    first = clock.elapsed
    assert first >= 0 and clock.elapsed == first  # stopped: no time passes
    restored = TrainingClock()
    restored.load_state_dict({"seconds": 12.5})
    assert restored.elapsed == 12.5 and restored.state_dict() == {"seconds": 12.5}


def test_training_logs_heldout_loss_and_train_seconds_on_mnist(tmp_path, mnist_dir):
    out = tmp_path / "run"
    config = tmp_path / "tiny"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2
                ).save_config(config)
    run_script(train_ddpm, [
        "--output_dir", str(out), "--model_config_name_or_path", str(config), "--dataset_name", str(mnist_dir),
        "--resolution", "8", "--train_batch_size", "4", "--max_train_samples", "16", "--max_train_steps", "5",
        "--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2",
        "--lr_warmup_steps", "1", "--learning_rate", "1e-3", "--use_ema", "--heldout_split", "test",
        "--heldout_num_images", "8", "--heldout_num_timesteps", "4", "--heldout_steps", "2",
    ])
    scalars = tensorboard_scalars(out / "logs")
    assert len(scalars["heldout_loss"]) == 3 and len(scalars["heldout_loss_ema"]) == 3  # steps 2, 4 and the last
    assert len(scalars["heldout_loss_t0031"]) == 3
    seconds = scalars["train_seconds"]
    assert len(seconds) == 5 and seconds == sorted(seconds) and seconds[0] > 0
    # The logged value is the saved model's held-out loss (EMA weights are what the pipeline saves).
    test_split = load_dataset(str(mnist_dir), split="test")
    images, _ = heldout_images(test_split, 8, 1, 8)
    saved = UNet2DModel.from_pretrained(out, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    expected = heldout_loss(saved, HeldOutSet.build(images, 50, 4, seed=0), scheduler).mean
    assert scalars["heldout_loss_ema"][-1] == pytest.approx(expected, rel=1e-5)

    # eval/heldout_loss.py reports the same number for the saved pipeline, its training resolution read off the model.
    argv = ["--model_dirs", str(out), "--dataset_name", str(mnist_dir), "--num_images", "8", "--num_timesteps", "4",
            "--output_json", str(tmp_path / "heldout.json")]
    (row,) = heldout_script.main(heldout_script.parse_args(argv))
    assert row["heldout_loss"] == pytest.approx(expected, rel=1e-6) and row["resolution"] == 8
    assert list(row["per_timestep"]) == timestep_grid(50, 4) and (tmp_path / "heldout.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--heldout_split", "test"], "needs --dataset_name"),
    (["--heldout_steps", "0"], "heldout_steps"),
])
def test_bad_heldout_flags_are_rejected(extra, message):
    with pytest.raises(ValueError, match=message):
        train_ddpm.parse_args(["--max_train_steps", "1", *extra])
