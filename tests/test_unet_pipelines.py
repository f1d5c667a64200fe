"""EMOv2UNet2DModel inside diffusers: stock pipelines, every common scheduler, and saving/loading a pipeline."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from emov2_gen import EMOv2UNet2DModel

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: load a saved pipeline folder with the generic loader and sample from it.
LOAD_AND_SAMPLE = """
import sys
import numpy as np
import torch
{import_line}
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
print(type(pipe).__name__, type(pipe.unet).__module__, type(pipe.unet).__name__)
images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
np.save(sys.argv[2], images)
"""


@pytest.fixture
def unet(make_tiny_unet):
    return make_tiny_unet()


def run_pipeline(pipeline, seed: int, **kwargs) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipeline(batch_size=2, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images


@pytest.mark.parametrize(
    "pipeline_cls, scheduler_cls", [(DDPMPipeline, DDPMScheduler), (DDIMPipeline, DDIMScheduler)], ids=["ddpm", "ddim"]
)
def test_stock_pipelines_sample_with_the_model(unet, pipeline_cls, scheduler_cls):
    pipeline = pipeline_cls(unet=unet, scheduler=scheduler_cls(num_train_timesteps=1000))
    images = run_pipeline(pipeline, seed=0)
    assert images.shape == (2, 16, 16, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0
    np.testing.assert_array_equal(run_pipeline(pipeline, seed=0), images)  # same seed, same images
    assert np.abs(run_pipeline(pipeline, seed=1) - images).max() > 1e-3


@pytest.mark.parametrize(
    "scheduler, clips_to_unit_range",
    [
        (DDPMScheduler(num_train_timesteps=1000, clip_sample=True), True),
        (DDIMScheduler(num_train_timesteps=1000, clip_sample=True), True),
        (PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True), False),
        (EulerDiscreteScheduler(num_train_timesteps=1000), False),
        (DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", thresholding=True), True),
    ],
    ids=["ddpm", "ddim", "pndm", "euler", "dpm-solver++"],
)
def test_model_drives_every_common_scheduler(unet, scheduler, clips_to_unit_range):
    """The standard denoising loop; timesteps arrive as the scheduler makes them (0-d int or float tensors).

    An untrained model predicts noise unrelated to the sample, so only schedulers that clip their x0
    estimate end in [-1, 1]; for the others the sample just has to stay finite.
    """
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    start = randn_tensor((2, 3, 16, 16), generator=generator) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    image = start
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_output = unet(scheduler.scale_model_input(image, t), t).sample
            assert model_output.shape == image.shape
            image = scheduler.step(model_output, t, image, **step_kwargs).prev_sample
    assert image.shape == (2, 3, 16, 16)
    assert torch.isfinite(image).all()
    assert (image - start).abs().max() > 0.1
    if clips_to_unit_range:
        assert image.abs().max() <= 1 + 1e-5


@pytest.fixture(scope="module")
def saved_pipeline(make_tiny_unet, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A DDPM pipeline with the EMOv2 UNet saved to disk (read-only for tests), and the images it samples here."""
    pipeline = DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    folder = tmp_path_factory.mktemp("saved") / "pipeline"
    pipeline.save_pretrained(folder)
    return folder, run_pipeline(pipeline, seed=0)


def load_in_fresh_process(folder: Path, out: Path, import_line: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = LOAD_AND_SAMPLE.format(import_line=import_line)
    return subprocess.run(
        [sys.executable, "-c", script, str(folder), str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )


def test_saved_pipeline_loads_with_diffusion_pipeline_after_importing_the_package(saved_pipeline, tmp_path):
    folder, expected_images = saved_pipeline
    unet_entry = json.loads((folder / "model_index.json").read_text())["unet"]
    assert unet_entry[0].startswith("emov2_gen") and unet_entry[1] == "EMOv2UNet2DModel"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    result = load_in_fresh_process(folder, tmp_path / "images.npy", "import emov2_gen")
    assert result.returncode == 0, result.stderr
    assert "DDPMPipeline emov2_gen.models.unet_2d EMOv2UNet2DModel" in result.stdout
    # Same weights, same scheduler, same seed: the same images as the pipeline that was saved.
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected_images, atol=1e-5)


def test_pipeline_index_naming_the_top_level_package_loads(saved_pipeline, tmp_path):
    """A model_index entry ["emov2_gen", "EMOv2UNet2DModel"] resolves through the package's ModelMixin re-export."""
    saved, expected_images = saved_pipeline
    folder = shutil.copytree(saved, tmp_path / "pipeline")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["unet"] = ["emov2_gen", "EMOv2UNet2DModel"]
    index_file.write_text(json.dumps(index))
    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipeline, DDPMPipeline) and isinstance(pipeline.unet, EMOv2UNet2DModel)
    np.testing.assert_allclose(run_pipeline(pipeline, seed=0), expected_images, atol=1e-5)


def test_saved_pipeline_does_not_load_without_importing_the_package(saved_pipeline, tmp_path):
    folder, _ = saved_pipeline
    result = load_in_fresh_process(folder, tmp_path / "images.npy", "")
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "has not been imported" in result.stderr, result.stderr[-2000:]
    assert "emov2_gen" in result.stderr
    assert not (tmp_path / "images.npy").exists()
