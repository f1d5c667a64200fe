#!/usr/bin/env python
"""Train an `EMOv2UNetForSegmentation` (U-EMOv2, its mobile presets, or the plain-conv UNet baseline) with Accelerate.

The recipe follows the paper's mmseg HRF config: random rescale (0.5-2x) -> random crop -> flip ->
photometric distortion, AdamW (lr 1.2e-4, betas 0.9/0.999, weight decay 0.05 except on norms, biases and
layer scales), linear warm-up then cosine decay, gradient clipping, sliding-window validation scored with
mmseg's IoUMetric (aAcc, mIoU, mDice, mAcc, per-class Dice/IoU, vessel Dice). Loss: cross-entropy +
Dice on the decode head, cross-entropy x 0.4 on the auxiliary head (the model's config; the paper used
CE only, `--dice_loss_weight 0`). The trained model is saved as an `EMOv2SegmentationPipeline`
(`save_pretrained`: `model_index.json` + `model/`) that segments with the training crop, and the final
validation scores go to `eval_results.json`, with every periodic validation's scores (`validation_history`) and,
with `--num_synthetic_test`, the scores on held-out synthetic test fundi that took no part in model selection.

    accelerate launch train/train_seg.py --preset unet-emov2-1m --synthetic_size 128 128 --crop_size 64 \
        --ratio_range 1 1 --learning_rate 1e-2 --lr_warmup_steps 60 --max_grad_norm 1 --max_train_steps 600
    accelerate launch train/train_seg.py --train_data_dir HRF --hrf_mmseg_split --preset unet-emov2-paper
    accelerate launch train/train_seg.py --train_data_dir DRIVE/training --layout drive \
        --validation_data_dir DRIVE/test --crop_size 64
    accelerate launch train/train_seg.py --dataset_name org/vessels --validation_split test
    accelerate launch --multi_gpu --num_processes 4 train/train_seg.py ...   # batch 8 per GPU, as the paper

Without data flags it trains on synthetic fundus images (offline); the first command is the CPU-sized recipe
of `eval/seg_benchmark.py` (the paper's lr 1.2e-4 and random rescale need thousands of steps). Every random
draw is a function of `--seed` and the position in training (the epoch's shuffle of (seed, epoch), a sample's
augmentation of (seed, epoch, index)), so `--resume_from_checkpoint` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from emov2_gen import EMOv2UNetForSegmentation
from emov2_gen.data.segmentation_datasets import (
    SEGMENTATION_LAYOUTS,
    SegmentationDataset,
    build_train_transform,
    hrf_mmseg_split,
    load_segmentation_dataset,
)
from emov2_gen.data.synthetic_vessels import SyntheticVesselDataset
from emov2_gen.data.training_images import derived_seed
from emov2_gen.evaluation.segmentation_metrics import SegmentationMetric, SegmentationScores
from emov2_gen.models.segmentation import SEGMENTATION_PRESETS
from emov2_gen.pipelines.pipeline_emov2_segmentation import EMOv2SegmentationPipeline
from emov2_gen.training_utils import (
    add_checkpoint_arguments,
    check_checkpoint_arguments,
    check_positive,
    configure_logging,
    ema_weights,
    exit_on_divergence,
    load_resume_state,
    prepare_output_dir,
    register_checkpoint_hooks,
    resolve_resume_checkpoint,
    save_checkpoint,
)

logger = get_logger(__name__, log_level="INFO")

DEFAULT_PRESET = "unet-emov2-5m"
MODEL_SUBFOLDER = "model"
RESULTS_FILE = "eval_results.json"
SHUFFLE_STREAM, AUGMENTATION_STREAM = 0, 1  # independent random streams derived from --seed


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (default: synthetic fundus images)")
    data.add_argument("--train_data_dir", type=str, default=None, help="A folder of image/mask(/FOV) files (see --layout).")
    data.add_argument("--validation_data_dir", type=str, default=None, help="A folder like --train_data_dir to validate on.")
    data.add_argument("--layout", type=str, default="hrf", choices=sorted(SEGMENTATION_LAYOUTS),
                      help="File layout of the data folders (the public archives' layouts).")
    data.add_argument("--hrf_mmseg_split", action="store_true",
                      help="Split one HRF folder as mmseg does: images 01-05 of each group train, 06-15 validate.")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A `datasets` data set (hub name or local directory) with image and mask columns.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_split", type=str, default="train")
    data.add_argument("--validation_split", type=str, default=None, help="The --dataset_name split to validate on.")
    data.add_argument("--image_column", type=str, default=None)
    data.add_argument("--mask_column", type=str, default=None)
    data.add_argument("--fov_column", type=str, default=None)
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--num_synthetic_train", type=int, default=20, help="Synthetic training images.")
    data.add_argument("--num_synthetic_validation", type=int, default=5, help="Synthetic validation images.")
    data.add_argument("--num_synthetic_test", type=int, default=0,
                      help="Synthetic test images (split 'test') scored once after training, apart from the validation "
                           "images that select learning rates or checkpoints; 0: none. Synthetic training data only.")
    data.add_argument("--synthetic_size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    data.add_argument("--crop_size", type=int, default=256, help="Square training crop (and validation window).")
    data.add_argument("--scale", type=int, nargs=2, default=None, metavar=("W", "H"),
                      help="Base size of the random rescale; default: the layout's (folders) or the first image's size.")
    data.add_argument("--ratio_range", type=float, nargs=2, default=(0.5, 2.0), help="Random rescale range around --scale.")
    data.add_argument("--flip_prob", type=float, default=0.5)
    data.add_argument("--no_photometric", action="store_true", help="Skip the photometric distortion.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--preset", type=str, default=None, choices=sorted(SEGMENTATION_PRESETS), metavar="PRESET",
                       help=f"Model preset (default {DEFAULT_PRESET}): {', '.join(sorted(SEGMENTATION_PRESETS))}.")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A config.json (or its folder) of an EMOv2UNetForSegmentation instead of a preset.")
    model.add_argument("--num_classes", type=int, default=2, help="Classes including background (vessel data: 2).")
    model.add_argument("--backbone_checkpoint", type=str, default=None,
                       help="Official EMOv2 ImageNet weights (.pth) for an EMOv2-encoder preset (emov2-*-unet).")
    model.add_argument("--dice_loss_weight", type=float, default=None, help="Override the model's Dice weight (3.0).")
    model.add_argument("--auxiliary_loss_weight", type=float, default=None, help="Override the model's aux CE weight (0.4).")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute the i2RMB stacks in the backward pass: less memory, slower steps.")

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="seg-emov2")
    training.add_argument("--overwrite_output_dir", action="store_true",
                          help="Start afresh in an output_dir that already holds a run (deletes its checkpoints).")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--train_batch_size", type=int, default=8, help="Batch size per process.")
    training.add_argument("--max_train_steps", type=int, default=2000, help="Optimiser steps (the paper: 40000).")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--learning_rate", type=float, default=1.2e-4)
    training.add_argument("--lr_scheduler", type=str, default="cosine", help="diffusers `get_scheduler` name.")
    training.add_argument("--lr_warmup_steps", type=int, default=500)
    training.add_argument("--adam_beta1", type=float, default=0.9)
    training.add_argument("--adam_beta2", type=float, default=0.999)
    training.add_argument("--adam_weight_decay", type=float, default=0.05, help="Not applied to norms, biases, layer scales.")
    training.add_argument("--adam_epsilon", type=float, default=1e-8)
    training.add_argument("--max_grad_norm", type=float, default=0.1, help="Gradient clipping (L2), the paper's 0.1.")
    training.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; validate and save it.")
    training.add_argument("--ema_max_decay", type=float, default=0.999)
    training.add_argument("--ema_power", type=float, default=2 / 3, help="EMA warm-up power (diffusers EMAModel).")
    training.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"))

    evaluation = parser.add_argument_group("validation")
    evaluation.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (and at the end).")
    evaluation.add_argument("--eval_stride", type=int, default=None, help="Sliding-window stride (default 2/3 of the crop).")
    evaluation.add_argument("--eval_windows_per_batch", type=int, default=8)
    evaluation.add_argument("--score_inside_fov", action="store_true",
                            help="Score only pixels inside the field of view (vessel literature); mmseg scores all.")

    saving = parser.add_argument_group("checkpoints and logging")
    add_checkpoint_arguments(saving)

    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent flags before anything is loaded."""
    if args.preset is not None and args.model_config_name_or_path is not None:
        raise ValueError("Pass either --preset or --model_config_name_or_path, not both.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("Pass either --dataset_name or --train_data_dir, not both.")
    if args.hrf_mmseg_split and (args.train_data_dir is None or args.validation_data_dir is not None or args.layout != "hrf"):
        raise ValueError("--hrf_mmseg_split splits one --train_data_dir in the hrf layout; drop --validation_data_dir.")
    if args.validation_data_dir is not None and args.train_data_dir is None:
        raise ValueError("--validation_data_dir goes with --train_data_dir.")
    if args.validation_split is not None and args.dataset_name is None:
        raise ValueError("--validation_split goes with --dataset_name.")
    check_positive(args, ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "crop_size",
                          "validation_steps", "eval_windows_per_batch", "num_synthetic_train", "num_synthetic_validation"))
    if args.num_synthetic_test < 0:
        raise ValueError(f"--num_synthetic_test must be at least 0, got {args.num_synthetic_test}.")
    if args.num_synthetic_test and (args.train_data_dir is not None or args.dataset_name is not None):
        raise ValueError("--num_synthetic_test scores synthetic test fundi; it goes with synthetic training data "
                         "(no --train_data_dir or --dataset_name).")
    if args.eval_stride is not None and not 1 <= args.eval_stride <= args.crop_size:
        raise ValueError(f"--eval_stride must lie in [1, --crop_size], got {args.eval_stride}.")
    check_checkpoint_arguments(args)


# ----------------------------------------------------------------------------------------------- data


def load_samples(args: argparse.Namespace) -> tuple[Any, Optional[Any], Optional[Any], str]:
    """Raw training, validation and test samples (rows `{"image", "mask"[, "fov"]}`; test: None unless
    --num_synthetic_test) and a description of the source."""
    common = dict(dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir, image_column=args.image_column,
                  mask_column=args.mask_column, fov_column=args.fov_column, layout=args.layout, seed=args.seed,
                  synthetic_size=tuple(args.synthetic_size))
    train, source = load_segmentation_dataset(args.dataset_name, args.train_data_dir, split=args.train_split,
                                              num_synthetic_samples=args.num_synthetic_train, **common)
    validation = None
    if args.hrf_mmseg_split:
        train, validation = hrf_mmseg_split(train, "train"), hrf_mmseg_split(train, "validation")
    elif args.validation_data_dir is not None or args.validation_split is not None:
        validation, _ = load_segmentation_dataset(args.dataset_name, args.validation_data_dir,
                                                  split=args.validation_split or "validation", **common)
    elif isinstance(train, SyntheticVesselDataset):
        validation, _ = load_segmentation_dataset(split="validation", num_synthetic_samples=args.num_synthetic_validation,
                                                  **common)
    test = None
    if args.num_synthetic_test:  # check_args allows it with synthetic training data only
        test, _ = load_segmentation_dataset(split="test", num_synthetic_samples=args.num_synthetic_test, **common)
    if isinstance(train, SyntheticVesselDataset):  # generated on the fly: keep the few samples in memory
        train, validation = ([samples[i] for i in range(len(samples))] for samples in (train, validation))
        test = [test[i] for i in range(len(test))] if test is not None else None
    return train, validation, test, source


class SeededAugmentation(torch.utils.data.Dataset):
    """`dataset[i]` with torch's global RNG seeded by (seed, epoch, i) for the call: augmentations are reproducible
    whichever process or worker loads the sample, so a resumed run sees exactly those of an uninterrupted one."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def random_resize_scale(args: argparse.Namespace, samples: Any) -> tuple[int, int]:
    """The (W, H) base of the random rescale: --scale, else the folder layout's, else the first image's size."""
    if args.scale is not None:
        return tuple(args.scale)
    if args.train_data_dir is not None and SEGMENTATION_LAYOUTS[args.layout].scale is not None:
        return SEGMENTATION_LAYOUTS[args.layout].scale
    height, width = SegmentationDataset(samples)[0]["pixel_values"].shape[-2:]
    return width, height


# ----------------------------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace) -> EMOv2UNetForSegmentation:
    overrides = {k: v for k, v in (("dice_loss_weight", args.dice_loss_weight),
                                   ("auxiliary_loss_weight", args.auxiliary_loss_weight)) if v is not None}
    overrides["num_classes"] = args.num_classes
    if args.model_config_name_or_path is not None:
        config = EMOv2UNetForSegmentation.load_config(args.model_config_name_or_path)
        model = EMOv2UNetForSegmentation.from_config(config, **overrides)
        if args.backbone_checkpoint is not None:
            model.load_backbone_checkpoint(args.backbone_checkpoint)
        return model
    return EMOv2UNetForSegmentation.from_preset(args.preset or DEFAULT_PRESET, backbone_checkpoint=args.backbone_checkpoint,
                                                **overrides)


def optimizer_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: norms, biases and layer scales (all 1-D) are not decayed."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    undecayed = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------- validation


def evaluate(pipeline: EMOv2SegmentationPipeline, samples: Any, score_inside_fov: bool, windows_per_batch: int) -> SegmentationScores:
    """Sliding-window segmentation of every validation image, scored over the whole set (mmseg IoUMetric)."""
    model = pipeline.model
    metric = SegmentationMetric(model.config.num_classes, model.config.ignore_index)
    was_training = model.training
    model.eval()
    for item in SegmentationDataset(samples, use_fov=score_inside_fov):
        probabilities = pipeline(item["pixel_values"], windows_per_batch=windows_per_batch, output_type="pt").probabilities[0]
        metric.update(probabilities[None].cpu(), item["labels"][None], item["fov"][None] if "fov" in item else None)
    model.train(was_training)
    return metric.compute()


def score_logs(scores: SegmentationScores, prefix: str = "val") -> dict[str, float]:
    logs = {f"{prefix}/{k}": v for k, v in scores.to_percent_dict().items()}
    logs.update({f"{prefix}/dice_class{c}": round(float(d) * 100, 2) for c, d in enumerate(scores.per_class_dice)})
    logs.update({f"{prefix}/iou_class{c}": round(float(d) * 100, 2) for c, d in enumerate(scores.per_class_iou)})
    return logs


# ----------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    configure_logging(accelerator)
    set_seed(args.seed)

    # Data (missing/empty/unpaired sources raise here).
    with accelerator.main_process_first():
        train_samples, validation_samples, test_samples, source = load_samples(args)
    scale = random_resize_scale(args, train_samples)
    transform = build_train_transform(scale, args.crop_size, tuple(args.ratio_range), args.flip_prob, not args.no_photometric)
    train_dataset = SeededAugmentation(SegmentationDataset(train_samples, transform, use_fov=False),
                                       derived_seed(args.seed, AUGMENTATION_STREAM))
    per_step = args.train_batch_size * accelerator.num_processes
    if len(train_dataset) < per_step:
        raise ValueError(f"{len(train_dataset)} training images cannot fill a batch of {args.train_batch_size} per process "
                         f"on {accelerator.num_processes} process(es); lower --train_batch_size.")
    logger.info(f"Training data: {source}, {len(train_dataset)} images, random rescale around {scale} (W, H) x "
                f"{tuple(args.ratio_range)}, {args.crop_size}px crops; validation: "
                f"{len(validation_samples) if validation_samples is not None else 'none'} images"
                f"{f', test: {len(test_samples)} images' if test_samples is not None else ''}.")

    model = build_model(args)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    logger.info(f"Model: {args.model_config_name_or_path or args.preset or DEFAULT_PRESET}, "
                f"{model.num_parameters() / 1e6:.3f}M parameters")

    resume_checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir, model, MODEL_SUBFOLDER)
    prepare_output_dir(output_dir, resume_checkpoint is not None, args.overwrite_output_dir, accelerator)

    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, power=args.ema_power,
                             model_cls=EMOv2UNetForSegmentation, model_config=model.config)
        ema_model.to(accelerator.device)
    register_checkpoint_hooks(accelerator, EMOv2UNetForSegmentation, MODEL_SUBFOLDER, ema_model)

    optimizer = torch.optim.AdamW(optimizer_parameter_groups(model, args.adam_weight_decay), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    shuffle_generator = torch.Generator()
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, generator=shuffle_generator, drop_last=True,
        num_workers=args.dataloader_num_workers,
    )
    train_dataloader = accelerator.prepare(train_dataloader)
    updates_per_epoch = max(len(train_dataloader) // args.gradient_accumulation_steps, 1)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    # Accelerate steps a prepared LR scheduler once per process per optimiser step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers(Path(__file__).stem, config={k: v for k, v in vars(args).items()
                                                                 if isinstance(v, (int, float, str, bool))})

    logger.info("***** Running training *****")
    logger.info(f"  Total batch size = {per_step * args.gradient_accumulation_steps}, steps = {args.max_train_steps}, "
                f"epochs = {num_epochs} of {updates_per_epoch} steps")
    global_step, first_epoch, batches_to_skip = load_resume_state(
        accelerator, resume_checkpoint, updates_per_epoch, args.gradient_accumulation_steps, args.max_train_steps
    )

    unwrapped = accelerator.unwrap_model(model)
    pipeline = EMOv2SegmentationPipeline(unwrapped, crop_size=args.crop_size, stride=args.eval_stride)
    pipeline.set_progress_bar_config(disable=True)

    # Scores of every validation in this process (a resumed run lists those since the resume), for Dice-vs-steps plots.
    validation_history: list[dict[str, float]] = []

    def validate(samples: Optional[Any] = validation_samples, prefix: str = "val") -> Optional[SegmentationScores]:
        if samples is None or not accelerator.is_main_process:
            return None
        with ema_weights(ema_model, unwrapped):
            scores = evaluate(pipeline, samples, args.score_inside_fov, args.eval_windows_per_batch)
        accelerator.log(score_logs(scores, prefix), step=global_step)
        logger.info(f"step {global_step} ({prefix}): " + ", ".join(f"{k} {v}" for k, v in scores.to_percent_dict().items()))
        if prefix == "val":
            validation_history.append({"step": global_step, **scores.to_percent_dict()})
        return scores

    progress_bar = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                        desc="Steps")
    train_start, losses = time.perf_counter(), []
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        model.train()
        shuffle_generator.manual_seed(derived_seed(args.seed, SHUFFLE_STREAM, epoch))
        train_dataloader.set_epoch(epoch)
        skip = batches_to_skip if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(batch["pixel_values"], labels=batch["labels"]).loss
                gathered = accelerator.gather(loss.detach().reshape(1))
                if not torch.isfinite(gathered).all():
                    raise FloatingPointError(
                        f"The loss became {gathered.tolist()} at step {global_step + 1}; training stopped before this "
                        "update. Lower --learning_rate or check the data, then --resume_from_checkpoint latest."
                    )
                losses.append(gathered.mean())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if ema_model is not None:
                ema_model.step(model.parameters())
            global_step += 1
            progress_bar.update(1)
            logs = {"loss": torch.stack(losses).mean().item(), "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
            losses = []
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                validate()
            if global_step >= args.max_train_steps:
                break
    progress_bar.close()
    train_seconds = time.perf_counter() - train_start

    results: dict[str, Any] = {}
    scores = validate()
    test_scores = validate(test_samples, "test")
    if accelerator.is_main_process:
        with ema_weights(ema_model, unwrapped):
            pipeline.save_pretrained(output_dir)
        results = {
            "model": args.model_config_name_or_path or args.preset or DEFAULT_PRESET,
            "parameters": unwrapped.num_parameters(),
            "steps": global_step,
            "train_seconds_this_run": round(train_seconds, 1),
            "data": source,
            "scores": scores.to_percent_dict() if scores is not None else None,
            "per_class_dice": [round(float(d) * 100, 2) for d in scores.per_class_dice] if scores is not None else None,
            "per_class_iou": [round(float(d) * 100, 2) for d in scores.per_class_iou] if scores is not None else None,
            "validation_history": validation_history,
            "test_scores": test_scores.to_percent_dict() if test_scores is not None else None,
        }
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        logger.info(f"Saved the pipeline{' (EMA weights)' if ema_model else ''} and {RESULTS_FILE} to {output_dir}")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    exit_on_divergence(lambda: main(parse_args()))
