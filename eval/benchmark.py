#!/usr/bin/env python
"""Benchmark the EMOv2 presets against the diffusers baselines (speed, size, memory).

    python eval/benchmark.py --output_dir outputs/benchmark                 # the UNet presets, CPU, fp32
    python eval/benchmark.py --models emov2-5m unet2d-5m --quick --output_dir /tmp/bench
    python eval/benchmark.py --models demo-s-2 dit-s-2 --baseline dit-s-2 --in_channels 4 --num_class_embeds 1001 \
        --quick --batch_sizes 1 --sampling_batch_size 1 --output_dir /tmp/bench-dit   # D-EMOv2 vs diffusers' DiT
    python eval/benchmark.py --device cuda --dtype bf16 --channels_last --compile --output_dir outputs/benchmark-gpu

Measures parameters, GFLOPs per image, forward latency (batch 1 and 16, 32x32 and 64x64), DDIM-50 sampling
throughput (batch 16), a training step (forward + backward + AdamW, batch 16, 32x32) and peak memory, interleaved
over the models (inference before training), and reports medians as ratios to the baseline. Prints the table and
writes OUTPUT_DIR/benchmark.json and OUTPUT_DIR/benchmark.md. Runs in the user's default environment (torch's
threads, the default allocator); `--cpu_allocator retain` is an opt-in tuning, reported as such. With
`--num_class_embeds` (label rows, null class included; required by the DiT baselines) every model is
class-conditional and is timed on its null class.
"""

import argparse
import dataclasses
import functools

import torch

from emov2_gen.cpu_allocator import add_cpu_allocator_argument, apply_cpu_allocator
from emov2_gen.evaluation.benchmark import DTYPES, QUICK_SETTINGS, BenchmarkSettings, run_benchmark
from emov2_gen.models.registry import DENOISER_PRESETS, UNET_DENOISER_PRESETS, build_denoiser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=DENOISER_PRESETS, default=list(UNET_DENOISER_PRESETS))
    parser.add_argument("--baseline", choices=DENOISER_PRESETS, default="unet2d-5m", help="Ratios are relative to it.")
    parser.add_argument(
        "--quick", action="store_true", help="32x32, batch 1 and 4, 2 repeats, DDIM-5: a smoke test, not a measurement."
    )
    parser.add_argument("--repeats", type=int, default=None, help="Timed repetitions per measurement (default 5; 2 with --quick).")
    parser.add_argument("--sampling_repeats", type=int, default=None, help="Timed DDIM runs per model (default 1).")
    parser.add_argument(
        "--batch_sizes", type=int, nargs="+", default=None,
        help="Forward batch sizes (default 1 16). Large ones (e.g. 256) show a GPU's memory-bound regime.",
    )  # fmt: skip
    parser.add_argument(
        "--resolutions", type=int, nargs="+", default=None,
        help="Forward resolutions (default 32 64); the training step runs at the first.",
    )  # fmt: skip
    parser.add_argument("--sampling_batch_size", type=int, default=None, help="DDIM batch size (default 16).")
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument(
        "--num_class_embeds", type=int, default=None,
        help="Label rows of every model, the null class included (1001: ImageNet's 1000 classes + null, as the D-EMOv2 "
        "and DiT presets; required by the dit-* baselines). Default: unconditional.",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice, one per core)."
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="bf16 runs everything under autocast.")
    parser.add_argument("--channels_last", action="store_true", help="Models and inputs in channels_last layout.")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (slow to start on CPU).")
    add_cpu_allocator_argument(parser)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_cpu_allocator(args.cpu_allocator)
    models = list(dict.fromkeys(args.models))
    if args.baseline not in models:
        print(f"Adding the baseline {args.baseline!r} to the benchmarked models.")
        models.insert(0, args.baseline)
    base = QUICK_SETTINGS if args.quick else BenchmarkSettings()
    overrides = {
        "repeats": args.repeats,
        "sampling_repeats": args.sampling_repeats,
        "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
        "resolutions": tuple(args.resolutions) if args.resolutions else None,
        "train_resolution": args.resolutions[0] if args.resolutions else None,
        "sampling_batch_size": args.sampling_batch_size,
    }
    settings = dataclasses.replace(
        base,
        **{key: value for key, value in overrides.items() if value is not None},
        in_channels=args.in_channels,
        device=args.device,
        dtype=args.dtype,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    builders = {
        name: functools.partial(
            build_denoiser, name, in_channels=args.in_channels, num_class_embeds=args.num_class_embeds
        )
        for name in models
    }
    report = run_benchmark(builders, args.baseline, settings)
    json_path, md_path = report.save(args.output_dir)
    print(report.to_markdown())
    print(f"Wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
