"""train/train_ddpm.py end to end: tiny models, a few steps, temporary folders, offline.

Most runs call the script's `main` in this process; the accelerate-launch/two-process run and the fresh-process
pipeline load use subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel
from PIL import Image

from emov2_gen import EMOV2_UNET_PRESETS, EMOv2UNet2DModel
from emov2_gen import training_utils
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
TRAIN_SCRIPT = REPO / "train" / "train_ddpm.py"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


train_ddpm = load_script(TRAIN_SCRIPT)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """A 2-level, 0.16M-parameter UNet2DModel config (downsampling factor 2)."""
    path = tmp_path / "tiny_unet"
    UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_config(path)
    return path


def quick_args(output_dir: Path, config: Path, *extra: str, steps: Optional[int] = 2) -> list[str]:
    """A tiny run: 20 digits at 8x8, batches of 4 (5 batches an epoch), 2-step previews."""
    return [
        "--output_dir", str(output_dir), "--model_config_name_or_path", str(config), "--resolution", "8",
        "--train_batch_size", "4", "--max_train_samples", "20", "--ddpm_num_steps", "50",
        "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2", "--lr_warmup_steps", "1",
        *(["--max_train_steps", str(steps)] if steps is not None else []), *extra,
    ]


def run_training(argv: list[str]) -> None:
    run_script(train_ddpm, argv)


def tensorboard_image_count(logging_dir: Path, tag: str) -> int:
    """How many images were logged to tensorboard under `tag`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    count = 0
    for events in logging_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events)).Reload()
        if tag in accumulator.Tags()["images"]:
            count += len(accumulator.Images(tag))
    return count


def write_images(folder: Path, count: int, mode: str = "RGB", size: int = 12) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


# ------------------------------------------------------------------------------------------ training runs


def test_trains_on_offline_digits_checkpoints_prunes_and_saves_ema_pipeline(tmp_path, tiny_config, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
                            "--use_ema", "--eval_scheduler", "ddim", "--random_flip", "--save_images_epochs", "1",
                            steps=6))

    assert "scikit-learn digits" in caplog.text and "resized to 8x8" in caplog.text
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-6"]  # 2 was pruned, no partial folder is left
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    # The saved model holds the EMA weights, as in the anchor.
    assert_same_weights(weights(out / "unet"), weights(out / "checkpoint-6" / "unet_ema"))
    raw = weights(out / "checkpoint-6" / "unet")
    assert any(not torch.equal(raw[k], v) for k, v in weights(out / "unet").items())

    pipeline = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline, DDPMPipeline) and isinstance(pipeline.unet, UNet2DModel)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()

    # 6 steps of 5 batches: a grid after epoch 0 and after the last (partial) epoch 1.
    grids = sorted(path.name for path in (out / "samples").glob("*.png"))
    assert grids == ["epoch_0000_step_0000005.png", "epoch_0001_step_0000006.png"]
    assert Image.open(out / "samples" / grids[0]).size[0] > 2 * 8  # a grid of 2 images side by side
    assert tensorboard_image_count(out / "logs", "samples") == 2
    scalars = tensorboard_scalars(out / "logs")
    for tag in ("loss", "lr", "ema_decay", "images_per_second"):
        assert len(scalars[tag]) == 6, tag
    assert all(np.isfinite(scalars["loss"]))
    assert scalars["ema_decay"] == sorted(scalars["ema_decay"])  # warm-up: the decay only grows


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_config, monkeypatch):
    """7 steps in one go == 4 steps, an interruption, and a resume to 7 (crossing epochs, mid-epoch resume)."""
    common = ["--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--random_flip", "--use_ema", "--class_conditional", "--learning_rate", "1e-3"]
    run_training(quick_args(tmp_path / "straight", tiny_config, *common, steps=7))

    resumed = tmp_path / "resumed"
    run_until_checkpoint(train_ddpm, quick_args(resumed, tiny_config, *common, steps=7), 4, monkeypatch)
    assert checkpoint_names(resumed) == ["checkpoint-2", "checkpoint-4"]
    run_training(quick_args(resumed, tiny_config, *common, "--resume_from_checkpoint", "latest", steps=7))

    straight = tmp_path / "straight"
    for sub in ("unet", "checkpoint-6/unet", "checkpoint-6/unet_ema"):
        assert_same_weights(weights(straight / sub), weights(resumed / sub))
    state_a = torch.load(straight / "checkpoint-6" / "optimizer.bin", weights_only=True)["state"]
    state_b = torch.load(resumed / "checkpoint-6" / "optimizer.bin", weights_only=True)["state"]
    for index in state_a:
        torch.testing.assert_close(state_a[index]["exp_avg_sq"], state_b[index]["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    # A run from another seed differs, so the equality above is not vacuous.
    run_training(quick_args(tmp_path / "other_seed", tiny_config, *common, "--seed", "1", steps=7))
    other = weights(tmp_path / "other_seed" / "unet")
    assert any(not torch.allclose(other[k], v) for k, v in weights(straight / "unet").items())


def test_two_processes_train_data_parallel_with_accelerate_launch(tmp_path, tiny_config):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT),
               *quick_args(out, tiny_config, "--max_train_samples", "24", "--checkpointing_steps", "4", steps=4)]
    env = {**os.environ, **OFFLINE_ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Num processes: 2" in log and "Backend: gloo" in log
    # 24 examples / (4 per process x 2 processes) = 3 steps per epoch, so 4 steps take 2 epochs.
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in log
    assert "Num epochs = 2" in log
    checkpoint = out / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                                "random_states_1.pkl"]
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert torch.isfinite(pipeline(batch_size=1, num_inference_steps=2, output_type="pt").images).all()


def test_trains_the_emov2_preset_and_pipeline_loads_after_import(tmp_path):
    out = tmp_path / "emov2"
    run_training(["--output_dir", str(out), "--model", "emov2-1m", "--resolution", "8", "--train_batch_size", "2",
                  "--max_train_samples", "4", "--max_train_steps", "2", "--ddpm_num_steps", "50",
                  "--ddpm_num_inference_steps", "2", "--eval_batch_size", "1", "--prediction_type", "v_prediction",
                  "--use_ema"])
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline.unet, EMOv2UNet2DModel)
    assert pipeline.unet.config.block_out_channels == list(EMOV2_UNET_PRESETS["emov2-1m"]["block_out_channels"])
    assert pipeline.unet.config.in_channels == 1
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("model", ["emov2-1m", "unet2d-5m"])
def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path, model):
    common = ["--model", model, "--resolution", "8", "--train_batch_size", "2", "--max_train_samples", "4",
              "--max_train_steps", "2", "--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "1",
              "--eval_batch_size", "1", "--save_images_epochs", "100"]
    run_training(["--output_dir", str(tmp_path / "plain"), *common])
    run_training(["--output_dir", str(tmp_path / "checkpointed"), *common, "--gradient_checkpointing"])
    expected = weights(tmp_path / "plain" / "unet")
    for name, value in weights(tmp_path / "checkpointed" / "unet").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_class_conditional_training_saves_a_guidance_pipeline_loadable_as_custom_pipeline(tmp_path, tiny_config):
    out = tmp_path / "conditional"
    run_training(quick_args(out, tiny_config, "--class_conditional", "--class_dropout_prob", "0.2",
                            "--guidance_scale", "2.0"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "EMOv2ImagePipeline" and index["null_class_label"] == 10
    pipeline = EMOv2ImagePipeline.from_pretrained(out)
    assert pipeline.unet.config.num_class_embeds == 11 and pipeline.num_classes == 10
    reference = pipeline(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=2,
                         generator=torch.manual_seed(0), output_type="np").images

    # A user's fresh process: plain DiffusionPipeline with the pipeline code saved next to the weights.
    loader = (
        "import sys, numpy as np, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline='pipeline_emov2_image',"
        " trust_remote_code=True)\n"
        "images = pipe(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=2,"
        " generator=torch.manual_seed(0), output_type='np').images\n"
        "np.save(sys.argv[2], images)\n"
        "print(type(pipe).__name__)\n"
    )
    env = {**os.environ, **OFFLINE_ENV, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    result = subprocess.run([sys.executable, "-c", loader, str(out), str(tmp_path / "images.npy")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "EMOv2ImagePipeline"
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), reference, atol=1e-6)


def test_trains_on_mnist_from_a_local_datasets_folder_in_bf16(tmp_path, tiny_config, caplog, mnist_dir):
    out = tmp_path / "mnist"
    caplog.set_level(logging.INFO)
    run_training(quick_args(out, tiny_config, "--dataset_name", str(mnist_dir), "--cache_dir",
                            str(tmp_path / "cache"), "--center_crop", "--prediction_type", "sample",
                            "--mixed_precision", "bf16"))
    assert f"dataset {mnist_dir}" in caplog.text
    unet = UNet2DModel.from_pretrained(out, subfolder="unet")
    assert unet.config.in_channels == 1 and unet.config.sample_size == 8
    assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_rgb_image_folder_with_labels_from_subfolders(tmp_path, tiny_config):
    data = tmp_path / "images"
    write_images(data / "cats", 4)
    write_images(data / "dogs", 4)
    out = tmp_path / "rgb"
    run_training(quick_args(out, tiny_config, "--train_data_dir", str(data), "--class_conditional",
                            "--class_dropout_prob", "0"))
    pipeline = EMOv2ImagePipeline.from_pretrained(out)
    assert pipeline.unet.config.in_channels == 3 and pipeline.unet.config.num_class_embeds == 2
    assert pipeline.config.null_class_label is None
    images = pipeline(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)


def test_in_channels_flag_trains_greyscale_digits_as_rgb(tmp_path, tiny_config):
    out = tmp_path / "digits_rgb"
    run_training(quick_args(out, tiny_config, "--in_channels", "3"))
    assert UNet2DModel.load_config(out / "unet")["in_channels"] == 3


def test_num_epochs_sets_the_length_without_max_train_steps(tmp_path, tiny_config):
    out = tmp_path / "epochs"
    run_training(quick_args(out, tiny_config, "--num_epochs", "2", "--checkpointing_steps", "5", steps=None))
    assert checkpoint_names(out) == ["checkpoint-10", "checkpoint-5"]  # 2 epochs x 5 batches


def test_gradients_are_clipped_once_per_optimiser_step(tmp_path, tiny_config, monkeypatch):
    clip = Accelerator.clip_grad_norm_
    max_norms = []

    def recording_clip(self, parameters, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)
    run_training(quick_args(tmp_path / "clip", tiny_config, "--max_grad_norm", "0.25",
                            "--gradient_accumulation_steps", "2", steps=2))
    assert max_norms == [0.25, 0.25]  # 2 optimiser steps of 2 micro-batches each


def test_push_to_hub_uploads_the_saved_pipeline(tmp_path, tiny_config, monkeypatch):
    calls = []

    class Repo:
        repo_id = "user/tiny-ddpm"

    monkeypatch.setattr(train_ddpm, "create_repo", lambda **kwargs: calls.append(("create", kwargs)) or Repo())
    monkeypatch.setattr(train_ddpm, "upload_folder", lambda **kwargs: calls.append(("upload", kwargs)))
    out = tmp_path / "hub"
    run_training(quick_args(out, tiny_config, "--push_to_hub", "--hub_model_id", "user/tiny-ddpm"))
    assert [name for name, _ in calls] == ["create", "upload"]
    assert calls[0][1]["repo_id"] == "user/tiny-ddpm"
    upload = calls[1][1]
    assert upload["repo_id"] == "user/tiny-ddpm" and Path(upload["folder_path"]) == out
    assert "checkpoint-*" in upload["ignore_patterns"]


# ------------------------------------------------------------------------------------------ failures


def test_a_diverging_run_exits_with_the_non_finite_loss_status(tmp_path, tiny_config):
    """The status sweeps read (fair_compare, seg_benchmark): a rate too high for the model, not a broken run."""
    command = [sys.executable, str(TRAIN_SCRIPT),
               *quick_args(tmp_path / "diverged", tiny_config, "--learning_rate", "1e30", steps=6)]
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == training_utils.DIVERGED_EXIT_CODE, result.stderr[-3000:]
    assert "NonFiniteLossError: The loss became" in result.stderr
    broken = subprocess.run([*command, "--resolution", "7"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)  # a size the model cannot downsample: a ValueError
    assert broken.returncode not in (0, training_utils.DIVERGED_EXIT_CODE), broken.stderr[-3000:]


def test_a_collapsed_loss_stops_the_run_and_a_resumed_run_remembers_it_had_learned(tmp_path, tiny_config,
                                                                                   monkeypatch):
    """The loss is scripted as a fraction of the zero prediction's (on the real batches, with the model's gradient):
    20% for 4 steps (learned), then 100% (collapsed). Run 1 stops at a checkpoint after step 4; run 2 resumes and must
    stop when its 2-step window is all collapse (step 6), which it only can with the learned state from the
    checkpoint. --collapse_window 0 trains through the same losses."""
    out = tmp_path / "collapse"
    real_loss = train_ddpm.diffusion_loss
    model_calls = []

    def scripted_loss(model_output, *args):
        zero = real_loss(torch.zeros_like(model_output), *args)
        if not model_output.requires_grad:  # the detector's scale: the loss of predicting zeros
            return zero
        model_calls.append(1)
        fraction = 0.2 if len(model_calls) <= 4 else 1.0
        return real_loss(model_output, *args) * 0 + fraction * zero

    monkeypatch.setattr(train_ddpm, "diffusion_loss", scripted_loss)
    flags = ("--checkpointing_steps", "4", "--collapse_window", "2")
    run_training(quick_args(out, tiny_config, *flags, steps=4))
    model_calls.clear()
    model_calls.extend([1] * 4)  # the resumed run's steps 5.. are the collapse
    collapsed = r"collapsed at optimiser step 6: .* 100% .* down to 20%"
    with pytest.raises(training_utils.LossCollapseError, match=collapsed):
        run_training(quick_args(out, tiny_config, *flags, "--resume_from_checkpoint", "latest", steps=8))
    assert not (out / "checkpoint-8").exists()
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "4", "--collapse_window", "0",
                            "--resume_from_checkpoint", "latest", steps=8))
    assert (out / "checkpoint-8").is_dir()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "nan"
    real_loss = train_ddpm.diffusion_loss
    calls = []

    def loss_that_explodes(model_output, *args):
        calls.extend([1] if model_output.requires_grad else [])  # not the collapse check's zero prediction
        loss = real_loss(model_output, *args)
        return loss * float("nan") if len(calls) == 3 and model_output.requires_grad else loss

    monkeypatch.setattr(train_ddpm, "diffusion_loss", loss_that_explodes)
    with pytest.raises(train_ddpm.NonFiniteLossError, match=r"optimiser step 3.*checkpoint-2"):
        run_training(quick_args(out, tiny_config, "--checkpointing_steps", "2", steps=5))
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    kept = UNet2DModel.from_pretrained(out / "checkpoint-2", subfolder="unet")
    assert all(torch.isfinite(p).all() for p in kept.parameters())

    monkeypatch.undo()  # the cause is gone: the run resumes from the kept checkpoint and finishes
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "2", "--resume_from_checkpoint", "checkpoint-2",
                            steps=5))
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"] and (out / "model_index.json").exists()


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--train_data_dir", "{tmp}/missing"], FileNotFoundError, "does not exist"),
        (["--train_data_dir", "{tmp}/empty"], ValueError, "contains no images"),
        (["--dataset_name", "{tmp}/missing_dataset"], FileNotFoundError, "does not exist"),
        (["--resolution", "9"], ValueError, "not divisible by 2"),
        (["--train_data_dir", "{tmp}/unlabelled", "--class_conditional"], ValueError, "no label column"),
        (["--resume_from_checkpoint", "{tmp}/checkpoint-7"], FileNotFoundError, "does not exist"),
        (["--max_train_steps", "0"], ValueError, "--max_train_steps must be at least 1, got 0"),
    ],
    ids=["missing-dir", "empty-dir", "missing-dataset", "resolution", "no-labels", "missing-checkpoint", "zero-steps"],
)
def test_bad_input_fails_before_training(tmp_path, tiny_config, extra, error, message):
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "unlabelled", 3)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        run_training(quick_args(out, tiny_config, *[arg.format(tmp=tmp_path) for arg in extra]))
    assert not out.exists() or not any(out.iterdir())


def test_unknown_preset_is_rejected_with_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        train_ddpm.parse_args(["--model", "emov2-3m"])
    err = capsys.readouterr().err
    assert "invalid choice: 'emov2-3m'" in err and "emov2-1m" in err and "ddpm-cifar10-32" in err


def test_emov2_resolution_must_match_its_downsampling_factor(tmp_path):
    with pytest.raises(ValueError, match="not divisible by 8"):
        run_training(["--output_dir", str(tmp_path / "out"), "--model", "emov2-1m", "--resolution", "12"])


def test_checkpoint_of_another_model_is_refused_before_training(tmp_path, tiny_config):
    out = tmp_path / "run"
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "2"))
    before = weights(out / "checkpoint-2" / "unet")
    wider = tmp_path / "wider_unet"
    UNet2DModel.from_config({**UNet2DModel.load_config(tiny_config), "block_out_channels": (16, 48)}).save_config(wider)
    with pytest.raises(ValueError, match=r"another model(.|\n)*block_out_channels: saved \[16, 32\], current \[16, 48\]"):
        run_training(quick_args(out, wider, "--resume_from_checkpoint", "latest", steps=4))
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert_same_weights(before, weights(out / "checkpoint-2" / "unet"))


def test_an_incomplete_or_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_config):
    """A checkpoint missing a training-state object (one from before the collapse check kept its state) or holding a
    damaged optimizer file names the checkpoint and the way out instead of accelerate's bare error."""
    out = tmp_path / "run"
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "2"))
    checkpoint = out / "checkpoint-2"
    custom_states = sorted(checkpoint.glob("custom_checkpoint_*.pkl"))
    assert len(custom_states) == 2  # the training clock and the collapse check
    custom_states[-1].unlink()
    with pytest.raises(RuntimeError, match=r"(?s)Could not load the training state in .*checkpoint-2 .*version"):
        run_training(quick_args(out, tiny_config, "--resume_from_checkpoint", "latest", steps=4))
    run_training(quick_args(tmp_path / "run2", tiny_config, "--checkpointing_steps", "2"))
    optimizer_file = tmp_path / "run2" / "checkpoint-2" / "optimizer.bin"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"(?s)Could not load the training state .*corrupt"):
        run_training(quick_args(tmp_path / "run2", tiny_config, "--resume_from_checkpoint", "latest", steps=4))


def test_output_dir_of_another_run_needs_resume_or_overwrite(tmp_path, tiny_config):
    out = tmp_path / "run"
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "1"))
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run_training(quick_args(out, tiny_config))
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "5", "--overwrite_output_dir", steps=1))
    assert checkpoint_names(out) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "emov2-1m", "--model_config_name_or_path", "x.json"], "either --model"),
        (["--dataset_name", "mnist", "--train_data_dir", "x"], "either --dataset_name"),
        (["--class_dropout_prob", "1.0"], "class_dropout_prob"),
        (["--checkpoints_total_limit", "0"], "checkpoints_total_limit"),
        (["--class_conditional", "--class_dropout_prob", "0", "--guidance_scale", "3"], "needs a null class"),
        (["--logger", "wandb", "--hub_token", "t"], "expose the token"),
    ],
)
def test_inconsistent_flags_are_rejected(argv, message):
    with pytest.raises((ValueError, ImportError), match=message):
        train_ddpm.parse_args(argv)


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_tracker_that_is_not_installed_is_rejected_before_training(tracker, monkeypatch):
    monkeypatch.setattr(training_utils, f"is_{tracker}_available", lambda: False)
    with pytest.raises(ImportError, match=f"--logger {tracker} needs {tracker}"):
        train_ddpm.parse_args(["--logger", tracker])


# ------------------------------------------------------------------------------------------ loss


@pytest.fixture
def noisy_batch():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=100)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.tensor([0, 10, 50, 99])
    return scheduler, clean, noise, timesteps, scheduler.add_noise(clean, noise, timesteps)


def test_sample_loss_equals_the_epsilon_loss_of_the_implied_noise(noisy_batch):
    """The anchor's SNR weighting makes x0-prediction error count like the noise error it implies."""
    scheduler, clean, noise, timesteps, noisy = noisy_batch
    predicted_clean = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    alpha_bar = scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    implied_noise = (noisy - alpha_bar.sqrt() * predicted_clean) / (1 - alpha_bar).sqrt()
    sample_loss = train_ddpm.diffusion_loss(predicted_clean, clean, noise, timesteps, scheduler, "sample")
    epsilon_loss = train_ddpm.diffusion_loss(implied_noise, clean, noise, timesteps, scheduler, "epsilon")
    torch.testing.assert_close(sample_loss, epsilon_loss, rtol=1e-4, atol=0)


def test_v_prediction_loss_is_zero_at_the_true_velocity(noisy_batch):
    scheduler, clean, noise, timesteps, _ = noisy_batch
    velocity = scheduler.get_velocity(clean, noise, timesteps)
    assert train_ddpm.diffusion_loss(velocity, clean, noise, timesteps, scheduler, "v_prediction") == 0
    assert train_ddpm.diffusion_loss(noise, clean, noise, timesteps, scheduler, "v_prediction") > 0.1
