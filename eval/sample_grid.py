#!/usr/bin/env python
"""Sample a PNG grid from a saved pipeline folder (EMOv2 or UNet2DModel; DDPM/DDIM/EMOv2Image pipelines).

    python eval/sample_grid.py --model_dir runs/ddpm-digits --num_images 64 --scheduler ddim \
        --num_inference_steps 50 --seed 0 --output runs/ddpm-digits/grid.png [--upscale 4] [--class_conditional]
"""

from __future__ import annotations

import argparse
import math

import torch.nn.functional as F
from torchvision.utils import save_image

from emov2_gen.evaluation.sampling import SCHEDULERS, generate_images, load_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="A saved diffusers pipeline folder.")
    parser.add_argument("--output", required=True, help="Where to write the PNG grid.")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--class_conditional", action="store_true", help="Image i gets class i %% num_classes.")
    parser.add_argument("--upscale", type=int, default=1, help="Nearest-neighbour enlargement of each image.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipeline = load_pipeline(args.model_dir, args.scheduler)
    images = generate_images(
        pipeline, args.num_images, args.num_inference_steps, args.seed, batch_size=args.batch_size,
        device=args.device, class_conditional=args.class_conditional,
    ).float() / 255
    if args.upscale > 1:
        images = F.interpolate(images, scale_factor=args.upscale, mode="nearest")
    save_image(images, args.output, nrow=math.ceil(math.sqrt(len(images))))
    print(f"Saved {len(images)} samples to {args.output}")


if __name__ == "__main__":
    main()
