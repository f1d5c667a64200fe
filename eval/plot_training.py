#!/usr/bin/env python
"""Compare training runs from their tensorboard logs: a loss/throughput plot and a summary table.

    python eval/plot_training.py --runs outputs/compare_mnist/emov2-5m outputs/compare_mnist/unet2d-5m \
        --output outputs/compare_mnist/training.png

Each RUN is a training output folder (its `logs/` are searched) or a logging folder.
"""

from __future__ import annotations

import argparse

from emov2_gen.evaluation.benchmark import markdown_table
from emov2_gen.evaluation.folder_names import folder_names
from emov2_gen.evaluation.training_logs import plot_runs, read_scalars, summarise_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="Training output or logging folders.")
    parser.add_argument("--names", nargs="+", help="Legend names (default: the folder names).")
    parser.add_argument("--output", required=True, help="Where to write the PNG plot.")
    parser.add_argument("--smoothing", type=float, default=0.95, help="EMA smoothing of the plotted curves.")
    parser.add_argument("--tail_fraction", type=float, default=0.1, help="Final loss = mean over this last share.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = args.names or folder_names(args.runs)
    if len(names) != len(args.runs):
        raise SystemExit(f"--names gives {len(names)} names for {len(args.runs)} runs.")
    if len(set(names)) != len(names):
        raise SystemExit(f"--names repeats a name ({', '.join(names)}): each run needs its own.")
    runs = {name: read_scalars(run) for name, run in zip(names, args.runs)}
    plot_runs(runs, args.output, smoothing=args.smoothing)
    summaries = [summarise_run(name, scalars, args.tail_fraction) for name, scalars in runs.items()]
    print(markdown_table(
        ["run", "steps", f"loss (mean of last {args.tail_fraction:.0%})", "median images/s"],
        [[s.name, str(s.steps), f"{s.final_loss:.4f}", f"{s.median_images_per_second:.0f}"] for s in summaries],
    ))  # fmt: skip
    print(f"\nPlot: {args.output}")


if __name__ == "__main__":
    main()
