"""eval/seg_benchmark.py: the fair protocol (a learning-rate sweep per model, the rate chosen on validation fundi, the
final scores on held-out test fundi), the table, the plot and resuming (tiny budget or faked runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from script_runs import load_script

from emov2_gen import EMOv2UNetForSegmentation
from emov2_gen.training_utils import DIVERGED_EXIT_CODE

seg_benchmark = load_script(Path(__file__).resolve().parents[1] / "eval" / "seg_benchmark.py")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RECIPE = ["--max_train_steps", "2", "--train_batch_size", "2", "--crop_size", "32", "--synthetic_size", "64", "64",
               "--num_synthetic_train", "2", "--num_synthetic_validation", "1", "--num_synthetic_test", "1",
               "--validation_every", "1", "--lr_warmup_steps", "1", "--cost_size", "32", "--latency_repeats", "1",
               "--threads", "1"]


def test_benchmark_trains_validates_tests_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    argv = ["--models", "unet-s5-d16-base16", "--cost_models", "unet-emov2-1m", "--output_dir", str(out),
            "--learning_rate", "1e-2", *TINY_RECIPE]  # the old single-rate flag is a one-rate sweep
    rows = seg_benchmark.main(seg_benchmark.parse_args(argv))

    assert [row["model"] for row in rows] == ["unet-s5-d16-base16", "unet-emov2-1m"]
    trained, cost_only = rows
    assert trained["learning_rate"] == 1e-2 and not trained["learning_rate_on_sweep_edge"]
    assert trained["steps"] == 2 and set(trained["test_scores"]) >= {"vessel_dice", "mDice"}
    assert [entry["step"] for entry in trained["validation_history"]] == [1, 2]
    assert trained["validation_history"][-1]["vessel_dice"] == trained["validation_vessel_dice"]["0.01"]
    assert (out / "unet-s5-d16-base16" / "lr-0.01" / "eval_results.json").is_file()
    assert (out / "unet-s5-d16-base16" / "lr-0.01.log").is_file()
    assert "learning_rate" not in cost_only
    assert cost_only["parameters"] == EMOv2UNetForSegmentation.from_preset("unet-emov2-1m").num_parameters()
    assert all(row["gflops"] > 0 and row["latency_ms"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "| unet-s5-d16-base16 | 1.836 |" in printed and "| unet-emov2-1m | 1.266 |" in printed
    assert (out / "table.md").read_text().startswith("| model |")
    assert json.loads((out / "results.json").read_text())["rows"][0]["model"] == "unet-s5-d16-base16"
    assert (out / "dice_vs_steps.png").read_bytes().startswith(b"\x89PNG")

    # --reuse resumes from the finished runs: nothing is trained again.
    monkeypatch.setattr(seg_benchmark.subprocess, "run", lambda *a, **k: pytest.fail("--reuse retrained a finished run"))
    monkeypatch.setattr(seg_benchmark, "cost", lambda preset, args: {"parameters": 1, "gflops": 1.0, "latency_ms": 1.0})
    again = seg_benchmark.main(seg_benchmark.parse_args([*argv, "--reuse"]))
    assert again[0]["test_scores"] == trained["test_scores"]


def fake_run(validation_dice: float, test_dice: float) -> dict:
    history = [{"step": 1, "vessel_dice": validation_dice / 2, "mDice": 50.0},
               {"step": 2, "vessel_dice": validation_dice, "mDice": 60.0}]
    return {"steps": 2, "scores": {"vessel_dice": validation_dice, "mDice": 60.0},
            "test_scores": {"vessel_dice": test_dice, "mDice": test_dice + 5}, "validation_history": history,
            "train_seconds_this_run": 12.0}


def test_each_model_gets_the_rate_with_the_best_validation_dice_never_the_best_test_dice(tmp_path, monkeypatch, capsys):
    runs = {  # (preset, lr) -> the run's results; the test Dice would pick other rates
        ("unet-emov2-1m", 3e-3): fake_run(70.0, 90.0),
        ("unet-emov2-1m", 1e-2): fake_run(75.0, 60.0),
        ("unet-emov2-1m", 3e-2): {"diverged": True},
        ("unet-s5-d16-base16", 3e-3): fake_run(40.0, 10.0),
        ("unet-s5-d16-base16", 1e-2): fake_run(60.0, 20.0),
        ("unet-s5-d16-base16", 3e-2): fake_run(80.0, 15.0),
    }
    trained = []
    monkeypatch.setattr(seg_benchmark, "train", lambda args, preset, lr: trained.append((preset, lr)) or runs[preset, lr])
    monkeypatch.setattr(seg_benchmark, "cost", lambda preset, args: {"parameters": 1e6, "gflops": 1.0, "latency_ms": 3.0})
    args = seg_benchmark.parse_args(["--models", "unet-emov2-1m", "unet-s5-d16-base16", "--cost_models",
                                     "--output_dir", str(tmp_path), "--learning_rates", "3e-2", "1e-2", "3e-3"])
    emov2, plain = seg_benchmark.main(args)

    assert sorted(trained) == sorted(runs)  # every (model, rate) pair, the sweep sorted by check_sweep
    assert args.learning_rates == [3e-3, 1e-2, 3e-2]
    assert emov2["learning_rate"] == 1e-2 and not emov2["learning_rate_on_sweep_edge"]
    assert emov2["test_scores"]["vessel_dice"] == 60.0 and emov2["validation_history"][-1]["vessel_dice"] == 75.0
    assert plain["learning_rate"] == 3e-2 and plain["learning_rate_on_sweep_edge"]
    assert plain["test_scores"] == {"vessel_dice": 15.0, "mDice": 20.0}
    table = capsys.readouterr().out
    assert ("| val vessel Dice @ lr 0.003 | val vessel Dice @ lr 0.01 | val vessel Dice @ lr 0.03 | chosen lr | "
            "test vessel Dice | test mDice | train time (s) |") in table
    assert "| unet-emov2-1m | 1.000 | 1.00 | 3 | 70.00 | 75.00 | diverged | 0.01 | 60.00 | 65.00 | 12 |" in table
    assert "| unet-s5-d16-base16 | 1.000 | 1.00 | 3 | 40.00 | 60.00 | 80.00 | 0.03 (sweep edge) | 15.00 | 20.00 | 12 |" in table
    assert (tmp_path / "dice_vs_steps.png").is_file()


def test_a_diverged_run_is_recorded_and_any_other_failure_raises(tmp_path, monkeypatch):
    args = seg_benchmark.parse_args(["--output_dir", str(tmp_path), "--learning_rates", "1e-2"])

    def failing_run(message: str, code: int):
        def run(command, cwd, env, stdout, stderr):
            stdout.write(message)
            return subprocess.CompletedProcess(command, code)
        return run

    diverged = failing_run("FloatingPointError: The loss became [nan]", DIVERGED_EXIT_CODE)
    monkeypatch.setattr(seg_benchmark.subprocess, "run", diverged)
    assert seg_benchmark.train(args, "unet-emov2-1m", 1e-2) == {"diverged": True}
    # The exit status decides, not the log: an error that merely mentions a FloatingPointError is a failure.
    for message in ("MemoryError", "ValueError: FloatingPointError in the data"):
        monkeypatch.setattr(seg_benchmark.subprocess, "run", failing_run(message, 1))
        with pytest.raises(RuntimeError, match=r"unet-emov2-1m at lr 0.01 failed .*lr-0.01.log"):
            seg_benchmark.train(args, "unet-emov2-1m", 1e-2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--learning_rates", "1e-2", "1e-2"], "repeats a rate"),
        (["--learning_rates", "1e-2", "0"], "positive and finite"),
        (["--num_synthetic_test", "0"], "--num_synthetic_test must be at least 1, got 0"),
        (["--validation_every", "0"], "--validation_every must be at least 1, got 0"),
    ],
)
def test_bad_flags_raise(extra, message):
    with pytest.raises(ValueError, match=message):
        seg_benchmark.parse_args(extra)


def test_gflops_are_counted_at_the_requested_size():
    model = EMOv2UNetForSegmentation.from_preset("unet-s5-d16-base16").eval()
    small, large = seg_benchmark.forward_gflops(model, 32), seg_benchmark.forward_gflops(model, 64)
    # Every conv but the ASPP image-pooling 1x1 (on a 1x1 map) scales with the pixel count.
    assert large / small == pytest.approx(4.0, rel=1e-3)
    # SEW-MHSA adds the q/k projection and both attention matmuls to the conv-mixer i2RMB: they are counted.
    conv_mixer = EMOv2UNetForSegmentation.from_preset("unet-emov2-1m", attention=False).eval()
    sew_mhsa = EMOv2UNetForSegmentation.from_preset("unet-emov2-1m").eval()
    assert seg_benchmark.forward_gflops(sew_mhsa, 32) > seg_benchmark.forward_gflops(conv_mixer, 32)
