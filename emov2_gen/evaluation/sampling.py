"""Load a saved diffusers pipeline folder and draw seeded samples from it, identically for every model.

Any folder with a `unet` (an `EMOv2UNet2DModel` or a `UNet2DModel`) and a `scheduler` -- saved as a
`DDPMPipeline`, `DDIMPipeline` or `EMOv2ImagePipeline` -- is loaded as an `EMOv2ImagePipeline` (which also takes
class labels), and its scheduler config is turned into the requested sampler. Every sample has its own CPU
`torch.Generator`, seeded from (seed, sample index), so a seed gives the same starting noise (and DDPM step noise)
to every model, whatever the batch size or device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from ..data.training_images import derived_seed
from ..pipelines import EMOv2ImagePipeline
from .inception_inputs import unit_to_uint8

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
}


def load_pipeline(model_dir: str | Path, scheduler: str) -> EMOv2ImagePipeline:
    """The pipeline saved in `model_dir`, sampling with `scheduler` (one of `SCHEDULERS`)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"Model directory {str(model_dir)!r} does not exist.")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(model_dir)!r} is not a saved diffusers pipeline (no model_index.json); save one with "
            "`DDPMPipeline(unet=..., scheduler=...).save_pretrained(dir)`."
        )
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
    pipeline = EMOv2ImagePipeline.from_pretrained(path)
    pipeline.scheduler = SCHEDULERS[scheduler].from_config(pipeline.scheduler.config)
    return pipeline


def sample_resolution(unet: ModelMixin) -> tuple[int, int]:
    """(height, width) of the model's samples, from `config.sample_size` (an int or a pair)."""
    size = unet.config.sample_size
    if size is None:
        raise ValueError(f"{type(unet).__name__} has no config.sample_size; cannot tell which resolution to sample.")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def sample_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    """One CPU generator per sample index in [start, stop), seeded from (seed, index)."""
    return [torch.Generator("cpu").manual_seed(derived_seed(seed, index)) for index in range(start, stop)]


def generate_images(
    pipeline: EMOv2ImagePipeline,
    num_samples: int,
    num_inference_steps: int,
    seed: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    class_conditional: bool = False,
    description: str = "sampling",
) -> torch.Tensor:
    """Draw `num_samples` images as a uint8 (N, C, H, W) CPU tensor.

    With `class_conditional`, sample i is conditioned on class ``i % num_classes`` (balanced, the same for every
    model); otherwise the model is sampled without labels.
    """
    if num_samples < 1 or num_inference_steps < 1 or batch_size < 1:
        raise ValueError("num_samples, num_inference_steps and batch_size must be positive.")
    if class_conditional and pipeline.num_classes is None:
        raise ValueError("Class-conditional sampling was asked for, but the model has no class embedding.")
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    batches = []
    with tqdm(total=num_samples, desc=description, unit="img") as progress:
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            labels = torch.arange(start, stop) % pipeline.num_classes if class_conditional else None
            images = pipeline(
                batch_size=stop - start,
                class_labels=labels,
                num_inference_steps=num_inference_steps,
                generator=sample_generators(seed, start, stop),
                output_type="pt",
            ).images
            batches.append(unit_to_uint8(images).cpu())
            progress.update(stop - start)
    return torch.cat(batches)
