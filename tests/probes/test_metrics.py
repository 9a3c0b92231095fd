"""Probe metrics: top-1, mIoU and depth RMSE by hand; merge of partial accumulators equals one-shot."""

from __future__ import annotations

import math

import pytest
import torch

from scope_ray.probes import Accuracy, ConfusionMatrix, DepthErrors, check_labels, top1

NAN, INF = float("nan"), float("inf")

# 3 classes on a 2×3 map with one ignored pixel. (label, pred) pairs:
# (0,0) (0,1) (1,1) / (2,2) (255,0) (1,2)
LABELS = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
PRED = torch.tensor([[[0, 1, 1], [2, 0, 2]]])
# counts[label, pred] = [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
# IoU_0 = 1 / (2 + 1 − 1) = 1/2, IoU_1 = 1 / (2 + 2 − 1) = 1/3, IoU_2 = 1 / (1 + 2 − 1) = 1/2


def test_top1_by_hand_ties_to_the_lowest_class():
    logits = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]])
    assert top1(logits, torch.tensor([1, 1, 2, 0])) == pytest.approx(3 / 4)
    assert top1(logits, torch.tensor([1, 1, 2, 1])) == pytest.approx(2 / 4)


def test_top1_and_check_labels_errors():
    with pytest.raises(ValueError, match="label outside the class range"):
        top1(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"logits \[B, C\]"):
        top1(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        check_labels(torch.tensor([0.0, 1.0]), 3)
    check_labels(torch.tensor([0, 2, 255], dtype=torch.uint8), 3, ignore_index=255)  # fine


def test_confusion_matrix_and_miou_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(PRED, LABELS)
    assert cm.counts_CC.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.iou().tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert cm.miou() == pytest.approx(4 / 9)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_miou_skips_classes_neither_present_nor_predicted_but_keeps_false_positives():
    cm = ConfusionMatrix(4)  # class 3 never appears
    cm.update(PRED, LABELS)
    assert math.isnan(cm.iou()[3].item())
    assert cm.miou() == pytest.approx(4 / 9)

    cm = ConfusionMatrix(4)
    pred = PRED.clone()
    pred[0, 1, 2] = 3  # (1, 2) becomes (1, 3): class 3 predicted, never labelled → IoU 0, counted
    cm.update(pred, LABELS)  # IoU_1 = 1 / (2 + 2 − 1), IoU_2 = 1 / (1 + 1 − 1)
    assert cm.iou().tolist() == pytest.approx([1 / 2, 1 / 3, 1.0, 0.0])
    assert cm.miou() == pytest.approx((1 / 2 + 1 / 3 + 1 + 0) / 4)


def test_confusion_matrix_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label outside the class range"):
        cm.update(PRED, torch.tensor([[[0, 0, 1], [2, 7, 1]]]))
    with pytest.raises(ValueError, match="label outside the class range"):
        cm.update(torch.tensor([[[0, 0, 1], [2, 3, 1]]]), LABELS)  # a prediction outside too
    with pytest.raises(ValueError, match="sizes differ"):
        cm.update(PRED[:, :, :2], LABELS)
    with pytest.raises(ValueError, match="real class"):
        ConfusionMatrix(300)  # 255 would be a class
    with pytest.raises(ValueError, match="undefined"):
        ConfusionMatrix(3).miou()
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


def test_depth_rmse_by_hand_with_zero_nan_inf_masked_and_counted():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [NAN, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[2.0, 0.0], [NAN, 6.0]], [[1.0, 4.0], [INF, 0.0]], [[0.0, 0.0], [NAN, 0.0]]])
    # image 0: errors² 1, 4 (2 invalid); image 1: 0, 9 (2 invalid, NaN prediction there is fine);
    # image 2: no valid pixel.
    errs = DepthErrors()
    errs.update(pred, target)
    assert (errs.n_valid, errs.n_invalid, errs.n_images, errs.n_empty_images) == (4, 8, 2, 1)
    assert errs.rmse() == pytest.approx(math.sqrt((1 + 4 + 0 + 9) / 4))
    assert errs.rmse_image_mean() == pytest.approx((math.sqrt(5 / 2) + math.sqrt(9 / 2)) / 2)


def test_depth_errors_given_mask_and_errors():
    errs = DepthErrors()
    pred, target = torch.tensor([[[1.0, 5.0]]]), torch.tensor([[[2.0, 1.0]]])
    errs.update(pred, target, torch.tensor([[[True, False]]]))
    assert (errs.n_valid, errs.n_invalid, errs.rmse()) == (1, 1, pytest.approx(1.0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        errs.update(torch.tensor([[[NAN]]]), torch.tensor([[[1.0]]]))
    with pytest.raises(ValueError, match="sizes differ"):
        errs.update(pred, target[:, :, :1])
    with pytest.raises(ValueError, match="no valid"):
        DepthErrors().rmse()


def _splits(n: int, g: torch.Generator) -> list[slice]:
    cuts = sorted(torch.randperm(n - 1, generator=g)[: int(torch.randint(0, n - 1, (1,), generator=g))].add(1).tolist())
    edges = [0, *cuts, n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("seed", range(5))
def test_merge_of_partial_accumulators_equals_one_shot(seed):
    g = torch.Generator().manual_seed(seed)
    b, c = 9, 5
    labels = torch.randint(0, c, (b, 4, 6), generator=g)
    labels[torch.rand(b, 4, 6, generator=g) < 0.2] = 255
    pred = torch.randint(0, c, (b, 4, 6), generator=g)
    logits = torch.randn(b, c, generator=g)
    cls_labels = torch.randint(0, c, (b,), generator=g)
    depth = torch.rand(b, 4, 6, generator=g) * 5
    target = torch.rand(b, 4, 6, generator=g) * 5
    target[torch.rand(b, 4, 6, generator=g) < 0.3] = 0.0
    target[3] = NAN  # one image without ground truth

    one_cm, one_depth, one_acc = ConfusionMatrix(c), DepthErrors(), Accuracy()
    one_cm.update(pred, labels)
    one_depth.update(depth, target)
    one_acc.update(logits, cls_labels)

    parts = []
    for s in _splits(b, g):
        cm, de, acc = ConfusionMatrix(c), DepthErrors(), Accuracy()
        cm.update(pred[s], labels[s])
        de.update(depth[s], target[s])
        acc.update(logits[s], cls_labels[s])
        parts.append((cm, de, acc))
    cm, de, acc = ConfusionMatrix(c), DepthErrors(), Accuracy()
    for p_cm, p_de, p_acc in parts:
        cm.merge(p_cm)
        de.merge(p_de)
        acc.merge(p_acc)

    assert torch.equal(cm.counts_CC, one_cm.counts_CC)
    assert cm.miou() == one_cm.miou()
    assert (de.n_valid, de.n_invalid, de.n_images, de.n_empty_images) == (
        one_depth.n_valid, one_depth.n_invalid, one_depth.n_images, one_depth.n_empty_images
    )
    assert de.n_empty_images == 1
    assert de.rmse() == pytest.approx(one_depth.rmse(), rel=1e-12)
    assert de.rmse_image_mean() == pytest.approx(one_depth.rmse_image_mean(), rel=1e-12)
    assert (acc.correct, acc.total) == (one_acc.correct, one_acc.total)
