#!/usr/bin/env python
"""Segmentation benchmark: EMOv2 UNet presets against plain convolutional UNets (mmseg UNet-S5-D16 layout).

The fair protocol: every trained model goes through `train/train_seg.py` once per rate of `--learning_rates`,
with identical flags otherwise (same data, steps, batch, seed), validating every `--validation_every` steps on
the synthetic validation fundi. Each model is compared at its own rate, the one with the best final validation
vessel Dice (`emov2_gen.evaluation.lr_sweep`), and scored at that rate on held-out synthetic test fundi that took
no part in the choice (sliding-window inference, mmseg IoUMetric: vessel Dice, mDice). Every model, trained or
not (`--cost_models`, e.g. the paper-sized pair), also gets its parameter count, GFLOPs of one forward pass and
CPU latency at `--cost_size`. Prints a markdown table and writes `results.json`, `table.md` and
`dice_vs_steps.png` (validation Dice vs steps at each model's chosen rate) to `--output_dir`; the runs live in
`<output_dir>/<preset>/lr-<lr>/`.

    python eval/seg_benchmark.py --models unet-emov2-1m unet-s5-d16-base16 --jobs 1 --threads 1
    python eval/seg_benchmark.py --models unet-emov2-5m unet-s5-d16-base32 --learning_rates 1e-2 --reuse

FLOPs: `torch.utils.flop_counter.FlopCounterMode`, 2 FLOPs per multiply-accumulate in convolutions and both
attention matmuls (see `emov2_gen.evaluation.flops`); norms, activations and pooling are not counted.
Latency: median wall time of a no-grad forward of one image (batch 1) after warm-up, `--threads` threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from emov2_gen import EMOv2UNetForSegmentation
from emov2_gen.evaluation.flops import flop_counter
from emov2_gen.evaluation.lr_sweep import best_learning_rate, check_sweep, on_sweep_edge
from emov2_gen.models.segmentation import SEGMENTATION_PRESETS
from emov2_gen.training_utils import DIVERGED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train" / "train_seg.py"
DEFAULT_MODELS = ("unet-emov2-1m", "unet-s5-d16-base16")
DEFAULT_COST_MODELS = ("unet-emov2-5m", "unet-s5-d16-base32", "unet-emov2-paper", "unet-s5-d16")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    presets = sorted(SEGMENTATION_PRESETS)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=presets, metavar="PRESET",
                        help=f"Presets to train and score ({', '.join(presets)}).")
    parser.add_argument("--cost_models", nargs="*", default=list(DEFAULT_COST_MODELS), choices=presets, metavar="PRESET",
                        help="Presets that only get parameters, GFLOPs and latency (no training).")
    parser.add_argument("--output_dir", type=str, default="seg-benchmark")
    parser.add_argument("--reuse", action="store_true",
                        help="Reuse the finished (model, learning rate) runs found in --output_dir (resume a benchmark).")
    recipe = parser.add_argument_group("training recipe (identical for every model and rate)")
    recipe.add_argument("--max_train_steps", type=int, default=600)
    recipe.add_argument("--train_batch_size", type=int, default=8)
    recipe.add_argument("--crop_size", type=int, default=64)
    recipe.add_argument("--synthetic_size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    recipe.add_argument("--num_synthetic_train", type=int, default=20)
    recipe.add_argument("--num_synthetic_validation", type=int, default=5, help="Fundi that choose each model's rate.")
    recipe.add_argument("--num_synthetic_test", type=int, default=10, help="Held-out fundi scored at the chosen rate.")
    recipe.add_argument("--validation_every", type=int, default=50, help="Validate every N steps (and at the end).")
    recipe.add_argument("--ratio_range", type=float, nargs=2, default=(1.0, 1.0),
                        help="Random rescale range; off by default: at this budget rescaled 1-px vessels (masks resized "
                             "nearest) keep every model at all-background.")
    recipe.add_argument("--learning_rates", "--learning_rate", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2],
                        metavar="LR", help="The sweep: every model trains at each rate (one rate: no sweep).")
    recipe.add_argument("--lr_warmup_steps", type=int, default=60)
    recipe.add_argument("--max_grad_norm", type=float, default=1.0)
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument("--train_args", type=str, default="",
                        help='Further train_seg.py flags for every model, e.g. "--use_ema --flip_prob 0".')
    cost = parser.add_argument_group("cost")
    cost.add_argument("--cost_size", type=int, default=256, help="Square input side for GFLOPs and latency (paper: 256).")
    cost.add_argument("--latency_repeats", type=int, default=5)
    cost.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for training and latency.")
    cost.add_argument("--jobs", type=int, default=1, help="Training runs at a time (each with --threads threads).")
    args = parser.parse_args(argv)
    for name in ("max_train_steps", "latency_repeats", "threads", "jobs", "cost_size", "num_synthetic_validation",
                 "num_synthetic_test", "validation_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    args.learning_rates = check_sweep(args.learning_rates)
    return args


def run_dir(args: argparse.Namespace, preset: str, learning_rate: float) -> Path:
    return Path(args.output_dir) / preset / f"lr-{learning_rate:g}"


def train(args: argparse.Namespace, preset: str, learning_rate: float) -> dict[str, Any]:
    """Train `preset` at `learning_rate` with the shared recipe (a train_seg.py subprocess) and return its
    eval_results.json; a run whose loss diverged returns `{"diverged": True}` (it cannot win the sweep)."""
    directory = run_dir(args, preset, learning_rate)
    results_file, log_file = directory / "eval_results.json", directory.parent / f"{directory.name}.log"
    if args.reuse and results_file.is_file():
        return json.loads(results_file.read_text())
    command = [
        sys.executable, str(TRAIN_SCRIPT), "--preset", preset, "--output_dir", str(directory), "--overwrite_output_dir",
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
        "--crop_size", str(args.crop_size), "--synthetic_size", *map(str, args.synthetic_size),
        "--num_synthetic_train", str(args.num_synthetic_train),
        "--num_synthetic_validation", str(args.num_synthetic_validation),
        "--num_synthetic_test", str(args.num_synthetic_test),
        "--ratio_range", *map(str, args.ratio_range), "--learning_rate", str(learning_rate),
        "--lr_warmup_steps", str(args.lr_warmup_steps), "--max_grad_norm", str(args.max_grad_norm),
        "--seed", str(args.seed), "--validation_steps", str(args.validation_every),
        "--checkpointing_steps", str(args.max_train_steps), *shlex.split(args.train_args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    directory.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode == DIVERGED_EXIT_CODE:  # train_seg.py stopped on a non-finite loss
        return {"diverged": True}
    if result.returncode != 0:
        raise RuntimeError(f"Training {preset} at lr {learning_rate:g} failed (exit {result.returncode}); see {log_file}.")
    return json.loads(results_file.read_text())


@torch.no_grad()
def forward_gflops(model: EMOv2UNetForSegmentation, size: int) -> float:
    counter = flop_counter()
    with counter:
        model(torch.zeros(1, model.config.in_channels, size, size))
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def latency_ms(model: EMOv2UNetForSegmentation, size: int, repeats: int) -> float:
    x = torch.randn(1, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cost(preset: str, args: argparse.Namespace) -> dict[str, float]:
    model = EMOv2UNetForSegmentation.from_preset(preset).eval()
    return {
        "parameters": model.num_parameters(),
        "gflops": forward_gflops(model, args.cost_size),
        "latency_ms": latency_ms(model, args.cost_size, args.latency_repeats),
    }


def choose_learning_rate(runs: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """A trained model's row entries: validation vessel Dice at every rate, the rate with the best one, and that
    run's test scores, validation history and train time. The test scores never influence the choice."""
    validation = {lr: run["scores"]["vessel_dice"] if not run.get("diverged") else math.nan for lr, run in runs.items()}
    best = best_learning_rate(validation, higher_is_better=True)
    chosen = runs[best]
    return {
        "validation_vessel_dice": {f"{lr:g}": dice for lr, dice in validation.items()},
        "learning_rate": best,
        "learning_rate_on_sweep_edge": on_sweep_edge(best, list(runs)),
        "steps": chosen["steps"],
        "validation_scores": chosen["scores"],
        "test_scores": chosen["test_scores"],
        "validation_history": chosen["validation_history"],
        "train_seconds": chosen["train_seconds_this_run"],
    }


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    size = args.cost_size
    header = (f"| model | params (M) | GFLOPs @{size}² | CPU latency @{size}² (ms, {args.threads} thr) | "
              + "".join(f"val vessel Dice @ lr {lr:g} | " for lr in args.learning_rates)
              + "chosen lr | test vessel Dice | test mDice | train time (s) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [row["model"], f"{row['parameters'] / 1e6:.3f}", f"{row['gflops']:.2f}", f"{row['latency_ms']:.0f}"]
        if "learning_rate" in row:
            cells += [f"{dice:.2f}" if math.isfinite(dice) else "diverged" for dice in row["validation_vessel_dice"].values()]
            cells.append(f"{row['learning_rate']:g}" + (" (sweep edge)" if row["learning_rate_on_sweep_edge"] else ""))
            cells += [f"{row['test_scores']['vessel_dice']:.2f}", f"{row['test_scores']['mDice']:.2f}",
                      f"{row['train_seconds']:.0f}"]
        else:
            cells += ["—"] * (len(args.learning_rates) + 4)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_dice_vs_steps(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation vessel Dice and mDice against training steps, one line per trained model at its chosen rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        if "validation_history" not in row:
            continue
        steps = [entry["step"] for entry in row["validation_history"]]
        for axis, metric in zip(axes, ("vessel_dice", "mDice")):
            axis.plot(steps, [entry[metric] for entry in row["validation_history"]], marker="o", markersize=3,
                      label=f"{row['model']} (lr {row['learning_rate']:g})")
    for axis, title in zip(axes, ("validation vessel Dice", "validation mDice")):
        axis.set(xlabel="training step", ylabel=f"{title} (%)", title=title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(preset, lr) for preset in args.models for lr in args.learning_rates]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = dict(zip(pairs, pool.map(lambda pair: train(args, *pair), pairs)))
    torch.set_num_threads(args.threads)
    rows = []
    for preset in list(args.models) + [m for m in args.cost_models if m not in args.models]:
        row: dict[str, Any] = {"model": preset, **cost(preset, args)}
        if preset in args.models:
            row.update(choose_learning_rate({lr: runs[preset, lr] for lr in args.learning_rates}))
            row["runs"] = {f"{lr:g}": runs[preset, lr] for lr in args.learning_rates}
        rows.append(row)
    table = markdown_table(rows, args)
    plot_dice_vs_steps(rows, output_dir / "dice_vs_steps.png")
    wall = time.perf_counter() - start
    summary = (f"{args.max_train_steps} steps x batch {args.train_batch_size} of {args.crop_size}px crops from "
               f"{args.num_synthetic_train} synthetic {args.synthetic_size[0]}x{args.synthetic_size[1]} fundi (rescale "
               f"{args.ratio_range[0]}-{args.ratio_range[1]}), lr sweep {' '.join(f'{lr:g}' for lr in args.learning_rates)}"
               f" (warm-up {args.lr_warmup_steps}, cosine), clip {args.max_grad_norm}, seed {args.seed}"
               f"{' ' + args.train_args if args.train_args else ''}; each model's lr chosen by its final vessel Dice on "
               f"{args.num_synthetic_validation} validation fundi (validated every {args.validation_every} steps), "
               f"then scored on {args.num_synthetic_test} held-out test fundi; benchmark wall time {wall / 60:.1f} min")
    print(table)
    print(summary)
    (output_dir / "table.md").write_text(table + "\n\n" + summary + "\n")
    (output_dir / "results.json").write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(args)}, indent=2))
    return rows


if __name__ == "__main__":
    main(parse_args())
