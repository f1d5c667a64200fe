"""The denoising objective that training optimises and the held-out loss measures (one definition for both)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def diffusion_loss(
    model_output: torch.Tensor,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    prediction_type: str,
    reduction: str = "mean",
) -> torch.Tensor:
    """diffusers' `train_unconditional.py` loss: MSE to the noise (epsilon), SNR-weighted MSE to the clean image
    (sample), MSE to v. `reduction="none"` returns one value per sample (what the held-out loss groups by timestep).
    """
    if prediction_type == "epsilon":
        target, weights = noise, None
    elif prediction_type == "sample":
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(clean_images.device)[timesteps]
        target, weights = clean_images, alphas_cumprod / (1 - alphas_cumprod)
    elif prediction_type == "v_prediction":
        target, weights = noise_scheduler.get_velocity(clean_images, noise, timesteps), None
    else:
        raise ValueError(f"Unsupported prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights.float()
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
