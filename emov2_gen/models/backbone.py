"""`EMOv2Backbone`: the paper's ImageNet classifier, numerically equal to the official `EMO2_*_k5_hybrid`.

Layout: a 3-layer stem (stride 2) and four stages, each opened by a stride-2 conv i2RMB with doubled
expansion on its input width; stages 1-2 use BatchNorm + SiLU and the conv mixer, stages 3-4 channel
LayerNorm + GELU and SEW-MHSA; every depth-wise conv is followed by BatchNorm + SiLU. Head:
LayerNorm -> global average pool -> Linear. Stochastic depth grows linearly over all blocks, down
blocks included. `load_official_state_dict` maps the official key layout onto this module tree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (see aligned_loading)
from torch import nn

from ..layers import I2RMB, ConvNormAct, LayerNorm2d
from .aligned_loading import AlignedLoadingMixin

EMOV2_BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "emov2-1m": dict(
        stem_width=16, depths=(2, 2, 8, 3), widths=(32, 48, 80, 180), expansions=(2.0, 2.5, 3.0, 3.5),
        head_dims=(16, 16, 20, 20), drop_path_rate=0.04036,
    ),
    "emov2-2m": dict(
        stem_width=16, depths=(3, 3, 9, 3), widths=(32, 48, 120, 200), expansions=(2.0, 2.5, 3.0, 3.5),
        head_dims=(16, 16, 20, 20), drop_path_rate=0.05,
    ),
    "emov2-5m": dict(
        stem_width=24, depths=(3, 3, 9, 3), widths=(48, 72, 160, 288), expansions=(2.0, 3.0, 4.0, 4.0),
        head_dims=(16, 24, 32, 32), drop_path_rate=0.05,
    ),
    "emov2-20m": dict(
        stem_width=32, depths=(3, 3, 13, 3), widths=(64, 128, 320, 448), expansions=(2.0, 3.0, 4.0, 4.0),
        head_dims=(16, 32, 32, 32), drop_path_rate=0.1,
    ),
}

# Official key -> this module's key. Applied in order; the official LayerNorm2d wraps an nn.LayerNorm
# as `.norm`, its mixers live in `eops.0` (`net` = conv expansion, `v` = value, `qk` = queries/keys).
_OFFICIAL_KEY_RULES: tuple[tuple[str, Any], ...] = (
    (r"^stage0\.", "stem."),
    (r"^stage(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"(^|\.)norm\.norm\.", r"\1norm."),
    (r"\.eops\.0\.(net|v)\.conv\.", ".expand.0."),
    (r"\.eops\.0\.qk\.conv\.", ".attn.qk."),
    (r"\.conv_local\.conv\.", ".dw.0."),
    (r"\.conv_local\.norm\.", ".dw.1."),
    (r"\.proj\.conv\.", ".proj."),
    (r"\.ls\.gamma$", ".layer_scale"),
)
_CHECKPOINT_WRAPPERS = ("state_dict", "model", "module")


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official EMOv2 keys to `EMOv2Backbone` keys (layer scales become 1-D)."""
    converted = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, repl in _OFFICIAL_KEY_RULES:
            new_key = re.sub(pattern, repl, new_key)
        if new_key.endswith(".layer_scale"):
            value = value.reshape(-1)
        converted[new_key] = value
    return converted


def read_official_checkpoint(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a released `.pth` (or `.safetensors`) file, unwrapping `model`/`state_dict` and `module.` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: say which one
        raise ValueError(f"Could not read checkpoint {path}: {err}") from err
    while isinstance(state, Mapping) and any(k in state for k in _CHECKPOINT_WRAPPERS) and not any(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        state = state[next(k for k in _CHECKPOINT_WRAPPERS if k in state)]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items()}


class EMOv2Backbone(AlignedLoadingMixin, ConfigMixin):
    """EMOv2 classifier backbone (`from_preset("emov2-1m" | "emov2-2m" | "emov2-5m" | "emov2-20m")`).

    `forward(x)` returns logits (B, num_classes), or pooled features when `num_classes == 0`;
    `forward_features(x)` returns the four stage outputs (strides 4, 8, 16, 32).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        stem_width: int = 24,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        widths: tuple[int, ...] = (48, 72, 160, 288),
        expansions: tuple[float, ...] = (2.0, 3.0, 4.0, 4.0),
        head_dims: tuple[int, ...] = (16, 24, 32, 32),
        attention_stages: tuple[bool, ...] = (False, False, True, True),
        stage_norms: tuple[str, ...] = ("bn", "bn", "ln", "ln"),
        stage_acts: tuple[str, ...] = ("silu", "silu", "gelu", "gelu"),
        window_size: int = 7,
        kernel_size: int = 5,
        drop_path_rate: float = 0.05,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        per_stage = (depths, widths, expansions, head_dims, attention_stages, stage_norms, stage_acts)
        if len({len(v) for v in per_stage}) != 1:
            raise ValueError("depths, widths, expansions, head_dims, attention_stages, stage_norms, stage_acts differ in length.")
        self.stem = nn.Sequential(
            ConvNormAct(in_channels, stem_width, 3, stride=2, bias=True),
            ConvNormAct(stem_width, stem_width, 3, groups=-1),
            ConvNormAct(stem_width, stem_width, 1, norm="none", act="none"),
        )
        drop_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, in_ch, index = [], stem_width, 0
        for depth, width, e, d_h, attn, norm, act in zip(*per_stage):
            blocks = []
            for i in range(depth):
                common = dict(
                    kernel_size=kernel_size, norm=norm, act=act, dw_norm="bn", dw_act="silu",
                    layer_scale_init=layer_scale_init, drop_path=drop_rates[index],
                )
                if i == 0:  # downsampling block: conv mixer, 2e on the input width, no residual
                    blocks.append(I2RMB(in_ch, width, expansion=2 * e, stride=2, **common))
                else:
                    blocks.append(I2RMB(width, expansion=e, attention=attn, head_dim=d_h, window_size=window_size, **common))
                index += 1
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)
        self.norm = LayerNorm2d(in_ch, eps=1e-6)
        self.head = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Official init: truncated normal (std 0.02) for Linear, ones/zeros for norms, default for convs."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EMOv2Backbone":
        if name not in EMOV2_BACKBONE_PRESETS:
            raise ValueError(f"Unknown EMOv2 backbone preset {name!r}; valid presets: {', '.join(EMOV2_BACKBONE_PRESETS)}.")
        return cls(**{**EMOV2_BACKBONE_PRESETS[name], **overrides})

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"Expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}.")
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.forward_features(x)[-1]).mean(dim=(2, 3))
        return self.head(x)

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load weights in the official key layout; raise naming missing/unexpected/mis-shaped keys."""
        converted = convert_official_state_dict(state_dict)
        own = self.state_dict()
        missing = sorted(set(own) - set(converted))
        unexpected = sorted(set(converted) - set(own))
        mismatched = sorted(
            f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(converted)
            if converted[k].shape != own[k].shape
        )
        if missing or unexpected or mismatched:
            problems = []
            for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
                if items:
                    problems.append(f"{title} ({len(items)}): " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
            raise ValueError("Official state dict does not fit this EMOv2Backbone config:\n  " + "\n  ".join(problems))
        self.load_state_dict(converted, strict=True)

    @classmethod
    def from_official_checkpoint(
        cls, path: Union[str, Path], preset: str, num_classes: Optional[int] = None, **overrides: Any
    ) -> "EMOv2Backbone":
        """Build `preset` and load a released official checkpoint (`.pth`) into it."""
        state = read_official_checkpoint(path)
        if num_classes is None:
            num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        model = cls.from_preset(preset, num_classes=num_classes, **overrides)
        if num_classes == 0:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        model.load_official_state_dict(state)
        return model
