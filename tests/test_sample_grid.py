"""eval/sample_grid.py: a grid PNG of the right size from a saved pipeline, reproducible by seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "sample_grid.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("sample_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_shape_and_seed_reproducibility(tmp_path, make_tiny_unet):
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(tmp_path / "pipe")
    script = _load_script()
    common = ["--model_dir", str(tmp_path / "pipe"), "--num_images", "4", "--num_inference_steps", "2", "--upscale", "2"]
    script.main(common + ["--output", str(tmp_path / "a.png"), "--seed", "3"])
    script.main(common + ["--output", str(tmp_path / "b.png"), "--seed", "3"])
    script.main(common + ["--output", str(tmp_path / "c.png"), "--seed", "4"])
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    size = make_tiny_unet().config.sample_size * 2  # 2 x 2 grid of upscaled images, 2 px padding around each
    assert a.shape[:2] == (2 * size + 3 * 2, 2 * size + 3 * 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load_script().main(["--model_dir", str(tmp_path / "nope"), "--output", str(tmp_path / "x.png")])
