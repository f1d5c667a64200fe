#!/usr/bin/env python
r"""Score generated digits with a digit classifier: recognisable share, class coverage, digit IS and digit FD.

FID of 16x16 MNIST samples upscaled for an ImageNet Inception weighs a speckled background heavily; these scores ask
whether the samples are digits (see `emov2_gen.evaluation.digit_scores`). The classifier is trained once on the
reference's training split at the samples' resolution and cached (about a minute for MNIST on a CPU).

    python eval/digit_score.py --model_dirs runs/emov2-1m runs/unet2d-1m --reference ../shared/data/mnist \
        --num_samples 1000 --num_inference_steps 50 --scheduler ddim --seed 0 --output_dir outputs/digits

or, on samples saved by `eval/fid.py --samples_only` (the same seeds give the same first N samples as FID's):

    python eval/digit_score.py --samples OUT/samples/*.pt --reference ../shared/data/mnist --output_dir OUT/digits

Writes OUTPUT_DIR/report.json and report.md (and, with --model_dirs, the samples as OUTPUT_DIR/samples/<model>.pt)
and prints the table, whose first row is real held-out images; `--anchors` adds uniform noise and the real images
with speckle noise, to show what a noisy background does to each score.
"""

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path


from emov2_gen.evaluation.benchmark import markdown_table
from emov2_gen.evaluation.digit_classifier import ClassifierRecipe
from emov2_gen.evaluation.digit_scores import RECOGNISABLE_PROBABILITY, DigitScore, DigitScorer
from emov2_gen.evaluation.fid import FIDSettings, ModelSamples, add_sample_arguments, common_sampling, sample_models


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_arguments(parser)
    parser.add_argument("--reference", required=True, help="Labelled digits: a local `datasets` directory or hub name.")
    parser.add_argument("--train_split", default="train", help="The split the classifier is trained on.")
    parser.add_argument("--heldout_split", default="test", help="The split of the FD reference and the real row.")
    parser.add_argument("--classifier_epochs", type=int, default=ClassifierRecipe.epochs)
    parser.add_argument(
        "--classifier_images", type=int, default=ClassifierRecipe.num_images, help="Training images (a fixed subset)."
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cache_dir", default=None, help="Classifier cache (default: OUTPUT_DIR/digit_classifier).")
    parser.add_argument(
        "--anchors", action="store_true", help="Also score uniform noise and the real row with speckle: the scales."
    )
    return parser.parse_args(argv)


def markdown_report(scores: list[DigitScore], scorer: DigitScorer, sampling: dict) -> str:
    header = ["samples", "N", f"recognisable (p >= {RECOGNISABLE_PROBABILITY})", "not a digit", "mean confidence",
              "effective classes", "digit IS", "digit FD"]  # fmt: skip
    rows = [
        [s.name, str(s.num_images), f"{s.recognisable:.3f}", f"{s.not_a_digit:.3f}", f"{s.confidence:.3f}",
         f"{s.effective_classes:.2f}",
         f"{s.digit_is:.2f} ± {s.digit_is_std:.2f}", f"{s.digit_fd:.2f}"]  # fmt: skip
        for s in scores
    ]
    lines = [
        "# Digit scores",
        "",
        f"- Classifier: {scorer.classifier_path.name}, {scorer.heldout_accuracy:.2%} accurate on the held-out images",
        f"- Held-out images: {scorer.heldout_description}; half are the digit-FD reference, half the first row",
        f"- Sampling: {sampling}",
        "",
        markdown_table(header, rows),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    if args.samples:
        samples = [ModelSamples.load(path) for path in args.samples]
    else:
        settings = FIDSettings.from_args(args, cache_dir=output_dir)
        samples = sample_models(args.model_dirs, settings, save_dir=output_dir / "samples")  # for a rescoring
    sampling = common_sampling(samples)
    resolutions = {tuple(s.info.resolution) for s in samples}
    if len(resolutions) != 1 or len(set(next(iter(resolutions)))) != 1:
        raise ValueError(f"The digit scores compare square samples of one resolution, got {sorted(resolutions)}.")
    scorer = DigitScorer(
        args.reference,
        resolution=samples[0].info.resolution[0],
        num_reference=sampling["num_samples"],
        cache_dir=args.cache_dir or output_dir / "digit_classifier",
        train_split=args.train_split,
        heldout_split=args.heldout_split,
        recipe=ClassifierRecipe(epochs=args.classifier_epochs, num_images=args.classifier_images),
        device=args.device,
    )
    anchors = scorer.anchor_images(seed=args.seed) if args.anchors else {}
    scores = [scorer.score_real()] + [scorer.score(name, images) for name, images in anchors.items()]
    scores += [scorer.score(s.info.name, s.images) for s in samples]

    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {**vars(args), "sampling": sampling},
        "classifier": {
            "path": str(scorer.classifier_path),
            "recipe": asdict(scorer.recipe),
            "heldout_accuracy": scorer.heldout_accuracy,
            "heldout_images": scorer.heldout_description,
        },
        "models": [asdict(score) for score in scores],
        "samples": {s.info.name: s.info.path for s in samples},
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = markdown_report(scores, scorer, sampling)
    (output_dir / "report.md").write_text(markdown)
    print(markdown)
    print(f"Report: {output_dir / 'report.json'} and {output_dir / 'report.md'}")


if __name__ == "__main__":
    main()
