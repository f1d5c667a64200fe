#!/usr/bin/env python
"""Why does `unet-emov2-1m` predict no vessel pixel from scratch? An instrumented, single-threaded training probe.

Project issue 16. Trains `EMOv2UNetForSegmentation` variants with a plain loop (AdamW, batch 8, crops of synthetic
fundi, cross-entropy) and records, at init and during the first steps:

- per level (encoder outputs `enc<i>`, decoder outputs `dec<i>`; i = level, 0 = full resolution): activation std,
  the high-frequency share of the activation energy (energy of x - avgpool3x3(x) over the energy of x - mean: how
  much pixel-scale detail a map carries), and the held-out R^2 of a ridge probe from the map's channels to the
  vessel fraction at that resolution (how linearly visible vessels are there);
- the locality of the full-resolution decoder output: the share of |d out(center) / d input| that falls within
  the 3x3 (and 9x9) neighbourhood of the pixel -- 1-px vessels need a sharply local path;
- per part parameter-gradient norms (encoder/decoder level, heads) and the layer-scale values;
- predicted vessel fraction and vessel Dice / mDice of full-image inference on held-out validation fundi.

    OMP_NUM_THREADS=1 python eval/seg_diagnose.py --variants official fixed plain --steps 120
    OMP_NUM_THREADS=1 python eval/seg_diagnose.py --init_only          # the init table for every variant

Variants are named in `VARIANTS` (preset + config overrides + recipe overrides). Results go to
`--output` (JSON) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from emov2_gen import EMOv2UNetForSegmentation
from emov2_gen.data.segmentation_datasets import SegmentationDataset, build_eval_transform, build_train_transform
from emov2_gen.data.synthetic_vessels import SyntheticVesselDataset
from emov2_gen.evaluation.segmentation_metrics import SegmentationMetric
from emov2_gen.layers import ConvNormAct

# The paper-faithful layout of the 1M preset (before the issue-16 fix): attention at every i2RMB level, no shortcut on
# width-changing units, residual layer scale 1e-6.
OFFICIAL_1M = dict(attention_levels=None, width_shortcut=False, layer_scale_init=1e-6, nonresidual_layer_scale_init=1.0)
CE = dict(dice_loss_weight=0.0)
# What a hand-written plain UNet usually has: one Conv3x3+BN+ReLU and a 1x1 classifier, no dropout, no auxiliary head.
SIMPLE_HEAD = dict(decode_head_type="fcn", head_dropout=0.0, auxiliary_head_channels=0)  # the issue's loop: cross-entropy (decode head + 0.4 x auxiliary head)


def _plain_full_res_decoder(model: EMOv2UNetForSegmentation) -> None:
    """Replace the full-resolution decoder block by two Conv3x3+BN+ReLU units (what the plain UNet has there)."""
    block = model.decoder[-1].block
    c_in, c_out = block[0].in_channels, block[0].out_channels
    model.decoder[-1].block = nn.Sequential(ConvNormAct(c_in, c_out, 3, norm="bn", act="relu"),
                                            ConvNormAct(c_out, c_out, 3, norm="bn", act="relu"))


# name -> (preset, model overrides, recipe overrides, optional model surgery)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], Optional[Callable]]] = {
    "plain": ("unet-s5-d16-base16", CE, {}, None),
    "plain-simplehead": ("unet-s5-d16-base16", {**CE, **SIMPLE_HEAD}, {}, None),
    "plain-4lvl-simplehead": ("unet-s5-d16-base16", {**CE, **SIMPLE_HEAD, "num_levels": 4}, {}, None),
    "plain-ce+dice": ("unet-s5-d16-base16", {}, {}, None),
    "plain-lr1e-2": ("unet-s5-d16-base16", CE, dict(lr=1e-2), None),
    "official-simplehead": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, **SIMPLE_HEAD}, {}, None),
    "shortcut-simplehead": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, **SIMPLE_HEAD, "width_shortcut": True}, {}, None),
    "attn-l2+-simplehead": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, **SIMPLE_HEAD, "attention_levels": (2, 3, 4)}, {}, None),
    "no-attn-simplehead": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, **SIMPLE_HEAD, "attention": False}, {}, None),
    "official": ("unet-emov2-1m", {**OFFICIAL_1M, **CE}, {}, None),
    "official-lr5e-4": ("unet-emov2-1m", {**OFFICIAL_1M, **CE}, dict(lr=5e-4), None),
    "official-lr1e-2": ("unet-emov2-1m", {**OFFICIAL_1M, **CE}, dict(lr=1e-2), None),
    "official-warmup30": ("unet-emov2-1m", {**OFFICIAL_1M, **CE}, dict(warmup=30), None),
    "ls1": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "layer_scale_init": 1.0}, {}, None),
    "nonres-ls1e-6": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "nonresidual_layer_scale_init": 1e-6}, {}, None),
    "bn": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "norm": "bn", "dw_norm": "bn"}, {}, None),
    "fcn-head": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "decode_head_type": "fcn"}, {}, None),
    "no-aux": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "auxiliary_head_channels": 0}, {}, None),
    "ce+dice": ("unet-emov2-1m", {**OFFICIAL_1M}, {}, None),
    "shortcut-ce+dice": ("unet-emov2-1m", {**OFFICIAL_1M, "width_shortcut": True}, {}, None),
    "attn-l2+-ce+dice": ("unet-emov2-1m", {**OFFICIAL_1M, "attention_levels": (2, 3, 4)}, {}, None),
    "shortcut+attn-l2+-ce+dice": ("unet-emov2-1m", {**OFFICIAL_1M, "width_shortcut": True, "attention_levels": (2, 3, 4)}, {}, None),
    "no-attn": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "attention": False}, {}, None),
    "attn-l2+": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "attention_levels": (2, 3, 4)}, {}, None),
    "shortcut": ("unet-emov2-1m", {**OFFICIAL_1M, **CE, "width_shortcut": True}, {}, None),
    "conv-dec0": ("unet-emov2-1m", {**OFFICIAL_1M, **CE}, {}, _plain_full_res_decoder),
    "fixed": ("unet-emov2-1m", CE, {}, None),  # the current preset (whatever its defaults are), CE only
    "preset": ("unet-emov2-1m", {}, {}, None),  # the current preset with its default loss (CE + Dice)
}
RECIPE = dict(lr=2e-3, warmup=0, weight_decay=0.05, clip=0.0)


# ----------------------------------------------------------------------------------------------- data


class Data:
    """Training crops and held-out validation fundi, drawn reproducibly."""

    def __init__(self, crop: int, size: int = 128, num_train: int = 20, num_val: int = 5, seed: int = 0) -> None:
        train = SyntheticVesselDataset(num_train, (size, size), seed=seed, split="train")
        self.train = SegmentationDataset([train[i] for i in range(num_train)],
                                         build_train_transform((size, size), crop, (1.0, 1.0)), use_fov=False)
        val = SyntheticVesselDataset(num_val, (size, size), seed=seed, split="validation")
        items = [SegmentationDataset([val[i] for i in range(num_val)], build_eval_transform(), use_fov=False)[i]
                 for i in range(num_val)]
        self.val_x = torch.stack([i["pixel_values"] for i in items])
        self.val_y = torch.stack([i["labels"] for i in items])
        self.seed = seed

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        indices = torch.randint(len(self.train), (batch_size,), generator=g).tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + step)
            items = [self.train[i] for i in indices]
        return torch.stack([i["pixel_values"] for i in items]), torch.stack([i["labels"] for i in items])


# ----------------------------------------------------------------------------------------------- probes


def level_maps(model: EMOv2UNetForSegmentation, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encoder outputs enc<i> and decoder outputs dec<i> (i = level; dec<top> is the bottleneck = enc<top>)."""
    features = model._encode(x)
    decoded = model._decode(features)
    maps = {f"enc{i}": f for i, f in enumerate(features)}
    maps.update({f"dec{i}": d for i, d in enumerate(decoded[:-1])})
    return maps


def high_frequency_share(x: torch.Tensor) -> float:
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    detail = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (detail.square().sum() / centred.square().sum().clamp_min(1e-30)).item()


def probe_r2(features: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-2) -> float:
    """Held-out R^2 of a ridge probe channels -> vessel fraction at the map's resolution (fit on the first images)."""
    b, c, h, w = features.shape
    target = F.adaptive_avg_pool2d((labels == 1).float()[:, None], (h, w))
    x = features.permute(0, 2, 3, 1).reshape(b, h * w, c).double()
    y = target.reshape(b, h * w).double()
    fit, test = slice(0, b - 2), slice(b - 2, b)
    xf, yf = x[fit].reshape(-1, c), y[fit].reshape(-1)
    mean, std = xf.mean(0), xf.std(0).clamp_min(1e-12)
    xf = torch.cat([(xf - mean) / std, torch.ones(len(xf), 1, dtype=xf.dtype)], 1)
    coef = torch.linalg.solve(xf.T @ xf + ridge * len(xf) * torch.eye(c + 1, dtype=xf.dtype), xf.T @ (yf - yf.mean()))
    xt = x[test].reshape(-1, c)
    pred = torch.cat([(xt - mean) / std, torch.ones(len(xt), 1, dtype=xt.dtype)], 1) @ coef + yf.mean()
    yt = y[test].reshape(-1)
    return (1 - (yt - pred).square().sum() / (yt - yt.mean()).square().sum()).item()


def locality(model: EMOv2UNetForSegmentation, x: torch.Tensor) -> tuple[float, float]:
    """Share of |d sum_c dec0[c, p] / d x| within 3x3 and 9x9 of the pixel p at the centre (train mode, summed over the batch)."""
    x = x.clone().requires_grad_(True)
    d0 = level_maps(model, x)["dec0"]
    h, w = d0.shape[-2:]
    d0[:, :, h // 2, w // 2].sum().backward()
    g = x.grad.abs().sum(dim=(0, 1))
    model.zero_grad(set_to_none=True)
    total = g.sum().clamp_min(1e-30)
    return (g[h // 2 - 1 : h // 2 + 2, w // 2 - 1 : w // 2 + 2].sum() / total).item(), (
        g[h // 2 - 4 : h // 2 + 5, w // 2 - 4 : w // 2 + 5].sum() / total).item()


def part_grad_norms(model: EMOv2UNetForSegmentation) -> dict[str, float]:
    parts = {f"enc{i}": m for i, m in enumerate(model.encoder)}
    levels = len(model.encoder)
    parts.update({f"dec{levels - 2 - j}": m for j, m in enumerate(model.decoder)})
    parts["head"] = model.decode_head
    if model.auxiliary_head is not None:
        parts["aux"] = model.auxiliary_head
    out = {}
    for name, module in parts.items():
        grads = [p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None]
        out[name] = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
    return out


def layer_scales(model: EMOv2UNetForSegmentation) -> dict[str, float]:
    """Mean |gamma| of residual and non-residual i2RMB units."""
    res, nonres = [], []
    for m in model.modules():
        if getattr(m, "layer_scale", None) is not None:
            (res if m.residual else nonres).append(m.layer_scale.detach().abs().mean().item())
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"residual": mean(res), "nonresidual": mean(nonres)}


@torch.no_grad()
def evaluate(model: EMOv2UNetForSegmentation, data: Data) -> dict[str, float]:
    was_training = model.training
    model.eval()
    logits = model(data.val_x).logits
    model.train(was_training)
    metric = SegmentationMetric(2)
    metric.update(logits, data.val_y)
    scores = metric.compute()
    pred = logits.argmax(1)
    return {"vessel_dice": round(scores.vessel_dice * 100, 2), "mDice": round(scores.mDice * 100, 2),
            "pred_vessel_frac": round((pred == 1).float().mean().item() * 100, 2),
            "true_vessel_frac": round((data.val_y == 1).float().mean().item() * 100, 2)}


def snapshot(model: EMOv2UNetForSegmentation, data: Data, x: torch.Tensor) -> dict[str, Any]:
    """Activation scale, detail share and vessel probe per level (on the validation fundi), plus locality."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        maps = level_maps(model, data.val_x)
    model.train(was_training)
    levels = {name: {"std": round(m.std().item(), 4), "hf": round(high_frequency_share(m), 3),
                     "probe_r2": round(probe_r2(m, data.val_y), 3) if m.shape[1] * 10 < 3 * m.shape[2] * m.shape[3] else None}
              for name, m in maps.items()}
    local3, local9 = locality(model, x)
    return {"levels": levels, "locality3": round(local3, 3), "locality9": round(local9, 3)}


# ----------------------------------------------------------------------------------------------- runs


def build(name: str, seed: int = 0) -> tuple[EMOv2UNetForSegmentation, dict[str, Any]]:
    preset, overrides, recipe, surgery = VARIANTS[name]
    torch.manual_seed(seed)
    model = EMOv2UNetForSegmentation.from_preset(preset, **overrides)
    if surgery is not None:
        surgery(model)
        model._init_weights(True)  # mmseg Kaiming init for the new convs too
    return model, {**RECIPE, **recipe}


def run(name: str, data: Data, steps: int, batch_size: int, eval_every: int, probe_steps: tuple[int, ...]) -> dict[str, Any]:
    model, recipe = build(name)
    model.train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"])
    warmup = recipe["warmup"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    record: dict[str, Any] = {"variant": name, "preset": VARIANTS[name][0], "recipe": recipe,
                              "parameters": model.num_parameters(), "loss": [], "evals": {}, "probes": {}, "grads": {}}
    x0, _ = data.batch(0, batch_size)
    start = time.perf_counter()
    for step in range(steps + 1):
        if step in probe_steps:
            record["probes"][step] = {**snapshot(model, data, x0), "layer_scale": layer_scales(model)}
        if step % eval_every == 0 or step == steps:
            record["evals"][step] = evaluate(model, data)
        if step == steps:
            break
        x, y = data.batch(step, batch_size)
        out = model(x, labels=y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if step in probe_steps or step % eval_every == 0:
            record["grads"][step] = {k: round(v, 5) for k, v in part_grad_norms(model).items()}
            with torch.no_grad():
                record.setdefault("train_pred_vessel_frac", {})[step] = round(
                    (out.logits.argmax(1) == 1).float().mean().item() * 100, 2)
        if recipe["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])
        optimizer.step()
        scheduler.step()
        record["loss"].append(round(out.loss.item(), 4))
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def summary_table(records: list[dict[str, Any]]) -> str:
    lines = ["| variant | params (M) | loss first10 → last10 | vessel Dice by step | pred vessel % (true) | locality3 init | "
             "dec0 probe R² init → end | dec0 hf init | s |", "|" + "---|" * 9]
    for r in records:
        loss = r["loss"]
        evals = r["evals"]
        dice = ", ".join(f"{s}:{e['vessel_dice']:.1f}" for s, e in evals.items())
        last = evals[max(evals, key=int)]
        probes = r["probes"]
        first, final = probes[min(probes, key=int)], probes[max(probes, key=int)]
        lines.append(
            f"| {r['variant']} | {r['parameters'] / 1e6:.3f} | {sum(loss[:10]) / 10:.3f} → {sum(loss[-10:]) / 10:.3f} | {dice} | "
            f"{last['pred_vessel_frac']:.1f} ({last['true_vessel_frac']:.1f}) | {first['locality3']:.3f} | "
            f"{first['levels']['dec0']['probe_r2']:.3f} → {final['levels']['dec0']['probe_r2']:.3f} | "
            f"{first['levels']['dec0']['hf']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["plain", "official", "fixed"], choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_size", type=int, default=64)
    parser.add_argument("--synthetic_size", type=int, default=128, help="Side of the synthetic fundi the crops come from.")
    parser.add_argument("--num_train", type=int, default=20, help="Synthetic training fundi.")
    parser.add_argument("--eval_every", type=int, default=30)
    parser.add_argument("--probe_steps", type=int, nargs="*", default=None, help="Default: 0 and the last step.")
    parser.add_argument("--init_only", action="store_true", help="Only the init snapshot (no training).")
    parser.add_argument("--output", type=str, default=None, help="JSON file for the records.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = Data(args.crop_size, args.synthetic_size, args.num_train)
    records = []
    for name in args.variants:
        if args.init_only:
            model, _ = build(name)
            model.train()
            x0, _ = data.batch(0, args.batch_size)
            snap = snapshot(model, data, x0)
            records.append({"variant": name, "parameters": model.num_parameters(), **snap})
            print(name, json.dumps(snap))
            continue
        probe_steps = tuple(args.probe_steps) if args.probe_steps is not None else (0, args.steps)
        records.append(run(name, data, args.steps, args.batch_size, args.eval_every, probe_steps))
        r = records[-1]
        print(f"{name}: {r['seconds']}s, evals {json.dumps(r['evals'])}", flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(records, indent=1))
    if not args.init_only:
        print(summary_table(records))
    if args.output:
        Path(args.output).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
