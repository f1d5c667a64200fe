"""`AlignedLoadingMixin`: `from_pretrained` that leaves every CPU weight in freshly allocated, aligned memory.

diffusers loads a safetensors checkpoint (``low_cpu_mem_usage``, its default) by assigning the tensors as they
lie in the file buffer, whose offsets are only 8-byte aligned. CPU kernels (oneDNN convolutions, MKL GEMMs)
take another vector path -- another summation order -- for misaligned operands, so a reloaded model's output
differed from the saved model's in the last bit (1 ulp on ~2% of pixels). One copy per tensor at load time
restores bit-identical save/load round trips.

A pipeline saves a component as [its module, its class]; diffusers then looks `ModelMixin` up in that module's
namespace to pick the loader, so every model module keeps `ModelMixin` imported although it subclasses this mixin.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin

ALIGNMENT_BYTES = 64  # torch's CPU allocator alignment (a cache line; what AVX-512 loads want)


def realign_cpu_tensors(model: torch.nn.Module) -> torch.nn.Module:
    """Copy each CPU parameter and buffer that does not start on an `ALIGNMENT_BYTES` boundary; returns `model`."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT_BYTES:
                tensor.data = tensor.data.clone()
    return model


class AlignedLoadingMixin(ModelMixin):
    """A `ModelMixin` whose `from_pretrained` reproduces the saved model's outputs bit for bit on CPU."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        realign_cpu_tensors(model)
        return loaded
