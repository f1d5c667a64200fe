"""Segmentation losses: pixel cross-entropy plus soft Dice, both skipping `ignore_index` pixels.

The Dice term is the one of mmsegmentation's (0.x) `DiceLoss` used by its "CE 1.0 + Dice 3.0" UNet
configs: softmax probabilities p against one-hot targets t, per image and class
1 - (2 sum(p t) + smooth) / (sum(p^2 + t^2) + smooth) with smooth = 1, averaged over classes and images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice of `logits` (B, K, H, W) against class ids `labels` (B, H, W); ignored pixels count nowhere."""
    num_classes = logits.shape[1]
    valid = (labels != ignore_index).unsqueeze(1)
    probs = logits.float().softmax(dim=1) * valid
    onehot = F.one_hot(labels.masked_fill(~valid.squeeze(1), 0), num_classes).permute(0, 3, 1, 2) * valid
    intersection = (probs * onehot).sum(dim=(2, 3))
    denominator = (probs.square() + onehot).sum(dim=(2, 3))  # onehot^2 == onehot
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


def cross_entropy_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, ce_weight: float = 1.0, dice_weight: float = 0.0, ignore_index: int = 255
) -> torch.Tensor:
    """`ce_weight` * pixel-mean cross-entropy + `dice_weight` * soft Dice (terms with weight 0 are skipped)."""
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"labels must have shape (B, H, W) = {tuple(logits.shape[:1] + logits.shape[2:])}, got {tuple(labels.shape)}.")
    loss = logits.new_zeros((), dtype=torch.float32)
    if ce_weight:
        pixel_ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
        loss = loss + ce_weight * pixel_ce / (labels != ignore_index).sum().clamp(min=1)  # 0, not NaN, if all ignored
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, labels, ignore_index)
    return loss
