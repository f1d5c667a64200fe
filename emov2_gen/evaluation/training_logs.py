"""Read the scalars a training run logged to tensorboard, and summarise or plot them side by side.

The training scripts log through Accelerate's tensorboard tracker under `<output_dir>/logs`; one run may hold
several event files (a resumed run adds one per launch), which are merged here by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def read_scalars(logging_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under `logging_dir` (searched recursively), by tag, as (step, value) pairs sorted by step.

    Where a resumed run logged a step twice, the later event file's value wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging_dir = Path(logging_dir)
    event_files = sorted(logging_dir.rglob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime)
    if not event_files:
        raise FileNotFoundError(f"No tensorboard event files under {logging_dir}.")
    by_tag: dict[str, dict[int, float]] = {}
    for events in event_files:
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every event
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            by_tag.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    return {tag: sorted(values.items()) for tag, values in by_tag.items()}


def ema_smooth(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Tensorboard's debiased exponential moving average (`smoothing` in [0, 1); 0 returns the values)."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    smoothed, last = np.empty(len(values)), 0.0
    for i, value in enumerate(values):
        last = smoothing * last + (1 - smoothing) * value
        smoothed[i] = last / (1 - smoothing ** (i + 1))
    return smoothed


@dataclass
class RunSummary:
    """One run's loss and throughput, read from its logs."""

    name: str
    steps: int
    final_loss: float  # mean over the last `tail_fraction` of the steps
    tail_fraction: float
    median_images_per_second: float


def summarise_run(name: str, scalars: dict[str, list[tuple[int, float]]], tail_fraction: float = 0.1) -> RunSummary:
    if "loss" not in scalars:
        raise KeyError(f"Run {name} logged no 'loss' scalar (tags: {sorted(scalars)}).")
    losses = np.array([value for _, value in scalars["loss"]])
    tail = losses[-max(1, round(tail_fraction * len(losses))):]
    throughput = [value for _, value in scalars.get("images_per_second", [])]
    return RunSummary(
        name=name,
        steps=scalars["loss"][-1][0],
        final_loss=float(tail.mean()),
        tail_fraction=tail_fraction,
        median_images_per_second=float(np.median(throughput)) if throughput else float("nan"),
    )


def plot_runs(runs: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path, smoothing: float = 0.95) -> None:
    """Training loss (raw, faint, and smoothed) and images/s against step, one line per run."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, speed_axes = figure.subplots(1, 2)
    for index, (name, scalars) in enumerate(runs.items()):
        colour = f"C{index}"
        steps, losses = (np.array(column) for column in zip(*scalars["loss"]))
        loss_axes.plot(steps, losses, color=colour, alpha=0.2, linewidth=0.5)
        loss_axes.plot(steps, ema_smooth(losses, smoothing), color=colour, label=name)
        if "images_per_second" in scalars:
            speed_steps, speed = (np.array(column) for column in zip(*scalars["images_per_second"]))
            speed_axes.plot(speed_steps, ema_smooth(speed, smoothing), color=colour, label=name)
    loss_axes.set(xlabel="step", ylabel=f"training loss (EMA {smoothing})", yscale="log")
    speed_axes.set(xlabel="step", ylabel=f"images / s (EMA {smoothing})")
    for axes in (loss_axes, speed_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=120)
