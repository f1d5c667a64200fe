"""`EMOv2ImagePipeline`: image generation with any diffusers scheduler, optionally class-conditional or in latent space.

The denoiser is anything with the `diffusers.UNet2DModel` contract -- an `emov2_gen.EMOv2UNet2DModel`, a
`UNet2DModel`, a D-EMOv2 `EMOv2Transformer2DModel` or diffusers' `DiTTransformer2DModel` -- so EMOv2 and baseline
models are sampled by the same code. Timesteps reach the denoiser as a (B,) tensor, as `DiTPipeline` passes them
(DiT rejects a 0-d one; the others broadcast either to the same values). Unconditional models behave as in
`DDPMPipeline`/`DDIMPipeline` (same noise, same results for the same generator). Class-conditional models take
`class_labels`; a model trained with a null class (labels randomly replaced by ``null_class_label`` during
training, see ``train/train_ddpm.py --class_dropout_prob``) also supports classifier-free guidance. A denoiser
with learned sigma (``out_channels == 2 * in_channels``, DiT's [epsilon, variance] layout, e.g. a D-EMOv2
`EMOv2Transformer2DModel` or a DiT) is sampled through its first ``in_channels`` channels, as `DiTPipeline` does,
unless the scheduler itself uses a learned variance (``variance_type`` "learned"/"learned_range"). With a ``vae``
(a latent-space denoiser, e.g. ``train/train_ddpm.py --vae_name_or_path``) the samples are latents, decoded as
``vae.decode(latents / vae.config.scaling_factor)`` (as `DiTPipeline`) before they are returned.

The null class is part of the pipeline's config (``model_index.json``), so a saved pipeline knows it:

    EMOv2ImagePipeline.from_pretrained(folder)                    # with emov2_gen installed
    DiffusionPipeline.from_pretrained(folder)                     # after `import emov2_gen`
    DiffusionPipeline.from_pretrained(folder, custom_pipeline=<path to this file>, trust_remote_code=True)

This module imports only torch and diffusers, so diffusers can also load it as custom pipeline code.
"""

from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")


def class_label_rows(denoiser: ModelMixin) -> Optional[int]:
    """Rows of the denoiser's class-label table, the null class included (``None``: unconditional).

    ``num_class_embeds`` for the UNets and D-EMOv2; diffusers' `DiTTransformer2DModel` has ``num_embeds_ada_norm``
    classes plus the null row it adds itself (index ``num_embeds_ada_norm``, `DiTPipeline`'s null class).
    """
    if isinstance(denoiser, DiTTransformer2DModel):
        return denoiser.config.num_embeds_ada_norm + 1
    return denoiser.config.get("num_class_embeds")


class EMOv2ImagePipeline(DiffusionPipeline):
    r"""Generate images with a `UNet2DModel`-contract denoiser and any diffusers scheduler.

    Args:
        unet: the denoiser, called as ``unet(sample, t, class_labels=...).sample``.
        scheduler: any diffusers scheduler (DDPM, DDIM, Euler, DPM-Solver, ...).
        null_class_label: the class index the model was trained with as "no class" (classifier-free
            guidance); ``None`` for models trained without one.
        vae: optional autoencoder (an `AutoencoderKL`) for a denoiser trained on its scaled latents.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: ModelMixin,
        scheduler: SchedulerMixin,
        null_class_label: Optional[int] = None,
        vae: Optional[ModelMixin] = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(null_class_label=null_class_label)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @property
    def num_classes(self) -> Optional[int]:
        """The number of real classes the denoiser was trained on (``None`` for unconditional models)."""
        rows = class_label_rows(self.unet)
        if rows is None:
            return None
        return rows - (1 if self.config.null_class_label is not None else 0)

    def _prepare_class_labels(
        self, class_labels: Optional[Union[int, list[int], torch.Tensor]], batch_size: Optional[int]
    ) -> tuple[Optional[torch.Tensor], int]:
        """Validate ``class_labels`` against the model and return them as a (B,) tensor with the batch size."""
        num_classes, null_class_label = self.num_classes, self.config.null_class_label
        if class_labels is None:
            batch_size = 1 if batch_size is None else batch_size
            if num_classes is None:
                return None, batch_size
            if null_class_label is None:
                raise ValueError(
                    f"This denoiser is class-conditional ({num_classes} classes) and was trained without a null "
                    "class, so it cannot generate unconditionally: pass `class_labels`."
                )
            return torch.full((batch_size,), null_class_label, dtype=torch.long), batch_size
        if num_classes is None:
            raise ValueError("`class_labels` were given, but this denoiser is unconditional (no `num_class_embeds`).")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1 and batch_size is not None:
            labels = labels.expand(batch_size)
        if batch_size is not None and labels.numel() != batch_size:
            raise ValueError(f"Got {labels.numel()} class labels for a batch of {batch_size} images.")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"Class labels must lie in [0, {num_classes - 1}]; got {labels.tolist()}.")
        return labels, labels.numel()

    def _scheduler_step_kwargs(
        self, eta: float, generator: Optional[Union[torch.Generator, list[torch.Generator]]]
    ) -> dict:
        """Pass ``eta`` and ``generator`` only to schedulers whose ``step`` takes them."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if "eta" in accepted:
            kwargs["eta"] = eta
        elif eta != 0.0:
            raise ValueError(f"eta={eta} was given, but {type(self.scheduler).__name__} has no eta parameter.")
        return kwargs

    @staticmethod
    def _split_learned_sigma(
        model_output: torch.Tensor, channels: int
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(prediction, variance) of a learned-sigma output with 2 * channels channels, else (output, None)."""
        if model_output.shape[1] == 2 * channels:
            prediction, variance = model_output.split(channels, dim=1)
            return prediction, variance
        return model_output, None

    def _scheduler_learns_variance(self) -> bool:
        """Whether the scheduler's step consumes [prediction, variance] itself (DDPM's learned variance types)."""
        return self.scheduler.config.get("variance_type") in ("learned", "learned_range")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: Optional[int] = None,
        class_labels: Optional[Union[int, list[int], torch.Tensor]] = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""Generate a batch of images.

        Args:
            batch_size: number of images; defaults to the number of ``class_labels``, else 1.
            class_labels: an int (for the whole batch), a list or a tensor of class indices. For a model trained
                with a null class, ``None`` generates unconditionally.
            guidance_scale: classifier-free guidance weight ``w`` in ``uncond + w * (cond - uncond)``; 1 disables
                guidance, 0 gives the unconditional prediction. Needs a model trained with a null class.
            num_inference_steps: number of denoising steps.
            eta: the DDIM eta (0 = deterministic DDIM, 1 = DDPM-like); only for schedulers that take it.
            generator: torch generator(s) that make the result reproducible.
            output_type: ``"pil"``, ``"np"`` (B, H, W, C floats in [0, 1]) or ``"pt"`` (B, C, H, W in [0, 1]).
            return_dict: return an `ImagePipelineOutput` (default) or a plain tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        labels, batch_size = self._prepare_class_labels(class_labels, batch_size)
        guided = guidance_scale != 1.0
        if guided:
            if self.config.null_class_label is None:
                raise ValueError("Classifier-free guidance needs a denoiser trained with a null class.")
            if class_labels is None:
                raise ValueError("Classifier-free guidance needs `class_labels` to guide towards.")
            if self.unet.config.out_channels not in (self.unet.config.in_channels, 2 * self.unet.config.in_channels):
                raise ValueError(
                    "Classifier-free guidance is only defined here for image-shaped model outputs (or learned sigma)."
                )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images.")

        device = self._execution_device
        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma

        if labels is not None:
            labels = labels.to(device)
            if guided:
                labels = torch.cat([labels, torch.full_like(labels, self.config.null_class_label)])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self._scheduler_step_kwargs(eta, generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([image, image]) if guided else image
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0])
            model_output = self.unet(model_input, timesteps, class_labels=labels).sample
            prediction, variance = self._split_learned_sigma(model_output, image.shape[1])
            if guided:  # guidance on the prediction; the variance is the conditional one (as DiTPipeline)
                conditional, unconditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
                variance = None if variance is None else variance.chunk(2)[0]
            if variance is not None and self._scheduler_learns_variance():
                prediction = torch.cat([prediction, variance], dim=1)
            image = self.scheduler.step(prediction, t, image, **step_kwargs).prev_sample

        if self.vae is not None:  # latents -> images in [-1, 1]
            image = self.vae.decode(image.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
