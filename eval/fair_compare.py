#!/usr/bin/env python
"""The fair generation comparison: every denoiser at its own best learning rate, then the same everything else.

    python eval/fair_compare.py --models emov2-1m unet2d-1m --learning_rates 5e-4 1e-3 2e-3 \
        --dataset_name ../shared/data/mnist --resolution 16 --max_train_steps 1200 --num_samples 1000 \
        --jobs 2 --threads 1 --output_dir outputs/fair-1m

1. Train: every (model, learning rate) pair runs `train/train_ddpm.py` with identical flags but the rate -- same
   data, steps, batch, warm-up and cosine schedule, EMA, seed -- logging the held-out denoising loss (fixed
   test-split images, noise and timesteps; `emov2_gen.evaluation.heldout_loss`) and the training wall-clock.
2. Select: each model's rate is the one with the lowest final held-out loss of its EMA weights (what is sampled).
   The sweep's runs are full-length, so the selected run is the final run (no short-horizon bias).
3. Score: `eval/fid.py` samples the selected runs with the same per-sample seeds and scores FID/KID/precision/
   recall at one N against the training split (`--num_samples 0` skips it); with `--digit_scores`,
   `eval/digit_score.py` judges the same samples with a digit classifier (recognisable share, digit FD).
4. Time: each model's seconds per optimiser step of `train/train_ddpm.py` itself (its logged training clock, which
   leaves evaluation out), from short runs made one at a time after the sweep, models in turn, the fastest of
   `--timing_repeats`. This sets the equal-time axis: it counts what a real training step costs (data loading, noise,
   the EMA update), which a model-only step leaves out; reported beside it as "model s/step".
5. Equal time (`--equal_time_runs`): every model slower per step than the fastest trains once more at its selected
   rate for the steps it takes in the fastest model's training time, with its own warm-up and cosine schedule (a
   run planned for that budget, not a cut-short one), and is scored like the others, FID included.
6. Report (`report.md`, `report.json`, `heldout_vs_cost.png`): held-out loss at every rate, at equal steps and at
   equal training wall-clock (each curve interpolated at the shortest run's final time, and the equal-time runs),
   FID/KID, parameters, GFLOPs, training throughput, peak training memory and the sample grids.

A model is a preset name, or `LABEL=PRESET:key=value,...` for a variant (the ablations), e.g.
`emov2-1m-gn=emov2-1m:norm_type='gn'` (values are Python literals). Class-conditional denoisers (the D-EMOv2 vs
DiT comparison, `--models demo-t-2 dit-t-2 --resolution 32 --class_conditional`) train on the labels and sample
balanced labels. Re-running continues unfinished runs from their latest checkpoint and reuses finished ones.
`--jobs 2 --threads 1` runs the sweep side by side, one core each; since the sweep's own wall-clock ("logged train
s") depends on which runs happened to share the machine, the equal-time axis comes from the timing runs, made alone.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from emov2_gen.data.image_datasets import load_image_dataset
from emov2_gen.data.training_images import image_channels, num_classes
from emov2_gen.evaluation.benchmark import NullClassDenoiser, peak_memory_mib
from emov2_gen.evaluation.digit_scores import RECOGNISABLE_PROBABILITY
from emov2_gen.evaluation.fid import samples_file
from emov2_gen.evaluation.flops import count_gflops
from emov2_gen.evaluation.folder_names import folder_names
from emov2_gen.evaluation.lr_sweep import best_learning_rate, check_sweep, on_sweep_edge
from emov2_gen.evaluation.training_logs import read_scalars
from emov2_gen.models.registry import DENOISER_PRESETS, build_denoiser
from emov2_gen.training_utils import DIVERGED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT, FID_SCRIPT = REPO / "train" / "train_ddpm.py", REPO / "eval" / "fid.py"
DIGIT_SCORE_SCRIPT = REPO / "eval" / "digit_score.py"
SELECTION_TAG = "heldout_loss_ema"  # the EMA weights are what the saved pipeline samples
DIVERGED = ".diverged"  # marks a run that train_ddpm.py stopped on a non-finite or collapsed loss


@dataclass
class ModelSpec:
    """A preset, or a preset with config overrides (an ablation row), under a display label."""

    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """`PRESET` or `LABEL=PRESET:key=value,key=value` (values are Python literals)."""
        head, _, assignments = text.partition(":")
        label, _, preset = head.rpartition("=")
        if preset not in DENOISER_PRESETS:
            raise ValueError(f"Unknown model preset {preset!r} in {text!r}; valid presets: {', '.join(DENOISER_PRESETS)}.")
        try:  # `key=value, ...` read as the keyword arguments of a call, so values may hold commas: (8, 16)
            call = ast.parse(f"f({assignments})", mode="eval").body
            if call.args:
                raise SyntaxError("every override needs a key")
            overrides = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"Cannot read the overrides of {text!r} as key=value pairs of Python literals: {error}") from error
        if overrides and not label:
            raise ValueError(f"A variant needs a label: LABEL={text}.")
        return cls(label or preset, preset, overrides)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="Presets or LABEL=PRESET:key=value,... variants.")
    parser.add_argument("--learning_rates", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3],
                        help="The sweep every model is trained at (at least 3 values for a fair comparison).")
    parser.add_argument("--output_dir", type=str, required=True)
    data = parser.add_argument_group("data and recipe (identical for every run)")
    data.add_argument("--dataset_name", type=str, default="../shared/data/mnist")
    data.add_argument("--heldout_split", type=str, default="test")
    data.add_argument("--resolution", type=int, default=16)
    data.add_argument("--train_batch_size", type=int, default=32)
    data.add_argument("--max_train_steps", type=int, default=1200)
    data.add_argument("--lr_warmup_steps", type=int, default=100)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--heldout_steps", type=int, default=100)
    data.add_argument("--heldout_num_images", type=int, default=512)
    data.add_argument("--class_conditional", action="store_true",
                      help="Train on the labels (train_ddpm.py's null class and label dropout 0.1; the held-out loss "
                           "uses the test labels) and sample FID with balanced labels: the D-EMOv2 vs DiT comparison.")
    data.add_argument("--train_args", type=str, nargs=argparse.REMAINDER, default=[],
                      help="Further train_ddpm.py flags for every run (must come last).")
    parser.add_argument("--equal_time_runs", action="store_true",
                        help="Also train each slower model at its selected rate for the fastest model's training time "
                             "(its own schedule) and score those runs: held-out loss and FID at equal wall-clock.")
    scoring = parser.add_argument_group("FID (eval/fid.py)")
    scoring.add_argument("--num_samples", type=int, default=1000, help="Samples per model and reference images; 0 skips FID.")
    scoring.add_argument("--num_inference_steps", type=int, default=50)
    scoring.add_argument("--fid_args", type=str, default="", help='Further eval/fid.py flags, e.g. "--inception-weights W".')
    scoring.add_argument("--digit_scores", action="store_true",
                         help="Also score FID's samples with eval/digit_score.py (digit datasets such as MNIST): the "
                              "recognisable share and digit FD of the very same images.")
    scoring.add_argument("--digit_args", type=str, default="",
                         help='Further eval/digit_score.py flags, e.g. "--classifier_epochs 1".')
    timing = parser.add_argument_group("equal-time axis (timing runs of train_ddpm.py, one at a time)")
    timing.add_argument("--timing_steps", type=int, default=300, help="Steps timed per timing run.")
    timing.add_argument("--timing_warmup_steps", type=int, default=20,
                        help="Untimed steps before them (lazy initialisation, the first batches).")
    timing.add_argument("--timing_repeats", type=int, default=3, help="Timing runs per model (the fastest counts), models in turn.")
    timing.add_argument("--timing_dir", type=str, default=None,
                        help="Where timing runs are kept and reused by name (default OUTPUT_DIR/timing). Another "
                             "comparison's timing folder shares its equal-time axis, e.g. for a replicate at another "
                             "seed; its runs must have the same models, resolution and batch size.")
    parser.add_argument("--jobs", type=int, default=1, help="Training runs of the sweep at a time.")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Where the model-only cost columns (model s/step, peak memory) are measured: where the runs "
                             "trained.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per run.")
    args = parser.parse_args(argv)
    args.specs = [ModelSpec.parse(text) for text in args.models]
    labels = [spec.label for spec in args.specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two models share a label: {labels}.")
    args.learning_rates = check_sweep(args.learning_rates)
    if args.digit_scores and not args.num_samples:
        parser.error("--digit_scores scores FID's samples: give --num_samples > 0.")
    for name in ("resolution", "train_batch_size", "max_train_steps", "heldout_steps", "timing_steps",
                 "timing_warmup_steps", "timing_repeats", "jobs", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.num_samples < 0:
        raise ValueError(f"--num_samples must be 0 (no FID) or positive, got {args.num_samples}.")
    return args


def diverged(run_dir: Path) -> bool:
    return (run_dir / DIVERGED).is_file()


def run_name(spec: ModelSpec, lr: float, steps: Optional[int] = None) -> str:
    return f"{spec.label}-lr{lr:g}" + (f"-{steps}steps" if steps is not None else "")


def build_variant(spec: ModelSpec, args: argparse.Namespace, channels: int):
    """The run's model as train_ddpm.py builds it (a class-conditional one with the data's labels + the null row)."""
    return build_denoiser(spec.preset, sample_size=args.resolution, in_channels=channels,
                          num_class_embeds=args.num_class_embeds, **spec.overrides)


def train(spec: ModelSpec, lr: float, args: argparse.Namespace, channels: int, steps: Optional[int] = None,
          run_dir: Optional[Path] = None) -> Path:
    """One run of the sweep (a train_ddpm.py subprocess; `steps` other than --max_train_steps: an equal-time run;
    `run_dir` other than runs/<run_name>: a timing run), continued from its last checkpoint if interrupted. A run that
    stops on a non-finite or collapsed loss is marked diverged (its held-out loss counts as NaN: it never wins the
    sweep); any other failure stops the comparison."""
    run_dir = run_dir or Path(args.output_dir) / "runs" / run_name(spec, lr, steps)
    steps = args.max_train_steps if steps is None else steps
    done = run_dir / ".done"
    if done.is_file() or diverged(run_dir):
        return run_dir
    model_flags = ["--model", spec.preset]
    if spec.overrides:
        config_dir = Path(args.output_dir) / "configs" / spec.label
        build_variant(spec, args, channels).save_config(config_dir)
        model_flags = ["--model_config_name_or_path", str(config_dir)]
    command = [
        sys.executable, str(TRAIN_SCRIPT), *model_flags, "--dataset_name", args.dataset_name,
        "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(steps), "--learning_rate", str(lr),
        "--lr_warmup_steps", str(args.lr_warmup_steps), "--seed", str(args.seed), "--use_ema",
        "--ddpm_beta_schedule", "squaredcos_cap_v2", "--eval_scheduler", "ddim", "--ddpm_num_inference_steps", "50",
        "--heldout_split", args.heldout_split, "--heldout_steps", str(args.heldout_steps),
        "--heldout_num_images", str(args.heldout_num_images),
        "--checkpointing_steps", str(max(args.heldout_steps, steps // 4)), "--checkpoints_total_limit", "1",
        "--resume_from_checkpoint", "latest", "--save_images_epochs", "1000000", "--save_model_epochs", "1000000",
        "--output_dir", str(run_dir), *(["--class_conditional"] if args.class_conditional else []), *args.train_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = run_dir.parent / f"{run_dir.name}.log"
    with open(log_file, "a") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode == DIVERGED_EXIT_CODE:
        (run_dir / DIVERGED).touch()  # a rate too high for this model: it loses the sweep, the comparison goes on
        return run_dir
    if result.returncode != 0:
        raise RuntimeError(f"Training {run_dir.name} failed (exit {result.returncode}); see {log_file}.")
    done.touch()
    return run_dir


def curve(scalars: dict[str, list[tuple[int, float]]], tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, training seconds, values) of a held-out tag; seconds are read off train_seconds at the same steps."""
    seconds = dict(scalars["train_seconds"])
    steps, values = (np.array(column, dtype=float) for column in zip(*scalars[tag]))
    return steps, np.array([seconds[int(step)] for step in steps]), values


def value_at(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """y linearly interpolated at x = `at` (NaN outside the curve's range)."""
    return float(np.interp(at, x, y)) if x[0] <= at <= x[-1] else math.nan


def time_training(args: argparse.Namespace, channels: int) -> dict[str, float]:
    """Seconds per optimiser step of train_ddpm.py itself, per model: the equal-time axis.

    Each timing run trains `--timing_warmup_steps` + `--timing_steps` steps (the recipe, at the sweep's lowest rate) and
    is read off its logged training clock between the warm-up's end and the last step. Runs go one at a time, models
    in turn (A, B, A, B, ...), and no run shares the machine with another. The fastest of `--timing_repeats` counts:
    on a shared machine interference only ever adds time, so the fastest run is the nearest to the model's own cost
    (timeit's rule). A median of 3 was not enough: a slow spell that hit two runs of one model and one of the other
    read the 5M pair's ratio as 1.76x instead of 1.2x. Finished timing runs (in `--timing_dir`) are reused.
    """
    warmup = args.timing_warmup_steps
    steps = warmup + args.timing_steps
    lr = min(args.learning_rates)
    seconds: dict[str, list[float]] = {spec.label: [] for spec in args.specs}
    timing_dir = Path(args.timing_dir or Path(args.output_dir) / "timing")
    for repeat in range(args.timing_repeats):
        for spec in args.specs:
            run_dir = train(spec, lr, args, channels, steps, timing_dir / f"{spec.label}-{steps}steps-{repeat}")
            if diverged(run_dir):
                raise RuntimeError(f"The timing run {run_dir} diverged at lr {lr:g}; put a lower rate in the sweep.")
            clock = dict(read_scalars(run_dir / "logs")["train_seconds"])
            seconds[spec.label].append((clock[steps] - clock[warmup]) / args.timing_steps)
    return {label: min(values) for label, values in seconds.items()}


def measure_costs(args: argparse.Namespace, channels: int, repeats: int = 20) -> dict[str, dict[str, float]]:
    """Parameters, GFLOPs per forward, and the model-only training step's time and peak memory on `args.device`, at
    the recipe's batch size.

    The model-only step (forward, backward, AdamW on a fixed batch) leaves out what the training script does besides
    (data loading, noising, the EMA update): `time_training`, not this, sets the equal-time axis. Its times are
    medians of `repeats` steps timed in turn (model A, B, A, B, ...) in this one process.
    """
    device = torch.device(args.device)
    steps, costs = {}, {}
    for spec in args.specs:
        torch.manual_seed(args.seed)
        model = build_variant(spec, args, channels).to(device)
        call = NullClassDenoiser(model)  # a class-conditional model (DEMO, DiT) is timed on its null class
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sample = torch.randn(args.train_batch_size, channels, args.resolution, args.resolution, device=device)
        timesteps = torch.randint(0, 1000, (args.train_batch_size,), device=device)

        def step(call=call, optimizer=optimizer, sample=sample, timesteps=timesteps) -> None:
            call(sample, timesteps).sample.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        step()  # warm-up
        steps[spec.label] = step
        gflops = count_gflops(model.eval(), args.resolution, channels)
        model.train()
        costs[spec.label] = {"parameters": model.num_parameters(), "gflops": gflops,
                             "peak_train_memory_mib": peak_memory_mib(step, device)}
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    for label, measured in times.items():
        costs[label]["model_seconds_per_step"] = float(np.median(measured))
    return costs


def select(
    args: argparse.Namespace, runs: dict[str, dict[float, Path]], costs: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Each model's held-out loss at every rate, its selected rate and that run's curves, and every selected curve
    at equal training time: the time the fastest-finishing model needs for the whole run (steps x its timed
    seconds per step), reached by each model at its own step count."""
    results = {}
    for spec in args.specs:
        scalars = {lr: read_scalars(path / "logs") for lr, path in runs[spec.label].items() if not diverged(path)}
        final = {lr: scalars[lr][SELECTION_TAG][-1][1] if lr in scalars else math.nan for lr in runs[spec.label]}
        best = best_learning_rate(final, higher_is_better=False)
        steps, seconds, values = curve(scalars[best], SELECTION_TAG)
        throughput = [value for _, value in scalars[best]["images_per_second"]]
        results[spec.label] = {
            "heldout_by_lr": {f"{lr:g}": value for lr, value in final.items()},
            "learning_rate": best,
            "on_sweep_edge": on_sweep_edge(best, args.learning_rates),
            "run_dir": str(runs[spec.label][best]),
            "curve": {"steps": steps.tolist(), "train_seconds": seconds.tolist(), "heldout_loss_ema": values.tolist()},
            "heldout_loss": float(values[-1]),
            "train_seconds": float(seconds[-1]),
            "images_per_second": float(np.median(throughput)),
        }
    equal_time = min(args.max_train_steps * cost["seconds_per_step"] for cost in costs.values())
    for label, result in results.items():
        c, step_time = result["curve"], costs[label]["seconds_per_step"]
        # At most the whole run: for the fastest model x / t * t can exceed it by a rounding error (NaN off the curve).
        steps = min(equal_time / step_time, args.max_train_steps)
        result["steps_at_equal_time"] = steps
        result["heldout_at_equal_time"] = value_at(np.array(c["steps"]), np.array(c["heldout_loss_ema"]), steps)
    return {"equal_train_seconds": equal_time, "models": results}


def add_equal_time_runs(args: argparse.Namespace, selection: dict[str, Any], channels: int) -> None:
    """Train every model slower per step than the fastest at its selected rate for the steps it takes in the
    equal training time (its own warm-up and cosine over those steps), and record each model's equal-time run: that
    run, or for the fastest model its selected run. Adds `equal_time_run` (run_dir, steps, heldout_loss) per model."""
    specs = {spec.label: spec for spec in args.specs}
    jobs = {}
    for label, model in selection["models"].items():
        steps = max(1, round(model["steps_at_equal_time"]))
        model["equal_time_run"] = {"run_dir": model["run_dir"], "steps": args.max_train_steps,
                                   "heldout_loss": model["heldout_loss"]}
        if steps < args.max_train_steps:
            jobs[label] = steps
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        paths = list(pool.map(
            lambda label: train(specs[label], selection["models"][label]["learning_rate"], args, channels, jobs[label]),
            jobs))
    for label, path in zip(jobs, paths):
        heldout = read_scalars(path / "logs")[SELECTION_TAG][-1][1] if not diverged(path) else math.nan
        selection["models"][label]["equal_time_run"] = {"run_dir": str(path), "steps": jobs[label],
                                                        "heldout_loss": heldout}


def fid_scores(args: argparse.Namespace, run_dirs: list[str]) -> dict[str, dict[str, Any]]:
    """FID/KID/precision/recall of the given runs, all sampled and scored together by eval/fid.py (reused while
    the same runs are asked for and their samples are kept), by resolved run directory."""
    fid_dir, dirs = Path(args.output_dir) / "fid", sorted(set(run_dirs))
    command = [sys.executable, str(FID_SCRIPT), "--model_dirs", *dirs, "--reference", args.dataset_name,
               "--split", "train", "--num_samples", str(args.num_samples), "--num_inference_steps",
               str(args.num_inference_steps), "--scheduler", "ddim", "--seed", str(args.seed),
               "--output_dir", str(fid_dir), *(["--class_conditional"] if args.class_conditional else []),
               *args.fid_args.split()]
    report = run_unless_reported(fid_dir / "report.json", dirs, lambda r: [row["path"] for row in r["models"]],
                                 command, args.threads * args.jobs, samples_files(args, dirs))
    return {row["path"]: row for row in report["models"]}


def digit_scores(args: argparse.Namespace, run_dirs: list[str]) -> dict[str, dict[str, Any]]:
    """The digit scores (eval/digit_score.py) of the very samples `fid_scores` drew for the given runs (reused while
    the same runs are asked for), by resolved run directory."""
    digit_dir, dirs = Path(args.output_dir) / "digits", sorted(set(run_dirs))
    samples = samples_files(args, dirs)
    command = [sys.executable, str(DIGIT_SCORE_SCRIPT), "--samples", *map(str, samples), "--reference",
               args.dataset_name, "--output_dir", str(digit_dir), *args.digit_args.split()]
    report = run_unless_reported(digit_dir / "report.json", dirs, lambda r: list(r["samples"].values()), command,
                                 args.threads * args.jobs, samples)
    rows = {row["name"]: row for row in report["models"]}
    return {path: rows[name] for name, path in report["samples"].items()}


def samples_files(args: argparse.Namespace, dirs: list[str]) -> list[Path]:
    """Where eval/fid.py keeps the samples of `dirs` (named as it names them)."""
    return [samples_file(Path(args.output_dir) / "fid" / "samples", name) for name in folder_names(dirs)]


def run_unless_reported(report: Path, dirs: list[str], reported_dirs: Callable[[dict], list[str]],
                        command: list[str], threads: int, samples: Sequence[Path]) -> dict[str, Any]:
    """A scoring script's report: run `command` unless `report` already covers exactly `dirs` (as resolved paths,
    read by `reported_dirs`) and was written after every one of the `samples` files, which must all exist (a digit
    report older than FID's samples judged other images; an FID report without its samples predates keeping them)."""
    wanted = sorted(str(Path(d).resolve()) for d in dirs)
    if not (report.is_file() and sorted(reported_dirs(json.loads(report.read_text()))) == wanted
            and all(path.is_file() and path.stat().st_mtime <= report.stat().st_mtime for path in samples)):
        subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True)
    return json.loads(report.read_text())


def score_of(scores_by_path: dict[str, dict[str, Any]], run_dir: str) -> dict[str, Any]:
    return scores_by_path[str(Path(run_dir).resolve())]


def plot(selection: dict[str, Any], costs: dict[str, dict[str, float]], path: Path) -> None:
    """Held-out loss (EMA weights) against optimiser steps and against training time (steps x timed seconds
    per step), one line per model; the dashed line is the equal-time budget of the report, a star a model's
    equal-time run (`--equal_time_runs`)."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    by_steps, by_time = figure.subplots(1, 2)
    for label, model in selection["models"].items():
        c = model["curve"]
        name = f"{label} (lr {model['learning_rate']:g})"
        by_steps.plot(c["steps"], c["heldout_loss_ema"], marker=".", label=name)
        seconds = np.array(c["steps"]) * costs[label]["seconds_per_step"]
        lines = by_time.plot(seconds, c["heldout_loss_ema"], marker=".", label=name)
        if "equal_time_run" in model:
            by_time.plot(selection["equal_train_seconds"], model["equal_time_run"]["heldout_loss"], marker="*",
                         markersize=12, color=lines[0].get_color(), linestyle="none")
    by_time.axvline(selection["equal_train_seconds"], color="grey", linestyle="--", linewidth=0.8)
    by_steps.set(xlabel="optimiser step", ylabel="held-out loss (EMA weights)", yscale="log")
    by_time.set(xlabel="training time (s): steps x timed s/step", ylabel="held-out loss (EMA weights)", yscale="log")
    for axes in (by_steps, by_time):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=120)


def markdown(args: argparse.Namespace, selection: dict[str, Any], costs: dict[str, dict[str, float]],
             fid: dict[str, dict[str, Any]], digits: dict[str, dict[str, Any]]) -> str:
    rates = [f"{lr:g}" for lr in args.learning_rates]
    equal_time = f"{selection['equal_train_seconds']:.0f} s"
    header = (["model", "params (M)", f"GFLOPs @{args.resolution}²"] + [f"held-out @lr {r}" for r in rates]
              + ["lr", f"held-out @{args.max_train_steps} steps",
                 f"held-out @{equal_time}", "s/step", "model s/step", "logged train s", "peak train MiB"]
              + (["FID", "KID"] if fid else []) + (["recognised", "digit FD"] if digits else [])
              + (["equal-time run: steps", "held-out"] + (["FID"] if fid else []) + (["recognised"] if digits else [])
                 if args.equal_time_runs else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec in args.specs:
        model, cost = selection["models"][spec.label], costs[spec.label]
        row = [spec.label, f"{cost['parameters'] / 1e6:.3f}", f"{cost['gflops']:.3f}"]
        row += [f"{model['heldout_by_lr'][r]:.5f}" if math.isfinite(model["heldout_by_lr"][r]) else "diverged"
                for r in rates]
        row += [f"{model['learning_rate']:g}" + (" (edge)" if model["on_sweep_edge"] else ""),
                f"{model['heldout_loss']:.5f}", f"{model['heldout_at_equal_time']:.5f}",
                f"{cost['seconds_per_step']:.3f}", f"{cost['model_seconds_per_step']:.3f}",
                f"{model['train_seconds']:.0f}", f"{cost['peak_train_memory_mib']:.0f}"]
        if fid:
            row += [f"{fid[spec.label]['fid']:.2f}", f"{fid[spec.label]['kid_mean']:.4f}"]
        if digits:
            row += [f"{digits[spec.label]['recognisable']:.3f}", f"{digits[spec.label]['digit_fd']:.2f}"]
        if args.equal_time_runs:
            run = model["equal_time_run"]
            row += [str(run["steps"]), f"{run['heldout_loss']:.5f}"] + ([f"{run['fid']['fid']:.2f}"] if fid else [])
            row += [f"{run['digits']['recognisable']:.3f}"] if digits else []
        lines.append("| " + " | ".join(row) + " |")
    overrides = [f"{spec.label}: {spec.preset} {spec.overrides}" for spec in args.specs if spec.overrides]
    recipe = (f"{args.dataset_name} at {args.resolution}x{args.resolution}, {args.max_train_steps} steps x batch "
              f"{args.train_batch_size}, AdamW, {args.lr_warmup_steps}-step warm-up then cosine, EMA, squaredcos_cap_v2, "
              f"seed {args.seed}, {args.jobs} run(s) at a time x {args.threads} thread(s). Held-out loss: "
              f"{args.heldout_num_images} {args.heldout_split}-split images, fixed noise and 8 timesteps, EMA weights; "
              "lr selected on its final value. Equal time: steps x s/step (train_ddpm.py's own clock, fastest of "
              f"{args.timing_repeats} timing runs of {args.timing_steps} steps made one at a time); model s/step: "
              f"forward, backward and AdamW alone, timed in turn in one process on {args.device}; "
              "logged train s: the sweep runs' own wall-clock (shared machine)."
              + (" Equal-time run: the selected rate retrained for the steps that fit the fastest model's training "
                 "time, with its own warm-up and cosine schedule." if args.equal_time_runs else ""))
    if fid:
        first = next(iter(fid.values()))
        recipe += (f" FID/KID: {first['num_samples']} DDIM-{first['num_inference_steps']} samples per model vs "
                   f"{first['num_reference']} training images, same per-sample seeds.")
    if digits:
        recipe += (f" Digit scores (eval/digit_score.py, the same samples): recognised = the digit classifier's top "
                   f"probability >= {RECOGNISABLE_PROBABILITY}; digit FD in its features vs held-out "
                   f"{args.heldout_split}-split images.")
    return "\n".join(lines) + "\n\n" + recipe + ("\n\nVariants: " + "; ".join(overrides) if overrides else "") + "\n"


def main(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset, _ = load_image_dataset(dataset_name=args.dataset_name)
    channels = image_channels(dataset[0]["image"])
    args.num_class_embeds = num_classes(dataset) + 1 if args.class_conditional else None
    jobs = [(spec, lr) for spec in args.specs for lr in args.learning_rates]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        paths = list(pool.map(lambda job: train(*job, args, channels), jobs))
    runs: dict[str, dict[float, Path]] = {}
    for (spec, lr), path in zip(jobs, paths):
        runs.setdefault(spec.label, {})[lr] = path
    torch.set_num_threads(args.threads)
    costs = measure_costs(args, channels)
    for label, seconds in time_training(args, channels).items():
        costs[label]["seconds_per_step"] = seconds
    selection = select(args, runs, costs)
    if args.equal_time_runs:
        add_equal_time_runs(args, selection, channels)
    fid, digits = {}, {}
    if args.num_samples:
        models = selection["models"].values()
        equal_time_runs = [model["equal_time_run"] for model in models] if args.equal_time_runs else []
        run_dirs = [model["run_dir"] for model in models] + [run["run_dir"] for run in equal_time_runs]
        scorers = [("fid", fid, fid_scores)] + ([("digits", digits, digit_scores)] if args.digit_scores else [])
        for key, scores, scorer in scorers:  # digit_scores reads the samples fid_scores kept: in this order
            by_path = scorer(args, run_dirs)
            scores.update({label: score_of(by_path, model["run_dir"]) for label, model in selection["models"].items()})
            for run in equal_time_runs:
                run[key] = score_of(by_path, run["run_dir"])
    plot(selection, costs, output_dir / "heldout_vs_cost.png")
    table = markdown(args, selection, costs, fid, digits)
    (output_dir / "report.md").write_text(table)
    report = {"args": {k: v for k, v in vars(args).items() if k != "specs"}, **selection, "costs": costs, "fid": fid,
              "digits": digits, "wall_seconds": time.perf_counter() - start}
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(table)
    return report


if __name__ == "__main__":
    main(parse_args())
