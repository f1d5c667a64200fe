"""eval/seg_benchmark.py: trains every model with the same recipe, prints and saves the table (tiny budget)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_runs import load_script

from emov2_gen import EMOv2UNetForSegmentation

seg_benchmark = load_script(Path(__file__).resolve().parents[1] / "eval" / "seg_benchmark.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmark_trains_with_one_recipe_and_reports_cost_and_scores(tmp_path, capsys):
    out = tmp_path / "bench"
    args = seg_benchmark.parse_args([
        "--models", "unet-s5-d16-base16", "--cost_models", "unet-emov2-1m", "--output_dir", str(out),
        "--max_train_steps", "2", "--train_batch_size", "2", "--crop_size", "32", "--synthetic_size", "64", "64",
        "--num_synthetic_train", "2", "--num_synthetic_validation", "1", "--lr_warmup_steps", "1",
        "--cost_size", "32", "--latency_repeats", "1", "--threads", "1",
    ])
    rows = seg_benchmark.main(args)

    assert [row["model"] for row in rows] == ["unet-s5-d16-base16", "unet-emov2-1m"]
    trained, cost_only = rows
    assert trained["steps"] == 2 and set(trained["scores"]) >= {"vessel_dice", "mDice", "mIoU", "aAcc"}
    assert "scores" not in cost_only
    assert cost_only["parameters"] == EMOv2UNetForSegmentation.from_preset("unet-emov2-1m").num_parameters()
    assert all(row["gflops"] > 0 and row["latency_ms"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "| unet-s5-d16-base16 | 1.836 |" in printed and "| unet-emov2-1m | 1.266 |" in printed
    assert (out / "table.md").read_text().startswith("| model |")
    assert json.loads((out / "results.json").read_text())["rows"][0]["model"] == "unet-s5-d16-base16"


def test_gflops_are_counted_at_the_requested_size():
    model = EMOv2UNetForSegmentation.from_preset("unet-s5-d16-base16").eval()
    small, large = seg_benchmark.forward_gflops(model, 32), seg_benchmark.forward_gflops(model, 64)
    # Every conv but the ASPP image-pooling 1x1 (on a 1x1 map) scales with the pixel count.
    assert large / small == pytest.approx(4.0, rel=1e-3)
    # SEW-MHSA adds the q/k projection and both attention matmuls to the conv-mixer i2RMB: they are counted.
    conv_mixer = EMOv2UNetForSegmentation.from_preset("unet-emov2-1m", attention=False).eval()
    sew_mhsa = EMOv2UNetForSegmentation.from_preset("unet-emov2-1m").eval()
    assert seg_benchmark.forward_gflops(sew_mhsa, 32) > seg_benchmark.forward_gflops(conv_mixer, 32)
