#!/usr/bin/env python
"""Print the denoiser presets' size table: parameters and GFLOPs per image, beside the UNet2DModel baselines.

    python eval/model_table.py                        # 32x32 RGB, the UNet presets, markdown to stdout
    python eval/model_table.py --models demo-s-2 demo-b-2 --baseline demo-s-2 --in_channels 4   # D-EMOv2 on latents
    python eval/model_table.py --models demo-s-2 dit-s-2 demo-b-2 dit-b-2 --baseline dit-s-2 --in_channels 4 \
        --num_class_embeds 1001                      # D-EMOv2 vs diffusers' DiT, 1000 classes + null
    python eval/model_table.py --json outputs/model_table.json

GFLOPs come from torch.utils.flop_counter (see `emov2_gen.evaluation.flops.FLOP_CONVENTION`), of one call on the null
class for class-conditional models (`emov2_gen.evaluation.benchmark.NullClassDenoiser`).
"""

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from emov2_gen.evaluation.benchmark import NullClassDenoiser, markdown_table
from emov2_gen.evaluation.flops import FLOP_CONVENTION, count_gflops
from emov2_gen.models.registry import DENOISER_PRESETS, UNET_DENOISER_PRESETS, build_denoiser


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=DENOISER_PRESETS, default=list(UNET_DENOISER_PRESETS))
    parser.add_argument("--baseline", choices=DENOISER_PRESETS, default="unet2d-5m", help="Ratios are relative to it.")
    parser.add_argument("--sample_size", type=int, default=32)
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument(
        "--num_class_embeds", type=int, default=None,
        help="Label rows of every model, the null class included (1001: ImageNet + null, as the D-EMOv2 and DiT "
        "presets; required by the dit-* baselines). Default: unconditional.",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows to this JSON file.")
    return parser.parse_args(argv)


def layout(config) -> str:
    """A UNet's block_out_channels, or a transformer's depth x width and patch size."""
    if "block_out_channels" in config:
        return str(tuple(config.block_out_channels))
    width = config.num_attention_heads * config.attention_head_dim
    return f"{config.num_layers} x {width}, patch {config.patch_size}"


def model_rows(
    names: list[str], sample_size: int, in_channels: int, num_class_embeds: Optional[int] = None
) -> list[dict]:
    rows = []
    for name in names:
        model = build_denoiser(
            name, sample_size=sample_size, in_channels=in_channels, num_class_embeds=num_class_embeds
        ).eval()
        rows.append(
            {
                "name": name,
                "class": type(model).__name__,
                "layout": layout(model.config),
                "parameters": model.num_parameters(),
                "gflops_per_image": count_gflops(NullClassDenoiser(model), sample_size, in_channels),
            }
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.models + [args.baseline]))
    torch.manual_seed(0)
    rows = model_rows(names, args.sample_size, args.in_channels, args.num_class_embeds)
    base = next(row for row in rows if row["name"] == args.baseline)
    for row in rows:
        row["parameters_ratio"] = row["parameters"] / base["parameters"]
        row["gflops_ratio"] = row["gflops_per_image"] / base["gflops_per_image"]
    size = f"{args.sample_size}x{args.sample_size}x{args.in_channels}"
    header = [
        "model", "class", "layout", "params (M)", f"params / {args.baseline}",
        f"GFLOPs per {size} image", f"GFLOPs / {args.baseline}",
    ]
    table = markdown_table(
        header,
        [
            [
                row["name"], row["class"], row["layout"], f"{row['parameters'] / 1e6:.2f}",
                f"{row['parameters_ratio']:.2f}", f"{row['gflops_per_image']:.3f}", f"{row['gflops_ratio']:.2f}",
            ]
            for row in rows
        ],
    )
    print(table)
    print(f"\nGFLOPs: {FLOP_CONVENTION}.")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"sample_size": args.sample_size, "in_channels": args.in_channels,
                   "num_class_embeds": args.num_class_embeds, "baseline": args.baseline,
                   "flop_convention": FLOP_CONVENTION, "models": rows}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
