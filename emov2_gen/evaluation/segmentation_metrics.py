"""Segmentation scores exactly as mmsegmentation's ``IoUMetric`` defines them, accumulated over a data set.

Per class c the metric sums, over every image, the pixel areas intersect(c) = |pred=c and label=c|,
pred(c), label(c) and union(c) = pred(c) + label(c) - intersect(c), leaving out pixels labelled
``ignore_index`` (and, when a field-of-view mask is given, pixels outside it). From the totals:
IoU = I/U, Dice = 2I/(P+L), Acc = I/L per class; aAcc = sum(I)/sum(L); mIoU, mDice and mAcc are the
nan-means over classes (a class absent from both predictions and labels is 0/0 = NaN and skipped).
For vessel data ``vessel_dice`` is the Dice of class 1 -- the number the vessel literature quotes;
mmseg's ``mDice`` also averages in the (easy, ~98%) background.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

VESSEL_CLASS = 1


@dataclass
class SegmentationScores:
    """Scores as fractions in [0, 1] (NaN where undefined); ``per_class_*`` are (num_classes,) tensors."""

    aAcc: float
    mIoU: float
    mDice: float
    mAcc: float
    per_class_iou: torch.Tensor
    per_class_dice: torch.Tensor
    per_class_acc: torch.Tensor
    vessel_dice: float

    def to_percent_dict(self) -> dict[str, float]:
        """Summary scores in percent rounded to 2 decimals, as mmseg logs them (plus ``vessel_dice``)."""
        return {k: round(v * 100, 2) for k, v in asdict(self).items() if isinstance(v, float)}


class SegmentationMetric:
    """Stateful mmseg ``IoUMetric``: call :meth:`update` per batch, :meth:`compute` once at the end."""

    def __init__(self, num_classes: int = 2, ignore_index: int = 255):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.area_intersect = torch.zeros(self.num_classes, dtype=torch.float64)
        self.area_pred = torch.zeros(self.num_classes, dtype=torch.float64)
        self.area_label = torch.zeros(self.num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, fov: Optional[torch.Tensor] = None) -> None:
        """Add a batch. ``pred``: class ids shaped like ``target`` or logits with an extra class dim 1.

        ``target`` holds class ids or ``ignore_index``; ``fov`` (same shape as ``target``, bool or 0/1)
        restricts scoring to the field of view. Predicted ids outside [0, num_classes) raise ValueError.
        """
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"Logits have {pred.shape[1]} classes, the metric expects {self.num_classes}.")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"Prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}.")
        valid = target != self.ignore_index
        if fov is not None:
            if fov.shape != target.shape:
                raise ValueError(f"FOV shape {tuple(fov.shape)} does not match target shape {tuple(target.shape)}.")
            valid &= fov.bool()
        pred, target = pred[valid].long().cpu(), target[valid].long().cpu()
        for name, ids in (("Predicted", pred), ("Target", target)):
            if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_classes):
                raise ValueError(
                    f"{name} class ids must lie in [0, {self.num_classes}) or be ignore_index; "
                    f"got {int(ids.min())}..{int(ids.max())}."
                )
        self.area_intersect += torch.bincount(pred[pred == target], minlength=self.num_classes)
        self.area_pred += torch.bincount(pred, minlength=self.num_classes)
        self.area_label += torch.bincount(target, minlength=self.num_classes)

    def compute(self) -> SegmentationScores:
        """Scores over everything passed to :meth:`update` since the last reset."""
        intersect, pred, label = self.area_intersect, self.area_pred, self.area_label
        if label.sum() == 0:
            raise ValueError("No labelled pixels were accumulated; call update() with non-ignored targets first.")
        iou = intersect / (pred + label - intersect)
        dice = 2 * intersect / (pred + label)
        acc = intersect / label
        return SegmentationScores(
            aAcc=float(intersect.sum() / label.sum()),
            mIoU=float(iou.nanmean()),
            mDice=float(dice.nanmean()),
            mAcc=float(acc.nanmean()),
            per_class_iou=iou,
            per_class_dice=dice,
            per_class_acc=acc,
            vessel_dice=float(dice[VESSEL_CLASS]),
        )
