"""Run management shared by the Accelerate training scripts: logging, resumable checkpoints, output folders, EMA swaps.

A run writes `checkpoint-<step>` folders with `Accelerator.save_state`; the model (and its EMA copy) go in
diffusers format into the sub-folders `<model_subfolder>/` and `<model_subfolder>_ema/` (via the hooks of
`register_checkpoint_hooks`), so a checkpoint's model also loads with `from_pretrained(..., subfolder=...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import diffusers
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.models.modeling_utils import ModelMixin
from diffusers.training_utils import EMAModel
from diffusers.utils import is_tensorboard_available, is_wandb_available

logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# A training script's exit status when its run diverged (a NaN/infinite loss, or a collapse: see
# `LossCollapseDetector`): how a sweep (eval/fair_compare.py, eval/seg_benchmark.py) tells a learning rate too high for
# a model from a broken run.
DIVERGED_EXIT_CODE = 3


class LossCollapseError(RuntimeError):
    """The training loss climbed back to the loss of predicting zeros: the model forgot what it had learned."""


def exit_on_divergence(main: Callable[[], Any]) -> None:
    """Run a training script's `main`; a `FloatingPointError` (the scripts' non-finite-loss stop) or a
    `LossCollapseError` prints its traceback and ends the process with `DIVERGED_EXIT_CODE`. Any other error
    propagates as usual."""
    try:
        main()
    except (FloatingPointError, LossCollapseError):
        traceback.print_exc()
        sys.exit(DIVERGED_EXIT_CODE)


class LossCollapseDetector:
    """Tells when a denoiser's run has collapsed: its training loss is back at the loss of predicting zeros.

    A learning rate at the edge of stability can ruin a run without a NaN. At seed 1, unet2d-5m at lr 3e-3 trained to
    a loss of 0.07, then within a few steps jumped to about 1.0 (what predicting zero noise scores) and stayed there:
    700 steps later it was 0.94, and a sweep would have spent the rest of its 5000 steps on it. The detector keeps the
    last `window` optimiser steps' losses and, on the same batches, the loss of an all-zero prediction (the scale of
    the objective, whatever the prediction type). A run has *learned* once a window's mean loss is at most
    `learned_fraction` of the zero prediction's, and has *collapsed* when a later window's mean is at least
    `collapsed_fraction` of it. Learning first is required, so a slow start never counts; a spike that passes within a
    window does not count either. `window` 0 turns the check off. Registered for checkpointing, so a resumed run
    remembers that it had learned.
    """

    def __init__(self, window: int, learned_fraction: float = 0.5, collapsed_fraction: float = 0.9) -> None:
        self.window, self.learned_fraction, self.collapsed_fraction = window, learned_fraction, collapsed_fraction
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        self.lowest_ratio = math.inf

    @property
    def ratio(self) -> float:
        """The last window's mean loss over the mean loss of a zero prediction on the same batches."""
        losses, zero_losses = zip(*self.recent)
        return sum(losses) / sum(zero_losses)

    def update(self, loss: float, zero_prediction_loss: float) -> bool:
        """Record one optimiser step; True when the run has collapsed."""
        if not self.window:
            return False
        self.recent.append((loss, zero_prediction_loss))
        if len(self.recent) < self.window:
            return False
        self.lowest_ratio = min(self.lowest_ratio, self.ratio)
        return self.lowest_ratio <= self.learned_fraction and self.ratio >= self.collapsed_fraction

    def message(self, global_step: int) -> str:
        return (
            f"The training loss collapsed at optimiser step {global_step}: over the last {self.window} steps it is "
            f"{self.ratio:.0%} of the loss of predicting zeros, after it had been down to {self.lowest_ratio:.0%}. The "
            "model has forgotten what it learned, usually because the learning rate is at the edge of stability: "
            "lower --learning_rate and start again (checkpoints from the last steps may hold the collapsed model). "
            "--collapse_window 0 turns this check off."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "lowest_ratio": self.lowest_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=self.window)
        self.lowest_ratio = float(state["lowest_ratio"])


def add_checkpoint_arguments(group: argparse._ArgumentGroup) -> None:
    """The checkpoint/resume/tracker flags this module implements, shared by the training scripts."""
    group.add_argument("--checkpointing_steps", type=int, default=500,
                       help="Save a resumable training state every N optimiser steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='"latest" (in output_dir; starts afresh if there is none) or a checkpoint path/name.')
    group.add_argument("--logger", type=str, default="tensorboard", choices=("tensorboard", "wandb"))
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to output_dir.")


def check_checkpoint_arguments(args: argparse.Namespace) -> None:
    """Reject the flags of `add_checkpoint_arguments` that cannot work: bad counts, a tracker that is not installed."""
    check_positive(args, ("checkpointing_steps", "checkpoints_total_limit"))
    if args.logger == "wandb" and not is_wandb_available():
        raise ImportError("--logger wandb needs wandb: pip install wandb.")
    if args.logger == "tensorboard" and not is_tensorboard_available():
        raise ImportError("--logger tensorboard needs tensorboard: pip install tensorboard.")


def check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Reject any of the integer flags `names` that is below 1 (None means unset and passes)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")


def configure_logging(accelerator: Accelerator) -> None:
    """INFO logging with timestamps; library chatter (datasets, diffusers) only from the local main process."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def checkpoint_step(path: Path) -> int:
    """The optimiser step a `checkpoint-<step>` folder was written at."""
    return int(CHECKPOINT_PATTERN.fullmatch(path.name).group(1))


def load_resume_state(
    accelerator: Accelerator,
    checkpoint: Optional[Path],
    updates_per_epoch: int,
    gradient_accumulation_steps: int,
    max_train_steps: int,
) -> tuple[int, int, int]:
    """Load `checkpoint`'s training state (if any); return (global_step, first_epoch, batches_to_skip).

    The position is exact: the run continues mid-epoch by skipping the batches already consumed in it.
    """
    if checkpoint is None:
        return 0, 0, 0
    logger.info(f"Resuming from {checkpoint}")
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:
        raise RuntimeError(
            f"Could not load the training state in {checkpoint} ({type(error).__name__}: {error}). The checkpoint is "
            "incomplete or corrupt, or was written by another version of the script (train_ddpm.py checkpoints from "
            "before its loss-collapse check kept its state hold one training-state object fewer). Resume from "
            "another checkpoint, or start afresh with --overwrite_output_dir."
        ) from error
    global_step = checkpoint_step(checkpoint)
    first_epoch, updates_into_epoch = divmod(global_step, updates_per_epoch)
    if global_step >= max_train_steps:
        logger.info(f"The checkpoint is at step {global_step} >= {max_train_steps} steps; nothing to train.")
    return global_step, first_epoch, updates_into_epoch * gradient_accumulation_steps


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete `checkpoint-<step>` folders in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.fullmatch(path.name)]
    return sorted(found, key=checkpoint_step)


def resolve_resume_checkpoint(
    resume_from: Optional[str], output_dir: Path, model: ModelMixin, model_subfolder: str
) -> Optional[Path]:
    """The checkpoint to resume `model` from: None for a fresh run, the newest for "latest", else the named folder.

    A name is looked up as a path, then inside `output_dir`; anything that is not a `checkpoint-<step>`
    folder holding `<model_subfolder>/config.json`, or one saved from another model, raises.
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run.")
            return None
        path = checkpoints[-1]
    else:
        path = Path(resume_from)
        if not path.is_dir():
            path = output_dir / resume_from
        if not path.is_dir():
            raise FileNotFoundError(f"Checkpoint {resume_from!r} does not exist (also looked in {output_dir}).")
        if not CHECKPOINT_PATTERN.fullmatch(path.name) or not (path / model_subfolder / "config.json").is_file():
            raise ValueError(
                f"{path} is not a training checkpoint (a checkpoint-<step> folder with {model_subfolder}/config.json)."
            )
    check_checkpoint_matches(path, model, model_subfolder)
    return path


def config_differences(model: ModelMixin, config_file: Path) -> list[str]:
    """The entries in which a saved `config.json` differs from `model`'s config (class name included)."""
    saved = json.loads(config_file.read_text())
    differences = []
    if saved.get("_class_name") != type(model).__name__:
        differences.append(f"class: saved {saved.get('_class_name')!r}, current {type(model).__name__!r}")
    current = json.loads(json.dumps(dict(model.config)))  # tuples -> lists, as in the saved file
    for key in sorted(set(current) | set(saved)):
        if not key.startswith("_") and current.get(key) != saved.get(key):
            differences.append(f"{key}: saved {saved.get(key)!r}, current {current.get(key)!r}")
    return differences


def check_checkpoint_matches(checkpoint: Path, model: ModelMixin, model_subfolder: str) -> None:
    """Refuse to resume a checkpoint written for another model (class or any config entry)."""
    differences = config_differences(model, checkpoint / model_subfolder / "config.json")
    if differences:
        raise ValueError(
            f"{checkpoint} was saved from another model than the one these flags build:\n  "
            + "\n  ".join(differences)
            + "\nResume with the same model and data flags, or start a new run."
        )


def prepare_output_dir(output_dir: Path, resuming: bool, overwrite: bool, accelerator: Accelerator) -> None:
    """Create `output_dir`; refuse to mix a new run into one holding another run unless `overwrite` (then prune it)."""
    previous = list_checkpoints(output_dir)
    has_saved_run = (output_dir / "model_index.json").is_file()
    if not resuming and (previous or has_saved_run):
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} already holds a training run ({len(previous)} checkpoint(s)"
                f"{', a saved pipeline' if has_saved_run else ''}). Pass --resume_from_checkpoint latest to "
                "continue it, --overwrite_output_dir to start afresh, or another --output_dir."
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for checkpoint in previous:
                shutil.rmtree(checkpoint)
            logger.info(f"--overwrite_output_dir: deleted {len(previous)} checkpoint(s) of the previous run.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, global_step: int, total_limit: Optional[int]) -> Path:
    """Write `checkpoint-<step>` atomically (a temporary folder, then a rename), then prune to `total_limit`.

    Older checkpoints are deleted only once the new one is complete, so a crash never loses the last good one.
    """
    final = output_dir / f"checkpoint-{global_step}"
    partial = output_dir / f".checkpoint-{global_step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        checkpoints = list_checkpoints(output_dir)
        if total_limit is not None and len(checkpoints) > total_limit:
            for old in checkpoints[: len(checkpoints) - total_limit]:
                shutil.rmtree(old)
            logger.info(f"Removed {len(checkpoints) - total_limit} old checkpoint(s) (--checkpoints_total_limit).")
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def register_checkpoint_hooks(
    accelerator: Accelerator, model_cls: type[ModelMixin], model_subfolder: str, ema_model: Optional[EMAModel] = None
) -> None:
    """Make `save_state`/`load_state` store the model (and EMA) with `save_pretrained` in `<model_subfolder>[_ema]/`."""

    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(checkpoint_dir, f"{model_subfolder}_ema"))
            for saved in models:
                accelerator.unwrap_model(saved).save_pretrained(os.path.join(checkpoint_dir, model_subfolder))
        weights.clear()  # saved in diffusers format above, not again by accelerate

    def load_model_hook(models, checkpoint_dir):
        if ema_model is not None:
            loaded_ema = EMAModel.from_pretrained(os.path.join(checkpoint_dir, f"{model_subfolder}_ema"), model_cls)
            ema_model.load_state_dict(loaded_ema.state_dict())
            ema_model.to(accelerator.device)
        while models:
            loaded = model_cls.from_pretrained(checkpoint_dir, subfolder=model_subfolder)
            accelerator.unwrap_model(models.pop()).load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


@contextlib.contextmanager
def ema_weights(ema_model: Optional[EMAModel], model: ModelMixin) -> Iterator[None]:
    """Temporarily load the EMA weights into `model` (a no-op without EMA)."""
    if ema_model is None:
        yield
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield
    finally:
        ema_model.restore(model.parameters())


class TrainingClock:
    """Seconds spent training, with evaluation, previews and checkpointing left out (`stop` around them).

    Registered with `accelerator.register_for_checkpointing`, so a resumed run continues its count: the
    wall-clock axis of the fair comparisons (held-out loss vs training time) survives interruptions.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: Optional[float] = None

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    @property
    def elapsed(self) -> float:
        """Seconds counted so far, the running stretch included."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.seconds + running

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.elapsed}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.seconds, self._started = float(state["seconds"]), None
