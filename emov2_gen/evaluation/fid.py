"""FID/KID/precision/recall of saved diffusion models against a reference dataset, all through one code path.

For each model folder: load the denoiser, draw N seeded samples with the requested sampler (the same noise for
every model), count its parameters and FLOPs, and score the samples with torch-fidelity against N reference images
at the model's resolution. Reference Inception features are cached by torch-fidelity under `cache_dir`, named from
the reference key (source, split, N, resolution, colour mode) and the Inception weights' hash, so later runs and
other models at the same resolution reuse them.

Sampling and scoring are separate steps (`sample_models`, `score_models`) so that a machine without the Inception
weights (a GPU node with no hub access, say) can draw the samples and save them (`ModelSamples.save`) and another
machine can score them later, with the same result as scoring where they were drawn.

Precision/recall are computed in the same Inception pool3 feature space (k=3 neighbourhoods), not with the VGG16
features of Kynkäänniemi et al. The Inception Score is not computed: the offline weights have no logits.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch_fidelity
from torch.utils.data import Dataset

from .flops import count_gflops
from .folder_names import folder_names
from .inception import InceptionWeights, resolve_inception_weights
from .inception_inputs import ImageTensorDataset
from .reference import ReferenceImages, ReferenceSet
from .sampling import SCHEDULERS, generate_images, load_pipeline, sample_resolution

FEATURE_EXTRACTOR = "inception-v3-compat"
KID_MAX_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3
MIN_SAMPLES = PRC_NEIGHBORHOOD + 1
GRID_SAMPLES = 64
SAMPLES_FORMAT = "emov2_gen.fid.samples/1"
# The settings that decide what the samples are; samples scored together must agree on them.
SAMPLING_SETTINGS = ("num_samples", "num_inference_steps", "scheduler", "seed", "class_conditional")


@dataclass
class FIDSettings:
    """What every model is evaluated with."""

    reference: str
    cache_dir: Path
    num_samples: int = 1000
    num_inference_steps: int = 50
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 64
    split: str = "train"
    class_conditional: bool = False
    device: str = "cpu"
    inception_weights: Optional[str] = None
    verbose: bool = True


    @classmethod
    def from_args(cls, args: argparse.Namespace, cache_dir: str | Path, **fields: Any) -> FIDSettings:
        """Settings from the flags of `add_sample_arguments` (plus `args.reference`), `fields` for the rest."""
        shared = ("reference", *SAMPLING_SETTINGS, "batch_size", "device")
        return cls(cache_dir=Path(cache_dir), **{name: getattr(args, name) for name in shared}, **fields)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every script that scores samples: where they come from (--model_dirs draws them, --samples reads
    files saved by `ModelSamples.save`) and how they are drawn (the same per-sample seeds for every model)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_dirs", nargs="+", help="Saved diffusers pipeline folders.")
    source.add_argument(
        "--samples", nargs="+", help="Samples files from eval/fid.py --samples_only, scored without re-sampling."
    )
    parser.add_argument("--num_samples", type=int, default=1000, help="Samples per model (FID: and reference images).")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--seed", type=int, default=0, help="The same seed gives every model the same noise.")
    parser.add_argument("--batch_size", type=int, default=64, help="Batch size for sampling and for scoring.")
    parser.add_argument(
        "--class_conditional", action="store_true", help="Sample class-conditional models with balanced labels."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class SampleInfo:
    """What a report row says about a model and how it was sampled: everything but the scores."""

    name: str
    path: str
    model_class: str
    parameters: int
    gflops_per_forward: float
    gflops_per_sample: float
    resolution: list[int]
    in_channels: int
    class_conditional: bool
    sampler: str
    num_inference_steps: int
    num_samples: int
    seed: int
    device: str
    seconds_per_image: float


@dataclass
class ModelScore(SampleInfo):
    """One model's row of the report."""

    num_reference: int
    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    precision: float
    recall: float
    inception_weights: str
    reference_key: str
    reference_cache_name: str


@dataclass
class ModelSamples:
    """One model's samples (uint8 (N, C, H, W)), its report fields, and the settings that drew them.

    `save`/`load` keep them in one torch file (tensors and plain values only, loaded with `weights_only=True`).
    """

    info: SampleInfo
    images: torch.Tensor
    sampling: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": SAMPLES_FORMAT, "info": asdict(self.info), "sampling": self.sampling}
        torch.save({**payload, "images": self.images.contiguous()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelSamples:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Samples file not found: {path}.")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or foreign files fail in many ways inside torch.load
            raise ValueError(f"{path} is not a readable samples file ({type(error).__name__}: {error}).") from error
        if not isinstance(data, dict) or data.get("format") != SAMPLES_FORMAT:
            raise ValueError(f"{path} is not a samples file written by eval/fid.py --samples_only ({SAMPLES_FORMAT}).")
        info = SampleInfo(**data["info"])
        images = data["images"]
        expected = (info.num_samples, info.in_channels, *info.resolution)
        if images.dtype != torch.uint8 or tuple(images.shape) != expected:
            got = f"{images.dtype} {tuple(images.shape)}"
            raise ValueError(f"{path}: expected uint8 images of shape {expected}, got {got}.")
        return cls(info, images, data["sampling"])


@dataclass
class FIDEvaluation:
    """Scores of all models, plus each model's first `GRID_SAMPLES` samples (uint8 (N, C, H, W)) for grids."""

    settings: FIDSettings
    weights: InceptionWeights
    reference_description: str
    scores: list[ModelScore]
    samples: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def kid_subset_size(num_generated: int, num_reference: int) -> int:
    """torch-fidelity's default KID subset size (1000), shrunk to what both inputs have."""
    return min(KID_MAX_SUBSET_SIZE, num_generated, num_reference)


def kid_std_is_measured(subset_size: int, num_generated: int, num_reference: int) -> bool:
    """Whether torch-fidelity's KID std means anything: it is the spread over random subsets of both inputs, so when
    the subset is as large as both (N <= 1000 against as many reference images) every subset is the whole set and
    the std is 0 by construction."""
    return subset_size < max(num_generated, num_reference)


def reference_cache_name(reference_key: str, weights: InceptionWeights) -> str:
    """A file-name-safe torch-fidelity cache name, unique per reference key and Inception weights."""
    digest = hashlib.sha256(f"{reference_key}|{weights.sha256}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9]+", "-", reference_key.split("|")[0].rstrip("/").rsplit("/", 1)[-1]).strip("-")
    return f"reference-{readable}-{digest}"


def fidelity_metrics(
    generated: Dataset,
    reference: ReferenceImages,
    weights: InceptionWeights,
    cache_dir: Path,
    device: str = "cpu",
    batch_size: int = 64,
    verbose: bool = True,
) -> dict[str, float]:
    """FID, KID and precision/recall of `generated` against `reference` with torch-fidelity.

    The reference's features are cached under `cache_dir` (see `reference_cache_name`); the generated ones are not.
    """
    for name, images in (("generated", generated), ("reference", reference)):
        if len(images) < MIN_SAMPLES:
            raise ValueError(f"FID/KID/precision need at least {MIN_SAMPLES} {name} images, got {len(images)}.")
    subset_size = kid_subset_size(len(generated), len(reference))
    metrics = torch_fidelity.calculate_metrics(
        input1=generated,
        input2=reference,
        input2_cache_name=reference_cache_name(reference.key, weights),
        cache=True,
        cache_root=str(cache_dir),
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size,
        fid=True,
        kid=True,
        prc=True,
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(weights.path),
        kid_subset_size=subset_size,
        prc_neighborhood=PRC_NEIGHBORHOOD,
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory or cheap to decode
        verbose=verbose,
    )
    return {
        "fid": metrics[torch_fidelity.KEY_METRIC_FID],
        "kid_mean": metrics[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": metrics[torch_fidelity.KEY_METRIC_KID_STD],
        "kid_subset_size": subset_size,
        "precision": metrics[torch_fidelity.KEY_METRIC_PRECISION],
        "recall": metrics[torch_fidelity.KEY_METRIC_RECALL],
    }


def sample_model(model_dir: str, name: str, settings: FIDSettings) -> ModelSamples:
    """Draw one model's samples with the settings' sampler and seeds, and describe the model for the report."""
    pipeline = load_pipeline(model_dir, settings.scheduler)
    unet = pipeline.unet.to(settings.device)
    resolution = sample_resolution(unet)
    gflops = count_gflops(unet, resolution, unet.config.in_channels)  # also warms up the model before timing

    start = time.perf_counter()
    images = generate_images(
        pipeline,
        num_samples=settings.num_samples,
        num_inference_steps=settings.num_inference_steps,
        seed=settings.seed,
        batch_size=settings.batch_size,
        device=settings.device,
        class_conditional=settings.class_conditional,
        description=f"sampling {name}",
    )
    seconds_per_image = (time.perf_counter() - start) / settings.num_samples
    info = SampleInfo(
        name=name,
        path=str(Path(model_dir).resolve()),
        model_class=f"{type(unet).__module__}.{type(unet).__name__}",
        parameters=unet.num_parameters(),
        gflops_per_forward=gflops,
        gflops_per_sample=gflops * settings.num_inference_steps,
        resolution=list(resolution),
        in_channels=unet.config.in_channels,
        class_conditional=settings.class_conditional,
        sampler=type(pipeline.scheduler).__name__,
        num_inference_steps=settings.num_inference_steps,
        num_samples=settings.num_samples,
        seed=settings.seed,
        device=str(settings.device),
        seconds_per_image=seconds_per_image,
    )
    return ModelSamples(info, images, {key: getattr(settings, key) for key in SAMPLING_SETTINGS})


def score_samples(
    samples: ModelSamples, settings: FIDSettings, reference: ReferenceSet, weights: InceptionWeights
) -> ModelScore:
    """Score one model's samples against the reference images at its resolution and colour mode."""
    reference_images = reference.images(tuple(samples.info.resolution), samples.info.in_channels)
    metrics = fidelity_metrics(
        ImageTensorDataset(samples.images),
        reference_images,
        weights,
        settings.cache_dir,
        device=settings.device,
        batch_size=settings.batch_size,
        verbose=settings.verbose,
    )
    return ModelScore(
        **asdict(samples.info),
        num_reference=len(reference_images),
        inception_weights=weights.description,
        reference_key=reference_images.key,
        reference_cache_name=reference_cache_name(reference_images.key, weights),
        **metrics,
    )


def samples_file(save_dir: str | Path, name: str) -> Path:
    """Where `sample_models(..., save_dir)` keeps the samples of the model folder it names `name`."""
    return Path(save_dir) / f"{name}.pt"


def sample_models(
    model_dirs: list[str], settings: FIDSettings, save_dir: Optional[str | Path] = None
) -> list[ModelSamples]:
    """Sample every model folder with the same settings (no scoring: no reference or Inception weights needed).

    With `save_dir`, each model's samples are saved as `save_dir/<name>.pt` as soon as they are drawn, so that
    another metric (`eval/digit_score.py --samples`) or machine can score the very same images later."""
    if not model_dirs:
        raise ValueError("Give at least one model directory.")
    missing = [d for d in model_dirs if not Path(d).is_dir()]
    if missing:
        raise FileNotFoundError(f"Model directories not found: {', '.join(missing)}.")
    if settings.num_samples < MIN_SAMPLES:
        raise ValueError(f"num_samples must be at least {MIN_SAMPLES}, got {settings.num_samples}.")
    drawn = []
    for model_dir, name in zip(model_dirs, folder_names(model_dirs)):
        drawn.append(sample_model(model_dir, name, settings))
        if save_dir is not None:
            drawn[-1].save(samples_file(save_dir, name))
    return drawn


def _scoring_inputs(settings: FIDSettings) -> tuple[ReferenceSet, InceptionWeights]:
    """The reference subset (N images) and the Inception weights, resolved before any sampling so bad ones fail fast."""
    reference = ReferenceSet(settings.reference, split=settings.split, num_images=settings.num_samples)
    return reference, resolve_inception_weights(settings.inception_weights)


def common_sampling(samples: list[ModelSamples]) -> dict[str, Any]:
    """The sampling settings that every one of `samples` was drawn with; an error if they differ or names repeat."""
    if not samples:
        raise ValueError("Give at least one samples file.")
    sampling = samples[0].sampling
    for other in samples[1:]:
        if other.sampling != sampling:
            raise ValueError(
                f"Samples drawn with different settings cannot be compared: {samples[0].info.name} {sampling} vs "
                f"{other.info.name} {other.sampling}."
            )
    names = [s.info.name for s in samples]
    if len(set(names)) != len(names):
        raise ValueError(f"Two samples files hold the same model name: {names}.")
    return sampling


def score_models(samples: list[ModelSamples], settings: FIDSettings) -> FIDEvaluation:
    """Score samples drawn by `sample_models` (here or on another machine) against one reference subset.

    The sampling settings (N, sampler, steps, seed, class conditioning) are taken from the samples, which must all
    agree on them; `settings` supplies the reference, the Inception weights and where to score.
    """
    settings = replace(settings, **common_sampling(samples))
    return _score_all(samples, settings, *_scoring_inputs(settings))


def _score_all(
    samples: list[ModelSamples], settings: FIDSettings, reference: ReferenceSet, weights: InceptionWeights
) -> FIDEvaluation:
    evaluation = FIDEvaluation(settings, weights, reference.description, scores=[])
    for model in samples:
        evaluation.scores.append(score_samples(model, settings, reference, weights))
        evaluation.samples[model.info.name] = model.images[:GRID_SAMPLES]
    return evaluation


def evaluate_models(
    model_dirs: list[str], settings: FIDSettings, save_dir: Optional[str | Path] = None
) -> FIDEvaluation:
    """Sample and score every model folder with the same settings, reference subset and Inception weights (the
    samples saved under `save_dir` if given, as `sample_models` does)."""
    scoring = _scoring_inputs(settings)
    return _score_all(sample_models(model_dirs, settings, save_dir), settings, *scoring)
