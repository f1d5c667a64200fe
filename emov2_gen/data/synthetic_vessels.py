"""Synthetic retinal fundus images with exact vessel masks: the offline stand-in for HRF/DRIVE.

A sample is a fundus-like RGB picture (orange-red textured background, uneven illumination and
vignetting, a bright optic disc, a darker macula, a circular field of view) crossed by vessel trees
that grow from the optic disc, branch, wander and taper from a few pixels to one pixel wide.
Vessels are rendered from their centre lines, so the mask is exact: a pixel is vessel when its centre
lies within the local vessel radius of a centre-line segment (and inside the field of view); the
picture uses the same geometry with anti-aliased edges, varying contrast, blur and noise on top.

Everything is drawn from one ``numpy.random.Generator``, so ``(size, seed)`` always gives the same
sample. :func:`write_synthetic_vessel_folder` stores samples in the HRF folder layout so the real
folder loader (:mod:`emov2_gen.data.segmentation_datasets`) is exercised by the offline default too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.special import expit
from skimage.transform import resize

# Lengths below are tuned for a 512-pixel field and scaled with the image size.
REFERENCE_SIZE = 512.0
MIN_VESSEL_RADIUS = 0.5  # a 1-pixel-wide vessel: every image column/row still has a pixel centre inside it
STEP_LENGTH = 1.5  # centre-line step in pixels
MAX_SEGMENTS = 20_000  # bound on the work per sample
# How strongly a vessel darkens each channel: fundus vessels are nearly invisible in red, clearest in green.
VESSEL_CHANNEL_ABSORPTION = np.array([0.25, 0.85, 0.6])


@dataclass
class _VesselTip:
    """A growing vessel end: position (y, x), heading (radians, x right / y down), radius and bend."""

    y: float
    x: float
    angle: float
    radius: float
    curvature: float
    contrast: float
    decay_length: float


def _segment_coverage(shape: tuple[int, int], segments: np.ndarray) -> np.ndarray:
    """Per pixel, the max over segments of the anti-aliased capsule coverage ``clip(r - d + 0.5, 0, 1)``.

    ``segments`` rows are (y0, x0, y1, x1, radius, contrast), d is the distance of the pixel centre to the
    segment. Returns (2, H, W): the plain coverage (>= 0.5 exactly when the centre is within r of the
    centre line, which defines the mask) and the contrast-weighted coverage (which darkens the picture).
    """
    height, width = shape
    coverage = np.zeros((2, height, width), dtype=np.float32)  # [geometric coverage, contrast-weighted]
    for y0, x0, y1, x1, radius, contrast in segments:
        reach = radius + 1.0
        top, bottom = int(max(np.floor(min(y0, y1) - reach), 0)), int(min(np.ceil(max(y0, y1) + reach) + 1, height))
        left, right = int(max(np.floor(min(x0, x1) - reach), 0)), int(min(np.ceil(max(x0, x1) + reach) + 1, width))
        if top >= bottom or left >= right:
            continue
        ys = np.arange(top, bottom, dtype=np.float32)[:, None] - y0
        xs = np.arange(left, right, dtype=np.float32)[None, :] - x0
        dy, dx = y1 - y0, x1 - x0
        along = np.clip((ys * dy + xs * dx) / max(dy * dy + dx * dx, 1e-12), 0.0, 1.0)
        distance = np.hypot(ys - along * dy, xs - along * dx)
        patch = np.clip(radius - distance + 0.5, 0.0, 1.0)
        window = coverage[:, top:bottom, left:right]
        np.maximum(window[0], patch, out=window[0])
        np.maximum(window[1], patch * contrast, out=window[1])
    return coverage


def _grow_vessel_trees(
    rng: np.random.Generator, disc: tuple[float, float], fov_center: tuple[float, float], fov_radius: float, side: int
) -> np.ndarray:
    """Centre-line segments (y0, x0, y1, x1, radius, contrast) of all vessel trees starting at the optic disc.

    Four temporal trunks arc around the macula (``side`` is +1 when the disc is right of the centre, so the
    temporal direction is -side), a few thinner nasal trunks leave the other way; every tip wanders,
    tapers, branches now and then and stops at one pixel width or at the edge of the field of view.
    """
    scale = 2.0 * fov_radius / (0.94 * REFERENCE_SIZE)
    radius_scale = max(scale, 0.5)  # small pictures keep vessels that are at least ~1 px wide near the disc
    temporal = -side
    tips: list[_VesselTip] = []
    for vertical in (-1, 1):  # superior and inferior arcades, an artery (lighter) and a vein (darker) each
        for contrast in (rng.uniform(0.35, 0.5), rng.uniform(0.55, 0.75)):
            angle = vertical * np.pi / 2 - vertical * temporal * rng.uniform(0.25, 0.6)
            tips.append(
                _VesselTip(
                    y=disc[0],
                    x=disc[1],
                    angle=angle,
                    radius=rng.uniform(2.4, 3.4) * radius_scale,
                    curvature=-vertical * temporal * rng.uniform(1.5, 2.5) / fov_radius,
                    contrast=contrast,
                    decay_length=rng.uniform(350, 600) * scale,
                )
            )
    nasal_angle = 0.0 if side > 0 else np.pi
    for _ in range(int(rng.integers(2, 5))):
        tips.append(
            _VesselTip(
                y=disc[0],
                x=disc[1],
                angle=nasal_angle + rng.uniform(-1.3, 1.3),
                radius=rng.uniform(1.4, 2.4) * radius_scale,
                curvature=rng.normal(0.0, 0.4) / fov_radius,
                contrast=rng.uniform(0.35, 0.7),
                decay_length=rng.uniform(250, 450) * scale,
            )
        )

    segments: list[tuple[float, ...]] = []
    while tips and len(segments) < MAX_SEGMENTS:
        tip = tips.pop()
        next_branch = rng.uniform(20, 60) * scale
        travelled = 0.0
        while tip.radius >= MIN_VESSEL_RADIUS and len(segments) < MAX_SEGMENTS:
            # The bend relaxes towards straight over ~0.6 field radii, so arcs do not close into loops.
            tip.curvature += -tip.curvature * STEP_LENGTH / (0.6 * fov_radius) + rng.normal(0.0, 0.02) / fov_radius
            tip.angle += tip.curvature * STEP_LENGTH + rng.normal(0.0, 0.035)
            y1 = tip.y + STEP_LENGTH * np.sin(tip.angle)
            x1 = tip.x + STEP_LENGTH * np.cos(tip.angle)
            if np.hypot(y1 - fov_center[0], x1 - fov_center[1]) > fov_radius:
                break
            segments.append((tip.y, tip.x, y1, x1, tip.radius, tip.contrast))
            tip.y, tip.x = y1, x1
            tip.radius *= np.exp(-STEP_LENGTH / tip.decay_length)
            travelled += STEP_LENGTH
            if travelled >= next_branch:
                travelled, next_branch = 0.0, rng.uniform(15, 50) * scale
                child_radius = tip.radius * rng.uniform(0.5, 0.8)
                tip.radius *= rng.uniform(0.85, 0.95)
                if child_radius >= MIN_VESSEL_RADIUS:
                    tips.append(
                        _VesselTip(
                            y=tip.y,
                            x=tip.x,
                            angle=tip.angle + rng.choice((-1, 1)) * rng.uniform(0.45, 1.1),
                            radius=child_radius,
                            curvature=rng.normal(0.0, 1.0) / fov_radius,
                            contrast=tip.contrast * rng.uniform(0.8, 1.05),
                            decay_length=tip.decay_length * rng.uniform(0.4, 0.7),
                        )
                    )
    return np.asarray(segments, dtype=np.float64).reshape(-1, 6)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std random field that varies over about ``cells`` cells across the image."""
    coarse = rng.standard_normal((cells + 1, cells + 1))
    field = resize(coarse, shape, order=3, mode="reflect", anti_aliasing=False)
    return (field - field.mean()) / max(field.std(), 1e-6)


def generate_vessel_sample(
    size: tuple[int, int] = (512, 512), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic fundus sample.

    Returns ``(image, mask, fov)``: ``image`` uint8 (H, W, 3) RGB, ``mask`` uint8 (H, W) with 1 on vessel
    pixels (inside the field of view only), ``fov`` uint8 (H, W) with 1 inside the circular field of view.
    """
    height, width = size
    if height < 32 or width < 32:
        raise ValueError(f"size must be at least 32x32 to hold a fundus picture, got {size}.")
    rng = np.random.default_rng(seed)
    short = min(height, width)
    center = (height / 2 + rng.uniform(-0.02, 0.02) * short, width / 2 + rng.uniform(-0.02, 0.02) * short)
    fov_radius = rng.uniform(0.44, 0.48) * short
    side = int(rng.choice((-1, 1)))  # optic disc right (+1) or left (-1) of the centre
    disc = (center[0] + rng.uniform(-0.08, 0.08) * fov_radius, center[1] + side * rng.uniform(0.35, 0.5) * fov_radius)
    disc_radius = rng.uniform(0.08, 0.1) * fov_radius
    macula = (
        center[0] + rng.uniform(-0.05, 0.05) * fov_radius,
        center[1] - side * rng.uniform(0.05, 0.15) * fov_radius,
    )

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    radial = np.hypot(ys - center[0], xs - center[1]) / fov_radius
    fov = radial <= 1.0

    # Background: orange-red base, vignetting, slow illumination changes and fine choroidal texture.
    base_colour = np.array([rng.uniform(170, 235), rng.uniform(65, 115), rng.uniform(20, 50)])
    vignetting = 1.0 - rng.uniform(0.3, 0.55) * radial**2
    illumination = vignetting * (1.0 + rng.uniform(0.06, 0.14) * _smooth_noise(rng, size, 4))
    texture = gaussian_filter(rng.standard_normal(size), sigma=max(short / 200, 1.0))
    texture /= max(texture.std(), 1e-6)
    image = base_colour * illumination[..., None] * (1.0 + np.array([0.05, 0.035, 0.03]) * texture[..., None])

    macula_dist = np.hypot(ys - macula[0], xs - macula[1]) / (0.14 * fov_radius)
    image *= 1.0 - rng.uniform(0.2, 0.35) * np.exp(-(macula_dist**2))[..., None]
    disc_dist = np.hypot(ys - disc[0], xs - disc[1]) / disc_radius
    disc_weight = expit((1.0 - disc_dist) * 8.0) + 0.25 * np.exp(-((disc_dist / 2.0) ** 2))
    disc_colour = np.array([rng.uniform(235, 255), rng.uniform(190, 230), rng.uniform(120, 170)])
    image += (np.minimum(disc_weight, 1.0)[..., None] * 0.8) * (disc_colour - image)

    # Vessels: darken by the anti-aliased, contrast-weighted coverage; thin vessels are fainter.
    segments = _grow_vessel_trees(rng, disc, center, fov_radius, side)
    segments[:, 5] *= 0.45 + 0.55 * np.minimum(segments[:, 4] / 2.0, 1.0)
    coverage, darkness = _segment_coverage(size, segments)
    darkness = gaussian_filter(darkness, sigma=0.5)
    image *= 1.0 - darkness[..., None] * VESSEL_CHANNEL_ABSORPTION

    # Optics and sensor: slight blur, noise, dark surround with a soft field-of-view edge.
    image = gaussian_filter(image, sigma=(rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.8), 0.0))
    image += rng.normal(0.0, rng.uniform(1.5, 4.0), image.shape)
    edge = np.clip((1.0 - radial) * fov_radius + 0.5, 0.0, 1.0)
    image = image * edge[..., None] + rng.uniform(0, 4, image.shape) * (1.0 - edge[..., None])

    mask = (coverage >= 0.5) & fov
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask.astype(np.uint8), fov.astype(np.uint8)


def sample_seed(seed: int, split: str, index: int) -> int:
    """Independent, reproducible seed for sample ``index`` of ``split`` (splits never share samples)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]).generate_state(1)[0])


class SyntheticVesselDataset(torch.utils.data.Dataset):
    """``num_samples`` synthetic fundus samples generated on the fly (nothing is stored).

    Items are dicts ``{"image": uint8 (H, W, 3), "mask": uint8 (H, W), "fov": uint8 (H, W)}`` -- the same
    raw-sample contract as the ``datasets.Dataset`` rows of a real vessel data set, so both can be wrapped
    by :class:`~emov2_gen.data.segmentation_datasets.SegmentationDataset` for transforms.
    """

    def __init__(self, num_samples: int, size: tuple[int, int] = (512, 512), seed: int = 0, split: str = "train"):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        self.num_samples, self.size, self.seed, self.split = num_samples, tuple(size), seed, split

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples.")
        seed = sample_seed(self.seed, self.split, index % self.num_samples)
        image, mask, fov = generate_vessel_sample(self.size, seed)
        return {"image": image, "mask": mask, "fov": fov}


def write_synthetic_vessel_folder(
    root: Union[str, Path], num_samples: int, size: tuple[int, int] = (512, 512), seed: int = 0, split: str = "train"
) -> Path:
    """Write samples in the HRF layout: ``images/NNN.png``, ``manual1/NNN.png`` (vessel 255) and ``mask/NNN_mask.png``.

    Returns ``root``. The files load with ``load_segmentation_dataset(data_dir=root, layout="hrf")``.
    """
    root = Path(root)
    for sub in ("images", "manual1", "mask"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    samples = SyntheticVesselDataset(num_samples, size, seed, split)
    for index in range(num_samples):
        sample = samples[index]
        name = f"{index:03d}"
        Image.fromarray(sample["image"]).save(root / "images" / f"{name}.png")
        Image.fromarray(sample["mask"] * 255).save(root / "manual1" / f"{name}.png")
        Image.fromarray(sample["fov"] * 255).save(root / "mask" / f"{name}_mask.png")
    return root
