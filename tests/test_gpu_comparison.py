"""eval/gpu_comparison.sh end to end at smoke size on the CPU (SMOKE=1 DEVICE=cpu): every phase, every output."""

import json
import os
import subprocess
from pathlib import Path

from emov2_gen.evaluation.fid import ModelSamples

REPO = Path(__file__).resolve().parents[1]


def run_phase(phase: str, out: Path, mnist: Path, **knobs: str) -> None:
    env = {**os.environ, **knobs, "SMOKE": "1", "DEVICE": "cpu", "OUT": str(out), "DATA": str(mnist), "STEPS": "2", "BATCH": "2",
           "NUM_SAMPLES": "20", "SEG_STEPS": "2", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "eval" / "gpu_comparison.sh"), phase], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_gpu_comparison_phases_train_then_score_every_model(tmp_path, mnist_dir):
    run_phase("train", tmp_path, mnist_dir)
    fp32 = json.loads((tmp_path / "benchmark-fp32" / "benchmark.json").read_text())
    assert [m["name"] for m in fp32["models"]] == ["emov2-1m", "unet2d-5m"]
    for name in ("emov2-5m", "unet2d-5m"):
        assert (tmp_path / "mnist" / name / ".done").exists()
        assert (tmp_path / "mnist" / "fid" / "samples" / f"{name}.pt").stat().st_size > 0
    assert not (tmp_path / "mnist" / "fid" / "report.json").exists()  # the train phase only samples
    seg = json.loads((tmp_path / "seg" / "results.json").read_text())
    assert [row["model"] for row in seg["rows"]][:2] == ["unet-emov2-paper", "unet-s5-d16"]

    run_phase("score", tmp_path, mnist_dir)
    fid = json.loads((tmp_path / "mnist" / "fid" / "report.json").read_text())
    assert [m["name"] for m in fid["models"]] == ["emov2-5m", "unet2d-5m"] and all(m["num_samples"] == 20 for m in fid["models"])
    assert all(m["device"] == "cpu" and m["reference_key"].endswith("|split=train|n=20|32x32|L") for m in fid["models"])
    digits = json.loads((tmp_path / "mnist" / "fid" / "digits" / "report.json").read_text())  # the same samples
    assert [m["name"] for m in digits["models"]][1:] == ["emov2-5m", "unet2d-5m"]
    assert all(m["num_images"] == 20 for m in digits["models"])

    run_phase("compiled", tmp_path, mnist_dir)
    bf16 = json.loads((tmp_path / "benchmark-bf16-compiled" / "benchmark.json").read_text())
    assert bf16["settings"]["dtype"] == "bf16" and bf16["settings"]["channels_last"]


def test_gpu_comparison_seg_paper_phase_runs_the_paper_recipe(tmp_path, mnist_dir):
    run_phase("seg-paper", tmp_path, mnist_dir, SEG_PAPER_STEPS="2")
    seg = json.loads((tmp_path / "seg-paper" / "results.json").read_text())
    assert [row["model"] for row in seg["rows"]][:2] == ["unet-emov2-paper", "unet-s5-d16"]
    recipe = seg["args"]
    assert (recipe["learning_rates"], recipe["max_grad_norm"], recipe["max_train_steps"]) == ([1.2e-4], 0.1, 2)


def test_gpu_comparison_fair_phase_trains_the_5m_pair_then_score_scores_the_selected_runs(tmp_path, mnist_dir):
    run_phase("fair", tmp_path, mnist_dir, FAIR_STEPS="2")
    report = json.loads((tmp_path / "fair" / "report.json").read_text())
    assert report["models"].keys() == {"emov2-5m", "unet2d-5m"} and report["args"]["max_train_steps"] == 2
    assert report["args"]["device"] == "cpu" and report["args"]["resolution"] == 32
    drawn = sorted(path.name for path in (tmp_path / "fair" / "fid" / "samples").glob("*.pt"))
    assert drawn == ["emov2-5m-lr0.001.pt", "unet2d-5m-lr0.001.pt"]

    run_phase("score", tmp_path, mnist_dir)
    fid = json.loads((tmp_path / "fair" / "fid" / "report.json").read_text())
    assert [m["name"] for m in fid["models"]] == ["emov2-5m-lr0.001", "unet2d-5m-lr0.001"]
    assert all(m["num_samples"] == 20 and m["sampler"] == "DDIMScheduler" for m in fid["models"])
    digits = json.loads((tmp_path / "fair" / "fid" / "digits" / "report.json").read_text())
    assert [m["name"] for m in digits["models"]][1:] == ["emov2-5m-lr0.001", "unet2d-5m-lr0.001"]


def test_gpu_comparison_fair_dit_phase_trains_demo_and_dit_on_labels_and_samples_balanced_labels(tmp_path, mnist_dir):
    run_phase("fair-dit", tmp_path, mnist_dir, FAIR_STEPS="1")
    report = json.loads((tmp_path / "fair-dit" / "report.json").read_text())
    assert report["models"].keys() == {"demo-s-2", "dit-s-2"} and report["args"]["class_conditional"]
    for name in ("demo-s-2", "dit-s-2"):
        drawn = ModelSamples.load(tmp_path / "fair-dit" / "fid" / "samples" / f"{name}-lr0.001.pt")
        assert drawn.info.class_conditional and drawn.info.num_samples == 20 and drawn.info.resolution == [32, 32]


def test_gpu_comparison_without_a_phase_prints_usage(tmp_path):
    result = subprocess.run(["bash", str(REPO / "eval" / "gpu_comparison.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: bash eval/gpu_comparison.sh train|score|compiled|seg-paper|fair|fair-dit" in result.stderr
