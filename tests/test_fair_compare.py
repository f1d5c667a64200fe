"""eval/fair_compare.py: per-model learning-rate selection on the held-out loss, equal-time reading, the report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from script_runs import load_script

from emov2_gen.evaluation.training_logs import read_scalars
from emov2_gen.training_utils import DIVERGED_EXIT_CODE

fair_compare = load_script(Path(__file__).resolve().parents[1] / "eval" / "fair_compare.py")

TINY_EMOV2 = "tiny-emo=emov2-1m:block_out_channels=(8, 8, 16, 16),attention_head_dim=8,layers_per_block=1"
TINY_UNET = ("tiny-unet=unet2d-1m:block_out_channels=(8, 16),down_block_types=('DownBlock2D', 'DownBlock2D'),"
             "up_block_types=('UpBlock2D', 'UpBlock2D'),norm_num_groups=8,layers_per_block=1")


def write_run(path: Path, heldout: list[float], every: int = 10) -> Path:
    """A fake finished run: tensorboard logs with heldout_loss_ema every `every` steps and train_seconds each step."""
    writer = SummaryWriter(str(path / "logs" / "train_ddpm"))
    for step in range(1, every * len(heldout) + 1):
        writer.add_scalar("train_seconds", 0.5 * step, step)
        writer.add_scalar("images_per_second", 64.0, step)
        if step % every == 0:
            writer.add_scalar("heldout_loss_ema", heldout[step // every - 1], step)
    writer.close()
    return path


def test_model_specs_are_presets_or_labelled_variants():
    assert fair_compare.ModelSpec.parse("emov2-1m") == fair_compare.ModelSpec("emov2-1m", "emov2-1m", {})
    spec = fair_compare.ModelSpec.parse("gn=emov2-1m:window_sizes=(8, 8, 0, 0),upsample_type='conv'")
    assert spec == fair_compare.ModelSpec("gn", "emov2-1m", {"window_sizes": (8, 8, 0, 0), "upsample_type": "conv"})
    for bad, message in [("nope", "Unknown model preset"), ("emov2-1m:kernel_size=3", "needs a label"),
                         ("a=emov2-1m:kernel_size", "key=value"), ("a=emov2-1m:kernel_size=three", "key=value")]:
        with pytest.raises(ValueError, match=message):
            fair_compare.ModelSpec.parse(bad)
    with pytest.raises(ValueError, match="share a label"):
        fair_compare.parse_args(["--models", "emov2-1m", "emov2-1m", "--output_dir", "x"])
    with pytest.raises(SystemExit):  # the digit scores judge FID's samples: none drawn, nothing to judge
        fair_compare.parse_args(["--models", "emov2-1m", "--num_samples", "0", "--digit_scores", "--output_dir", "x"])


def test_each_model_gets_its_own_best_rate_and_is_read_at_equal_time(tmp_path):
    args = fair_compare.parse_args(["--models", "emov2-1m", "unet2d-1m", "--learning_rates", "1e-3", "3e-3", "1e-2",
                                    "--max_train_steps", "40", "--output_dir", str(tmp_path)])
    runs = {
        "emov2-1m": {1e-3: write_run(tmp_path / "a1", [0.9, 0.5, 0.4, 0.30]),
                     3e-3: write_run(tmp_path / "a3", [0.8, 0.4, 0.3, 0.20]),  # best final value
                     1e-2: write_run(tmp_path / "a10", [0.7, 0.3, 0.2, math.nan])},  # diverged: never chosen
        "unet2d-1m": {1e-3: write_run(tmp_path / "b1", [0.6, 0.4, 0.3, 0.25]),
                      3e-3: write_run(tmp_path / "b3", [0.6, 0.5, 0.4, 0.35]),
                      1e-2: write_run(tmp_path / "b10", [0.6, 0.5, 0.45, 0.40])},
    }
    diverged = tmp_path / "b10-diverged"  # stopped on a NaN loss: no final held-out value, never chosen
    diverged.mkdir()
    (diverged / fair_compare.DIVERGED).touch()
    runs["unet2d-1m"][1e-2] = diverged
    costs = {"emov2-1m": {"seconds_per_step": 2.0}, "unet2d-1m": {"seconds_per_step": 1.0}}
    selection = fair_compare.select(args, runs, costs)
    emo, unet = selection["models"]["emov2-1m"], selection["models"]["unet2d-1m"]
    assert emo["learning_rate"] == 3e-3 and not emo["on_sweep_edge"]
    assert unet["learning_rate"] == 1e-3 and unet["on_sweep_edge"]
    assert emo["heldout_loss"] == pytest.approx(0.2) and math.isnan(unet["heldout_by_lr"]["0.01"])
    # Equal time = the faster finisher's 40 steps x 1 s: 20 steps of the 2 s/step model, 40 of the other.
    assert selection["equal_train_seconds"] == 40.0
    assert emo["steps_at_equal_time"] == 20 and emo["heldout_at_equal_time"] == pytest.approx(0.4)
    assert unet["heldout_at_equal_time"] == pytest.approx(0.25)
    assert emo["curve"]["train_seconds"] == [5.0, 10.0, 15.0, 20.0]  # the logged wall-clock, kept for the report


def test_the_fastest_model_is_read_at_its_last_step_despite_rounding(tmp_path):
    args = fair_compare.parse_args(["--models", "emov2-5m", "unet2d-5m", "--learning_rates", "1e-3", "3e-3", "1e-2",
                                    "--max_train_steps", "1000", "--output_dir", str(tmp_path)])
    runs = {label: {lr: write_run(tmp_path / f"{label}{lr:g}", [0.4, 0.3, 0.2, 0.1], every=250) for lr in args.learning_rates}
            for label in ("emov2-5m", "unet2d-5m")}
    fast = 0.2068079169591268  # 1000 * fast / fast == 1000.0000000000001
    selection = fair_compare.select(args, runs, {"emov2-5m": {"seconds_per_step": 0.248}, "unet2d-5m": {"seconds_per_step": fast}})
    assert selection["models"]["unet2d-5m"]["steps_at_equal_time"] == 1000
    assert selection["models"]["unet2d-5m"]["heldout_at_equal_time"] == pytest.approx(0.1)


def test_value_at_interpolates_inside_the_curve_only():
    x, y = np.array([10.0, 20.0]), np.array([1.0, 3.0])
    assert fair_compare.value_at(x, y, 15.0) == 2.0 and math.isnan(fair_compare.value_at(x, y, 5.0))


def test_end_to_end_sweep_selects_reports_and_reuses_finished_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "fair"
    argv = ["--models", TINY_EMOV2, TINY_UNET, "--learning_rates", "1e-3", "1e-2", "--resolution", "8",
            "--max_train_steps", "3", "--heldout_steps", "2", "--heldout_num_images", "8", "--lr_warmup_steps", "1",
            "--timing_steps", "2", "--timing_warmup_steps", "1", "--timing_repeats", "1", "--num_samples", "0",
            "--jobs", "2", "--threads", "1", "--output_dir", str(out),
            "--train_args", "--max_train_samples", "32", "--ddpm_num_steps", "50"]
    report = fair_compare.main(fair_compare.parse_args(argv))

    for label in ("tiny-emo", "tiny-unet"):
        model = report["models"][label]
        by_lr = {float(lr): value for lr, value in model["heldout_by_lr"].items()}
        assert model["learning_rate"] == min(by_lr, key=by_lr.get)
        assert model["curve"]["steps"] == [2, 3]  # every --heldout_steps and at the end
        assert report["costs"][label]["model_seconds_per_step"] > 0 and report["costs"][label]["parameters"] > 0
        # The equal-time axis is the training script's own clock over the timing run's last 2 steps.
        clock = dict(read_scalars(out / "timing" / f"{label}-3steps-0" / "logs")["train_seconds"])
        assert report["costs"][label]["seconds_per_step"] == pytest.approx((clock[3] - clock[1]) / 2)
    config = json.loads((out / "configs" / "tiny-emo" / "config.json").read_text())
    assert config["_class_name"] == "EMOv2UNet2DModel" and config["block_out_channels"] == [8, 8, 16, 16]
    table = (out / "report.md").read_text()
    assert table.startswith("| model |") and "| tiny-emo |" in table and "| tiny-unet |" in table
    assert (out / "heldout_vs_cost.png").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["models"].keys() == {"tiny-emo", "tiny-unet"}

    stamp = (out / "runs" / "tiny-emo-lr0.001" / "model_index.json").stat().st_mtime_ns
    again = fair_compare.main(fair_compare.parse_args(argv))  # finished runs are reused, not retrained
    assert (out / "runs" / "tiny-emo-lr0.001" / "model_index.json").stat().st_mtime_ns == stamp
    assert again["models"]["tiny-emo"]["heldout_by_lr"] == report["models"]["tiny-emo"]["heldout_by_lr"]
    assert "| tiny-emo |" in capsys.readouterr().out

    # With FID and equal-time runs: every selected and equal-time run is scored, and each score lands on its run.
    def fake_fid(args, run_dirs):
        return {str(Path(d).resolve()): {"fid": float(len(Path(d).name)), "kid_mean": 0.0, "num_samples": 4,
                                         "num_inference_steps": 2, "num_reference": 4} for d in run_dirs}

    monkeypatch.setattr(fair_compare, "fid_scores", fake_fid)
    scoring = argv[:argv.index("--num_samples")] + ["--num_samples", "4", "--equal_time_runs"] + argv[argv.index("--jobs"):]
    scored = fair_compare.main(fair_compare.parse_args(scoring))
    for label, model in scored["models"].items():
        assert scored["fid"][label]["fid"] == len(Path(model["run_dir"]).name)
        assert model["equal_time_run"]["fid"]["fid"] == len(Path(model["equal_time_run"]["run_dir"]).name)
    monkeypatch.undo()

    # For real, with the digit scores: digit_score.py judges the very samples fid.py kept, each row on its own run.
    digit_flags = ["--num_inference_steps", "2", "--digit_scores", "--digit_args",
                   "--classifier_images 200 --classifier_epochs 1"]  # fmt: skip
    real = scoring[:scoring.index("--num_samples")] + ["--num_samples", "20", *digit_flags] + scoring[scoring.index(
        "--num_samples") + 2:]
    judged = fair_compare.main(fair_compare.parse_args(real))
    runs = {label: model["run_dir"] for label, model in judged["models"].items()}
    runs.update({f"{label} equal time": model["equal_time_run"]["run_dir"] for label, model in judged["models"].items()})
    digits = {**judged["digits"], **{f"{label} equal time": model["equal_time_run"]["digits"]
                                     for label, model in judged["models"].items()}}  # fmt: skip
    for label, run_dir in runs.items():
        assert digits[label]["name"] == Path(run_dir).resolve().name and digits[label]["num_images"] == 20
        assert 0 <= digits[label]["recognisable"] <= 1 and digits[label]["digit_fd"] > 0
    assert sorted(path.name for path in (out / "fid" / "samples").glob("*.pt")) == sorted(
        Path(run_dir).resolve().name + ".pt" for run_dir in set(runs.values()))
    assert "| recognised | digit FD |" in (out / "report.md").read_text()


def test_class_conditional_models_are_costed_on_their_null_class_and_trained_on_labels(tmp_path, monkeypatch):
    tiny = ["tiny-demo=demo-t-2:num_layers=1,num_attention_heads=2,attention_head_dim=8",
            "tiny-dit=dit-t-2:num_layers=1,num_attention_heads=2,attention_head_dim=8"]
    args = fair_compare.parse_args(["--models", *tiny, "--learning_rates", "1e-3", "3e-3", "1e-2", "--resolution", "8",
                                    "--train_batch_size", "2", "--class_conditional", "--output_dir", str(tmp_path)])
    args.num_class_embeds = 11  # MNIST's 10 digits + the null row, as main() reads them off the data
    costs = fair_compare.measure_costs(args, channels=1, repeats=1)  # diffusers' DiT cannot run without labels
    assert all(cost["gflops"] > 0 and cost["model_seconds_per_step"] > 0 for cost in costs.values())
    assert fair_compare.build_variant(args.specs[1], args, 1).config.num_embeds_ada_norm == 10

    commands = []
    monkeypatch.setattr(fair_compare.subprocess, "run", lambda command, **_: commands.append(command)
                        or type("Done", (), {"returncode": 0})())  # fmt: skip
    (tmp_path / "runs" / "tiny-demo-lr0.001").mkdir(parents=True)  # what the training subprocess would make
    fair_compare.train(args.specs[0], 1e-3, args, channels=1)
    assert "--class_conditional" in commands[0] and "--model_config_name_or_path" in commands[0]

    # A run stopped on a non-finite loss is marked diverged and not retried; any other failure stops everything.
    def failing(command, stdout, **_):
        diverging = "0.01" in command
        stdout.write("NonFiniteLossError: The loss became [nan]\n" if diverging else "ImportError: NonFiniteLossError\n")
        return type("Failed", (), {"returncode": DIVERGED_EXIT_CODE if diverging else 1})()

    monkeypatch.setattr(fair_compare.subprocess, "run", failing)
    for lr in ("0.01", "0.003"):
        (tmp_path / "runs" / f"tiny-dit-lr{lr}").mkdir(parents=True)
    assert fair_compare.diverged(fair_compare.train(args.specs[1], 1e-2, args, channels=1))
    with pytest.raises(RuntimeError, match="tiny-dit-lr0.003 failed"):
        fair_compare.train(args.specs[1], 3e-3, args, channels=1)
    config = json.loads((tmp_path / "configs" / "tiny-demo" / "config.json").read_text())
    assert config["num_class_embeds"] == 11 and config["num_layers"] == 1


def test_equal_time_runs_retrain_slower_models_for_the_fastest_models_time(tmp_path, monkeypatch):
    args = fair_compare.parse_args(["--models", "emov2-1m", "unet2d-1m", "--learning_rates", "1e-3", "3e-3", "1e-2",
                                    "--max_train_steps", "40", "--equal_time_runs", "--output_dir", str(tmp_path)])
    runs = {"emov2-1m": {lr: write_run(tmp_path / f"a{lr:g}", [0.8, 0.4, 0.3, 0.2 + lr]) for lr in args.learning_rates},
            "unet2d-1m": {lr: write_run(tmp_path / f"b{lr:g}", [0.6, 0.4, 0.3, 0.25 + lr]) for lr in args.learning_rates}}
    costs = {"emov2-1m": {"seconds_per_step": 2.0}, "unet2d-1m": {"seconds_per_step": 1.0}}
    selection = fair_compare.select(args, runs, costs)
    trained = []

    def fake_train(spec, lr, args, channels, steps=None):
        trained.append((spec.label, lr, steps))
        return write_run(tmp_path / "runs" / fair_compare.run_name(spec, lr, steps), [0.5, 0.33], every=steps // 2)

    monkeypatch.setattr(fair_compare, "train", fake_train)
    fair_compare.add_equal_time_runs(args, selection, channels=1)
    # Only the 2 s/step model retrains, at its selected rate, for the 20 steps of the other's 40 x 1 s.
    assert trained == [("emov2-1m", 1e-3, 20)]
    emo, unet = (selection["models"][label]["equal_time_run"] for label in ("emov2-1m", "unet2d-1m"))
    assert emo["steps"] == 20 and emo["heldout_loss"] == pytest.approx(0.33)
    assert emo["run_dir"].endswith("emov2-1m-lr0.001-20steps")
    assert unet == {"run_dir": str(runs["unet2d-1m"][1e-3]), "steps": 40, "heldout_loss": pytest.approx(0.251)}
    table = fair_compare.markdown(args, selection, {label: {**cost, "parameters": 1e6, "gflops": 0.1, "model_seconds_per_step": 0.5,
                                                             "peak_train_memory_mib": 1.0} for label, cost in costs.items()}, {}, {})
    assert table.splitlines()[0].endswith("| equal-time run: steps | held-out |")
    assert "| 20 | 0.33000 |" in table and "| 40 | 0.25100 |" in table


def test_training_is_timed_one_run_at_a_time_in_turn_and_the_fastest_run_counts(tmp_path, monkeypatch):
    args = fair_compare.parse_args(["--models", "emov2-1m", "unet2d-1m", "--learning_rates", "1e-3", "3e-3", "1e-2",
                                    "--timing_steps", "10", "--timing_repeats", "3", "--output_dir", str(tmp_path)])
    warm, calls = args.timing_warmup_steps, []
    step_seconds = {"emov2-1m": [2.0, 9.0, 3.0], "unet2d-1m": [1.0, 1.5, 0.5]}  # per repeat; a slow spell in repeat 1

    def fake_train(spec, lr, args, channels, steps=None, run_dir=None):
        calls.append((spec.label, lr, steps, run_dir.name))
        per_step = step_seconds[spec.label][int(run_dir.name[-1])]  # named LABEL-<steps>steps-<repeat>
        writer = SummaryWriter(str(run_dir / "logs" / "train_ddpm"))
        for step in range(1, steps + 1):  # a slow start that the warm-up leaves out
            writer.add_scalar("train_seconds", 100.0 + per_step * step if step > 1 else 50.0, step)
        writer.close()
        return run_dir

    monkeypatch.setattr(fair_compare, "train", fake_train)
    assert fair_compare.time_training(args, channels=1) == {"emov2-1m": 2.0, "unet2d-1m": 0.5}
    assert calls == [(label, 1e-3, warm + 10, f"{label}-{warm + 10}steps-{repeat}") for repeat in range(3)
                     for label in ("emov2-1m", "unet2d-1m")]  # in turn, at the sweep's lowest rate

    def diverging_train(spec, lr, args, channels, steps=None, run_dir=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / fair_compare.DIVERGED).touch()
        return run_dir

    monkeypatch.setattr(fair_compare, "train", diverging_train)
    with pytest.raises(RuntimeError, match="timing run .* diverged at lr 0.001"):
        fair_compare.time_training(args, channels=1)


def test_timing_runs_go_to_timing_dir_where_another_comparison_shares_them(tmp_path, monkeypatch):
    """A replicate at another seed reads the first comparison's equal-time axis from its timing folder."""
    shared = tmp_path / "seed0" / "timing"
    args = fair_compare.parse_args(["--models", "unet2d-1m", "--learning_rates", "1e-3", "3e-3", "1e-2", "--seed", "1",
                                    "--timing_steps", "4", "--timing_warmup_steps", "1", "--timing_repeats", "1",
                                    "--timing_dir", str(shared), "--output_dir", str(tmp_path / "seed1")])
    run_dirs = []

    def fake_train(spec, lr, args, channels, steps=None, run_dir=None):
        run_dirs.append(run_dir)
        writer = SummaryWriter(str(run_dir / "logs" / "train_ddpm"))
        for step in range(1, steps + 1):
            writer.add_scalar("train_seconds", 0.25 * step, step)
        writer.close()
        return run_dir

    monkeypatch.setattr(fair_compare, "train", fake_train)
    assert fair_compare.time_training(args, channels=1) == {"unet2d-1m": 0.25}
    assert run_dirs == [shared / "unet2d-1m-5steps-0"] and not (tmp_path / "seed1" / "timing").exists()


def test_fid_is_sampled_once_for_every_distinct_run_and_reused(tmp_path, monkeypatch):
    args = fair_compare.parse_args(["--models", "emov2-1m", "--output_dir", str(tmp_path)])
    calls = []

    def fake_fid(command, **_):
        dirs = command[command.index("--model_dirs") + 1:command.index("--reference")]
        calls.append(dirs)
        rows = [{"path": str(Path(d).resolve()), "fid": float(len(d))} for d in dirs]
        (tmp_path / "fid" / "samples").mkdir(parents=True, exist_ok=True)
        for d in dirs:
            (tmp_path / "fid" / "samples" / f"{Path(d).name}.pt").touch()
        (tmp_path / "fid" / "report.json").write_text(json.dumps({"models": rows}))

    monkeypatch.setattr(fair_compare.subprocess, "run", fake_fid)
    scores = fair_compare.fid_scores(args, [str(tmp_path / "a"), str(tmp_path / "bb"), str(tmp_path / "a")])
    assert calls == [[str(tmp_path / "a"), str(tmp_path / "bb")]]  # the shared run is sampled once
    assert fair_compare.score_of(scores, str(tmp_path / "bb"))["fid"] == len(str(tmp_path / "bb"))
    fair_compare.fid_scores(args, [str(tmp_path / "bb"), str(tmp_path / "a")])  # the same runs: the report is reused
    assert len(calls) == 1
    (tmp_path / "fid" / "samples" / "a.pt").unlink()  # a report from before fid.py kept its samples: sampled again
    fair_compare.fid_scores(args, [str(tmp_path / "bb"), str(tmp_path / "a")])
    assert len(calls) == 2
    fair_compare.fid_scores(args, [str(tmp_path / "a")])  # other runs: sampled again
    assert calls[-1] == [str(tmp_path / "a")]


def test_digit_scores_judge_fids_samples_and_are_rescored_when_those_are_redrawn(tmp_path, monkeypatch):
    args = fair_compare.parse_args(["--models", "emov2-1m", "--digit_scores", "--output_dir", str(tmp_path)])
    runs = [str(tmp_path / "runs" / name) for name in ("a", "bb")]
    samples = tmp_path / "fid" / "samples"
    samples.mkdir(parents=True)
    for run in runs:
        (samples / f"{Path(run).name}.pt").touch()
    calls = []

    def fake_digit_score(command, **_):
        files = command[command.index("--samples") + 1:command.index("--reference")]
        calls.append([Path(f).name for f in files])
        report = {"samples": {Path(f).stem: str((tmp_path / "runs" / Path(f).stem).resolve()) for f in files},
                  "models": [{"name": "real images"}] + [{"name": Path(f).stem, "recognisable": len(Path(f).stem) / 10}
                                                         for f in files]}  # fmt: skip
        (tmp_path / "digits").mkdir(exist_ok=True)
        (tmp_path / "digits" / "report.json").write_text(json.dumps(report))

    monkeypatch.setattr(fair_compare.subprocess, "run", fake_digit_score)
    scores = fair_compare.digit_scores(args, runs)
    assert calls == [["a.pt", "bb.pt"]]  # FID's kept samples, named as fid.py names them
    assert fair_compare.score_of(scores, runs[1])["recognisable"] == 0.2  # each row on its own run
    fair_compare.digit_scores(args, runs[::-1])
    assert len(calls) == 1  # the same runs and samples: reused
    later = (tmp_path / "digits" / "report.json").stat().st_mtime + 10
    os.utime(samples / "a.pt", (later, later))  # FID drew a's samples again: the old digit scores judged others
    fair_compare.digit_scores(args, runs)
    assert len(calls) == 2
