"""train/train_seg.py end to end on synthetic vessels: tiny models, a few steps, temporary folders, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from script_runs import (
    assert_same_weights,
    checkpoint_names,
    load_script,
    run_script,
    run_until_checkpoint,
    tensorboard_scalars,
    weights,
)

from emov2_gen import EMOv2UNetForSegmentation
from emov2_gen.data.synthetic_vessels import generate_vessel_sample, write_synthetic_vessel_folder
from emov2_gen.pipelines.pipeline_emov2_segmentation import EMOv2SegmentationPipeline

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train" / "train_seg.py"
# A 3-level i2RMB UNet (38k parameters) that trains in a fraction of a second per step on 32 px crops.
TINY = dict(base_channels=8, num_levels=3, head_dim=8, window_size=4, decode_head_channels=8, auxiliary_head_channels=8)

train_seg = load_script(TRAIN_SCRIPT)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny_seg"
    EMOv2UNetForSegmentation(**TINY).save_config(path)
    return path


def quick_args(output_dir: Path, config: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--model_config_name_or_path", str(config), "--synthetic_size", "64", "64",
        "--num_synthetic_train", "8", "--num_synthetic_validation", "2", "--crop_size", "32", "--train_batch_size", "4",
        "--max_train_steps", "2", "--lr_warmup_steps", "1", "--learning_rate", "3e-3", *extra,
    ]


def run_training(argv: list[str]) -> dict:
    return run_script(train_seg, argv)


# ------------------------------------------------------------------------------------------ training runs


def test_loss_decreases_on_synthetic_vessels_and_the_run_saves_a_working_pipeline(tmp_path, tiny_config):
    out = tmp_path / "run"
    results = run_training(quick_args(out, tiny_config, "--max_train_steps", "40", "--checkpointing_steps", "10",
                                      "--checkpoints_total_limit", "2", "--validation_steps", "20", "--use_ema",
                                      "--ema_max_decay", "0.9", "--learning_rate", "1e-2"))

    loss = tensorboard_scalars(out / "logs")["loss"]
    assert len(loss) == 40 and np.isfinite(loss).all()
    assert np.mean(loss[-10:]) < 0.9 * np.mean(loss[:10]), loss  # about 0.82 here
    scalars = tensorboard_scalars(out / "logs")
    assert len(scalars["val/mDice"]) == 2 and len(scalars["val/vessel_dice"]) == 2  # step 20 and the end

    assert checkpoint_names(out) == ["checkpoint-30", "checkpoint-40"]
    # The saved model has the EMA parameters and the trained model's BatchNorm statistics (EMA tracks parameters).
    final, ema, raw = (weights(out / sub) for sub in ("model", "checkpoint-40/model_ema", "checkpoint-40/model"))
    parameters = {name for name, _ in EMOv2UNetForSegmentation(**TINY).named_parameters()}
    assert_same_weights({k: final[k] for k in parameters}, {k: ema[k] for k in parameters})
    assert_same_weights({k: v for k, v in final.items() if k not in parameters},
                        {k: v for k, v in raw.items() if k not in parameters})
    assert any(not torch.equal(raw[k], final[k]) for k in parameters)

    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["steps"] == 40 and saved["parameters"] == EMOv2UNetForSegmentation(**TINY).num_parameters()
    assert set(saved["scores"]) == {"aAcc", "mIoU", "mDice", "mAcc", "vessel_dice"}
    assert saved["scores"]["mDice"] == pytest.approx(np.mean(saved["per_class_dice"]), abs=0.02)
    assert [entry["step"] for entry in saved["validation_history"]] == [20, 40]
    assert saved["validation_history"][-1] == {"step": 40, **saved["scores"]}
    assert saved["test_scores"] is None  # no --num_synthetic_test

    pipeline = EMOv2SegmentationPipeline.from_pretrained(out)
    assert pipeline.config.crop_size == 32
    image, _, _ = generate_vessel_sample((70, 45), seed=3)
    output = pipeline(image)
    assert output.masks[0].shape == (70, 45) and output.probabilities[0].shape == (2, 70, 45)


def test_held_out_test_fundi_are_scored_apart_from_the_validation_history(tmp_path, tiny_config):
    out = tmp_path / "run"
    results = run_training(quick_args(out, tiny_config, "--num_synthetic_test", "3", "--validation_steps", "1"))

    assert [entry["step"] for entry in results["validation_history"]] == [1, 2]
    scalars = tensorboard_scalars(out / "logs")  # float32
    assert [entry["vessel_dice"] for entry in results["validation_history"]] == pytest.approx(scalars["val/vessel_dice"])
    assert set(results["test_scores"]) == {"aAcc", "mIoU", "mDice", "mAcc", "vessel_dice"}
    assert results["test_scores"] != results["scores"]  # other fundi (split "test"), other scores
    assert scalars["test/mDice"] == pytest.approx([results["test_scores"]["mDice"]])
    _, validation, test, _ = train_seg.load_samples(train_seg.parse_args(quick_args(out, tiny_config,
                                                                                     "--num_synthetic_test", "3")))
    assert len(test) == 3 and not any(np.array_equal(np.asarray(t["image"]), np.asarray(v["image"]))
                                      for t in test for v in validation)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_config, monkeypatch):
    """5 steps in one go == 3 steps, an interruption, and a resume to 5 (crossing an epoch, mid-epoch resume)."""
    common = ["--max_train_steps", "5", "--checkpointing_steps", "1", "--num_synthetic_train", "8", "--use_ema"]
    straight = tmp_path / "straight"
    run_training(quick_args(straight, tiny_config, *common))

    resumed = tmp_path / "resumed"
    run_until_checkpoint(train_seg, quick_args(resumed, tiny_config, *common), 3, monkeypatch)
    run_training(quick_args(resumed, tiny_config, *common, "--resume_from_checkpoint", "latest"))

    for sub in ("model", "checkpoint-5/model", "checkpoint-5/model_ema"):
        assert_same_weights(weights(straight / sub), weights(resumed / sub))
    other = tmp_path / "other_seed"
    run_training(quick_args(other, tiny_config, *common, "--seed", "1"))
    assert any(not torch.allclose(weights(other / "model")[k], v) for k, v in weights(straight / "model").items())


def test_trains_from_an_hrf_layout_folder_scoring_inside_the_field_of_view(tmp_path, tiny_config):
    train_dir = write_synthetic_vessel_folder(tmp_path / "train", 4, size=(48, 64), seed=1)
    val_dir = write_synthetic_vessel_folder(tmp_path / "val", 2, size=(48, 64), seed=1, split="validation")
    results = run_training(quick_args(tmp_path / "run", tiny_config, "--train_data_dir", str(train_dir),
                                      "--validation_data_dir", str(val_dir), "--score_inside_fov", "--scale", "64", "48"))
    assert "folder" in results["data"] and results["steps"] == 2
    assert 0 <= results["scores"]["aAcc"] <= 100


def test_two_processes_train_data_parallel_with_accelerate_launch(tmp_path, tiny_config):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT),
               *quick_args(out, tiny_config, "--train_batch_size", "2", "--checkpointing_steps", "2")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stdout + result.stderr
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert json.loads((out / "eval_results.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--train_data_dir", "/nonexistent/hrf"], FileNotFoundError, "does not exist"),
        (["--train_batch_size", "9"], ValueError, "cannot fill a batch"),
        (["--dataset_name", "x", "--train_data_dir", "y"], ValueError, "either --dataset_name or --train_data_dir"),
        (["--hrf_mmseg_split"], ValueError, "--hrf_mmseg_split"),
        (["--eval_stride", "40"], ValueError, "--eval_stride"),
        (["--crop_size", "0"], ValueError, "--crop_size must be at least 1, got 0"),
        (["--preset", "unet-emov2-1m"], ValueError, "either --preset or --model_config_name_or_path"),
        (["--num_synthetic_test", "-1"], ValueError, "--num_synthetic_test must be at least 0, got -1"),
        (["--num_synthetic_test", "2", "--dataset_name", "x"], ValueError, "goes with synthetic training data"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, tiny_config, extra, error, message):
    with pytest.raises(error, match=message):
        run_training(quick_args(tmp_path / "run", tiny_config, *extra))
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_checkpoint_of_another_model_and_a_used_output_dir_are_refused(tmp_path, tiny_config):
    out = tmp_path / "run"
    run_training(quick_args(out, tiny_config, "--checkpointing_steps", "2"))
    with pytest.raises(FileExistsError, match="already holds a training run"):
        run_training(quick_args(out, tiny_config))
    other = tmp_path / "other"
    EMOv2UNetForSegmentation(**{**TINY, "base_channels": 16}).save_config(other)
    with pytest.raises(ValueError, match="base_channels"):
        run_training(quick_args(out, other, "--resume_from_checkpoint", "latest"))


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path, tiny_config):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    run_training(quick_args(plain, tiny_config))
    run_training(quick_args(checkpointed, tiny_config, "--gradient_checkpointing"))
    expected = weights(plain / "model")
    for name, value in weights(checkpointed / "model").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=name)
