"""`EMOv2Transformer2DModel`: D-EMOv2 ("DEMO"), the paper's DiT-style generator, a drop-in for `DiTTransformer2DModel`.

DEMO-X/2 is DiT-X/2 with every transformer block replaced by an adaLN-modulated i2RMB on the (H/p x W/p) token map
(architecture brief §4): the DiT embedders are kept -- patchify (a p x p stride-p conv), the fixed 2-D sin-cos
position embedding, diffusers' 256-channel sinusoidal timestep projection + MLP, a class-label table -- and the
adaLN final layer with learned sigma. Each block computes::

    shift, scale, gate = Linear_{d->3d}(SiLU(c))          c = timestep embedding (+ class embedding)
    x <- x + gate * i2RMB_core(LN(x) * (1 + scale) + shift)

where i2RMB_core = expansion/value 1x1 conv (e = 4, GELU) -> SEW-MHSA -> depth-wise 5x5 conv + LN + GELU with its
inner residual -> 1x1 projection (no bias). The block is `layers.I2RMB` itself, conditioned (`temb_channels`), as
the EMOv2 UNet's blocks are; nothing of it is re-implemented here.

Parameter count. The four presets reproduce the logged DEMO counts exactly (24,596,000 / 96,082,976 / 334,831,648 /
492,692,000 at sample_size 32, 4 latent channels, 1000 classes + 1 null class):
``depth * (13 d^2 + 119 d) + 3 d^2 + 1568 d + 32``. Per block 13d^2 + 119d = adaLN Linear(d -> 3d) (3d^2 + 3d) +
i2RMB with affine pre-norm and no layer scale (10d^2 + 116d). Globally DiT's 3d^2 + 1566d + 32 -- which counts the
frozen position embedding as a parameter (256 tokens x d), as DiT's own `nn.Parameter(requires_grad=False)` does
-- plus 2d: the final LayerNorm is affine here (DiT's is not). These are inferred from the counts (the brief's
"unique solution"); the official DEMO code is not public.

Choices the counts cannot fix (documented, tested where testable):
- Heads: DiT's (S 6, B 12, L 16, XL 16; head width d / heads = 64, 64, 64, 72). Values are e * d_h wide per head
  (EMOv2's rule: the expansion is the value projection). Heads do not change the parameter count.
- Window: 8 x 8, so a 16 x 16 token map (256^2 images, SD-VAE latents 32^2, patch 2) has 4 local tiles + 4
  stride-2 dilated windows -- the SEW-MHSA pattern of the classifier's stage 3 rather than one global window.
  The model never pads: a token map that the window does not tile raises a ValueError (the official zero padding
  is unmasked, brief oddity 3). `from_preset` shrinks the window to fit a smaller `sample_size`.
- Zero init: adaLN-Zero, as DiT. Each block's modulation Linear is zero-initialised, so the gate is 0 and every
  block is the identity at init (the gate takes the role of EMOv2's 1e-6 layer scale, which is dropped). The final
  adaLN Linear and output Linear are zero-initialised too (DiT's `initialize_weights`), so the initial prediction is
  0; the other Linear layers are Xavier-uniform with zero bias, the patch conv Xavier on its flattened weight, the
  timestep MLP and label table normal(0, 0.02) -- DiT's init. The i2RMB convolutions keep PyTorch's default, as the
  EMOv2 models do.
- Norms/activations: channel LayerNorm everywhere (no BatchNorm: batch statistics would mix noise levels), GELU for
  the value/expansion and after the depth-wise conv -- the EMOv2 UNet's conditioned blocks (`conditioned_i2rmb`).
- Class conditioning: `num_class_embeds` rows (the repo's convention, as `EMOv2UNet2DModel`), the last being the null
  class when classifier-free guidance is wanted: 1001 = DiT's 1000 ImageNet classes + null class 1000, which
  `DiTPipeline` passes for guidance. Label dropout is the training loop's job (`train_ddpm.py --class_dropout_prob`);
  `class_dropout_prob` > 0 reproduces DiT's in-model dropout (labels replaced by the last row in training mode).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin, get_parameter_dtype  # noqa: F401 (see aligned_loading)
from torch import nn

from ..blocks.unet_2d_blocks import conditioned_i2rmb
from ..layers import make_norm
from .aligned_loading import AlignedLoadingMixin

TIMESTEP_PROJ_CHANNELS = 256  # DiT's (and diffusers' CombinedTimestepLabelEmbeddings') frequency embedding width
PRESET_WINDOW_SIZE = 8

# DiT's model sizes with DiT's heads; all at patch 2, 32x32x4 latents, 1000 classes + null (DiT-X/2's setting).
_DEMO_COMMON = dict(sample_size=32, in_channels=4, patch_size=2, num_class_embeds=1001, learn_sigma=True)
EMOV2_TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "demo-s-2": dict(_DEMO_COMMON, num_attention_heads=6, attention_head_dim=64, num_layers=12),
    "demo-b-2": dict(_DEMO_COMMON, num_attention_heads=12, attention_head_dim=64, num_layers=12),
    "demo-l-2": dict(_DEMO_COMMON, num_attention_heads=16, attention_head_dim=64, num_layers=24),
    "demo-xl-2": dict(_DEMO_COMMON, num_attention_heads=16, attention_head_dim=72, num_layers=28),
}


def demo_parameter_count(hidden_size: int, num_layers: int) -> int:
    """The logged DEMO parameter count at the presets' setting (32x32x4 latents, patch 2, 1001 label rows)."""
    d = hidden_size
    return num_layers * (13 * d * d + 119 * d) + 3 * d * d + 1568 * d + 32


def fit_window(window_size: int, sample_size: Union[int, tuple[int, int], list[int]], patch_size: int) -> int:
    """The largest window <= `window_size` that tiles the token map of a `sample_size` input (<= 0 kept: global)."""
    if window_size <= 0:
        return window_size
    sides = tuple(sample_size) if isinstance(sample_size, (tuple, list)) else (sample_size, sample_size)
    grid_h, grid_w = (max(1, s // patch_size) for s in sides)
    return next(w for w in range(min(window_size, grid_h, grid_w), 0, -1) if grid_h % w == 0 and grid_w % w == 0)


class EMOv2Transformer2DModel(AlignedLoadingMixin, ConfigMixin):
    """D-EMOv2: DiT's embedders and adaLN final layer around a stack of adaLN-modulated i2RMBs (see the module doc).

    Config keys shared with `DiTTransformer2DModel` keep its names and meaning: `num_attention_heads`,
    `attention_head_dim` (hidden size d = their product), `in_channels`, `out_channels`, `num_layers`, `dropout`,
    `sample_size` (latent side, fixes the stored position embedding; other sizes get an interpolated one, as in
    diffusers' `PatchEmbed`), `patch_size`, `norm_eps`.

    EMOv2/DEMO-specific keys:
        learn_sigma: predict [epsilon, variance] (out_channels = 2 * in_channels, DiT's convention); `out_channels`
            may be left None and is then resolved and stored.
        num_class_embeds: label-table rows (None: unconditional, timestep only); see the module doc for the null class.
        class_dropout_prob: in-model label dropout to the last row while training (DiT's; default 0, see above).
        expansion_ratio: i2RMB expansion e (value width e * d). kernel_size: depth-wise kernel.
        window_size: SEW-MHSA window on the token map (<= 0: the whole map). drop_path_rate: stochastic depth,
            linear over the blocks.
    """

    _supports_gradient_checkpointing = True
    # An i2RMB adds its shortcut to its gated branch: keep each block on one device under `device_map`.
    _no_split_modules = ["I2RMB"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        sample_size: Union[int, tuple[int, int]] = 32,
        patch_size: int = 2,
        learn_sigma: bool = True,
        num_class_embeds: Optional[int] = 1001,
        class_dropout_prob: float = 0.0,
        expansion_ratio: float = 4.0,
        kernel_size: int = 5,
        window_size: int = PRESET_WINDOW_SIZE,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        hidden = num_attention_heads * attention_head_dim
        expected_out = 2 * in_channels if learn_sigma else in_channels
        if out_channels is None:
            out_channels = expected_out
            self.register_to_config(out_channels=out_channels)  # pipelines read config.out_channels (DiTPipeline)
        elif learn_sigma and out_channels != expected_out:
            raise ValueError(
                f"learn_sigma=True predicts [epsilon, variance]: out_channels must be 2 * in_channels = {expected_out}, "
                f"got {out_channels} (or pass learn_sigma=False)."
            )
        if hidden % 2:
            raise ValueError(f"The hidden size {hidden} must be even (2-D sin-cos position embedding).")
        if num_class_embeds is not None and num_class_embeds < 1:
            raise ValueError(f"num_class_embeds must be positive or None, got {num_class_embeds}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {class_dropout_prob}.")
        if class_dropout_prob > 0 and num_class_embeds is None:
            raise ValueError("class_dropout_prob > 0 needs a label table (num_class_embeds) whose last row is the null class.")
        self.hidden_size, self.out_channels, self.patch_size = hidden, out_channels, patch_size
        self.gradient_checkpointing = False

        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        self.grid_size = (height // patch_size, width // patch_size)
        self.base_size = self.grid_size[0]  # PatchEmbed's reference for interpolating the position embedding
        # Patchify: diffusers' PatchEmbed conv, unflattened (the blocks work on the NCHW token map), position embedding
        # kept out of it: it is a frozen parameter here, as DiT's (so it is counted and saved as DiT counts it).
        self.patch_embed = PatchEmbed(
            height=height, width=width, patch_size=patch_size, in_channels=in_channels, embed_dim=hidden,
            flatten=False, pos_embed_type=None,
        )
        self.pos_embed = nn.Parameter(self._sincos_map(*self.grid_size), requires_grad=False)

        # DiT's conditioning: the same pieces as diffusers' CombinedTimestepLabelEmbeddings, one shared copy.
        self.time_proj = Timesteps(TIMESTEP_PROJ_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_PROJ_CHANNELS, hidden)
        self.class_embedder = nn.Embedding(num_class_embeds, hidden) if num_class_embeds is not None else None

        drop_rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]  # linspace(0, rate)
        self.transformer_blocks = nn.ModuleList(
            conditioned_i2rmb(
                hidden, hidden, hidden, attention=True, expansion=expansion_ratio, head_dim=attention_head_dim,
                num_heads=num_attention_heads, window_size=window_size, kernel_size=kernel_size, dropout=dropout,
                drop_path=rate, norm_eps=norm_eps,
            )
            for rate in drop_rates
        )

        # adaLN final layer (DiT's, with an affine LayerNorm): shift/scale from c, then a per-token linear to p*p*C_out.
        self.norm_out = make_norm("ln", hidden, eps=norm_eps)
        self.proj_out_1 = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.proj_out_2 = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self._init_weights()

    # ------------------------------------------------------------------------------------------------ construction

    def _sincos_map(self, grid_h: int, grid_w: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """DiT's 2-D sin-cos embedding of a grid_h x grid_w token map, as a (1, d, grid_h, grid_w) map.

        Tokens come in the row-major order of `PatchEmbed`'s flattening; a grid other than `sample_size`'s is
        scaled to it (`base_size`), as diffusers' `PatchEmbed` does.
        """
        table = get_2d_sincos_pos_embed(self.hidden_size, (grid_h, grid_w), base_size=self.base_size, device=device)
        return table.float().reshape(grid_h, grid_w, -1).permute(2, 0, 1).unsqueeze(0).contiguous()

    def _init_weights(self) -> None:
        """DiT's `initialize_weights` (see the module doc); the i2RMB convolutions keep PyTorch's default init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        conv = self.patch_embed.proj
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_2.weight, std=0.02)
        if self.class_embedder is not None:
            nn.init.normal_(self.class_embedder.weight, std=0.02)
        for block in self.transformer_blocks:  # adaLN-Zero: gate (and shift/scale) 0, every block the identity
            nn.init.zeros_(block.modulation.linear.weight)
            nn.init.zeros_(block.modulation.linear.bias)
        for linear in (self.proj_out_1[1], self.proj_out_2):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EMOv2Transformer2DModel":
        """Build `demo-s-2`, `demo-b-2`, `demo-l-2` or `demo-xl-2` (randomly initialised); overrides win.

        Unless `window_size` is given, the presets' 8 x 8 window is shrunk to the largest window that tiles the
        token map of `sample_size` (e.g. 4 for 8x8 inputs at patch 2); the result is stored in the config.
        """
        if name not in EMOV2_TRANSFORMER_PRESETS:
            raise ValueError(
                f"Unknown D-EMOv2 preset {name!r}; valid presets: {', '.join(EMOV2_TRANSFORMER_PRESETS)}."
            )
        config = {"window_size": PRESET_WINDOW_SIZE, **EMOV2_TRANSFORMER_PRESETS[name], **overrides}
        if "window_size" not in overrides:
            config["window_size"] = fit_window(config["window_size"], config["sample_size"], config["patch_size"])
        return cls(**config)

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this: the patch size (the token map must also be tiled by the window)."""
        return self.patch_size

    # ------------------------------------------------------------------------------------------------ forward

    def _check_input(self, hidden_states: torch.Tensor) -> tuple[int, int]:
        """The token-map size, after checking channels, patch and window tiling (the model never pads)."""
        if hidden_states.ndim != 4 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Expected hidden_states of shape (B, {self.config.in_channels}, H, W), got {tuple(hidden_states.shape)}."
            )
        height, width = hidden_states.shape[-2:]
        p, window = self.patch_size, self.config.window_size
        if height % p or width % p:
            raise ValueError(f"H and W must be multiples of the patch size {p}, got {height}x{width}.")
        grid_h, grid_w = height // p, width // p
        if window > 0 and (grid_h % window or grid_w % window):
            raise ValueError(
                f"A {height}x{width} input gives a {grid_h}x{grid_w} token map (patch {p}), which {window}x{window} "
                f"SEW-MHSA windows do not tile (the model does not pad). Use H and W that are multiples of "
                f"{p * window}, or a window_size that divides the token map."
            )
        return grid_h, grid_w

    def _conditioning(
        self, timestep: Union[torch.Tensor, float, int, None], class_labels: Optional[torch.Tensor], batch: int,
        device: torch.device,
    ) -> torch.Tensor:
        """c = timestep embedding (+ class embedding), (B, d), as DiT's adaLN input."""
        if timestep is None:
            raise ValueError("timestep is required: every block is conditioned on it through adaLN.")
        timesteps = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=device)
        timesteps = timesteps.reshape(-1).to(device)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        elif timesteps.numel() != batch:
            raise ValueError(f"Got {timesteps.numel()} timesteps for a batch of {batch}.")
        emb = self.timestep_embedder(self.time_proj(timesteps).to(get_parameter_dtype(self.timestep_embedder)))
        if self.class_embedder is None:
            if class_labels is not None:
                raise ValueError("class_labels were given but the model is unconditional (num_class_embeds is None).")
            return emb
        if class_labels is None:
            raise ValueError(
                f"class_labels are required (num_class_embeds={self.config.num_class_embeds}); pass the null class "
                f"{self.config.num_class_embeds - 1} for unconditional samples if the model was trained with one."
            )
        labels = class_labels.reshape(-1).to(device=device, dtype=torch.long)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        elif labels.numel() != batch:
            raise ValueError(f"Got {labels.numel()} class labels for a batch of {batch}.")
        if self.training and self.config.class_dropout_prob > 0:  # DiT's LabelEmbedder.token_drop
            dropped = torch.rand(labels.shape, device=device) < self.config.class_dropout_prob
            labels = torch.where(dropped, self.config.num_class_embeds - 1, labels)
        return emb + self.class_embedder(labels).to(emb.dtype)

    def _position_embedding(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        if (grid_h, grid_w) == self.grid_size:
            return self.pos_embed
        return self._sincos_map(grid_h, grid_w, device=device)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[torch.Tensor, float, int, None] = None,
        class_labels: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        return_dict: bool = True,
    ) -> Union[Transformer2DModelOutput, tuple]:
        """Predict epsilon (and the variance interpolation when `learn_sigma`) for latents (B, C, H, W).

        `DiTTransformer2DModel.forward`'s contract: `timestep` an int/float, 0-d or (B,) tensor; `class_labels` (B,);
        returns `Transformer2DModelOutput(sample=(B, out_channels, H, W))` or `(sample,)`. `cross_attention_kwargs`
        exists for signature compatibility; there is no attention processor to pass them to, so non-empty ones raise.
        """
        if cross_attention_kwargs:
            raise ValueError(
                f"EMOv2Transformer2DModel has no attention processors; got cross_attention_kwargs {sorted(cross_attention_kwargs)}."
            )
        grid_h, grid_w = self._check_input(hidden_states)
        batch, device = hidden_states.shape[0], hidden_states.device
        cond = self._conditioning(timestep, class_labels, batch, device)

        tokens = self.patch_embed(hidden_states) + self._position_embedding(grid_h, grid_w, device).to(hidden_states.dtype)
        # Channels-last token map: the channel LayerNorms read contiguous NHWC and the 1x1 convs skip reorders.
        tokens = tokens.contiguous(memory_format=torch.channels_last)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, cond)
            else:
                tokens = block(tokens, cond)

        shift, scale = self.proj_out_1(cond).view(batch, -1, 1, 1).chunk(2, dim=1)
        tokens = torch.addcmul(shift, self.norm_out(tokens), 1 + scale)  # LN(x) * (1 + scale) + shift
        patches = self.proj_out_2(tokens.permute(0, 2, 3, 1))  # (B, h, w, p*p*C_out)
        p, c = self.patch_size, self.out_channels
        # Unpatchify in DiT's (p, q, c) order, so that DiT-layout output weights mean the same here.
        output = patches.reshape(batch, grid_h, grid_w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        output = output.reshape(batch, c, grid_h * p, grid_w * p)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
