"""Speed, size and memory of denoisers, measured side by side and reported as ratios to a baseline.

Timings are wall-clock, interleaved: each repetition runs every metric for every model in turn (round-robin),
after warm-up, and the median is reported, so a slow patch on a shared machine hits all models alike. (On a
busy CPU, prefer one torch thread: with two, every op waits for the descheduled thread and timings explode.)
Inference is timed first (forward latencies, then DDIM sampling) and the training step last. On CPU, once a
process has run training steps, its heap holds their freed activations, and every later inference op ran a few
percent slower (without page faults: the temporaries land elsewhere), and the model that allocates more suffered
more (emov2-5m more than unet2d-5m; README, "Inference timed before training"). Timed after training, the
forwards measured that history as much as the models.
Class-conditional denoisers (the D-EMOv2 and DiT presets with `num_class_embeds`) are timed, counted and sampled
on their null class (`NullClassDenoiser`), the class-less call every model can make: diffusers' DiT cannot run
without labels. Sampling runs `EMOv2ImagePipeline` (the repo's sampler, equal to `DDIMPipeline` for unconditional
UNets), which also takes the prediction half of a learned-sigma output.
Peak memory is the most tensor memory the step allocates beyond what was already allocated (weights,
optimizer state): `torch.cuda.max_memory_allocated` on CUDA; on CPU the running sum of the CPU allocator's
`[memory]` events recorded by `torch.profiler` (tensor bytes, not RSS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from ..cpu_allocator import cpu_allocator_description
from ..layers.fused_norm import fused_kernel_enabled
from ..pipelines import EMOv2ImagePipeline
from ..pipelines.pipeline_emov2_image import class_label_rows
from .flops import FLOP_CONVENTION, count_gflops

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the step minus memory_allocated before it",
    "cpu": "peak of the running sum of torch.profiler CPU allocator [memory] events during the step (tensor bytes)",
}


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to measure and how. Forward latencies cover every (batch size, resolution) pair."""

    resolutions: tuple[int, ...] = (32, 64)
    batch_sizes: tuple[int, ...] = (1, 16)
    train_batch_size: int = 16
    train_resolution: int = 32
    sampling_batch_size: int = 16
    sampling_steps: int = 50
    repeats: int = 5
    sampling_repeats: int = 1
    warmup: int = 1
    in_channels: int = 3
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if torch.device(self.device).type not in MEMORY_METHOD:
            raise ValueError(f"Unsupported device {self.device!r}; use cpu or cuda.")
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        if self.train_resolution not in self.resolutions:
            raise ValueError(f"train_resolution {self.train_resolution} must be one of resolutions {self.resolutions}.")
        counts = (self.repeats, self.sampling_repeats, self.train_batch_size, self.sampling_batch_size, self.sampling_steps)
        if min(counts) < 1 or min(self.batch_sizes) < 1 or self.warmup < 0:
            raise ValueError("repeats, batch sizes and sampling steps must be positive and warmup non-negative.")


# A smoke test of the whole path (CI, tests), not a measurement.
QUICK_SETTINGS = BenchmarkSettings(
    resolutions=(32,), batch_sizes=(1, 4), train_batch_size=4, sampling_batch_size=4, sampling_steps=5, repeats=2
)


@dataclass(frozen=True)
class Metric:
    """One report column: its JSON key, table label and unit, and which direction is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = False


def benchmark_metrics(settings: BenchmarkSettings) -> list[Metric]:
    """The report's columns for these settings, in order."""
    r, bt, bs = settings.train_resolution, settings.train_batch_size, max(settings.batch_sizes)
    metrics = [Metric("parameters", "params", "M")]
    metrics += [Metric(f"gflops_{res}px", f"GFLOPs/img {res}²", "GFLOPs") for res in settings.resolutions]
    metrics += [
        Metric(f"forward_ms_bs{b}_{res}px", f"fwd bs{b} {res}²", "ms")
        for res in settings.resolutions
        for b in settings.batch_sizes
    ]
    metrics += [
        Metric("train_step_ms", f"train step bs{bt} {r}²", "ms"),
        Metric("train_peak_mib", f"train peak bs{bt} {r}²", "MiB"),
        Metric("forward_peak_mib", f"fwd peak bs{bs} {r}²", "MiB"),
        Metric(
            "sampling_images_per_s", f"DDIM-{settings.sampling_steps} bs{settings.sampling_batch_size}", "img/s",
            higher_is_better=True,
        ),
    ]
    return metrics


@dataclass
class BenchmarkReport:
    """Values per model (metric key -> value in the metric's unit), the raw timings behind them, and their context."""

    settings: BenchmarkSettings
    environment: dict[str, Any]
    baseline: str
    metrics: list[Metric]
    model_classes: dict[str, str]
    values: dict[str, dict[str, float]]
    timings_s: dict[str, dict[str, list[float]]]

    @property
    def memory_method(self) -> str:
        return MEMORY_METHOD[torch.device(self.settings.device).type]

    def ratios(self) -> dict[str, dict[str, float]]:
        """Every value relative to the baseline's (so the baseline's ratios are all 1).

        Timed metrics use the median of per-repetition ratios: repetition i of a model and of the baseline ran
        back to back, so the pair shares the machine's load at that moment.
        """
        base = self.values[self.baseline]
        ratios = {}
        for name, values in self.values.items():
            ratios[name] = {key: value / base[key] for key, value in values.items()}
            for metric in self.metrics:
                if metric.key in self.timings_s[name]:
                    pairs = zip(self.timings_s[name][metric.key], self.timings_s[self.baseline][metric.key])
                    paired = [(b / t if metric.higher_is_better else t / b) for t, b in pairs]
                    ratios[name][metric.key] = statistics.median(paired)
        return ratios

    def to_dict(self) -> dict[str, Any]:
        ratios = self.ratios()
        return {
            "settings": dataclasses.asdict(self.settings),
            "environment": self.environment,
            "baseline": self.baseline,
            "flop_convention": FLOP_CONVENTION,
            "memory_method": self.memory_method,
            "metrics": [dataclasses.asdict(metric) for metric in self.metrics],
            "models": [
                {
                    "name": name,
                    "class": self.model_classes[name],
                    "values": self.values[name],
                    "ratios": ratios[name],
                    "timings_s": self.timings_s[name],
                }
                for name in self.values
            ],
        }

    def to_markdown(self) -> str:
        """A table with one row per model; each cell is `value (ratio to baseline)`."""
        ratios = self.ratios()
        header = ["model"] + [m.label if m.unit in m.label else f"{m.label} ({m.unit})" for m in self.metrics]
        rows = [
            [name] + [f"{_format_value(values[m.key], m.unit)} ({ratios[name][m.key]:.2f}x)" for m in self.metrics]
            for name, values in self.values.items()
        ]
        env, s = self.environment, self.settings
        context = [f"CPU allocator: {env['cpu_allocator']}"] if "cpu_allocator" in env else []
        if "fused_layernorm_kernel" in env:
            context.append(f"fused LayerNorm kernel: {'on' if env['fused_layernorm_kernel'] else 'off'}")
        lines = [
            f"Ratios are model / `{self.baseline}` (time, memory: lower is better; img/s: higher is better); "
            "timed ratios are medians of per-repetition ratios. "
            f"Medians of {s.repeats} interleaved repetitions ({s.sampling_repeats} for sampling) after {s.warmup} "
            "warm-up, inference (forwards, then sampling) timed before the training step; "
            f"device {env['device_name']}, {env['torch_threads']} torch threads, dtype {s.dtype}, "
            f"channels_last {s.channels_last}, compile {s.compile}, torch {env['torch']}"
            + "".join(f"; {item}" for item in context) + ".",
            "",
            markdown_table(header, rows),
            "",
            f"GFLOPs: {FLOP_CONVENTION}. Peak memory: {self.memory_method}.",
        ]
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str | Path) -> tuple[Path, Path]:
        """Write `benchmark.json` and `benchmark.md` into `output_dir` (created if needed)."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = output_dir / "benchmark.json", output_dir / "benchmark.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2))
        md_path.write_text(self.to_markdown())
        return json_path, md_path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (shared with `eval/model_table.py`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _format_value(value: float, unit: str) -> str:
    if unit == "M":
        return f"{value / 1e6:.2f}M"
    if unit == "MiB":
        return f"{value:.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def environment_info(device: torch.device) -> dict[str, Any]:
    """Versions, device name, torch's intra-op thread count, (CPU) how memory is allocated and (CUDA) whether
    inference may take the fused LayerNorm kernel (`emov2_gen.layers.fused_norm`; EMOV2_GEN_FUSED_NORM=0 is off)."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            device_name = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
    return {
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        **({"cpu_allocator": cpu_allocator_description()} if device.type == "cpu" else {}),
        **({"fused_layernorm_kernel": fused_kernel_enabled()} if device.type == "cuda" else {}),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(run: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - start


def peak_memory_mib(run: Callable[[], Any], device: torch.device) -> float:
    """The most tensor memory `run` allocates on top of what is allocated when it starts, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    allocations = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    peak = current = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def null_class_label(model: ModelMixin) -> Optional[int]:
    """The label of a class-less call to a class-conditional denoiser: its last label row, the null class of the
    D-EMOv2 and DiT presets (`class_label_rows`); None for an unconditional denoiser."""
    rows = class_label_rows(model)
    return None if rows is None else rows - 1


class NullClassDenoiser(nn.Module):
    """`model(sample, timestep)` for any denoiser: a class-conditional one gets `null_class_label` unless labels are
    passed, so that every model is timed and FLOP-counted on the same call (diffusers' DiT needs labels)."""

    def __init__(self, model: ModelMixin) -> None:
        super().__init__()
        self.model, self.null_class_label = model, null_class_label(model)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> Any:
        if class_labels is None and self.null_class_label is not None:
            class_labels = torch.full((sample.shape[0],), self.null_class_label, device=sample.device)
        return self.model(sample, timestep, class_labels=class_labels)


class _ModelUnderTest:
    """One model (per resolution) with its inputs, optimizer and pipeline, and the closures that run them."""

    def __init__(self, build: Callable[[int], ModelMixin], settings: BenchmarkSettings, device: torch.device) -> None:
        self.settings, self.device = settings, device
        self.gflops: dict[int, float] = {}
        self.models = {res: self._prepare(build(res), res) for res in settings.resolutions}
        self.calls = {res: NullClassDenoiser(model) for res, model in self.models.items()}
        train_model = self.models[settings.train_resolution]
        self.optimizer = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
        self.pipeline = EMOv2ImagePipeline(
            unet=train_model, scheduler=DDIMScheduler(num_train_timesteps=1000),
            null_class_label=null_class_label(train_model),
        )
        self.pipeline.set_progress_bar_config(disable=True)

    def _prepare(self, model: ModelMixin, resolution: int) -> ModelMixin:
        model = model.to(self.device).eval()
        if self.settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # Counted before compiling: FlopCounterMode does not see inside a compiled graph.
        self.gflops[resolution] = count_gflops(NullClassDenoiser(model), resolution, self.settings.in_channels)
        if self.settings.compile:
            # Static shapes: each case is one fixed shape. With dynamic=None a second batch size or resolution
            # marks the dims symbolic, and on CPU (torch 2.14) inductor then failed to compile the training step
            # (InductorError on a symbolic size comparison).
            model.compile(dynamic=False)
        return model

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = DTYPES[self.settings.dtype]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _inputs(self, batch_size: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator("cpu").manual_seed(0)
        sample = torch.randn(batch_size, self.settings.in_channels, resolution, resolution, generator=generator)
        if self.settings.channels_last:
            sample = sample.to(memory_format=torch.channels_last)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        return sample.to(self.device), timesteps.to(self.device)

    def forward(self, batch_size: int, resolution: int) -> Callable[[], None]:
        model = self.calls[resolution]
        sample, timesteps = self._inputs(batch_size, resolution)

        def run() -> None:
            with torch.inference_mode(), self._autocast():
                model(sample, timesteps)

        return run

    def train_step(self) -> Callable[[], None]:
        """Forward, epsilon-MSE backward (of a learned-sigma output's prediction half, as train_ddpm.py) and an AdamW
        step."""
        model = self.calls[self.settings.train_resolution]
        noisy, timesteps = self._inputs(self.settings.train_batch_size, self.settings.train_resolution)
        noise = torch.randn_like(noisy)

        def run() -> None:
            model.train()
            with self._autocast():
                prediction = model(noisy, timesteps).sample[:, : noise.shape[1]]
            F.mse_loss(prediction.float(), noise).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            model.eval()

        return run

    def sampling(self, num_inference_steps: int) -> Callable[[], None]:
        """DDIM sampling of one batch with `EMOv2ImagePipeline` (class-conditional models: the null class)."""

        def run() -> None:
            with torch.inference_mode(), self._autocast():
                self.pipeline(
                    batch_size=self.settings.sampling_batch_size,
                    num_inference_steps=num_inference_steps,
                    generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np",
                )

        return run


def _interleaved_seconds(
    cases: dict[str, dict[str, Callable[[], None]]], repeats: int, warmup: int, device: torch.device, description: str
) -> dict[str, dict[str, list[float]]]:
    """Run `cases[metric][model]` round-robin over models, `warmup` untimed then `repeats` timed passes."""
    timings: dict[str, dict[str, list[float]]] = {}
    total = (warmup + repeats) * sum(len(per_model) for per_model in cases.values())
    with tqdm(total=total, desc=description, leave=False) as progress:
        for repetition in range(warmup + repeats):
            for metric, per_model in cases.items():
                for name, run in per_model.items():
                    seconds = _seconds(run, device)
                    if repetition >= warmup:
                        timings.setdefault(name, {}).setdefault(metric, []).append(seconds)
                    progress.update()
    return timings


def run_benchmark(
    builders: dict[str, Callable[[int], ModelMixin]],
    baseline: str,
    settings: BenchmarkSettings = BenchmarkSettings(),
) -> BenchmarkReport:
    """Measure every model in `builders` (name -> function(sample_size) -> randomly initialised denoiser)."""
    if baseline not in builders:
        raise ValueError(f"The baseline {baseline!r} must be one of the benchmarked models: {', '.join(builders)}.")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False.")
    torch.manual_seed(0)
    subjects = {name: _ModelUnderTest(build, settings, device) for name, build in builders.items()}

    values: dict[str, dict[str, float]] = {name: {} for name in subjects}
    for name, subject in subjects.items():
        values[name]["parameters"] = float(subject.models[settings.train_resolution].num_parameters())
        values[name].update({f"gflops_{res}px": gflops for res, gflops in subject.gflops.items()})

    # Inference first, then training: see the module docstring.
    forward_cases: dict[str, dict[str, Callable[[], None]]] = {
        f"forward_ms_bs{b}_{res}px": {name: s.forward(b, res) for name, s in subjects.items()}
        for res in settings.resolutions
        for b in settings.batch_sizes
    }
    timings = _interleaved_seconds(forward_cases, settings.repeats, settings.warmup, device, "forward")
    for subject in subjects.values():  # the pipeline passes 0-d timesteps: warm up (and compile) that path too
        for _ in range(settings.warmup):
            subject.sampling(num_inference_steps=1)()
    sampling = _interleaved_seconds(
        {"sampling_images_per_s": {name: s.sampling(settings.sampling_steps) for name, s in subjects.items()}},
        settings.sampling_repeats, 0, device, "sampling",
    )
    training = _interleaved_seconds(
        {"train_step_ms": {name: s.train_step() for name, s in subjects.items()}},
        settings.repeats, settings.warmup, device, "training",
    )
    for name in subjects:
        timings[name].update(training[name])
        values[name].update({metric: 1e3 * statistics.median(seconds) for metric, seconds in timings[name].items()})
        values[name]["sampling_images_per_s"] = settings.sampling_batch_size / statistics.median(
            sampling[name]["sampling_images_per_s"]
        )
        timings[name].update(sampling[name])

    for name, subject in subjects.items():
        values[name]["train_peak_mib"] = peak_memory_mib(subject.train_step(), device)
        values[name]["forward_peak_mib"] = peak_memory_mib(
            subject.forward(max(settings.batch_sizes), settings.train_resolution), device
        )

    metrics = benchmark_metrics(settings)
    return BenchmarkReport(
        settings=settings,
        environment=environment_info(device),
        baseline=baseline,
        metrics=metrics,
        model_classes={name: type(s.models[settings.train_resolution]).__name__ for name, s in subjects.items()},
        values={name: {m.key: values[name][m.key] for m in metrics} for name in subjects},
        timings_s=timings,
    )
