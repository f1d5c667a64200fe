"""eval/compare_mnist.sh end to end at a toy size: both models trained alike, scored side by side, resumable."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_compare(out: Path, mnist: Path, **knobs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "DATA": str(mnist), "STEPS": "2", "BATCH": "2", "NUM_SAMPLES": "8",
           "INFERENCE_STEPS": "2", "STAGES": "train fid", "FID_ARGS": "--batch_size 8 --device cpu",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **knobs}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "eval" / "compare_mnist.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_compare_mnist_trains_both_models_alike_scores_them_and_resumes(tmp_path, mnist_dir):
    out = tmp_path / "compare"
    run_compare(out, mnist_dir, PARALLEL="1")
    report = json.loads((out / "fid" / "report.json").read_text())
    models = {model["name"]: model for model in report["models"]}
    assert list(models) == ["emov2-5m", "unet2d-5m"]
    assert models["emov2-5m"]["model_class"].endswith(".EMOv2UNet2DModel")
    assert models["unet2d-5m"]["model_class"].endswith(".UNet2DModel")
    assert all(model["num_samples"] == 8 and model["fid"] > 0 for model in models.values())
    for name in models:
        assert int((out / name / ".train_seconds").read_text()) >= 0
        assert (out / f"train_{name}.log").stat().st_size > 0  # PARALLEL=1: one log per model

    # A second run finds both models trained and does not train them again.
    again = run_compare(out, mnist_dir, STAGES="train")
    assert again.stdout.count("already trained") == 2
