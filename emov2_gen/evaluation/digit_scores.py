"""Digit scores: how many samples a digit classifier recognises, how the classes are covered, and a Frechet distance
in the classifier's own features (the "digit FD").

Scored per set of uint8 greyscale samples with the `DigitClassifier` of `digit_classifier` (trained on the
reference's training split):

- `recognisable`: the share of samples whose top digit has probability >= 0.9 (a reader would name the digit);
- `not_a_digit`: the share the classifier puts in its rejection class (noise, blobs, scrambled strokes);
- `confidence`: the mean top-digit probability;
- `effective_classes`: exp(entropy) of the mean predicted digit distribution, 10 when the digits are balanced,
  1 when every sample is the same digit (mode collapse);
- `digit_is`: the Inception Score computed from the classifier's ten digit logits (torch-fidelity's
  `isc_features_to_metric`, 10 splits), the classic MNIST sample score: high when samples are confident and varied;
- `digit_fd`: the Frechet distance between the classifier features of the samples and of N held-out reference
  images (torch-fidelity's FID statistics and distance, in the 128-d feature space instead of Inception's).

The held-out split (MNIST's test split) is drawn as 2N images and cut in two alternating halves: one is the FD
reference, the other is scored like a model, as the "real images" row that shows each score's ceiling. The
classifier's accuracy on all 2N is reported with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

from .digit_classifier import NOT_A_DIGIT, ClassifierRecipe, labelled_images, load_or_train_classifier
from .reference import ReferenceSet

RECOGNISABLE_PROBABILITY = 0.9
IS_SPLITS = 10
MIN_IMAGES = IS_SPLITS * 2  # every Inception Score split needs at least two images
REAL_ROW = "real images (held-out split)"
ANCHOR_SPECKLE_STDS = (0.1, 0.2, 0.3)  # on the [0, 1] scale
ANCHOR_BACKGROUND = 0.3


@dataclass
class DigitScore:
    """One sample set's digit scores."""

    name: str
    num_images: int
    recognisable: float
    not_a_digit: float
    confidence: float
    effective_classes: float
    digit_is: float
    digit_is_std: float
    digit_fd: float
    class_shares: list[float]


class DigitScorer:
    """Scores sample sets at one resolution against a reference's held-out split with one trained classifier."""

    def __init__(
        self,
        reference: str,
        resolution: int,
        num_reference: int,
        cache_dir: str | Path,
        train_split: str = "train",
        heldout_split: str = "test",
        recipe: ClassifierRecipe = ClassifierRecipe(),
        device: str | torch.device = "cpu",
    ):
        if num_reference < MIN_IMAGES:
            raise ValueError(f"The digit scores need at least {MIN_IMAGES} reference images, got {num_reference}.")
        heldout = ReferenceSet(reference, split=heldout_split, num_images=2 * num_reference)
        if len(heldout) < 2 * num_reference:
            raise ValueError(
                f"The {heldout_split!r} split has {len(heldout)} images; the digit scores need 2 x {num_reference} "
                "(one half as the reference, the other as the real-images row). Score fewer samples."
            )
        self.classifier, self.classifier_path = load_or_train_classifier(
            reference, resolution, cache_dir, split=train_split, recipe=recipe, device=device
        )
        self.recipe = recipe
        self.resolution = resolution
        self.heldout_description = heldout.description
        images, labels = labelled_images(heldout.dataset, resolution, description="decoding held-out images")
        features, logits = self.classifier.features_and_logits(images)  # one pass over both halves
        self.heldout_accuracy = float((logits.argmax(dim=1) == labels).double().mean())
        self.reference_images, self.real_images = images[0::2], images[1::2]
        self.reference_statistics = fid_features_to_statistics(features[0::2])

    def score(self, name: str, images: torch.Tensor) -> DigitScore:
        """The digit scores of uint8 (N, 1, H, W) samples at the scorer's resolution."""
        if images.dim() != 4 or tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(
                f"{name}: expected (N, 1, {self.resolution}, {self.resolution}) images, got {tuple(images.shape)}."
            )
        if len(images) < MIN_IMAGES:
            raise ValueError(f"{name}: the digit scores need at least {MIN_IMAGES} images, got {len(images)}.")
        features, logits = self.classifier.features_and_logits(images)
        probabilities = logits.softmax(dim=1)
        digits = probabilities[:, :NOT_A_DIGIT]
        top = digits.max(dim=1).values
        shares = digits.mean(dim=0)
        shares = shares / shares.sum()
        entropy = -(shares * shares.clamp_min(1e-12).log()).sum()
        inception_score = isc_features_to_metric(logits[:, :NOT_A_DIGIT], splits=IS_SPLITS)
        distance = fid_statistics_to_metric(self.reference_statistics, fid_features_to_statistics(features), False)
        return DigitScore(
            name=name,
            num_images=len(images),
            recognisable=float((top >= RECOGNISABLE_PROBABILITY).double().mean()),
            not_a_digit=float((probabilities.argmax(dim=1) == NOT_A_DIGIT).double().mean()),
            confidence=float(top.mean()),
            effective_classes=math.exp(float(entropy)),
            digit_is=inception_score[KEY_METRIC_ISC_MEAN],
            digit_is_std=inception_score[KEY_METRIC_ISC_STD],
            digit_fd=float(distance[KEY_METRIC_FID]),
            class_shares=[round(float(share), 4) for share in shares],
        )

    def score_real(self) -> DigitScore:
        """The held-out half that is not the FD reference, scored like samples: each score's ceiling."""
        return self.score(REAL_ROW, self.real_images)

    def anchor_images(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Sets that show each score's scale: uniform noise (no digit at all), the real row with Gaussian speckle of
        growing std and the real row on a grey background (the same digits on other backgrounds), uint8 like samples."""
        generator = torch.Generator().manual_seed(seed)
        real = self.real_images
        anchors = {"uniform noise": torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=generator)}
        for std in ANCHOR_SPECKLE_STDS:
            speckle = std * 255 * torch.randn(real.shape, generator=generator)
            anchors[f"real images + speckle std {std:g}"] = (real.float() + speckle).clamp(0, 255).round().byte()
        grey = ANCHOR_BACKGROUND * 255 + (1 - ANCHOR_BACKGROUND) * real.float()
        anchors[f"real images on grey {ANCHOR_BACKGROUND:g}"] = grey.round().byte()
        return anchors
