"""The fused channel-LayerNorm kernel against the eager ops it replaces, run by Triton's CPU interpreter.

The kernel only runs on CUDA in the library; TRITON_INTERPRET=1 executes the same Triton program on CPU
tensors, so its indexing, masking, modulation, activations and residual are checked here without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from emov2_gen.layers import LayerNorm2d, fused_norm, make_act
from emov2_gen.layers.fused_norm import activation_kind, fused_norm_enabled, kernel_applies, norm_act

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before the kernel is decorated (at import).
_KERNEL_CHECK = textwrap.dedent(
    """
    import itertools, json, torch
    from emov2_gen.layers import LayerNorm2d, make_act
    from emov2_gen.layers.fused_norm import channel_norm_kernel

    torch.manual_seed(0)
    errors = {}
    for channels, act, modulated, residual, layout in itertools.product(
        (32, 96, 160), ("none", "gelu", "silu", "relu"), (False, True), (False, True), ("nchw", "nhwc")
    ):
        b, h, w = 3, 5, 7  # 105 rows per sample: not a multiple of any block of rows
        x = torch.randn(b, channels, h, w) * 3 + 1
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        norm = LayerNorm2d(channels, eps=1e-6)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
        # adaLN's split views of one (B, 2C + 4, 1, 1) projection: channel stride 1, sample stride 2C + 4
        params = torch.randn(b, 2 * channels + 4, 1, 1) * 0.5
        shift, scale, _ = params.split((channels, channels, 4), dim=1)
        res = torch.randn(b, channels, h, w) if residual else None
        with torch.no_grad():
            expected = norm(x)
            if modulated:
                expected = torch.addcmul(shift, expected, 1 + scale)
            expected = make_act(act)(expected)
            if residual:
                expected = expected + res
            out = channel_norm_kernel(
                x, norm.weight, norm.bias, norm.eps, shift if modulated else None, scale if modulated else None,
                act, res,
            )
        key = f"C{channels}-{act}-mod{int(modulated)}-res{int(residual)}-{layout}"
        errors[key] = [(out - expected).abs().max().item(), expected.abs().max().item(),
                       out.is_contiguous(memory_format=torch.channels_last), list(out.shape)]

    # Whole denoisers: every LayerNorm site through the kernel (the interpreter enables it on CPU) vs eager.
    from emov2_gen.layers import fused_norm
    from emov2_gen.layers.fused_norm import fused_norm_enabled
    from emov2_gen.models.registry import build_denoiser
    fused_norm.MIN_FUSED_NUMEL = 0  # every LayerNorm of the small test model through the kernel
    for name in ("emov2-1m",):
        model = build_denoiser(name, sample_size=16).eval()
        for module in model.modules():  # non-zero adaLN so that the modulation is exercised
            if module.__class__.__name__ == "AdaLNModulation":
                torch.nn.init.normal_(module.linear.weight, std=0.05)
        sample, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
        with torch.no_grad():
            fused = model(sample, t).sample
            with fused_norm_enabled(False):
                reference = model(sample, t).sample
        errors[name] = [(fused - reference).abs().max().item(), reference.abs().max().item(), True, list(fused.shape)]
    print(json.dumps(errors))
    """
)


def test_kernel_matches_the_eager_ops_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "EMOV2_GEN_FUSED_NORM": "1"}
    result = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 3 * 4 * 2 * 2 * 2 + 1
    model_error, model_scale, _, _ = errors.pop("emov2-1m")
    assert 0 < model_error <= 1e-5 * model_scale, model_error  # the kernel ran (rounding differs) and matches
    for key, (max_error, scale, channels_last, shape) in errors.items():
        assert shape == [3, int(key.split("-")[0][1:]), 5, 7], key
        assert channels_last, key
        assert max_error <= 1e-5 * max(1.0, scale), (key, max_error)


def test_eager_path_is_taken_off_cuda_and_when_disabled():
    norm, act = LayerNorm2d(8), make_act("gelu", inplace=True)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert not kernel_applies(x, norm, activation_kind(act))  # CPU tensor: the eager ops run
        torch.testing.assert_close(norm_act(x, norm, act), torch.nn.functional.gelu(norm(x)))
    before = fused_norm._enabled  # EMOV2_GEN_FUSED_NORM's setting
    with fused_norm_enabled(False):
        assert not fused_norm._enabled
    assert fused_norm._enabled == before


def test_activation_kinds():
    assert activation_kind(None) == "none"
    assert activation_kind(torch.nn.Identity()) == "none"
    assert activation_kind(make_act("gelu", inplace=True)) == "gelu"
    assert activation_kind(torch.nn.GELU()) == "gelu"
    assert activation_kind(torch.nn.GELU(approximate="tanh")) is None  # not implemented: eager path
    assert activation_kind(torch.nn.SiLU()) == "silu"
    assert activation_kind(torch.nn.ReLU()) == "relu"
    assert activation_kind(torch.nn.Tanh()) is None


@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_eager_residual_add_keeps_gradients_exact(kind):
    """The eager path adds the residual into the activation's output in place, except after ReLU, whose output
    autograd saves: an in-place add there would fail the backward."""
    torch.manual_seed(0)
    norm, act = LayerNorm2d(8), make_act(kind, inplace=True)
    x, residual = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)
    out = norm_act(x, norm, act, residual=residual)
    out.square().sum().backward()
    x_ref, residual_ref = x.detach().requires_grad_(), residual.detach().requires_grad_()
    reference = getattr(torch.nn.functional, kind)(norm(x_ref)) + residual_ref
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(residual.grad, residual_ref.grad)
