"""The digit scores: a classifier that knows digits, scores that separate digits from non-digits and collapsed
samples, a cached classifier that is reused (and a corrupt cache that is an error), and the script's report.

The classifier is trained on 4000 MNIST images for 2 epochs here (about 5 s on one thread), not the 60,000 x 2
the script uses by default.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from emov2_gen import build_denoiser
from emov2_gen.evaluation import digit_classifier
from emov2_gen.evaluation.digit_classifier import ClassifierRecipe, DigitClassifier
from emov2_gen.evaluation.digit_scores import MIN_IMAGES, REAL_ROW, DigitScorer
from emov2_gen.evaluation.fid import FIDSettings, sample_models
from emov2_gen.evaluation.reference import ReferenceSet
from script_runs import load_script

REPO = Path(__file__).resolve().parents[1]
RECIPE = ClassifierRecipe(epochs=2, num_images=4000)
NUM_REFERENCE = 200


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digit_classifier")


@pytest.fixture(scope="module")
def scorer(one_thread, mnist_dir, cache_dir) -> DigitScorer:
    return DigitScorer(str(mnist_dir), resolution=16, num_reference=NUM_REFERENCE, cache_dir=cache_dir, recipe=RECIPE)


def shuffled_pixels(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's own pixels in a random order: the same ink, no digit."""
    generator = torch.Generator().manual_seed(seed)
    flat = images.flatten(1)
    order = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(len(images))])
    return flat.gather(1, order).view_as(images)


def test_the_classifier_knows_mnist_digits(scorer):
    assert scorer.heldout_accuracy > 0.9
    assert len(scorer.reference_images) == len(scorer.real_images) == NUM_REFERENCE


def test_real_digits_score_far_better_than_their_own_pixels_shuffled(scorer):
    real = scorer.score_real()
    shuffled = scorer.score("shuffled", shuffled_pixels(scorer.real_images))
    assert real.name == REAL_ROW and real.num_images == NUM_REFERENCE
    assert real.recognisable > 0.7 and real.effective_classes > 9 and real.digit_is > 5
    assert shuffled.digit_is < real.digit_is / 2 and shuffled.not_a_digit > 0.8 and real.not_a_digit < 0.05
    assert shuffled.digit_fd > 10 * real.digit_fd
    assert sum(real.class_shares) == pytest.approx(1, abs=1e-3)


def test_noise_and_blank_images_are_not_digits_but_digits_on_noisy_backgrounds_still_are(scorer):
    # A classifier of digits alone calls uniform noise a confident "8"; the rejection class must catch it, while
    # a digit on a speckled or grey background (the baseline's failure modes) keeps its class.
    anchors = scorer.anchor_images(seed=1)
    speckled_names = [f"real images + speckle std {std}" for std in (0.1, 0.2, 0.3)]
    assert list(anchors) == ["uniform noise", *speckled_names, "real images on grey 0.3"]
    for name, images in (("noise", anchors["uniform noise"]), ("blank", torch.zeros_like(scorer.real_images))):
        score = scorer.score(name, images)
        assert score.not_a_digit > 0.9 and score.recognisable < 0.05, name
    real = scorer.score_real()
    speckled = [scorer.score(name, anchors[name]) for name in speckled_names]
    assert speckled[0].not_a_digit < 0.1 and speckled[0].recognisable > 0.8 * real.recognisable
    on_grey = scorer.score("grey", anchors["real images on grey 0.3"])
    assert on_grey.not_a_digit < 0.1 and on_grey.recognisable > 0.8 * real.recognisable
    fds = [real.digit_fd] + [score.digit_fd for score in speckled]
    assert fds == sorted(fds)  # more speckle, further from the real digits


def test_the_reference_half_is_at_distance_zero_from_itself(scorer):
    assert scorer.score("reference", scorer.reference_images).digit_fd == pytest.approx(0, abs=1e-3)


def test_samples_of_one_digit_show_as_collapsed(scorer, mnist_dir):
    images, labels = digit_classifier.labelled_images(ReferenceSet(str(mnist_dir), "test", 600).dataset, 16)
    ones = images[labels == 1][:MIN_IMAGES * 2]
    score = scorer.score("ones", ones)
    assert score.effective_classes < 2 and score.class_shares[1] > 0.8
    assert score.digit_is < 2 and score.digit_fd > scorer.score_real().digit_fd


def test_bad_samples_are_clear_errors(scorer):
    with pytest.raises(ValueError, match="greyscale"):
        scorer.score("rgb", torch.zeros(MIN_IMAGES, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="16, 16"):
        scorer.score("small", torch.zeros(MIN_IMAGES, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGES}"):
        scorer.score("few", scorer.real_images[: MIN_IMAGES - 1])
    with pytest.raises(ValueError, match="greyscale"):
        scorer.score("float", scorer.real_images.float())


def test_the_cached_classifier_is_reused_and_a_corrupt_one_is_an_error(scorer, mnist_dir, cache_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(digit_classifier, "train_classifier", no_training)
    again = DigitScorer(str(mnist_dir), 16, NUM_REFERENCE, cache_dir, recipe=RECIPE)
    assert again.classifier_path == scorer.classifier_path
    assert again.heldout_accuracy == scorer.heldout_accuracy
    assert again.score_real() == scorer.score_real()

    corrupt = cache_dir / "corrupt"
    corrupt.mkdir()
    (corrupt / scorer.classifier_path.name).write_bytes(scorer.classifier_path.read_bytes()[:100])
    with pytest.raises(ValueError, match="delete it to retrain"):
        DigitScorer(str(mnist_dir), 16, NUM_REFERENCE, corrupt, recipe=RECIPE)


def test_another_recipe_or_resolution_gets_its_own_classifier(scorer, mnist_dir):
    train_set = ReferenceSet(str(mnist_dir), "train", RECIPE.num_images)
    names = {
        digit_classifier.cache_file(train_set, resolution, recipe, Path("c")).name
        for resolution, recipe in ((16, RECIPE), (16, ClassifierRecipe(epochs=3, num_images=4000)), (28, RECIPE))
    }
    assert scorer.classifier_path.name in names and len(names) == 3


def test_references_without_labels_or_enough_heldout_images_are_clear_errors(one_thread, tmp_path, mnist_dir):
    for i in range(2 * MIN_IMAGES):  # enough for the held-out halves, so the missing labels are what fails
        Image.new("L", (16, 16), color=i * 6).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="label"):
        DigitScorer(str(tmp_path), 16, MIN_IMAGES, tmp_path / "cache", heldout_split="train", recipe=RECIPE)
    with pytest.raises(ValueError, match="Score fewer samples"):
        DigitScorer(str(mnist_dir), 16, 6000, tmp_path / "cache", recipe=RECIPE)


def test_the_classifier_rejects_maps_smaller_than_its_pooling():
    with pytest.raises(ValueError, match="at least 8x8"):
        DigitClassifier.prepare(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


# --- the script ------------------------------------------------------------------------------------------------------


def test_script_scores_models_and_saved_samples_alike_with_the_real_row_first(
    one_thread, tmp_path, mnist_dir, cache_dir
):
    torch.manual_seed(0)
    model_dir = tmp_path / "emov2-tiny"
    unet = build_denoiser("emov2-1m", sample_size=16, in_channels=1, layers_per_block=1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(model_dir)
    script = load_script(REPO / "eval" / "digit_score.py")
    common = ["--reference", str(mnist_dir), "--classifier_epochs", "2", "--classifier_images", "4000",
              "--cache_dir", str(cache_dir)]  # fmt: skip
    sampling = ["--num_samples", str(MIN_IMAGES), "--num_inference_steps", "2", "--seed", "1"]
    script.main(["--model_dirs", str(model_dir), *sampling, *common, "--anchors", "--output_dir", str(tmp_path / "a")])

    settings = FIDSettings(
        reference="unused", cache_dir=tmp_path, num_samples=MIN_IMAGES, num_inference_steps=2, seed=1
    )
    (samples,) = sample_models([str(model_dir)], settings)
    samples_file = samples.save(tmp_path / "samples" / "emov2-tiny.pt")
    script.main(["--samples", str(samples_file), *common, "--output_dir", str(tmp_path / "b")])

    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("a", "b")]
    names = [row["name"] for row in reports[0]["models"]]
    assert names[0] == REAL_ROW and names[1] == "uniform noise" and names[-1] == "emov2-tiny" and len(names) == 7
    assert [row["name"] for row in reports[1]["models"]] == [REAL_ROW, "emov2-tiny"]
    for report in reports:
        assert report["classifier"]["heldout_accuracy"] > 0.9
        real, untrained = report["models"][0], report["models"][-1]
        assert untrained["digit_fd"] > real["digit_fd"]
    assert reports[0]["models"][-1] == reports[1]["models"][-1]  # same seeds: the same samples and scores either way
    assert (tmp_path / "a" / "samples" / "emov2-tiny.pt").is_file()
    table = [line for line in (tmp_path / "a" / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 8 and table[1].startswith(f"| {REAL_ROW}")


def test_script_needs_a_source_and_a_reference(tmp_path):
    script = load_script(REPO / "eval" / "digit_score.py")
    with pytest.raises(SystemExit):
        script.parse_args(["--reference", "x", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.parse_args(["--model_dirs", "m", "--output_dir", str(tmp_path)])
