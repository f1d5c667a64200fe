"""Helpers for tests that run the training scripts in this process: loading a script, running it, reading its output."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from emov2_gen.evaluation.training_logs import read_scalars


def load_script(path: Path) -> ModuleType:
    """Import a script (e.g. train/train_seg.py) as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses (and pickling) look their module up by name
    spec.loader.exec_module(module)
    return module


def run_script(script: ModuleType, argv: list[str]):
    """`script.main(script.parse_args(argv))`, leaving no Accelerate state behind for the next run."""
    try:
        return script.main(script.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


class Interrupted(Exception):
    """A run stopped right after a checkpoint, as a crash or a killed job would stop it."""


def run_until_checkpoint(script: ModuleType, argv: list[str], step: int, monkeypatch) -> None:
    """Run `script` until it has written checkpoint `step`, then stop it there (raising nothing to the caller)."""
    save_checkpoint = script.save_checkpoint

    def save_then_interrupt(accelerator, output_dir, global_step, total_limit):
        save_checkpoint(accelerator, output_dir, global_step, total_limit)
        if global_step == step:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(script, "save_checkpoint", save_then_interrupt)
        try:
            run_script(script, argv)
        except Interrupted:
            return
    raise AssertionError(f"The run ended without writing checkpoint {step}.")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def checkpoint_names(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint-")))


def tensorboard_scalars(logging_dir: Path) -> dict[str, list[float]]:
    """Every scalar logged under `logging_dir`, by tag, in step order."""
    return {tag: [value for _, value in events] for tag, events in read_scalars(logging_dir).items()}
