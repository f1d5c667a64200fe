#!/usr/bin/env python
"""Held-out denoising loss of saved pipelines, side by side: the number `train_ddpm.py --heldout_split` logs.

    python eval/heldout_loss.py --model_dirs runs/emov2-1m runs/unet2d-1m --dataset_name ../shared/data/mnist \
        --split test --num_images 512 --num_timesteps 8 --seed 0

Each saved pipeline (`DDPMPipeline` or `EMOv2ImagePipeline`, the weights it samples with: the EMA weights of an
`--use_ema` run) is scored with its own training noise schedule and prediction type on the same fixed images, noise
and timestep grid (`emov2_gen.evaluation.heldout_loss`), at the resolution it was trained at; class-conditional
models get the images' labels, latent pipelines the VAE means of the images. With the flags of the training run
(`--heldout_num_images`, `--heldout_num_timesteps`, `--seed`) it reproduces the run's last logged value. Prints a
markdown table (mean and per-timestep loss, parameters) and writes `--output_json` if given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from emov2_gen.data.image_datasets import load_image_dataset
from emov2_gen.evaluation.heldout_loss import HeldOutSet, encode_heldout_images, heldout_images, heldout_loss
from emov2_gen.evaluation.sampling import load_pipeline, sample_resolution
from emov2_gen.models.registry import downsampling_factor
from emov2_gen.pipelines.pipeline_emov2_image import class_label_rows


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dirs", nargs="+", required=True, help="Saved pipelines (train_ddpm.py output folders).")
    parser.add_argument("--dataset_name", type=str, default="../shared/data/mnist")
    parser.add_argument("--train_data_dir", type=str, default=None)
    parser.add_argument("--split", type=str, default="test")
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--num_timesteps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the fixed noise (train_ddpm.py's --seed).")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.dataset_name is not None and args.train_data_dir is not None:
        args.dataset_name = None  # an explicit folder wins over the default dataset
    return args


def score(model_dir: str, args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
    """The held-out loss of one saved pipeline, on inputs prepared as its training run prepared them."""
    pipeline = load_pipeline(model_dir, "ddpm")
    denoiser = pipeline.unet.to(args.device)
    vae = pipeline.vae.to(args.device) if pipeline.vae is not None else None
    height, width = sample_resolution(denoiser)
    if height != width:
        raise ValueError(f"{model_dir} samples {height}x{width}; the held-out images are square crops.")
    resolution = height * (downsampling_factor(vae) if vae is not None else 1)
    channels = vae.config.in_channels if vae is not None else denoiser.config.in_channels
    images, labels = heldout_images(dataset, resolution, channels, args.num_images, class_label_rows(denoiser) is not None)
    if vae is not None:
        images = encode_heldout_images(images, vae)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    heldout = HeldOutSet.build(images, noise_scheduler.config.num_train_timesteps, args.num_timesteps, seed=args.seed,
                               class_labels=labels)
    loss = heldout_loss(denoiser, heldout, noise_scheduler)
    return {"model_dir": str(model_dir), "model_class": type(denoiser).__name__,
            "parameters": denoiser.num_parameters(), "resolution": resolution, "heldout_loss": loss.mean,
            "per_timestep": loss.per_timestep}


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    grid = list(rows[0]["per_timestep"])
    header = ["model", "class", "params (M)", "held-out loss"] + [f"t={t}" for t in grid]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [Path(row["model_dir"]).name, row["model_class"], f"{row['parameters'] / 1e6:.3f}",
                 f"{row['heldout_loss']:.5f}"] + [f"{row['per_timestep'].get(t, float('nan')):.5f}" for t in grid]
        lines.append("| " + " | ".join(cells) + " |")
    source = args.dataset_name or args.train_data_dir
    return "\n".join(lines) + (f"\n\nThe training objective (each pipeline's prediction type) on {args.num_images} "
                               f"{args.split}-split images of {source}, fixed noise (seed {args.seed}) at {len(grid)} "
                               "timesteps (the centres of equal bins).\n")


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    dataset, _ = load_image_dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, split=args.split)
    rows = [score(model_dir, args, dataset) for model_dir in tqdm(args.model_dirs, desc="held-out loss")]
    print(markdown(rows, args))
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "models": rows},
                                               indent=2))
    return rows


if __name__ == "__main__":
    main(parse_args())
