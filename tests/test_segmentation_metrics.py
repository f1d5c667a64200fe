import math

import pytest
import torch

from emov2_gen.evaluation.segmentation_metrics import SegmentationMetric


def test_hand_computed_two_class_case_with_ignore_index():
    target = torch.tensor([[0, 0, 1], [1, 1, 255]])
    pred = torch.tensor([[0, 1, 1], [0, 1, 0]])  # the last pixel is ignored, whatever is predicted there
    # Valid (pred, target) pairs: (0,0) (1,0) (1,1) (0,1) (1,1).
    # class 0: I=1, P=2, L=2, U=3 -> IoU 1/3, Dice 2/4, Acc 1/2
    # class 1: I=2, P=3, L=3, U=4 -> IoU 1/2, Dice 4/6, Acc 2/3
    # aAcc = 3/5; mIoU = (1/3+1/2)/2 = 5/12; mDice = mAcc = (1/2+2/3)/2 = 7/12
    metric = SegmentationMetric(num_classes=2)
    metric.update(pred, target)
    scores = metric.compute()
    assert scores.aAcc == pytest.approx(3 / 5)
    assert scores.mIoU == pytest.approx(5 / 12)
    assert scores.mDice == pytest.approx(7 / 12)
    assert scores.mAcc == pytest.approx(7 / 12)
    torch.testing.assert_close(scores.per_class_iou, torch.tensor([1 / 3, 1 / 2], dtype=torch.float64))
    torch.testing.assert_close(scores.per_class_dice, torch.tensor([1 / 2, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(scores.per_class_acc, torch.tensor([1 / 2, 2 / 3], dtype=torch.float64))
    assert scores.vessel_dice == pytest.approx(2 / 3)
    expected_percent = {"aAcc": 60.0, "mIoU": 41.67, "mDice": 58.33, "mAcc": 58.33, "vessel_dice": 66.67}
    assert scores.to_percent_dict() == expected_percent


def test_areas_accumulate_over_the_data_set_not_per_image_means():
    metric = SegmentationMetric(num_classes=2)
    # Image A (4 px): perfect, two vessel pixels. Image B (2 px): one vessel pixel missed.
    metric.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    metric.update(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]))
    # Totals: class 1: I=2, P=2, L=3 -> Dice 4/5 (the mean of per-image Dice would be (1+0)/2).
    # class 0: I=3, P=4, L=3 -> Dice 6/7. aAcc = 5/6.
    scores = metric.compute()
    assert scores.vessel_dice == pytest.approx(4 / 5)
    assert scores.mDice == pytest.approx((6 / 7 + 4 / 5) / 2)
    assert scores.aAcc == pytest.approx(5 / 6)
    metric.reset()
    metric.update(torch.tensor([[1]]), torch.tensor([[1]]))
    assert metric.compute().aAcc == 1.0


def test_class_absent_from_prediction_and_label_is_nan_and_skipped():
    metric = SegmentationMetric(num_classes=3)
    metric.update(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 1, 0, 0]]))
    # class 0: I=2, P=2, L=3, U=3 -> IoU 2/3; class 1: I=1, P=2, L=1, U=2 -> IoU 1/2; class 2: 0/0 -> NaN
    scores = metric.compute()
    for per_class in (scores.per_class_iou, scores.per_class_dice, scores.per_class_acc):
        assert math.isnan(per_class[2])
    assert scores.mIoU == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores.mAcc == pytest.approx((2 / 3 + 1) / 2)


def test_class_predicted_but_never_labelled_scores_zero_iou_and_nan_acc():
    metric = SegmentationMetric(num_classes=3)
    metric.update(torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    # class 0: I=1, P=1, L=2 -> IoU 1/2, Acc 1/2; class 1: NaN; class 2: I=0, P=1, L=0 -> IoU 0, Acc 0/0 = NaN
    scores = metric.compute()
    assert scores.per_class_iou[2] == 0 and math.isnan(scores.per_class_acc[2])
    assert scores.mIoU == pytest.approx(1 / 4)
    assert scores.mAcc == pytest.approx(1 / 2)


def test_field_of_view_restriction():
    target = torch.tensor([[0, 1, 1, 0]])
    pred = torch.tensor([[1, 1, 0, 0]])
    fov = torch.tensor([[False, True, True, True]])
    # Without the FOV: class 1 I=1, P=2, L=2 -> Dice 1/2. Inside it (first pixel dropped): I=1, P=1, L=2 -> Dice 2/3.
    full, inside = SegmentationMetric(), SegmentationMetric()
    full.update(pred, target)
    inside.update(pred, target, fov=fov)
    assert full.compute().vessel_dice == pytest.approx(1 / 2)
    assert inside.compute().vessel_dice == pytest.approx(2 / 3)
    assert inside.compute().aAcc == pytest.approx(2 / 3)


def test_logits_are_argmaxed():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])  # (B=1, K=2, H=1, W=2) -> classes [0, 1]
    metric = SegmentationMetric()
    metric.update(logits, torch.tensor([[[0, 0]]]))
    torch.testing.assert_close(metric.area_pred, torch.tensor([1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="3 classes"):
        metric.update(torch.zeros(1, 3, 1, 2), torch.zeros(1, 1, 2, dtype=torch.long))


def test_bad_inputs_raise():
    metric = SegmentationMetric()
    with pytest.raises(ValueError, match="does not match"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Predicted class ids must lie in \[0, 2\)"):
        metric.update(torch.tensor([[0, 2]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="Target class ids"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="FOV shape"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), fov=torch.ones(1, 3, dtype=torch.bool))
    metric.update(torch.tensor([[1]]), torch.tensor([[255]]))  # only ignored pixels
    with pytest.raises(ValueError, match="No labelled pixels"):
        metric.compute()
    with pytest.raises(ValueError, match="at least 2"):
        SegmentationMetric(num_classes=1)
