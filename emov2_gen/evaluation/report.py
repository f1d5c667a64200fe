"""Write an FID evaluation to disk: report.json, a side-by-side report.md, sample grids and a cost/quality plot."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchvision.utils import save_image

from .benchmark import markdown_table
from .fid import GRID_SAMPLES, FIDEvaluation, ModelScore, kid_std_is_measured
from .flops import FLOP_CONVENTION

PLOT_NAME = "fid_vs_cost.png"


def sample_grid_name(model_name: str) -> str:
    return "samples_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name) + ".png"


def save_sample_grid(samples: torch.Tensor, path: Path) -> Path:
    """A square-ish grid of the first `GRID_SAMPLES` uint8 (N, C, H, W) samples."""
    samples = samples[:GRID_SAMPLES]
    save_image(samples.float() / 255, path, nrow=math.ceil(math.sqrt(len(samples))))
    return path


def report_dict(evaluation: FIDEvaluation) -> dict:
    """Everything needed to reproduce and read the numbers, JSON-ready."""
    settings = asdict(evaluation.settings)
    settings["cache_dir"] = str(settings["cache_dir"])
    weights = evaluation.weights
    return {
        "settings": settings,
        "reference": evaluation.reference_description,
        "inception_weights": {
            "source": weights.source,
            "description": weights.description,
            "path": str(weights.path),
            "sha256": weights.sha256,
        },
        "flop_convention": FLOP_CONVENTION,
        "notes": [
            "FID/KID use torch-fidelity's inception-v3-compat pool3 features (2048-d); precision/recall use the same "
            "features with k=3 neighbourhoods. The Inception Score is not reported.",
            "FID is biased upwards at small N: compare only numbers computed with the same N, reference and sampler "
            "(the published protocol is 50,000 samples against the training set).",
        ],
        "models": [{**asdict(score), "sample_grid": sample_grid_name(score.name)} for score in evaluation.scores],
    }


def kid_cell(score: ModelScore) -> str:
    """KID mean ± std, or the mean alone where the std is 0 by construction (see `kid_std_is_measured`)."""
    if kid_std_is_measured(score.kid_subset_size, score.num_samples, score.num_reference):
        return f"{score.kid_mean:.4f} ± {score.kid_std:.4f}"
    return f"{score.kid_mean:.4f} (one subset: no std)"


def scores_table(scores: list[ModelScore]) -> str:
    """A markdown table with one row per model, side by side."""
    header = ["model", "class", "params (M)", "GFLOPs/forward", "GFLOPs/sample", "sampler", "steps", "N", "s/image",
              "FID", "KID (mean ± std)", "precision", "recall"]  # fmt: skip
    rows = [
        [
            s.name, s.model_class.rsplit(".", 1)[-1], f"{s.parameters / 1e6:.3f}", f"{s.gflops_per_forward:.3f}",
            f"{s.gflops_per_sample:.2f}", s.sampler, str(s.num_inference_steps), str(s.num_samples),
            f"{s.seconds_per_image:.4f}", f"{s.fid:.2f}", kid_cell(s),
            f"{s.precision:.3f}", f"{s.recall:.3f}",
        ]  # fmt: skip
        for s in scores
    ]
    return markdown_table(header, rows)


def markdown_report(evaluation: FIDEvaluation) -> str:
    settings = evaluation.settings
    lines = [
        "# FID evaluation",
        "",
        f"- Reference: {evaluation.reference_description}, {evaluation.scores[0].num_reference} images",
        f"- Sampler: {settings.scheduler}, {settings.num_inference_steps} steps, seed {settings.seed}, "
        f"sampled on {evaluation.scores[0].device}, scored on {settings.device}",
        f"- Inception weights: {evaluation.weights.description}",
        f"- FLOPs: {FLOP_CONVENTION}",
        "",
        scores_table(evaluation.scores),
        "",
    ]
    return "\n".join(lines)


def plot_fid_vs_cost(scores: list[ModelScore], path: Path) -> None:
    """FID against GFLOPs per forward and against parameters, one labelled point per model."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, attribute, label in (
        (axes[0], "gflops_per_forward", "GFLOPs per forward (1 image)"),
        (axes[1], "parameters", "parameters (M)"),
    ):
        for score in scores:
            x = getattr(score, attribute) / (1e6 if attribute == "parameters" else 1)
            ax.scatter(x, score.fid)
            ax.annotate(score.name, (x, score.fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("FID (lower is better)")
        ax.grid(alpha=0.3)
    first = scores[0]
    figure.suptitle(f"FID vs cost (N={first.num_samples}, {first.sampler}, {first.num_inference_steps} steps)")
    figure.savefig(path, dpi=120)


def write_reports(evaluation: FIDEvaluation, output_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, one sample grid per model and the FID-vs-cost plot; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "report.json", "markdown": output_dir / "report.md", "plot": output_dir / PLOT_NAME}
    paths["json"].write_text(json.dumps(report_dict(evaluation), indent=2) + "\n")
    paths["markdown"].write_text(markdown_report(evaluation))
    for name, samples in evaluation.samples.items():
        paths[f"grid:{name}"] = save_sample_grid(samples, output_dir / sample_grid_name(name))
    plot_fid_vs_cost(evaluation.scores, paths["plot"])
    return paths
