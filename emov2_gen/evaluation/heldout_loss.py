"""Held-out denoising loss: the training objective on fixed held-out images, fixed noise and a fixed timestep grid.

FID needs thousands of samples and an Inception network; this needs one forward pass per held-out image, and
it is nearly noise-free from one evaluation to the next because nothing in it is redrawn: image ``i`` is always
noised with the same Gaussian draw (a CPU generator seeded from ``seed``) at the same timestep, the grid's
``i mod K``-th point. The grid is the centres of K equal bins of [0, T), so the mean over the set is a stratified
estimate of the (uniform-timestep) training loss, and the per-timestep means show where two models differ. It is
the selection metric of the fair comparisons (`eval/fair_compare.py`); FID stays the final metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from datasets import Dataset
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.models.modeling_utils import ModelMixin

from ..data.training_images import TrainingImageDataset
from ..diffusion_loss import diffusion_loss


def timestep_grid(num_train_timesteps: int, num_points: int) -> list[int]:
    """The centres of `num_points` equal bins of [0, num_train_timesteps): e.g. T=1000, K=4 -> [125, 375, 625, 875]."""
    if not 1 <= num_points <= num_train_timesteps:
        raise ValueError(f"num_points must lie in [1, {num_train_timesteps}], got {num_points}.")
    return [int((k + 0.5) * num_train_timesteps / num_points) for k in range(num_points)]


def heldout_images(
    dataset: Dataset, resolution: int, channels: int, num_images: int, with_labels: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first `num_images` of `dataset` as training would see them, without the random parts (centre crop, no
    flip): (N, C, R, R) in [-1, 1], and their labels when `with_labels`."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    if num_images > len(dataset):
        raise ValueError(f"Asked for {num_images} held-out images, but the split has only {len(dataset)}.")
    samples = TrainingImageDataset(dataset.select(range(num_images)), resolution=resolution, channels=channels,
                                   center_crop=True, with_labels=with_labels)
    items = [samples[i] for i in range(num_images)]
    images = torch.stack([item["images"] for item in items])
    labels = torch.tensor([item["class_labels"] for item in items]) if with_labels else None
    return images, labels


@torch.no_grad()
def encode_heldout_images(images: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """Latent training's held-out inputs: the scaled means of the VAE's latents (no sampling, so they stay fixed)."""
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return (posterior.mode() * vae.config.scaling_factor).float().cpu()


@dataclass
class HeldOutSet:
    """Fixed inputs of the held-out loss: images in [-1, 1], their noise, timesteps and (optional) class labels."""

    images: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    class_labels: Optional[torch.Tensor]
    grid: list[int]

    @classmethod
    def build(
        cls,
        images: torch.Tensor,
        num_train_timesteps: int,
        num_timesteps: int = 8,
        seed: int = 0,
        class_labels: Optional[torch.Tensor] = None,
    ) -> "HeldOutSet":
        """Pair image i with grid point i mod `num_timesteps` and a noise draw fixed by `seed`."""
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"Expected a non-empty (N, C, H, W) batch of held-out images, got {tuple(images.shape)}.")
        if class_labels is not None and class_labels.shape != (len(images),):
            raise ValueError(f"Expected {len(images)} class labels, got shape {tuple(class_labels.shape)}.")
        grid = timestep_grid(num_train_timesteps, num_timesteps)
        if len(images) < len(grid):
            raise ValueError(f"{len(images)} held-out images cannot cover {len(grid)} timesteps; use more images.")
        timesteps = torch.tensor(grid, dtype=torch.long).repeat(len(images) // len(grid) + 1)[: len(images)]
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        return cls(images.float(), noise, timesteps, class_labels, grid)


@dataclass
class HeldOutLoss:
    """The mean loss over the set and its mean at each grid timestep."""

    mean: float
    per_timestep: dict[int, float]

    def scalars(self, prefix: str = "heldout_loss") -> dict[str, float]:
        """Tracker scalars: `prefix` and `prefix_t0062`-style entries, one per timestep."""
        return {prefix: self.mean, **{f"{prefix}_t{t:04d}": value for t, value in self.per_timestep.items()}}


@torch.no_grad()
def heldout_loss(
    model: ModelMixin,
    heldout: HeldOutSet,
    noise_scheduler: DDPMScheduler,
    prediction_type: Optional[str] = None,
    batch_size: int = 128,
) -> HeldOutLoss:
    """The training loss of `model` on `heldout`, in eval mode (restored afterwards), on the model's device/dtype.

    A learned-sigma output ([prediction, variance]) is scored on its prediction half, as in training.
    `prediction_type` defaults to the scheduler's.
    """
    prediction_type = prediction_type or noise_scheduler.config.prediction_type
    was_training = model.training
    model.eval()
    device, dtype = model.device, model.dtype
    losses = []
    try:
        for start in range(0, len(heldout.images), batch_size):
            chunk = slice(start, start + batch_size)
            clean = heldout.images[chunk].to(device)
            noise = heldout.noise[chunk].to(device)
            timesteps = heldout.timesteps[chunk].to(device)
            labels = None if heldout.class_labels is None else heldout.class_labels[chunk].to(device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            output = model(noisy.to(dtype), timesteps, class_labels=labels).sample[:, : clean.shape[1]]
            losses.append(
                diffusion_loss(output, clean, noise, timesteps, noise_scheduler, prediction_type, reduction="none").cpu()
            )
    finally:
        model.train(was_training)
    per_sample = torch.cat(losses).double()
    per_timestep = {t: per_sample[heldout.timesteps == t].mean().item() for t in heldout.grid}
    # The mean of the per-timestep means: every grid point weighs the same even when N is not a multiple of K.
    return HeldOutLoss(mean=sum(per_timestep.values()) / len(per_timestep), per_timestep=per_timestep)
