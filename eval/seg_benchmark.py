#!/usr/bin/env python
"""Segmentation benchmark: EMOv2 UNet presets against plain convolutional UNets (mmseg UNet-S5-D16 layout).

Every trained model goes through `train/train_seg.py` with identical flags except `--preset` (same data,
recipe, seed and step budget), and is scored on the same synthetic validation fundi with sliding-window
inference (mmseg IoUMetric: vessel Dice, mDice, mIoU, aAcc). Every model, trained or not (`--cost_models`,
e.g. the paper-sized pair), also gets its parameter count, GFLOPs of one forward pass and CPU latency at
`--cost_size`. Prints a markdown table and writes `results.json` and `table.md` to `--output_dir`.

    python eval/seg_benchmark.py                                   # the README table (~15 min on 2 cores)
    python eval/seg_benchmark.py --models unet-emov2-5m unet-s5-d16-base32 --max_train_steps 1000

FLOPs: `torch.utils.flop_counter.FlopCounterMode`, 2 FLOPs per multiply-accumulate in convolutions and both
attention matmuls (see `emov2_gen.evaluation.flops`); norms, activations and pooling are not counted.
Latency: median wall time of a no-grad forward of one image (batch 1) after warm-up, `--threads` threads.
"""

from __future__ import annotations

import argparse
import json
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
from emov2_gen.models.segmentation import SEGMENTATION_PRESETS

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
    parser.add_argument("--reuse", action="store_true", help="Reuse finished training runs found in --output_dir.")
    recipe = parser.add_argument_group("training recipe (identical for every model)")
    recipe.add_argument("--max_train_steps", type=int, default=600)
    recipe.add_argument("--train_batch_size", type=int, default=8)
    recipe.add_argument("--crop_size", type=int, default=64)
    recipe.add_argument("--synthetic_size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    recipe.add_argument("--num_synthetic_train", type=int, default=20)
    recipe.add_argument("--num_synthetic_validation", type=int, default=5)
    recipe.add_argument("--ratio_range", type=float, nargs=2, default=(1.0, 1.0),
                        help="Random rescale range; off by default: at this budget rescaled 1-px vessels (masks resized "
                             "nearest) keep every model at all-background.")
    recipe.add_argument("--learning_rate", type=float, default=1e-2)
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
    for name in ("max_train_steps", "latency_repeats", "threads", "jobs", "cost_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    return args


def train(args: argparse.Namespace, preset: str) -> dict[str, Any]:
    """Train `preset` with the shared recipe (a train_seg.py subprocess) and return its eval_results.json."""
    run_dir = Path(args.output_dir) / preset
    results_file = run_dir / "eval_results.json"
    if args.reuse and results_file.is_file():
        return json.loads(results_file.read_text())
    command = [
        sys.executable, str(TRAIN_SCRIPT), "--preset", preset, "--output_dir", str(run_dir), "--overwrite_output_dir",
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
        "--crop_size", str(args.crop_size), "--synthetic_size", *map(str, args.synthetic_size),
        "--num_synthetic_train", str(args.num_synthetic_train),
        "--num_synthetic_validation", str(args.num_synthetic_validation),
        "--ratio_range", *map(str, args.ratio_range), "--learning_rate", str(args.learning_rate),
        "--lr_warmup_steps", str(args.lr_warmup_steps), "--max_grad_norm", str(args.max_grad_norm),
        "--seed", str(args.seed), "--validation_steps", str(args.max_train_steps),
        "--checkpointing_steps", str(args.max_train_steps), *shlex.split(args.train_args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{preset}.log", "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"Training {preset} failed (exit {result.returncode}); see {run_dir.parent / f'{preset}.log'}.")
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


def markdown_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    size = args.cost_size
    header = (f"| model | params (M) | GFLOPs @{size}² | CPU latency @{size}² (ms, {args.threads} thr) | vessel Dice | "
              "mDice | mIoU | aAcc | train time (s) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        scores = row.get("scores") or {}
        trained = [f"{scores[k]:.2f}" if k in scores else "—" for k in ("vessel_dice", "mDice", "mIoU", "aAcc")]
        train_time = f"{row['train_seconds_this_run']:.0f}" if "train_seconds_this_run" in row else "—"
        lines.append(f"| {row['model']} | {row['parameters'] / 1e6:.3f} | {row['gflops']:.2f} | {row['latency_ms']:.0f} | "
                     + " | ".join(trained) + f" | {train_time} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trained = dict(zip(args.models, pool.map(lambda preset: train(args, preset), args.models)))
    torch.set_num_threads(args.threads)
    rows = []
    for preset in list(args.models) + [m for m in args.cost_models if m not in args.models]:
        rows.append({"model": preset, **trained.get(preset, {}), **cost(preset, args)})
    table = markdown_table(rows, args)
    wall = time.perf_counter() - start
    summary = (f"{args.max_train_steps} steps x batch {args.train_batch_size} of {args.crop_size}px crops from "
               f"{args.num_synthetic_train} synthetic {args.synthetic_size[0]}x{args.synthetic_size[1]} fundi (rescale "
               f"{args.ratio_range[0]}-{args.ratio_range[1]}), lr {args.learning_rate}, clip {args.max_grad_norm}, "
               f"seed {args.seed}{' ' + args.train_args if args.train_args else ''}; scored on "
               f"{args.num_synthetic_validation} validation fundi; benchmark wall time {wall / 60:.1f} min")
    print(table)
    print(summary)
    (output_dir / "table.md").write_text(table + "\n\n" + summary + "\n")
    (output_dir / "results.json").write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(args)}, indent=2))
    return rows


if __name__ == "__main__":
    main(parse_args())
