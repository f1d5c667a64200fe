"""Shared test helpers: the offline data folder, a naive SEW-MHSA reference and a tiny EMOv2 UNet factory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from emov2_gen import EMOv2UNet2DModel
from emov2_gen.layers import SEWMHSA

# CI clones the repository with `shared/` beside it.
SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The smallest EMOv2 UNet preset shrunk to test size: 4 levels (downsampling factor 8), conv level
# at full resolution, SEW-MHSA below it, one i2RMB per level.
TINY_UNET_OVERRIDES = dict(
    sample_size=16, block_out_channels=(16, 16, 32, 32), expansion_ratios=2.0, attention_head_dim=8, layers_per_block=1
)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    assert SHARED_DATA_DIR.is_dir(), f"Offline data folder missing: {SHARED_DATA_DIR}"
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def mnist_dir(shared_data_dir) -> Path:
    """The offline MNIST `datasets` folder (train/test parquet)."""
    return shared_data_dir / "mnist"


@pytest.fixture(scope="module")
def one_thread():
    """Run (a test module) on one torch thread, then restore: on a busy 2-core machine two threads spend most of their time
    waiting for each other (small ops get ~100x slower), and the tiny test models gain nothing from two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_tiny_unet() -> Callable[..., EMOv2UNet2DModel]:
    """`make_tiny_unet(**overrides)` -> a seeded, tiny `emov2-1m` UNet in eval mode."""

    def make(**overrides) -> EMOv2UNet2DModel:
        torch.manual_seed(0)
        return EMOv2UNet2DModel.from_preset("emov2-1m", **{**TINY_UNET_OVERRIDES, **overrides}).eval()

    return make


def naive_sew_mhsa(module: SEWMHSA, x: torch.Tensor, to_value: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """SEW-MHSA computed from its definition (architecture brief §1.2), for cross-checking the module.

    The map is zero-padded on the right/bottom to a multiple of the window BEFORE the q/k and value
    projections (so padded tokens carry the projection biases). Each output token attends, per head and
    per partition, with softmax(q k^T / sqrt(d)) v, to the keys of its own w x w tile ("local") and of
    its stride-n grid spanning the padded map ("dilated"); the partition outputs are summed. The key set
    of every token is listed by a plain loop over tokens; the attention itself is then one batched gather.
    """
    b, c, h, w = x.shape
    wh = module.window_size if module.window_size > 0 else h
    ww = module.window_size if module.window_size > 0 else w
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    n1, n2 = hp // wh, wp // ww
    padded = x.new_zeros(b, c, hp, wp)
    padded[:, :, :h, :w] = x
    qk = torch.einsum("oc,bchw->bohw", module.qk.weight.flatten(1), padded)
    if module.qk.bias is not None:
        qk = qk + module.qk.bias.view(1, -1, 1, 1)
    heads = module.num_heads
    q, k = (t.reshape(b, heads, -1, hp * wp) for t in qk.chunk(2, dim=1))
    v = to_value(padded).reshape(b, heads, -1, hp * wp)

    def attended(r: int, col: int, partition: str) -> list[int]:
        if partition == "local":
            rows = range(r // wh * wh, r // wh * wh + wh)
            cols = range(col // ww * ww, col // ww * ww + ww)
        else:
            rows, cols = range(r % n1, hp, n1), range(col % n2, wp, n2)
        return [i * wp + j for i in rows for j in cols]

    # (h*w tokens, partitions, wh*ww keys): flat indices into the padded grid.
    index = torch.tensor([[attended(r, col, p) for p in module.partitions] for r in range(h) for col in range(w)])
    queries = q.view(b, heads, -1, hp, wp)[..., :h, :w].flatten(3)  # (B, heads, d, h*w)
    scores = torch.einsum("bndt,bndtpk->bntpk", queries, k[..., index]) / math.sqrt(q.shape[2])
    out = torch.einsum("bntpk,bnetpk->bnet", scores.softmax(dim=-1), v[..., index])  # sums the partitions
    return out.reshape(b, -1, h, w)


@pytest.fixture(scope="session")
def sew_mhsa_reference() -> Callable[..., torch.Tensor]:
    """The naive per-token SEW-MHSA (`naive_sew_mhsa(module, x, to_value)`)."""
    return naive_sew_mhsa
