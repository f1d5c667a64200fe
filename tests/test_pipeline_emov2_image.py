"""EMOv2ImagePipeline: same results as diffusers' own pipelines, any scheduler, class labels, guidance, save/load."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.pipelines import ImagePipelineOutput
from diffusers.utils import dynamic_modules_utils
from PIL import Image

import emov2_gen.pipelines
from emov2_gen import EMOv2UNet2DModel, build_denoiser
from emov2_gen.pipelines import EMOv2ImagePipeline
from emov2_gen.pipelines import pipeline_emov2_image

NUM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(num_class_embeds=None, in_channels=1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, block_out_channels=(16, 32),
        norm_num_groups=8, layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds,
    ).eval()


@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=50)


@pytest.fixture
def guided_pipeline(scheduler) -> EMOv2ImagePipeline:
    """A class-conditional model trained with a null class: NUM_CLASSES real classes + label NUM_CLASSES."""
    return EMOv2ImagePipeline(tiny_unet(NUM_CLASSES + 1), DDIMScheduler.from_config(scheduler.config),
                              null_class_label=NUM_CLASSES)


def generate(pipeline, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 3, "generator": torch.manual_seed(0), "output_type": "np", **kwargs}
    return pipeline(**kwargs).images


def test_matches_ddpm_pipeline_with_the_ddpm_scheduler(scheduler):
    unet = tiny_unet()
    ours = generate(EMOv2ImagePipeline(unet, scheduler), batch_size=2)
    theirs = generate(DDPMPipeline(unet, scheduler), batch_size=2)
    assert ours.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_matches_ddim_pipeline_with_the_ddim_scheduler(scheduler, eta):
    unet, ddim = tiny_unet(), DDIMScheduler.from_config(scheduler.config)
    ours = generate(EMOv2ImagePipeline(unet, ddim), batch_size=2, eta=eta)
    theirs = generate(DDIMPipeline(unet, ddim), batch_size=2, eta=eta)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_works_with_a_scheduler_that_scales_its_inputs():
    """Euler starts from sigma_max-scaled noise and rescales the model input to unit variance at every step."""
    euler = EulerDiscreteScheduler(num_train_timesteps=1000)
    unet = tiny_unet()
    model_inputs = []
    unet.register_forward_pre_hook(lambda module, args: model_inputs.append(args[0]))
    pipeline = EMOv2ImagePipeline(unet, euler)
    first, again = generate(pipeline, batch_size=4), generate(pipeline, batch_size=4)
    assert euler.init_noise_sigma > 100
    assert 0.8 < model_inputs[0].std() < 1.2  # noise * init_noise_sigma, then scale_model_input
    np.testing.assert_array_equal(first, again)
    assert first.min() >= 0 and first.max() <= 1


def test_runs_the_emov2_denoiser(scheduler):
    torch.manual_seed(0)
    unet = build_denoiser("emov2-1m", sample_size=8, in_channels=3, num_class_embeds=NUM_CLASSES).eval()
    assert isinstance(unet, EMOv2UNet2DModel)
    pipeline = EMOv2ImagePipeline(unet, DDIMScheduler.from_config(scheduler.config))
    images = generate(pipeline, class_labels=[0, 3], num_inference_steps=2)
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


def test_class_labels_change_the_images(guided_pipeline):
    per_label = generate(guided_pipeline, class_labels=[0, 1, 2, 3], generator=[torch.manual_seed(0)] * 4)
    for a, b in ((0, 1), (1, 2), (2, 3)):
        assert np.abs(per_label[a] - per_label[b]).max() > 1e-4
    one_label = generate(guided_pipeline, batch_size=3, class_labels=2)
    assert one_label.shape[0] == 3


def test_guidance_combines_conditional_and_unconditional_predictions(guided_pipeline):
    labels = [1, 3]
    unconditional = generate(guided_pipeline, batch_size=2)  # the null class
    conditional = generate(guided_pipeline, class_labels=labels)
    # w = 0 is the unconditional prediction, w = 1 the conditional one, w = 3 neither.
    np.testing.assert_allclose(generate(guided_pipeline, class_labels=labels, guidance_scale=0.0), unconditional,
                               atol=1e-5)
    np.testing.assert_allclose(generate(guided_pipeline, class_labels=labels, guidance_scale=1.0), conditional,
                               atol=1e-6)
    guided = generate(guided_pipeline, class_labels=labels, guidance_scale=3.0)
    assert np.abs(guided - conditional).max() > 1e-4 and np.abs(guided - unconditional).max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[0, NUM_CLASSES]), r"must lie in \[0, 3\]"),
        (dict(class_labels=[-1]), r"must lie in \[0, 3\]"),
        (dict(class_labels=[0, 1], batch_size=3), "2 class labels for a batch of 3"),
        (dict(guidance_scale=2.0), "needs `class_labels`"),
        (dict(class_labels=[0], eta=0.5, scheduler=DDPMScheduler(num_train_timesteps=50)), "no eta parameter"),
        (dict(class_labels=[0], output_type="latent"), "output_type must be one of"),
        (dict(class_labels=[0, 1], generator=[torch.manual_seed(0)]), "1 generators for a batch of 2"),
    ],
)
def test_rejects_bad_arguments(guided_pipeline, kwargs, message):
    if "scheduler" in kwargs:
        guided_pipeline.scheduler = kwargs.pop("scheduler")
    with pytest.raises(ValueError, match=message):
        guided_pipeline(num_inference_steps=2, **kwargs)


def test_models_without_a_null_class_need_labels_and_cannot_guide(scheduler):
    conditional = EMOv2ImagePipeline(tiny_unet(NUM_CLASSES), scheduler)
    with pytest.raises(ValueError, match="pass `class_labels`"):
        conditional(num_inference_steps=2)
    with pytest.raises(ValueError, match="trained with a null class"):
        conditional(class_labels=[0], guidance_scale=2.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="this denoiser is unconditional"):
        EMOv2ImagePipeline(tiny_unet(), scheduler)(class_labels=[0], num_inference_steps=2)


def test_output_types(scheduler):
    pipeline = EMOv2ImagePipeline(tiny_unet(in_channels=3), scheduler)
    pil = pipeline(batch_size=2, num_inference_steps=2).images
    assert len(pil) == 2 and all(isinstance(image, Image.Image) and image.mode == "RGB" for image in pil)
    pt = pipeline(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert pt.shape == (2, 3, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    output = pipeline(batch_size=1, num_inference_steps=2, return_dict=False)
    assert isinstance(output, tuple) and len(output[0]) == 1
    assert isinstance(pipeline(num_inference_steps=2), ImagePipelineOutput)


def test_save_and_load_keep_the_null_class_and_the_results(tmp_path, guided_pipeline):
    guided_pipeline.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["null_class_label"] == NUM_CLASSES
    loaded = EMOv2ImagePipeline.from_pretrained(tmp_path)
    assert loaded.config.null_class_label == NUM_CLASSES and isinstance(loaded.scheduler, DDIMScheduler)
    np.testing.assert_allclose(
        generate(loaded, class_labels=[2, 0], guidance_scale=2.5),
        generate(guided_pipeline, class_labels=[2, 0], guidance_scale=2.5),
        atol=1e-6,
    )


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Keep diffusers' copies of custom pipeline code in a temporary folder."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [name for name in sys.modules if name.startswith("diffusers_modules")]:
        del sys.modules[name]


def test_diffusion_pipeline_loads_it_as_custom_pipeline(tmp_path, guided_pipeline, modules_cache):
    guided_pipeline.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe", custom_pipeline=pipeline_emov2_image.__file__, trust_remote_code=True
    )
    assert type(loaded).__name__ == "EMOv2ImagePipeline" and loaded.config.null_class_label == NUM_CLASSES
    np.testing.assert_allclose(
        generate(loaded, class_labels=[1, 2], guidance_scale=2.0),
        generate(guided_pipeline, class_labels=[1, 2], guidance_scale=2.0),
        atol=1e-6,
    )


def test_is_exported_from_the_installed_package():
    assert emov2_gen.pipelines.EMOv2ImagePipeline is EMOv2ImagePipeline
    assert issubclass(EMOv2ImagePipeline, DiffusionPipeline)
