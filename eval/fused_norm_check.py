#!/usr/bin/env python
"""Check and time the fused channel-LayerNorm kernel (emov2_gen.layers.fused_norm) on a CUDA GPU.

    python eval/fused_norm_check.py                       # batch 256, the EMOv2-5M UNet's 32² shapes

1. Correctness: the kernel against the eager ops (in float64) on random inputs of every activation, with and
   without modulation and residual; then whole denoisers with every LayerNorm through the kernel against
   `fused_norm_enabled(False)`, as relative errors, once with PyTorch's default TF32 settings and once with
   TF32 off. cuDNN runs float32 convolutions in TF32 by default, so input differences of float rounding can
   move a product by one TF32 step (~5e-4 relative); with TF32 off only float32 rounding should remain.
2. Speed: the kernel's time against PyTorch's LayerNorm (plus the eager modulation/activation/residual ops it
   replaces) at the (channels, side) pairs the EMOv2-5M UNet normalises, with CUDA-event timing (median).
"""

import argparse

import torch

from emov2_gen.layers import LayerNorm2d, fused_norm, make_act, norm_act
from emov2_gen.layers.fused_norm import channel_norm_kernel, fused_norm_enabled
from emov2_gen.models.registry import build_denoiser

# (channels, map side) of the EMOv2-5M UNet's LayerNorms at 32x32: pre-norms at C, depth-wise norms at e*C.
SHAPES = ((32, 32), (64, 32), (64, 16), (192, 16), (128, 8), (384, 8), (160, 4), (480, 4))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def eager(x, norm, act, shift, scale, residual):
    """The ops the model runs where the kernel does not apply."""
    with fused_norm_enabled(False):
        return norm_act(x, norm, act, shift, scale, residual)


def inputs(batch: int, channels: int, side: int, modulated: bool, residual: bool, dtype=torch.float32):
    x = (torch.randn(batch, channels, side, side, device="cuda") * 2 + 0.5).to(memory_format=torch.channels_last)
    norm = LayerNorm2d(channels).cuda()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    params = torch.randn(batch, 3 * channels, 1, 1, device="cuda") * 0.5
    shift, scale, _ = params.split(channels, dim=1)
    res = torch.randn_like(x) if residual else None
    return x.to(dtype), norm.to(dtype), (shift.to(dtype), scale.to(dtype)) if modulated else (None, None), res


def milliseconds(run, repeats: int = 50) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("This check needs a CUDA GPU.")
    torch.manual_seed(0)
    worst = 0.0
    for act in ("none", "gelu", "silu", "relu"):
        for modulated in (False, True):
            for residual in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    x, norm, (shift, scale), res = inputs(4, 96, 13, modulated, residual, dtype)
                    out = torch.full_like(x, float("nan"))
                    out.copy_(channel_norm_kernel(x, norm.weight, norm.bias, norm.eps, shift, scale, act, res))
                    ref = eager(x.double(), norm.double(), make_act(act), *(
                        t.double() if t is not None else None for t in (shift, scale, res)))  # fmt: skip
                    error = relative_error(out, ref)
                    bound = 1e-5 if dtype == torch.float32 else 1e-2
                    status = "ok" if error < bound and not out.isnan().any() else "FAIL"
                    worst = max(worst, error) if dtype == torch.float32 else worst
                    print(f"kernel {act:5s} mod={int(modulated)} res={int(residual)} {str(dtype):15s} "
                          f"rel. error {error:.2e} {status}")  # fmt: skip
    print(f"worst fp32 kernel relative error {worst:.2e}")

    fused_norm.MIN_FUSED_NUMEL = 0  # every LayerNorm site through the kernel, small as these inputs are
    tf32_defaults = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for name in ("emov2-5m", "emov2-1m"):
        for side in (32, 64):
            model = build_denoiser(name, sample_size=side).cuda().eval()
            sample, t = torch.randn(8, 3, side, side, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
            for module in model.modules():  # non-zero adaLN so that the modulation is exercised
                if hasattr(module, "linear") and module.linear.weight.abs().sum() == 0:
                    torch.nn.init.normal_(module.linear.weight, std=0.02)
            errors = []
            for tf32 in (tf32_defaults, (False, False)):
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
                fused = model(sample, t).sample
                with fused_norm_enabled(False):
                    reference = model(sample, t).sample
                errors.append(relative_error(fused, reference))
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32_defaults
            print(f"{name} {side}²: fused vs eager output relative error {errors[0]:.2e} with the default TF32 settings "
                  f"(convs {tf32_defaults[0]}, matmuls {tf32_defaults[1]}), {errors[1]:.2e} with TF32 off")

    print("\n| channels | side | PyTorch LayerNorm + eager ops (ms) | fused kernel (ms) | speed-up |")
    print("|---|---|---|---|---|")
    gelu = make_act("gelu")
    total_eager = total_fused = 0.0
    for channels, side in SHAPES:
        x, norm, (shift, scale), res = inputs(args.batch_size, channels, side, True, True)
        before = milliseconds(lambda: eager(x, norm, gelu, shift, scale, res))
        weight, bias, eps = norm.weight, norm.bias, norm.eps
        after = milliseconds(lambda: channel_norm_kernel(x, weight, bias, eps, shift, scale, "gelu", res))
        total_eager, total_fused = total_eager + before, total_fused + after
        print(f"| {channels} | {side} | {before:.3f} | {after:.3f} | {before / after:.1f}x |")
    print(f"| all | | {total_eager:.3f} | {total_fused:.3f} | {total_eager / total_fused:.1f}x |")


if __name__ == "__main__":
    main()
