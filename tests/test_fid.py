"""The FID evaluator: honest scores, reproducible samples, reused reference statistics, clear errors, reports.

Inception costs ~0.1-0.3 s per image on 2 CPU cores, so N stays at 16-32 images at 16x16.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch.utils.data import Dataset

from emov2_gen import build_denoiser
from emov2_gen.evaluation.fid import (
    FIDSettings,
    ModelSamples,
    ModelScore,
    evaluate_models,
    fidelity_metrics,
    kid_std_is_measured,
    kid_subset_size,
    sample_models,
    score_models,
)
from emov2_gen.evaluation.inception import resolve_inception_weights
from emov2_gen.evaluation.inception_inputs import ImageTensorDataset
from emov2_gen.evaluation.reference import ReferenceImages, ReferenceSet
from emov2_gen.evaluation.report import scores_table
from emov2_gen.evaluation.sampling import generate_images, load_pipeline
from script_runs import load_script

REPO = Path(__file__).resolve().parents[1]


def tiny_unet(sample_size: int = 16, num_class_embeds=None) -> UNet2DModel:
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        num_class_embeds=num_class_embeds,
    )


def save_pipeline(unet, folder: Path) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    return {
        "unet2d": save_pipeline(tiny_unet(), root / "unet2d-tiny"),
        "emov2": save_pipeline(
            build_denoiser("emov2-1m", sample_size=16, in_channels=1, layers_per_block=1), root / "emov2-tiny"
        ),
        "conditional": save_pipeline(tiny_unet(num_class_embeds=10), root / "unet2d-conditional"),
    }


# --- honesty: real vs real is far better than noise vs real, and reference features are cached -----------------


class CountingReference(Dataset):
    """Reference images that count how many were decoded, to see whether torch-fidelity used its cache."""

    def __init__(self, images: ReferenceImages):
        self.images, self.key, self.decoded = images, images.key, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.decoded += 1
        return self.images[index]


@pytest.fixture(scope="module")
def mnist_scores(tmp_path_factory, mnist_dir):
    num_images, resolution = 32, (16, 16)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        weights = resolve_inception_weights()
    reference = CountingReference(ReferenceSet(str(mnist_dir), "train", num_images).images(resolution, 1))
    other_real = ReferenceSet(str(mnist_dir), "test", num_images).images(resolution, 1)
    generator = torch.Generator().manual_seed(0)
    noise = ImageTensorDataset(torch.randint(0, 256, (num_images, 1, *resolution), dtype=torch.uint8, generator=generator))
    cache = tmp_path_factory.mktemp("fidelity_cache")
    real_scores = fidelity_metrics(other_real, reference, weights, cache, verbose=False)
    decoded_first = reference.decoded
    noise_scores = fidelity_metrics(noise, reference, weights, cache, verbose=False)
    return dict(real=real_scores, noise=noise_scores, decoded=(decoded_first, reference.decoded), n=num_images)


def test_real_subsets_score_far_better_than_noise(mnist_scores):
    real, noise = mnist_scores["real"], mnist_scores["noise"]
    assert 0 < real["fid"] < 0.3 * noise["fid"]
    assert real["kid_mean"] < 0.1 * noise["kid_mean"]
    assert real["precision"] > 0.5 > noise["precision"]
    assert real["recall"] > 0.5 > noise["recall"]
    assert real["kid_subset_size"] == mnist_scores["n"]  # adapted to N (< torch-fidelity's default 1000)


def test_reference_features_are_computed_once_and_then_read_from_the_cache(mnist_scores):
    first, after_second = mnist_scores["decoded"]
    assert first >= mnist_scores["n"]  # every image once (torch-fidelity also peeks at the first one)
    assert after_second == first


def test_kid_subset_size_never_exceeds_either_input():
    assert kid_subset_size(200, 5000) == 200
    assert kid_subset_size(5000, 300) == 300
    assert kid_subset_size(50_000, 50_000) == 1000


def test_kid_std_is_shown_only_where_the_subsets_can_differ(mnist_scores):
    n = mnist_scores["n"]
    assert mnist_scores["real"]["kid_std"] < 1e-5  # every subset of 32 out of 32 images is the whole set
    assert not kid_std_is_measured(n, n, n)
    assert kid_std_is_measured(1000, 5000, 5000) and kid_std_is_measured(200, 200, 5000)
    row = ModelScore(
        name="m", path="m", model_class="x.M", parameters=10**6, gflops_per_forward=0.1, gflops_per_sample=5.0,
        resolution=[16, 16], in_channels=1, class_conditional=False, sampler="DDIMScheduler", num_inference_steps=50,
        num_samples=1000, seed=0, device="cpu", seconds_per_image=0.01, num_reference=1000, fid=20.0, kid_mean=0.0123,
        kid_std=0.0, kid_subset_size=1000, precision=0.5, recall=0.5, inception_weights="w", reference_key="r",
        reference_cache_name="c",
    )  # fmt: skip
    row_line = scores_table([row]).splitlines()[-1]
    assert "0.0123 (one subset: no std)" in row_line and "±" not in row_line
    measured = replace(row, num_samples=5000, num_reference=5000, kid_std=0.0011)
    assert "0.0123 ± 0.0011" in scores_table([measured])


# --- sampling: seeded per sample, class labels, FLOPs -------------------------------------------------------------


def test_same_seed_gives_the_same_samples_whatever_the_batch_size(model_dirs):
    pipeline = load_pipeline(model_dirs["unet2d"], "ddpm")  # DDPM: the step noise comes from the generators too
    draw = lambda seed, batch_size: generate_images(pipeline, 7, 3, seed=seed, batch_size=batch_size)  # noqa: E731
    first = draw(seed=1, batch_size=3)
    assert first.dtype == torch.uint8 and first.shape == (7, 1, 16, 16)
    assert torch.equal(first, draw(seed=1, batch_size=3))
    # Other batch sizes change only float summation order: at most a rounding step of difference.
    assert (first.int() - draw(seed=1, batch_size=7).int()).abs().max() <= 1
    assert (first.int() - draw(seed=2, batch_size=3).int()).abs().float().mean() > 10


def test_class_conditional_models_need_the_flag_and_get_balanced_labels(model_dirs):
    pipeline = load_pipeline(model_dirs["conditional"], "ddim")
    with pytest.raises(ValueError, match="class_labels"):
        generate_images(pipeline, 4, 2, seed=0)
    samples = generate_images(pipeline, 4, 2, seed=0, class_conditional=True)
    assert samples.shape == (4, 1, 16, 16)
    unconditional = load_pipeline(model_dirs["unet2d"], "ddim")
    with pytest.raises(ValueError, match="no class embedding"):
        generate_images(unconditional, 4, 2, seed=0, class_conditional=True)


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_model_dir_is_a_clear_error(tmp_path, model_dirs, mnist_dir):
    settings = FIDSettings(reference=str(mnist_dir), cache_dir=tmp_path / "cache", num_samples=8)
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        evaluate_models([str(tmp_path / "not-a-model")], settings)
    (tmp_path / "no-index").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "no-index", "ddim")
    with pytest.raises(ValueError, match="Unknown scheduler"):
        load_pipeline(model_dirs["unet2d"], "euler")


def test_empty_reference_is_a_clear_error(tmp_path, model_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        ReferenceSet(str(empty))
    settings = FIDSettings(reference=str(empty), cache_dir=tmp_path / "cache", num_samples=8)
    with pytest.raises(ValueError, match="no images"):
        evaluate_models([str(model_dirs["unet2d"])], settings)


def test_reference_images_at_their_own_resolution_are_exact(tmp_path, mnist_dir):
    reference = ReferenceSet(str(mnist_dir), "test", num_images=3)
    images = reference.images((28, 28), 1)
    keys = {images.key, reference.images((16, 16), 1).key, reference.images((28, 28), 3).key}
    assert len(keys) == 3
    original = torch.from_numpy(np.array(reference.dataset[0]["image"]))
    first = images[0]
    assert first.shape == (3, 28, 28) and first.dtype == torch.uint8
    for channel in first:
        assert torch.equal(channel, original)


# --- the command line: two models side by side, then a rerun with the same seed ------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "eval" / "fid.py"), *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_reports_models_side_by_side_and_the_same_seed_reproduces_samples_and_score(tmp_path, model_dirs, mnist_dir):
    # The baseline is listed twice: same seed and settings must give it identical samples and scores.
    unet2d, emov2 = str(model_dirs["unet2d"]), str(model_dirs["emov2"])
    output = tmp_path / "report"
    result = run_cli("--model_dirs", unet2d, emov2, unet2d, "--reference", str(mnist_dir), "--split", "test",
                     "--num_samples", "16", "--num_inference_steps", "2", "--scheduler", "ddim", "--seed", "3",
                     "--output_dir", str(output))  # fmt: skip

    report = json.loads((output / "report.json").read_text())
    assert "Inception" in report["inception_weights"]["description"]
    models = {model["name"]: model for model in report["models"]}
    assert list(models) == ["unet2d-tiny-0", "emov2-tiny", "unet2d-tiny-2"]
    assert models["emov2-tiny"]["model_class"].endswith(".EMOv2UNet2DModel")
    assert models["unet2d-tiny-0"]["model_class"].endswith(".UNet2DModel")
    for model in models.values():
        assert model["parameters"] > 0 and model["gflops_per_forward"] > 0 and model["seconds_per_image"] > 0
        assert model["gflops_per_sample"] == pytest.approx(2 * model["gflops_per_forward"])
        assert model["sampler"] == "DDIMScheduler" and model["num_samples"] == model["num_reference"] == 16
        assert model["fid"] > 0 and model["kid_subset_size"] == 16
        assert 0 <= model["precision"] <= 1 and 0 <= model["recall"] <= 1
        assert model["reference_key"].endswith("|split=test|n=16|16x16|L")
        assert (output / model["sample_grid"]).stat().st_size > 0
    assert models["unet2d-tiny-0"]["parameters"] != models["emov2-tiny"]["parameters"]
    assert models["unet2d-tiny-0"]["fid"] != models["emov2-tiny"]["fid"]
    for key in ("fid", "kid_mean", "precision", "recall"):
        assert models["unet2d-tiny-0"][key] == models["unet2d-tiny-2"][key]
    first_grid, second_grid = (output / models[name]["sample_grid"] for name in ("unet2d-tiny-0", "unet2d-tiny-2"))
    assert first_grid.read_bytes() == second_grid.read_bytes()
    kept = sorted(path.name for path in (output / "samples").glob("*.pt"))  # for other scores of the same images
    assert kept == ["emov2-tiny.pt", "unet2d-tiny-0.pt", "unet2d-tiny-2.pt"]

    assert (output / "fid_vs_cost.png").stat().st_size > 0
    assert len(list((output / "fidelity_cache").iterdir())) == 2  # one reference: features + FID statistics
    table_rows = [line for line in (output / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table_rows) == 4 and [row.split(" | ")[0] for row in table_rows[1:]] == [
        "| unet2d-tiny-0",
        "| emov2-tiny",
        "| unet2d-tiny-2",
    ]
    assert all(row in result.stdout for row in table_rows)


# --- sampling on one machine, scoring on another -------------------------------------------------------------------


def test_samples_saved_by_samples_only_score_exactly_as_a_one_step_run(tmp_path, model_dirs, mnist_dir):
    dirs = [str(model_dirs["unet2d"]), str(model_dirs["emov2"])]
    sampling = ("--num_samples", "8", "--num_inference_steps", "2", "--scheduler", "ddpm", "--seed", "5")
    result = run_cli("--model_dirs", *dirs, *sampling, "--samples_only", "--output_dir", str(tmp_path / "drawn"))
    files = sorted((tmp_path / "drawn" / "samples").glob("*.pt"))
    assert [f.name for f in files] == ["emov2-tiny.pt", "unet2d-tiny.pt"]
    assert (tmp_path / "drawn" / "samples_emov2-tiny.png").stat().st_size > 0
    assert not (tmp_path / "drawn" / "report.json").exists() and "8 samples" in result.stdout

    # Scored elsewhere: the sampling settings come from the files, not from defaults (N 1000, DDIM, 50 steps).
    run_cli("--samples", *map(str, files), "--reference", str(mnist_dir), "--split", "test",
            "--output_dir", str(tmp_path / "scored"))  # fmt: skip
    scored = json.loads((tmp_path / "scored" / "report.json").read_text())
    assert scored["settings"]["num_samples"] == 8 and scored["settings"]["scheduler"] == "ddpm"

    settings = FIDSettings(reference=str(mnist_dir), split="test", cache_dir=tmp_path / "cache", num_samples=8,
                           num_inference_steps=2, scheduler="ddpm", seed=5, verbose=False)  # fmt: skip
    one_step = {score.name: score for score in evaluate_models(dirs, settings, save_dir=tmp_path / "kept").scores}
    for drawn in files:  # a one-step run keeps the very images that --samples_only saves
        assert torch.equal(ModelSamples.load(tmp_path / "kept" / drawn.name).images, ModelSamples.load(drawn).images)
    for model in scored["models"]:
        reference = one_step[model["name"]]
        assert model["num_samples"] == model["num_reference"] == 8 and model["sampler"] == "DDPMScheduler"
        for key in ("precision", "recall", "parameters", "gflops_per_forward", "reference_key"):
            assert model[key] == getattr(reference, key), key
        # The same samples and reference: the scores agree to float round-off (Inception features computed in another
        # process may sum in another order; CI saw FID differ in the 7th significant digit).
        for key in ("fid", "kid_mean"):
            assert model[key] == pytest.approx(getattr(reference, key), rel=1e-5), key


def test_samples_files_are_checked_before_scoring(tmp_path, model_dirs, mnist_dir):
    settings = FIDSettings(reference=str(mnist_dir), split="test", cache_dir=tmp_path / "cache", num_samples=4,
                           num_inference_steps=1, verbose=False)  # fmt: skip
    (drawn,) = sample_models([str(model_dirs["unet2d"])], settings)
    path = drawn.save(tmp_path / "unet2d.pt")
    assert torch.equal(ModelSamples.load(path).images, drawn.images)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable samples file"):
        ModelSamples.load(corrupt)
    torch.save({"images": drawn.images}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a samples file"):
        ModelSamples.load(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ModelSamples.load(tmp_path / "missing.pt")

    other_seed = ModelSamples(replace(drawn.info, name="other"), drawn.images, {**drawn.sampling, "seed": 1})
    with pytest.raises(ValueError, match="different settings"):
        score_models([drawn, other_seed], settings)
    with pytest.raises(ValueError, match="same model name"):
        score_models([drawn, drawn], settings)


def test_cli_rejects_scoring_without_a_reference_and_resampling_saved_samples(tmp_path):
    for args, message in ((["--model_dirs", "a"], "--reference is required"),
                          (["--samples", "a.pt", "--samples_only"], "give --model_dirs")):  # fmt: skip
        result = subprocess.run([sys.executable, str(REPO / "eval" / "fid.py"), *args, "--output_dir", str(tmp_path)],
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr


def test_anchor_script_puts_real_images_far_below_noise_on_the_reference_scale(tmp_path, capsys, mnist_dir):
    anchors = load_script(REPO / "eval" / "fid_anchors.py")
    common = ["--reference", str(mnist_dir), "--num_samples", "24", "--resolution", "16", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="must differ"):
        anchors.main(common + ["--split", "test", "--other_split", "test"])

    scores = anchors.main(common + ["--split", "train", "--other_split", "test", "--device", "cpu"])
    real, noise = scores["real (test split)"], scores["uniform noise"]
    assert 0 < real["fid"] < 0.3 * noise["fid"] and real["kid_mean"] < 0.1 * noise["kid_mean"]
    written = json.loads((tmp_path / "anchors.json").read_text())
    assert written["num_samples"] == 24 and written["scores"]["uniform noise"]["fid"] == noise["fid"]
    assert f"| uniform noise | {noise['fid']:.1f} |" in capsys.readouterr().out
    assert len(list((tmp_path / "fidelity_cache").iterdir())) == 2  # one reference, computed once for both scores
