"""`EMOv2SegmentationPipeline`: image(s) in, per-pixel class masks and class probabilities out.

Images are normalised as in training (ImageNet mean/std) and segmented by an `EMOv2UNetForSegmentation`
(or any model returning `.logits` of shape (B, num_classes, H, W) from `model(pixel_values)`). With a
`crop_size` the image is segmented by sliding-window inference (mmseg "slide" mode: overlapping windows,
averaged logits), which keeps memory bounded for large fundus photographs and shows the model the
input size it was trained on; without one the whole image goes through the model at once.
The window settings are part of the pipeline's config, so a pipeline saved by `train/train_seg.py`
segments with the crop it was trained on:

    pipe = EMOv2SegmentationPipeline.from_pretrained(folder)      # with emov2_gen imported
    out = pipe([image_a, image_b])                                 # PIL, numpy or torch images, any sizes
    out.masks[0], out.probabilities[0]                             # (H, W) class ids, (K, H, W) probabilities
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from emov2_gen.data.segmentation_datasets import normalize_transform
from emov2_gen.evaluation.sliding_window import sliding_window_inference

OUTPUT_TYPES = ("np", "pt", "pil")
NORMALIZE = normalize_transform()  # the training normalisation (ImageNet mean/std)
ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]


@dataclass
class SegmentationPipelineOutput(BaseOutput):
    """One entry per input image.

    masks: class ids (H, W) -- uint8 numpy arrays ("np"), long tensors ("pt"), or greyscale PIL images with
        class id x 255 // (num_classes - 1), i.e. 0/255 for vessel masks ("pil").
    probabilities: softmax class probabilities (num_classes, H, W), float32 numpy arrays (tensors for "pt").
    """

    masks: list
    probabilities: list


class EMOv2SegmentationPipeline(DiffusionPipeline):
    r"""Semantic segmentation with an `EMOv2UNetForSegmentation`.

    Args:
        model: the segmentation model.
        crop_size: sliding-window size (int or (h, w)); None segments every image in one forward pass.
        stride: window step; None means 2/3 of the crop (mmseg's HRF setting: 256 / 170).
    """

    model_cpu_offload_seq = "model"

    def __init__(
        self,
        model: ModelMixin,
        crop_size: Optional[Union[int, tuple[int, int]]] = None,
        stride: Optional[Union[int, tuple[int, int]]] = None,
    ) -> None:
        super().__init__()
        self.register_modules(model=model)
        self.register_to_config(crop_size=crop_size, stride=stride)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image -> a normalised (1, 3, H, W) float tensor.

        Accepts PIL images (converted to RGB), uint8 arrays/tensors, or float arrays/tensors in [0, 1];
        arrays are (H, W, 3) or (H, W), tensors (3, H, W).
        """
        if isinstance(image, PIL.Image.Image):
            pixels = TF.pil_to_tensor(image.convert("RGB"))
        elif isinstance(image, np.ndarray):
            array = image[..., None].repeat(3, axis=-1) if image.ndim == 2 else image
            if array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(f"A numpy image must be (H, W, 3) or (H, W), got shape {image.shape}.")
            pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"A tensor image must be (3, H, W), got shape {tuple(image.shape)}.")
            pixels = image
        else:
            raise TypeError(f"Unsupported image type {type(image).__name__}; pass PIL images, numpy arrays or tensors.")
        if pixels.is_floating_point() and (pixels.min() < 0 or pixels.max() > 1):
            raise ValueError("Float images must hold values in [0, 1] (uint8 images 0-255).")
        if not pixels.is_floating_point() and pixels.dtype != torch.uint8:
            raise ValueError(f"Integer images must be uint8, got {pixels.dtype}.")
        return NORMALIZE(tv_tensors.Image(pixels)).as_subclass(torch.Tensor)[None]

    @torch.no_grad()
    def __call__(
        self,
        images: Union[ImageInput, list[ImageInput]],
        crop_size: Optional[Union[int, tuple[int, int]]] = None,
        stride: Optional[Union[int, tuple[int, int]]] = None,
        windows_per_batch: int = 8,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> Union[SegmentationPipelineOutput, tuple]:
        """Segment `images` (one image or a list, sizes may differ; a (B, 3, H, W) tensor is a list of B).

        `crop_size`/`stride` override the pipeline's sliding-window config for this call.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("No images were given.")
        crop_size = crop_size if crop_size is not None else self.config.crop_size
        stride = stride if stride is not None else self.config.stride
        if crop_size is not None and stride is None:
            stride = tuple(max(1, 2 * c // 3) for c in ((crop_size, crop_size) if isinstance(crop_size, int) else crop_size))
        num_classes = self.model.config.num_classes
        device, dtype = self._execution_device, self.model.dtype

        def segment(pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values.to(dtype)).logits.float()

        masks, probabilities = [], []
        for image in self.progress_bar(images):
            pixel_values = self.preprocess(image).to(device)
            if crop_size is None:
                logits = segment(pixel_values)
            else:
                logits = sliding_window_inference(segment, pixel_values, crop_size, stride, num_classes, windows_per_batch)
            probs = logits.softmax(dim=1)[0]
            masks.append(probs.argmax(dim=0))
            probabilities.append(probs)

        if output_type == "pt":
            output = (masks, probabilities)
        else:
            probabilities = [p.cpu().numpy() for p in probabilities]
            masks = [m.to(torch.uint8).cpu().numpy() for m in masks]
            if output_type == "pil":
                masks = [PIL.Image.fromarray(m * (255 // (num_classes - 1))) for m in masks]
            output = (masks, probabilities)
        self.maybe_free_model_hooks()
        if not return_dict:
            return output
        return SegmentationPipelineOutput(masks=output[0], probabilities=output[1])
