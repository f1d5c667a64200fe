#!/usr/bin/env python
r"""What a perfect and a useless generator score: the FID scale for one reference, N and resolution.

    python eval/fid_anchors.py --reference ../shared/data/mnist --split train --other_split test \
        --num_samples 1000 --resolution 32 --channels 1 --output_dir outputs/fid_anchors

Scores N real images of another split (a "perfect" generator) and N uniform-noise images (a useless one) against
the same N reference images that eval/fid.py uses for models of this resolution and channel count, so the numbers
sit on the same scale as a report with the same N (FID grows as N shrinks). Pass eval/fid.py's --cache_dir to reuse
its reference features. Writes OUTPUT_DIR/anchors.json and prints a table.
"""

import argparse
import json
from pathlib import Path

import torch

from emov2_gen.evaluation.fid import fidelity_metrics
from emov2_gen.evaluation.inception import resolve_inception_weights
from emov2_gen.evaluation.inception_inputs import ImageTensorDataset
from emov2_gen.evaluation.reference import ReferenceSet


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="Image folder, local `datasets` directory or hub dataset.")
    parser.add_argument("--split", default="train", help="Reference split, as in eval/fid.py.")
    parser.add_argument("--other_split", default="test", help="Split the 'perfect generator' images come from.")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise images.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cache_dir", default=None, help="Reference feature cache (default: OUTPUT_DIR/fidelity_cache).")
    parser.add_argument("--inception-weights", "--inception_weights", dest="inception_weights", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    if args.split == args.other_split:
        raise ValueError("--other_split must differ from --split: the same images would score FID 0 by construction.")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir or output_dir / "fidelity_cache")
    weights = resolve_inception_weights(args.inception_weights)
    resolution = (args.resolution, args.resolution)
    reference = ReferenceSet(args.reference, args.split, args.num_samples).images(resolution, args.channels)
    real = ReferenceSet(args.reference, args.other_split, args.num_samples).images(resolution, args.channels)
    generator = torch.Generator().manual_seed(args.seed)
    noise = ImageTensorDataset(
        torch.randint(0, 256, (len(reference), args.channels, *resolution), dtype=torch.uint8, generator=generator)
    )
    scores = {
        f"real ({args.other_split} split)": fidelity_metrics(real, reference, weights, cache_dir, args.device, args.batch_size),
        "uniform noise": fidelity_metrics(noise, reference, weights, cache_dir, args.device, args.batch_size),
    }
    (output_dir / "anchors.json").write_text(json.dumps({
        "reference": args.reference, "split": args.split, "num_samples": len(reference),
        "resolution": args.resolution, "channels": args.channels, "inception_weights": weights.description,
        "scores": scores,
    }, indent=2))
    print(f"| images (N={len(reference)}, {args.resolution}², vs {args.split}) | FID | KID | precision | recall |")
    print("|---|---|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} | {s['fid']:.1f} | {s['kid_mean']:.4f} | {s['precision']:.2f} | {s['recall']:.2f} |")
    print(f"\nInception weights: {weights.description}")
    return scores


if __name__ == "__main__":
    main()
