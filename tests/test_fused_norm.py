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

from emov2_gen.layers import LayerNorm2d, make_act, norm_act
from emov2_gen.layers.fused_norm import (
    activation_kind,
    fused_kernel_enabled,
    fused_norm_enabled,
    kernel_shapes_fit,
    kernel_takes_operands,
)

# Runs in a fresh interpreter: TRITON_INTERPRET must be set before the kernel is decorated (at import).
_KERNEL_CHECK = textwrap.dedent(
    """
    import itertools, json, torch
    from emov2_gen.layers import LayerNorm2d, make_act
    from emov2_gen.layers.fused_norm import channel_norm_kernel

    torch.manual_seed(0)
    errors = {}
    for channels, act, modulated, residual, layout in itertools.product(
        (32, 96, 160), ("none", "gelu", "silu", "relu"), (False, True, "batch1"), (False, True), ("nchw", "nhwc")
    ):
        b, h, w = 3, 5, 7  # 105 rows per sample: not a multiple of any block of rows
        x = torch.randn(b, channels, h, w) * 3 + 1
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        norm = LayerNorm2d(channels, eps=1e-6)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
        # adaLN's split views of one (B, 2C + 4, 1, 1) projection: channel stride 1, sample stride 2C + 4
        # (modulated == "batch1": one (1, C, 1, 1) modulation broadcast over the batch, as with a batch-1 temb)
        params = torch.randn(1 if modulated == "batch1" else b, 2 * channels + 4, 1, 1) * 0.5
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
        key = f"C{channels}-{act}-mod{modulated}-res{int(residual)}-{layout}"
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
    assert len(errors) == 3 * 4 * 3 * 2 * 2 + 1
    model_error, model_scale, _, _ = errors.pop("emov2-1m")
    assert 0 < model_error <= 1e-5 * model_scale, model_error  # the kernel ran (rounding differs) and matches
    for key, (max_error, scale, channels_last, shape) in errors.items():
        assert shape == [3, int(key.split("-")[0][1:]), 5, 7], key
        assert channels_last, key
        assert max_error <= 1e-5 * max(1.0, scale), (key, max_error)


def test_environment_switch_is_read_at_each_call_and_the_context_manager_wins(monkeypatch):
    monkeypatch.setenv("EMOV2_GEN_FUSED_NORM", "1")
    assert fused_kernel_enabled()  # Triton comes with the test extra
    monkeypatch.setenv("EMOV2_GEN_FUSED_NORM", "0")  # after import: still honoured
    assert not fused_kernel_enabled()
    with fused_norm_enabled(True):
        assert fused_kernel_enabled()
        with fused_norm_enabled(False):
            assert not fused_kernel_enabled()
        assert fused_kernel_enabled()
    assert not fused_kernel_enabled()


def test_kernel_conditions_on_the_tensors(monkeypatch):
    big = torch.randn(1, 32, 256, 256)  # 2^21 elements: MIN_FUSED_NUMEL
    with torch.no_grad():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not kernel_takes_operands(big)  # a CPU tensor: eager ops
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernel_takes_operands(big)
        assert not kernel_takes_operands(big[:, :, :128])  # too small to pay off
        assert not kernel_takes_operands(big.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernel_takes_operands(big)
    weight = torch.ones(32, requires_grad=True)
    assert not kernel_takes_operands(big, weight)  # autograd records: the kernel has no backward
    with torch.no_grad():
        assert kernel_takes_operands(big, weight)


def test_kernel_shapes_fit_only_what_it_computes():
    x = torch.randn(3, 8, 4, 4)
    assert kernel_shapes_fit(x, None, None, None)
    assert kernel_shapes_fit(x, torch.randn(3, 8, 1, 1), torch.randn(3, 8, 1, 1), torch.randn(3, 8, 4, 4))
    assert kernel_shapes_fit(x, torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1), None)  # batch-1 broadcast
    assert not kernel_shapes_fit(x, torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4), None)  # per-pixel modulation
    assert not kernel_shapes_fit(x, torch.randn(6, 8, 1, 1), torch.randn(6, 8, 1, 1), None)  # would broadcast x
    assert not kernel_shapes_fit(x, None, None, torch.randn(1, 8, 4, 4))  # a broadcasting residual
    assert not kernel_shapes_fit(x[0], None, None, None)


def test_activation_kinds_are_an_allowlist():
    class LeakyReLUNamedRelu(torch.nn.ReLU):  # a subclass may compute something else: not taken
        def forward(self, x):
            return torch.nn.functional.leaky_relu(x)

    assert activation_kind(None) == "none"
    assert activation_kind(torch.nn.Identity()) == "none"
    assert activation_kind(make_act("gelu")) == "gelu"
    assert activation_kind(torch.nn.GELU(approximate="tanh")) is None  # not implemented: eager path
    assert activation_kind(make_act("silu")) == "silu"
    assert activation_kind(make_act("relu")) == "relu"
    assert activation_kind(torch.nn.Tanh()) is None
    assert activation_kind(torch.nn.LeakyReLU()) is None
    assert activation_kind(LeakyReLUNamedRelu()) is None


@pytest.mark.parametrize("kind", ["relu", "gelu", "silu"])
def test_norm_act_matches_the_composed_ops_with_exact_gradients_and_leaves_inputs_alone(kind):
    torch.manual_seed(0)
    norm, act = LayerNorm2d(8), make_act(kind)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)
    shift, scale = torch.randn(2, 8, 1, 1, requires_grad=True), torch.randn(2, 8, 1, 1, requires_grad=True)
    kept = residual.detach().clone()
    out = norm_act(x, norm, act, shift, scale, residual)
    assert torch.equal(residual.detach(), kept) and out.data_ptr() != residual.data_ptr()
    out.square().sum().backward()
    leaves = [t.detach().requires_grad_() for t in (x, shift, scale, residual)]
    x_ref, shift_ref, scale_ref, residual_ref = leaves
    y = torch.nn.functional.layer_norm(x_ref.permute(0, 2, 3, 1), (8,), norm.weight, norm.bias, norm.eps)
    y = y.permute(0, 3, 1, 2) * (1 + scale_ref) + shift_ref
    reference = getattr(torch.nn.functional, kind)(y) + residual_ref
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference)
    for got, want in zip((x, shift, scale, residual), leaves):
        torch.testing.assert_close(got.grad, want.grad)


def test_norm_act_refuses_half_a_modulation():
    with pytest.raises(ValueError, match="both shift and scale"):
        norm_act(torch.randn(1, 4, 2, 2), LayerNorm2d(4), shift=torch.zeros(1, 4, 1, 1))
