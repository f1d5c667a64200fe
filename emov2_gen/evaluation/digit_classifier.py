"""A small digit classifier trained on the reference data, the feature space of the digit scores.

FID measures generated MNIST digits with an ImageNet Inception that sees a 16x16 digit upscaled to 299x299, where a
speckled background moves the features as much as the stroke that makes a 3 a 3. A classifier trained on the digits
themselves asks the question a reader asks of a sample grid: is this a digit, and which one? `DigitClassifier` is a
four-layer CNN (about 0.2M parameters) whose 128-d penultimate activations are the features the digit Frechet
distance is computed in, as FID is in Inception's pool3 features.

Besides the ten digits it has an eleventh class, "not a digit", because a classifier trained on digits alone is
confidently wrong off the data: uniform noise reads as a 99.99% "8", and a sample that failed to become a digit
would count as a recognised one. The rejection class is trained on non-digits made on the fly (uniform noise,
blurred noise blobs, a digit's own pixels shuffled, flat grey images), and half of the digits are trained on a grey,
speckled background, so that a recognisable digit on a noisy background still counts as a digit: the scores judge
the shape, not the background (FID judges that already).

`load_or_train_classifier` trains it once per (reference, split, resolution, recipe) on the reference's labelled
training images, preprocessed exactly as the FID reference images are (centre crop, the model's resolution, uint8
rounding), and caches the weights as safetensors so every later evaluation uses the same classifier.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.training_images import TrainingImageDataset, derived_seed
from .inception_inputs import unit_to_uint8
from .reference import ReferenceSet

NUM_DIGITS = 10
NOT_A_DIGIT = NUM_DIGITS  # the rejection class's index
FEATURE_DIM = 128
MAX_SPECKLE_STD = 0.25  # speckle on training digits: Gaussian, std up to this, on the [0, 1] scale
MAX_BACKGROUND = 0.4  # grey background under training digits: level up to this
NON_DIGITS_PER_BATCH = 16
CLASSIFIER_VERSION = 3  # bump when the architecture or the recipe changes: old cache files are then not reused


class DigitClassifier(nn.Module):
    """Two conv stages (32 and 64 channels, BatchNorm, ReLU, 2x max-pool between) -> 4x4 pool -> 128-d -> 11 logits
    (the ten digits, then `NOT_A_DIGIT`).

    The adaptive pool makes it work at any resolution of at least 8x8.
    """

    def __init__(self, num_classes: int = NUM_DIGITS + 1):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), *conv(64, 64), nn.AdaptiveAvgPool2d(4)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1, H, W) images -> the network's float input in [0, 1]."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(
                f"The digit classifier reads uint8 greyscale (N, 1, H, W) images, got {images.dtype} "
                f"{tuple(images.shape)}."
            )
        if min(images.shape[-2:]) < 8:
            raise ValueError(f"The digit classifier needs images of at least 8x8, got {tuple(images.shape[-2:])}.")
        return images.float() / 255.0

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, 128), logits (N, 11)) of float (N, 1, H, W) images in [0, 1] (see `prepare`)."""
        features = self.embed(self.body(pixels * 2.0 - 1.0))
        return features, self.head(features)

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of many images, in eval mode and in batches, as float64 CPU tensors."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        outputs = [self(self.prepare(images[i : i + batch_size]).to(device)) for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return (torch.cat([f for f, _ in outputs]).double().cpu(), torch.cat([lg for _, lg in outputs]).double().cpu())


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained; with the reference data it names the cache file."""

    epochs: int = 2
    batch_size: int = 128
    learning_rate: float = 1e-3
    num_images: int = 60000
    seed: int = 0


def labelled_images(dataset, resolution: int, description: str = "decoding") -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a labelled `datasets.Dataset` as uint8 (N, 1, R, R), preprocessed like the FID reference images
    (centre crop, bilinear resize, uint8 rounding), and their int64 labels."""
    if "label" not in dataset.column_names:
        raise ValueError("The digit scores need a labelled reference dataset (a `label` column), e.g. MNIST.")
    images = TrainingImageDataset(dataset, resolution=resolution, channels=1, center_crop=True, with_labels=True)
    batches, labels = [], []
    for batch in tqdm(DataLoader(images, batch_size=1024), desc=description, unit="batch"):
        batches.append(unit_to_uint8(batch["images"] / 2 + 0.5))
        labels.append(batch["class_labels"])
    return torch.cat(batches), torch.cat(labels).long()


def non_digits(digits: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` float images in [0, 1] that are not digits, shaped like `digits` (float (N, 1, H, W) in [0, 1]):
    a quarter each of uniform noise, blurred noise blobs, shuffled digit pixels and flat grey with faint noise."""
    shape = (count, *digits.shape[1:])
    uniform = torch.rand(shape, generator=generator)
    blobs = F.avg_pool2d(torch.rand(shape, generator=generator), 5, stride=1, padding=2, count_include_pad=False)
    low, high = blobs.amin((1, 2, 3), keepdim=True), blobs.amax((1, 2, 3), keepdim=True)
    blobs = (blobs - low) / (high - low).clamp_min(1e-6)
    sources = digits[torch.randint(len(digits), (count,), generator=generator)].flatten(1)
    order = torch.argsort(torch.rand(sources.shape, generator=generator), dim=1)
    shuffled = sources.gather(1, order).view(shape)
    flat = torch.rand((count, 1, 1, 1), generator=generator) + 0.05 * torch.randn(shape, generator=generator)
    kind = torch.randint(4, (count, 1, 1, 1), generator=generator)
    images = torch.where(kind == 0, uniform, torch.where(kind == 1, blobs, torch.where(kind == 2, shuffled, flat)))
    return images.clamp(0, 1)


def on_noisy_backgrounds(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Half of the digits (float in [0, 1]) lifted onto a grey background (level up to `MAX_BACKGROUND`) with
    Gaussian speckle (std up to `MAX_SPECKLE_STD`), the other half as they are."""
    shape = (len(digits), 1, 1, 1)
    noisy = torch.rand(shape, generator=generator) < 0.5
    level = torch.rand(shape, generator=generator) * MAX_BACKGROUND * noisy
    std = torch.rand(shape, generator=generator) * MAX_SPECKLE_STD * noisy
    return (level + (1 - level) * digits + std * torch.randn(digits.shape, generator=generator)).clamp(0, 1)


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe, device: str | torch.device = "cpu"
) -> DigitClassifier:
    """Train a `DigitClassifier` with Adam and cross-entropy on the digits (half on noisy backgrounds) plus
    `NON_DIGITS_PER_BATCH` generated non-digits per batch; the seed fixes the initialisation, order and noise."""
    if int(labels.max()) >= NUM_DIGITS or int(labels.min()) < 0:
        raise ValueError(f"Digit labels must lie in [0, {NUM_DIGITS}), got {int(labels.min())}..{int(labels.max())}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    generator = torch.Generator().manual_seed(derived_seed(recipe.seed, 1))
    model.train()
    steps = recipe.epochs * -(-len(images) // recipe.batch_size)
    with tqdm(total=steps, desc="training the digit classifier", unit="step") as progress:
        for _ in range(recipe.epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), recipe.batch_size):
                index = order[start : start + recipe.batch_size]
                digits = DigitClassifier.prepare(images[index])
                negatives = non_digits(digits, NON_DIGITS_PER_BATCH, generator)
                pixels = torch.cat([on_noisy_backgrounds(digits, generator), negatives])
                targets = torch.cat([labels[index], torch.full((NON_DIGITS_PER_BATCH,), NOT_A_DIGIT)])
                _, logits = model(pixels.to(device))
                loss = F.cross_entropy(logits, targets.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def cache_file(reference: ReferenceSet, resolution: int, recipe: ClassifierRecipe, cache_dir: Path) -> Path:
    """Where the classifier for this reference subset, resolution and recipe is stored."""
    key = f"{reference.key((resolution, resolution), 1)}|{asdict(recipe)}|v{CLASSIFIER_VERSION}"
    return Path(cache_dir) / f"digit-classifier-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def load_or_train_classifier(
    reference: str,
    resolution: int,
    cache_dir: str | Path,
    split: str = "train",
    recipe: ClassifierRecipe = ClassifierRecipe(),
    device: str | torch.device = "cpu",
) -> tuple[DigitClassifier, Path]:
    """The cached classifier for the reference's `split` at `resolution`, trained and cached first if there is none.

    A cache file that cannot be read is an error (delete it to retrain), never a silent retrain or a wrong model.
    """
    train_set = ReferenceSet(reference, split=split, num_images=recipe.num_images)
    path = cache_file(train_set, resolution, recipe, Path(cache_dir))
    model = DigitClassifier()
    if path.is_file():
        try:
            model.load_state_dict(load_file(path))
        except Exception as error:  # a truncated or foreign file fails in safetensors or in load_state_dict
            raise ValueError(
                f"The cached digit classifier {path} is unreadable ({type(error).__name__}: {error}); delete it to "
                "retrain."
            ) from error
        return model.to(device).eval(), path
    images, labels = labelled_images(train_set.dataset, resolution, description="decoding classifier training images")
    model = train_classifier(images, labels, recipe, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"reference": train_set.key((resolution, resolution), 1), **_str(recipe)})
    return model, path


def _str(recipe: ClassifierRecipe) -> dict[str, str]:
    return {name: str(value) for name, value in asdict(recipe).items()}
