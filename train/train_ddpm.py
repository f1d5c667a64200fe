#!/usr/bin/env python
"""Train a DDPM denoiser -- an EMOv2 UNet, a D-EMOv2 transformer or a `UNet2DModel` baseline -- with Accelerate.

Flag-for-flag a superset of diffusers' `examples/unconditional_image_generation/train_unconditional.py`, plus:
EMOv2 and baseline presets (`--model`) or a config file of any denoiser class; greyscale or RGB data; an offline
default dataset; class-conditional training with a null class for classifier-free guidance; `--prediction_type
v_prediction`; latent-space training in a frozen `AutoencoderKL` (`--vae_name_or_path`: the denoiser is built
for its latents and the saved pipeline decodes them); DDIM previews; `--max_train_steps`; `--seed`; resumable
runs that reproduce the uninterrupted run exactly; a stop with a clear message on a NaN/inf loss or on a collapse
(the loss back at that of predicting zeros); and errors for bad input before any training starts.

Launch (the script also runs as plain `python train/train_ddpm.py ...`, one process):

    accelerate launch train/train_ddpm.py --model emov2-1m --resolution 16 --max_train_steps 300   # digits, offline
    accelerate launch train/train_ddpm.py --dataset_name ../shared/data/mnist --resolution 32 ...  # a `datasets` dir
    accelerate launch train/train_ddpm.py --vae_name_or_path stabilityai/sd-vae-ft-mse --model demo-s-2 \
        --train_data_dir images/ --resolution 256 ...                                             # 32x32x4 latents
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train/train_ddpm.py ... # 8 GPUs, 1 node
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank $RANK \
        --main_process_ip $HEAD_IP --main_process_port 29500 train/train_ddpm.py ...               # 2 nodes x 8 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train/train_ddpm.py ...   # 2 CPU procs (gloo)

Data-parallel runs split every epoch over the processes, so `--train_batch_size` is per process and the
effective batch is train_batch_size x processes x gradient_accumulation_steps.

Reproducibility: every random draw is a function of `--seed` and the position in training -- the epoch's shuffle
of (seed, epoch), a sample's crop/flip of (seed, epoch, index) and a batch's latent sample (with a VAE), noise,
timesteps and label dropout of (seed, epoch, batch, process) -- so `--resume_from_checkpoint` continues exactly
where the run stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler
from diffusers.models.modeling_utils import ModelMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.import_utils import is_xformers_available
from huggingface_hub import create_repo, upload_folder
from torchvision.utils import save_image
from tqdm.auto import tqdm

from emov2_gen.data.image_datasets import load_image_dataset
from emov2_gen.data.training_images import TrainingImageDataset, derived_seed, image_channels, num_classes
from emov2_gen.diffusion_loss import diffusion_loss
from emov2_gen.evaluation.heldout_loss import HeldOutSet, encode_heldout_images, heldout_images, heldout_loss
from emov2_gen.models.registry import DENOISER_PRESETS, build_denoiser, denoiser_from_config, downsampling_factor
from emov2_gen.pipelines import EMOv2ImagePipeline
from emov2_gen.pipelines import pipeline_emov2_image
from emov2_gen.training_utils import (
    LossCollapseDetector,
    LossCollapseError,
    TrainingClock,
    add_checkpoint_arguments,
    check_checkpoint_arguments,
    check_positive,
    configure_logging,
    ema_weights,
    exit_on_divergence,
    list_checkpoints,
    load_resume_state,
    prepare_output_dir,
    register_checkpoint_hooks,
    resolve_resume_checkpoint,
    save_checkpoint,
)

logger = get_logger(__name__, log_level="INFO")

DEFAULT_MODEL = "emov2-5m"
EVAL_SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
MODEL_SUBFOLDER = "unet"  # checkpoint-<step>/unet[_ema]/, as in the anchor and the saved pipeline
# Independent random streams derived from --seed (see the module docstring).
SHUFFLE_STREAM, AUGMENTATION_STREAM, NOISE_STREAM, LATENT_STREAM = 0, 1, 2, 3
# The frozen VAE runs in the dtype of the mixed precision (diffusers' training scripts' `weight_dtype`).
VAE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A dataset on the Hugging Face hub or a local `datasets` directory (e.g. ../shared/data/mnist).")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's config name, if any.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="A folder of images (sub-folder names become class labels). Without this and "
                           "--dataset_name, scikit-learn's bundled 8x8 digits are used, upscaled to --resolution.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded/prepared datasets are cached.")
    data.add_argument("--resolution", type=int, default=32,
                      help="Training resolution; must be divisible by the model's total downsampling factor "
                           "(with --vae_name_or_path: by the VAE's times the model's).")
    data.add_argument("--center_crop", action="store_true", help="Centre-crop instead of random-crop to the resolution.")
    data.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    data.add_argument("--in_channels", type=int, choices=(1, 3), default=None,
                      help="1 (greyscale) or 3 (RGB); by default it follows the data's first image (with "
                           "--vae_name_or_path: the VAE's in_channels).")
    data.add_argument("--preserve_input_precision", action="store_true",
                      help="Keep the full precision of 16-bit greyscale images instead of converting to 8 bits.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on a random subset of this many examples (debugging, quick runs).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes.")

    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, choices=DENOISER_PRESETS, default=None,
                       help=f"A denoiser preset (default {DEFAULT_MODEL} unless --model_config_name_or_path is given).")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A config.json (or its folder) of an EMOv2UNet2DModel, EMOv2Transformer2DModel or "
                            "UNet2DModel; its sample_size, in/out_channels and num_class_embeds are set from the data "
                            "and flags (to the latents' with --vae_name_or_path).")
    model.add_argument("--vae_name_or_path", type=str, default=None,
                       help="Train in the latent space of this diffusers AutoencoderKL (a folder or hub id, e.g. "
                            "stabilityai/sd-vae-ft-mse): the frozen VAE encodes every batch to scaled latents, the "
                            "denoiser is built for them (latent_channels at resolution / 2**(VAE levels - 1)), and "
                            "the saved pipeline (an EMOv2ImagePipeline with the VAE) decodes its samples.")
    model.add_argument("--vae_subfolder", type=str, default=None,
                       help='The VAE\'s subfolder in --vae_name_or_path (e.g. "vae" of a saved pipeline).')
    model.add_argument("--class_conditional", action="store_true",
                       help="Condition on the dataset's class labels (a `label` column or image sub-folders).")
    model.add_argument("--class_dropout_prob", type=float, default=0.1,
                       help="With --class_conditional: probability of replacing a label by the null class "
                            "(index num_classes), which enables classifier-free guidance; 0 trains without one.")
    model.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (UNet2DModel only; EMOv2 models refuse it: their SEW-MHSA runs "
                            "torch's scaled_dot_product_attention, which picks fused kernels itself).")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute block activations in the backward pass: less memory, slower steps.")

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps of the noise schedule.")
    diffusion.add_argument("--ddpm_beta_schedule", type=str, default="linear",
                           choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"))
    diffusion.add_argument("--ddpm_beta_start", type=float, default=1e-4)
    diffusion.add_argument("--ddpm_beta_end", type=float, default=0.02)
    diffusion.add_argument("--prediction_type", type=str, default="epsilon",
                           choices=("epsilon", "sample", "v_prediction"),
                           help="What the model predicts: the noise, the clean image (SNR-weighted loss), or v.")
    diffusion.add_argument("--ddpm_num_inference_steps", type=int, default=1000, help="Sampling steps for previews.")
    diffusion.add_argument("--eval_scheduler", type=str, default="ddpm", choices=tuple(EVAL_SCHEDULERS),
                           help="Sampler for the preview grids.")
    diffusion.add_argument("--guidance_scale", type=float, default=1.0,
                           help="Classifier-free guidance for class-conditional previews (1 = none).")

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="ddpm-emov2",
                          help="Where the pipeline, checkpoints, sample grids and logs are written.")
    training.add_argument("--overwrite_output_dir", action="store_true",
                          help="Start afresh in an output_dir that already holds a run (deletes its checkpoints).")
    training.add_argument("--seed", type=int, default=0, help="Seed of every random draw (see the module docstring).")
    training.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    training.add_argument("--eval_batch_size", type=int, default=16, help="Number of images in a preview grid.")
    training.add_argument("--num_epochs", type=int, default=100)
    training.add_argument("--max_train_steps", type=int, default=None,
                          help="Total optimiser steps; overrides --num_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--learning_rate", type=float, default=1e-4)
    training.add_argument("--lr_scheduler", type=str, default="cosine",
                          help='diffusers `get_scheduler` name: "linear", "cosine", "cosine_with_restarts", '
                               '"polynomial", "constant", "constant_with_warmup".')
    training.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up length in optimiser steps.")
    training.add_argument("--adam_beta1", type=float, default=0.95)
    training.add_argument("--adam_beta2", type=float, default=0.999)
    training.add_argument("--adam_weight_decay", type=float, default=1e-6)
    training.add_argument("--adam_epsilon", type=float, default=1e-08)
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    training.add_argument("--collapse_window", type=int, default=100,
                          help="Stop (exit status 3, as on a NaN loss) when the mean training loss over this many "
                               "steps climbs back to 90%% of the loss of predicting zeros after it had been below "
                               "50%%: the run collapsed. 0 turns the check off.")
    training.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights and save it as the model.")
    training.add_argument("--ema_inv_gamma", type=float, default=1.0)
    training.add_argument("--ema_power", type=float, default=3 / 4)
    training.add_argument("--ema_max_decay", type=float, default=0.9999)
    training.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"),
                          help="Overrides the `accelerate config` / `accelerate launch` setting.")

    heldout = parser.add_argument_group("held-out denoising loss (emov2_gen.evaluation.heldout_loss)")
    heldout.add_argument("--heldout_split", type=str, default=None,
                         help='A split of --dataset_name / --train_data_dir (e.g. "test" for MNIST) whose first '
                              "--heldout_num_images images score the training objective with fixed noise and timesteps "
                              "every --heldout_steps steps (logged as heldout_loss[_ema]); off by default.")
    heldout.add_argument("--heldout_num_images", type=int, default=512)
    heldout.add_argument("--heldout_num_timesteps", type=int, default=8,
                         help="Points of the fixed timestep grid (bin centres of [0, --ddpm_num_steps)).")
    heldout.add_argument("--heldout_steps", type=int, default=250, help="Score every N optimiser steps and at the end.")

    saving = parser.add_argument_group("saving and logging")
    saving.add_argument("--save_images_epochs", type=int, default=10, help="Save a preview grid every N epochs.")
    saving.add_argument("--save_model_epochs", type=int, default=10, help="Save the pipeline every N epochs.")
    add_checkpoint_arguments(saving)
    saving.add_argument("--push_to_hub", action="store_true", help="Upload the saved pipeline to the Hugging Face hub.")
    saving.add_argument("--hub_token", type=str, default=None)
    saving.add_argument("--hub_model_id", type=str, default=None, help="Defaults to output_dir's name.")
    saving.add_argument("--hub_private_repo", action="store_true")
    saving.add_argument("--local_rank", type=int, default=-1, help="Set by torch.distributed launchers.")

    args = parser.parse_args(argv)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent flags before anything is loaded."""
    if args.model is not None and args.model_config_name_or_path is not None:
        raise ValueError("Pass either --model or --model_config_name_or_path, not both.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Pass either --dataset_name or --train_data_dir, not both.")
    if args.vae_subfolder is not None and args.vae_name_or_path is None:
        raise ValueError("--vae_subfolder needs --vae_name_or_path.")
    if args.resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {args.resolution}.")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob must lie in [0, 1), got {args.class_dropout_prob}.")
    if args.heldout_split is not None and args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("--heldout_split needs --dataset_name or --train_data_dir (the offline digits have one split).")
    if args.guidance_scale != 1.0 and not (args.class_conditional and args.class_dropout_prob > 0):
        raise ValueError("--guidance_scale needs a null class: --class_conditional with --class_dropout_prob > 0.")
    check_positive(args, ("train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                          "save_images_epochs", "save_model_epochs", "ddpm_num_inference_steps",
                          "max_train_samples", "max_train_steps", "heldout_num_images", "heldout_num_timesteps",
                          "heldout_steps"))
    if args.collapse_window < 0:
        raise ValueError(f"--collapse_window must be 0 (off) or positive, got {args.collapse_window}.")
    if args.logger == "wandb" and args.hub_token is not None:
        raise ValueError("--logger wandb with --hub_token would expose the token; use `hf auth login` instead.")
    check_checkpoint_arguments(args)


# ----------------------------------------------------------------------------------------------- model


def load_vae(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The frozen VAE of a latent-space run: eval mode, no gradients, on `device` in `dtype`."""
    vae = AutoencoderKL.from_pretrained(args.vae_name_or_path, subfolder=args.vae_subfolder)
    vae.requires_grad_(False)
    return vae.eval().to(device, dtype=dtype)


def latent_shape(vae: AutoencoderKL, channels: int, resolution: int) -> tuple[int, int]:
    """(channels, side) of the VAE's latents of `resolution`-pixel images, after checking that it can encode them."""
    if vae.config.in_channels not in (1, 3):
        raise ValueError(
            f"The VAE encodes {vae.config.in_channels}-channel images; training images are greyscale (1) or RGB (3)."
        )
    if vae.config.in_channels != channels:
        raise ValueError(
            f"The VAE encodes {vae.config.in_channels}-channel images, but --in_channels is {channels}; drop it (the "
            "VAE's in_channels is the default) or pass the VAE's."
        )
    levels, factor = len(vae.config.block_out_channels), downsampling_factor(vae)
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} is not divisible by {factor}, the downsampling factor of the VAE ({levels} "
            f"levels); use a multiple of {factor}."
        )
    return vae.config.latent_channels, resolution // factor


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a latent-space denoiser trains on: a sample of the VAE's posterior of `images` times its scaling_factor."""
    latents = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator)
    return (latents * vae.config.scaling_factor).to(images.dtype)


def build_model(
    args: argparse.Namespace, channels: int, sample_size: int, num_class_embeds: Optional[int]
) -> ModelMixin:
    """The denoiser from a preset or a config file, with the data-dependent fields set from the data (or latents).

    `out_channels` is the class's default: `channels` for the UNets, [prediction, variance] for a learned-sigma
    D-EMOv2 transformer (as its presets), which trains through its prediction half.
    """
    data_fields = dict(
        sample_size=sample_size, in_channels=channels, out_channels=None, num_class_embeds=num_class_embeds
    )
    if args.model_config_name_or_path is not None:
        model = denoiser_from_config(args.model_config_name_or_path, **data_fields)
    else:
        model = build_denoiser(args.model or DEFAULT_MODEL, **data_fields)
    factor = downsampling_factor(model)
    if sample_size % factor:
        vae_factor = args.resolution // sample_size  # 1 in pixel space
        size = f"--resolution {args.resolution}"
        if vae_factor > 1:
            size = f"The latent size {sample_size} of {size}"
        if "patch_size" in model.config:
            layout = f"patch size {factor}"
        else:
            layout = f"{len(model.config.block_out_channels)} levels"
        raise ValueError(
            f"{size} is not divisible by {factor}, the total downsampling factor of this {type(model).__name__} "
            f"({layout}); use a --resolution that is a multiple of {factor * vae_factor}."
        )
    return model


# ----------------------------------------------------------------------------------------------- diffusion


def build_heldout_set(
    args: argparse.Namespace,
    channels: int,
    with_labels: bool,
    vae: Optional[AutoencoderKL],
    accelerator: Accelerator,
) -> HeldOutSet:
    """The fixed held-out set of `--heldout_split` (with a VAE: the scaled means of its latents, no sampling)."""
    with accelerator.main_process_first():
        try:
            dataset, _ = load_image_dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
                                            split=args.heldout_split, dataset_config_name=args.dataset_config_name,
                                            cache_dir=args.cache_dir)
        except ValueError as error:
            if "split" not in str(error).lower():
                raise
            raise ValueError(f"--heldout_split {args.heldout_split!r} is not a split of the training data: {error}") from error
    images, labels = heldout_images(dataset, args.resolution, channels, args.heldout_num_images, with_labels)
    if vae is not None:
        images = encode_heldout_images(images, vae)
    return HeldOutSet.build(images, args.ddpm_num_steps, args.heldout_num_timesteps, seed=args.seed,
                            class_labels=labels)


def log_heldout_loss(
    accelerator: Accelerator,
    model: ModelMixin,
    ema_model: Optional[EMAModel],
    heldout: HeldOutSet,
    noise_scheduler: DDPMScheduler,
    global_step: int,
) -> None:
    """Log the held-out loss of the trained weights (heldout_loss) and of their EMA (heldout_loss_ema)."""
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        scalars = heldout_loss(unet, heldout, noise_scheduler).scalars()
        if ema_model is not None:
            with ema_weights(ema_model, unet):
                scalars.update(heldout_loss(unet, heldout, noise_scheduler).scalars("heldout_loss_ema"))
        accelerator.log(scalars, step=global_step)
        logger.info(f"Step {global_step}: held-out loss {scalars['heldout_loss']:.5f}"
                    + (f", EMA {scalars['heldout_loss_ema']:.5f}" if ema_model is not None else ""))
    accelerator.wait_for_everyone()


def save_preview_grid(
    pipeline: EMOv2ImagePipeline, args: argparse.Namespace, num_labels: Optional[int], path: Path
) -> torch.Tensor:
    """Sample ``--eval_batch_size`` images (seeded, class-conditional previews cycle through the classes), save a grid."""
    class_labels = torch.arange(args.eval_batch_size) % num_labels if num_labels else None
    images = pipeline(
        batch_size=args.eval_batch_size,
        class_labels=class_labels,
        guidance_scale=args.guidance_scale if num_labels else 1.0,
        num_inference_steps=args.ddpm_num_inference_steps,
        generator=torch.Generator(device=pipeline.device).manual_seed(0),
        output_type="pt",
    ).images
    columns = min(num_labels, args.eval_batch_size) if num_labels else math.ceil(math.sqrt(args.eval_batch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=columns)
    return images


def log_preview(accelerator: Accelerator, args: argparse.Namespace, images: torch.Tensor, global_step: int) -> None:
    if args.logger == "tensorboard":
        accelerator.get_tracker("tensorboard", unwrap=True).add_images("samples", images, global_step)
    elif args.logger == "wandb":
        import wandb

        wandb_images = [wandb.Image(image.permute(1, 2, 0).cpu().numpy()) for image in images]
        accelerator.get_tracker("wandb").log({"samples": wandb_images}, step=global_step)


def save_trained_pipeline(
    unet: ModelMixin,
    noise_scheduler: DDPMScheduler,
    null_class_label: Optional[int],
    vae: Optional[AutoencoderKL],
    output_dir: Path,
) -> None:
    """Save the final folder: a `DDPMPipeline` for unconditional pixel-space noise predictors (as the anchor), else
    (class labels, a VAE, a learned-sigma output) an `EMOv2ImagePipeline`, with the VAE as its `vae/`.

    The `EMOv2ImagePipeline` folder also gets the pipeline's source, so that
    `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_emov2_image", trust_remote_code=True)`
    works for users (and hub repos) without emov2_gen's pipelines on their path.
    """
    unconditional = pipeline_emov2_image.class_label_rows(unet) is None
    if unconditional and vae is None and unet.config.out_channels == unet.config.in_channels:
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(output_dir)
        return
    EMOv2ImagePipeline(
        unet=unet, scheduler=noise_scheduler, null_class_label=null_class_label, vae=vae
    ).save_pretrained(output_dir)
    shutil.copyfile(pipeline_emov2_image.__file__, output_dir / "pipeline_emov2_image.py")


# ----------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=7200))],
    )
    configure_logging(accelerator)
    set_seed(args.seed)

    # Data (missing/empty sources raise here, before anything else is built).
    with accelerator.main_process_first():
        dataset, source = load_image_dataset(
            dataset_name=args.dataset_name,
            train_data_dir=args.train_data_dir,
            dataset_config_name=args.dataset_config_name,
            cache_dir=args.cache_dir,
        )
    if args.dataset_name is None and args.train_data_dir is None:
        logger.info(f"No --dataset_name or --train_data_dir: training on {source}, resized to "
                    f"{args.resolution}x{args.resolution}.")
    else:
        logger.info(f"Training data: {source}, {len(dataset)} examples.")
    if args.max_train_samples is not None and args.max_train_samples < len(dataset):
        dataset = dataset.shuffle(seed=args.seed).select(range(args.max_train_samples))
        logger.info(f"--max_train_samples: using {len(dataset)} examples.")
    num_labels = num_classes(dataset) if args.class_conditional else None
    null_class_label = num_labels if num_labels is not None and args.class_dropout_prob > 0 else None
    num_class_embeds = None if num_labels is None else num_labels + (null_class_label is not None)

    # VAE and model (unknown configs and resolutions the VAE or the model cannot downsample raise here).
    vae = None
    if args.vae_name_or_path is None:
        channels = args.in_channels or image_channels(dataset[0]["image"])
        model_channels, sample_size = channels, args.resolution
    else:
        vae = load_vae(args, accelerator.device, VAE_DTYPES.get(accelerator.mixed_precision, torch.float32))
        channels = args.in_channels or vae.config.in_channels
        model_channels, sample_size = latent_shape(vae, channels, args.resolution)
    model = build_model(args, model_channels, sample_size, num_class_embeds)
    heldout = None
    if args.heldout_split is not None:
        heldout = build_heldout_set(args, channels, num_labels is not None, vae, accelerator)
        logger.info(f"Held-out loss: {len(heldout.images)} images of split {args.heldout_split!r} at timesteps "
                    f"{heldout.grid}, every {args.heldout_steps} steps.")
    model_cls = type(model)
    inputs = f"{channels} channel(s), {args.resolution}px" + (
        "" if vae is None else f" -> {model_channels}x{sample_size}x{sample_size} latents of {args.vae_name_or_path}"
    )
    logger.info(f"Model: {model_cls.__name__} ({args.model_config_name_or_path or args.model or DEFAULT_MODEL}), "
                f"{model.num_parameters() / 1e6:.2f}M parameters, {inputs}"
                + (f", {num_labels} classes" if num_labels else "")
                + (f", null class {null_class_label}" if null_class_label is not None else ""))
    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            raise ValueError("xformers is not available; install it or drop --enable_xformers_memory_efficient_attention.")
        model.enable_xformers_memory_efficient_attention()  # EMOv2 models raise NotImplementedError (SEW-MHSA)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()

    # Resume target (a checkpoint of another model raises here).
    resume_checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir, model, MODEL_SUBFOLDER)
    prepare_output_dir(output_dir, resume_checkpoint is not None, args.overwrite_output_dir, accelerator)

    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                             inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=model_cls,
                             model_config=model.config)
        ema_model.to(accelerator.device)

    register_checkpoint_hooks(accelerator, model_cls, MODEL_SUBFOLDER, ema_model)
    clock = TrainingClock()  # logged as train_seconds: the wall-clock axis of the fair comparisons
    accelerator.register_for_checkpointing(clock)
    collapse = LossCollapseDetector(args.collapse_window)
    accelerator.register_for_checkpointing(collapse)

    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        beta_start=args.ddpm_beta_start,
        beta_end=args.ddpm_beta_end,
        prediction_type=args.prediction_type,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    train_dataset = TrainingImageDataset(
        dataset, resolution=args.resolution, channels=channels, center_crop=args.center_crop,
        random_flip=args.random_flip, with_labels=num_labels is not None,
        preserve_input_precision=args.preserve_input_precision,
        seed=derived_seed(args.seed, AUGMENTATION_STREAM),
    )
    shuffle_generator = torch.Generator()
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, generator=shuffle_generator,
        num_workers=args.dataloader_num_workers,
    )
    train_dataloader = accelerator.prepare(train_dataloader)

    # Length of training, in optimiser steps (the data loader is now split over the processes).
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * num_update_steps_per_epoch
    num_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    # Accelerate steps a prepared LR scheduler once per process per optimiser step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(Path(__file__).stem, config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num epochs = {num_epochs}")
    logger.info(f"  Instantaneous batch size per process = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")

    global_step, first_epoch, batches_to_skip = load_resume_state(
        accelerator, resume_checkpoint, num_update_steps_per_epoch, args.gradient_accumulation_steps, max_train_steps
    )

    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_repo(repo_id=args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token,
                              private=args.hub_private_repo).repo_id

    progress_bar = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                        desc="Steps")
    noise_generator = torch.Generator(device=accelerator.device)
    latent_generator = torch.Generator(device=accelerator.device)
    last_sync_time, accumulated_losses = time.perf_counter(), []
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        model.train()
        clock.start()
        shuffle_generator.manual_seed(derived_seed(args.seed, SHUFFLE_STREAM, epoch))
        train_dataloader.set_epoch(epoch)
        skip = batches_to_skip if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            clean_images = batch["images"]
            if vae is not None:  # from here on the "images" are the VAE's scaled latents
                latent_generator.manual_seed(
                    derived_seed(args.seed, LATENT_STREAM, epoch, batch_index, accelerator.process_index)
                )
                clean_images = encode_latents(vae, clean_images, latent_generator)
            batch_size = clean_images.shape[0]
            noise_generator.manual_seed(
                derived_seed(args.seed, NOISE_STREAM, epoch, batch_index, accelerator.process_index)
            )
            noise = torch.randn(clean_images.shape, generator=noise_generator, device=clean_images.device,
                                dtype=clean_images.dtype)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                                      generator=noise_generator, device=clean_images.device)
            class_labels = batch.get("class_labels")
            if class_labels is not None and null_class_label is not None:
                dropped = torch.rand(batch_size, generator=noise_generator, device=clean_images.device)
                class_labels = torch.where(dropped < args.class_dropout_prob, null_class_label, class_labels)
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                # A learned-sigma output ([prediction, variance]) is trained through its prediction half.
                model_output = model(noisy_images, timesteps, class_labels=class_labels).sample
                model_output = model_output[:, : clean_images.shape[1]]
                loss = diffusion_loss(model_output, clean_images, noise, timesteps, noise_scheduler,
                                      args.prediction_type)
                zero_loss = diffusion_loss(torch.zeros_like(model_output), clean_images, noise, timesteps,
                                           noise_scheduler, args.prediction_type)  # the collapse check's scale
                gathered = accelerator.gather(torch.stack([loss.detach(), zero_loss]).reshape(1, 2))  # process x 2
                if not torch.isfinite(gathered[:, 0]).all():
                    checkpoints = list_checkpoints(output_dir)
                    accelerator.end_training()
                    raise NonFiniteLossError(
                        f"The loss became {gathered[:, 0].tolist()} at epoch {epoch}, batch {batch_index} (optimiser "
                        f"step {global_step + 1}); training stopped before this update. The last good checkpoint is "
                        f"{checkpoints[-1] if checkpoints else 'none (no checkpoint was saved yet)'}. Lower "
                        "--learning_rate, check the data or the mixed precision, then resume with "
                        "--resume_from_checkpoint latest."
                    )
                accumulated_losses.append(gathered.mean(dim=0))  # (loss, zero-prediction loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(model.parameters())
                global_step += 1
                progress_bar.update(1)
                now = time.perf_counter()
                mean_loss, mean_zero_loss = torch.stack(accumulated_losses).mean(dim=0).tolist()
                logs = {
                    "loss": mean_loss,
                    "lr": lr_scheduler.get_last_lr()[0],
                    "step": global_step,
                    "epoch": epoch,
                    "images_per_second": batch_size * accelerator.num_processes * len(accumulated_losses)
                    / (now - last_sync_time),
                    "train_seconds": clock.elapsed,
                }
                if ema_model is not None:
                    logs["ema_decay"] = ema_model.cur_decay_value
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=global_step)
                if collapse.update(mean_loss, mean_zero_loss):
                    accelerator.end_training()
                    raise LossCollapseError(collapse.message(global_step))
                accumulated_losses = []
                clock.stop()
                if heldout is not None and (global_step % args.heldout_steps == 0 or global_step >= max_train_steps):
                    log_heldout_loss(accelerator, model, ema_model, heldout, noise_scheduler, global_step)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
                clock.start()
                last_sync_time = time.perf_counter()
                if global_step >= max_train_steps:
                    break

        clock.stop()
        last_epoch = epoch == num_epochs - 1 or global_step >= max_train_steps
        if accelerator.is_main_process:
            unet = accelerator.unwrap_model(model)
            if (epoch + 1) % args.save_images_epochs == 0 or last_epoch:
                scheduler = EVAL_SCHEDULERS[args.eval_scheduler].from_config(noise_scheduler.config)
                pipeline = EMOv2ImagePipeline(unet=unet, scheduler=scheduler, null_class_label=null_class_label,
                                              vae=vae)
                pipeline.set_progress_bar_config(disable=True)
                unet.eval()
                with ema_weights(ema_model, unet):
                    grid_path = output_dir / "samples" / f"epoch_{epoch:04d}_step_{global_step:07d}.png"
                    images = save_preview_grid(pipeline, args, num_labels, grid_path)
                unet.train()
                log_preview(accelerator, args, images, global_step)
                logger.info(f"Saved sample grid {grid_path}")
            if (epoch + 1) % args.save_model_epochs == 0 or last_epoch:
                with ema_weights(ema_model, unet):
                    save_trained_pipeline(unet, noise_scheduler, null_class_label, vae, output_dir)
                logger.info(f"Saved pipeline to {output_dir}" + (" (EMA weights)" if ema_model is not None else ""))
                if repo_id is not None:
                    upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=f"Epoch {epoch}",
                                  ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".checkpoint-*"],
                                  token=args.hub_token)
        accelerator.wait_for_everyone()

    progress_bar.close()
    accelerator.end_training()


if __name__ == "__main__":
    exit_on_divergence(lambda: main(parse_args()))
