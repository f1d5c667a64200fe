"""GFLOPs of one denoiser forward pass per image, counted with `torch.utils.flop_counter.FlopCounterMode`.

Convention: 2 FLOPs per multiply-accumulate in convolutions, linear layers, matrix multiplications and attention
(both attention matmuls, QK^T and AV, whichever SDPA kernel runs); normalisations, activations, softmax and other
elementwise ops count 0. PyTorch has no FLOP formula for the fused CPU attention kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`), so without the mapping below a model whose attention takes
that kernel (diffusers' `AttnProcessor2_0` does on CPU) would be counted without its attention, while one that falls
back to the math kernel (e.g. value width != query width) would not; the mapping makes both count the same.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..pipelines.pipeline_emov2_image import class_label_rows

FLOP_CONVENTION = (
    "torch.utils.flop_counter.FlopCounterMode, one forward (timestep included) per image: 2 FLOPs per "
    "multiply-accumulate in conv/linear/matmul and in both attention matmuls (QK^T, AV); norms, activations, "
    "softmax and elementwise ops are not counted"
)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_ATTENTION_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts the fused CPU attention kernel (absent from torch's formulas)."""
    return FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOP_FORMULAS)


@torch.no_grad()
def count_gflops(
    model: nn.Module, sample_size: Union[int, tuple[int, int]], in_channels: int, batch_size: int = 1
) -> float:
    """GFLOPs per image of `model(sample, timestep)` on a (batch_size, in_channels, H, W) zero sample.

    `model` follows the `UNet2DModel` call contract; a class-conditional model (a label table, `class_label_rows`:
    the UNets, D-EMOv2 and diffusers' DiT) gets class label 0. The count for the whole batch is divided by
    `batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    parameter = next(model.parameters())
    sample = torch.zeros(batch_size, in_channels, height, width, device=parameter.device, dtype=parameter.dtype)
    timestep = torch.full((batch_size,), 500, device=parameter.device, dtype=torch.long)
    class_labels = None
    if getattr(model, "config", None) is not None and class_label_rows(model) is not None:
        class_labels = torch.zeros(batch_size, device=parameter.device, dtype=torch.long)
    counter = flop_counter()
    with counter:
        model(sample, timestep, class_labels=class_labels)
    return counter.get_total_flops() / batch_size / 1e9
