"""Probe metrics of METHOD §9: top-1, mIoU, depth RMSE, streamed and mergeable.

Shape suffixes: B batch, C classes, H×W label size. Every accumulator's ``update`` takes one batch
and ``merge`` adds another accumulator's partial counts (from another worker or shard): after any
split of the data, merging the parts gives the one-shot result, because every count is a sum:
exactly for the integer counts, up to float64 rounding for the sums of squared errors.

The input checks that training and evaluation share (which labels and which depth pixels are
valid) live here; ``losses`` imports them.
"""

from __future__ import annotations

import math

import torch

from scope_ray.data.images import IGNORE_INDEX  # noqa: F401 - re-exported: the probes' ignore index


# ---------------------------------------------------------------------------------- checks
def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> None:
    """Raise ValueError unless every label is an integer in [0, num_classes) or the ignore index."""
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a real class for num_classes={num_classes}")
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:5].tolist()
        allowed = f"0..{num_classes - 1}" + ("" if ignore_index is None else f" or {ignore_index} (ignore)")
        raise ValueError(f"label outside the class range: {values} ({int(bad.sum())} labels); allowed: {allowed}")


def valid_depth_mask(target: torch.Tensor) -> torch.Tensor:
    """Pixels with usable ground truth: finite and > 0 (0 and NaN mark missing depth). Bool, same shape."""
    return torch.isfinite(target) & (target > 0)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str, ndim: int | None = None) -> None:
    if a.shape != b.shape or (ndim is not None and a.ndim != ndim):
        want = "equal shapes" if ndim is None else f"equal {ndim}-dim shapes"
        raise ValueError(f"{what}: need {want}; got {tuple(a.shape)} and {tuple(b.shape)}")


# ---------------------------------------------------------------------------- classification
def top1_correct(logits_BC: torch.Tensor, labels_B: torch.Tensor) -> int:
    """How many rows have their label as the arg-max (ties go to the lowest class index)."""
    if logits_BC.ndim != 2 or labels_B.ndim != 1 or labels_B.shape[0] != logits_BC.shape[0]:
        raise ValueError(f"need logits [B, C] and labels [B]; got {tuple(logits_BC.shape)} and {tuple(labels_B.shape)}")
    check_labels(labels_B, logits_BC.shape[1])
    return int((logits_BC.argmax(dim=1) == labels_B.to(logits_BC.device)).sum())


def top1(logits_BC: torch.Tensor, labels_B: torch.Tensor) -> float:
    """Top-1 accuracy of one batch, in [0, 1]."""
    if labels_B.numel() == 0:
        raise ValueError("top1 of an empty batch is undefined")
    return top1_correct(logits_BC, labels_B) / labels_B.shape[0]


class Accuracy:
    """Streaming top-1: ``update`` per batch, ``merge`` partial results, ``value()`` at the end."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, logits_BC: torch.Tensor, labels_B: torch.Tensor) -> None:
        self.correct += top1_correct(logits_BC, labels_B)
        self.total += labels_B.shape[0]

    def merge(self, other: Accuracy) -> Accuracy:
        self.correct += other.correct
        self.total += other.total
        return self

    def value(self) -> float:
        if self.total == 0:
            raise ValueError("no samples counted")
        return self.correct / self.total


# ------------------------------------------------------------------------------ segmentation
class ConfusionMatrix:
    """Streaming confusion matrix over pixels: ``counts[label, prediction]`` (int64, on CPU).

    Pixels whose label is ``ignore_index`` are not counted, whatever their prediction.

    mIoU follows mmseg's convention: IoU_c = TP / (TP + FP + FN) per class, and the mean runs over
    the classes with a non-empty union (present in the labels or predicted somewhere). A class
    neither present nor predicted is left out rather than scored 0 or 1; a class that is only
    predicted (never present) scores 0 and is kept.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be ≥ 2; got {num_classes}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a real class for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts_CC = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred_BHW: torch.Tensor, labels_BHW: torch.Tensor) -> None:
        """Add one batch of predicted class indices (e.g. ``logits.argmax(1)``) and labels."""
        _check_same_shape(pred_BHW, labels_BHW, "prediction and label sizes differ")
        check_labels(labels_BHW, self.num_classes, self.ignore_index)
        check_labels(pred_BHW, self.num_classes)
        labels = labels_BHW.reshape(-1).long()
        pred = pred_BHW.reshape(-1).long().to(labels.device)
        if self.ignore_index is not None:
            keep = labels != self.ignore_index
            labels, pred = labels[keep], pred[keep]
        c = self.num_classes
        self.counts_CC += torch.bincount(labels * c + pred, minlength=c * c).reshape(c, c).cpu()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) "
                f"into a {self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self.counts_CC += other.counts_CC
        return self

    def iou(self) -> torch.Tensor:
        """IoU per class [C] (float64); NaN where the class is neither present nor predicted."""
        counts = self.counts_CC.double()
        tp = counts.diagonal()
        union = counts.sum(0) + counts.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        iou_C = self.iou()
        if bool(torch.isnan(iou_C).all()):
            raise ValueError("no labelled pixels counted: mIoU is undefined")
        return float(iou_C.nanmean())

    def pixel_accuracy(self) -> float:
        total = int(self.counts_CC.sum())
        if total == 0:
            raise ValueError("no labelled pixels counted")
        return int(self.counts_CC.diagonal().sum()) / total


# ------------------------------------------------------------------------------------- depth
class DepthErrors:
    """Streaming depth RMSE over valid pixels (``valid_depth_mask`` of the target unless given).

    Two conventions exist in the depth literature and supp. C does not say which it uses, so both
    are kept: ``rmse()`` pools every valid pixel of every image (√(Σ e² / Σ n)); ``rmse_image_mean()``
    averages per-image RMSEs. Invalid pixels are skipped and counted (``n_invalid``); images with no
    valid pixel are skipped and counted (``n_empty_images``).
    """

    def __init__(self) -> None:
        self.sq_err = 0.0  # Σ over valid pixels of (pred − target)², float64
        self.n_valid = 0
        self.n_invalid = 0
        self.rmse_sum = 0.0  # Σ over images with a valid pixel of that image's RMSE
        self.n_images = 0  # images with ≥ 1 valid pixel
        self.n_empty_images = 0

    def update(self, pred_BHW: torch.Tensor, target_BHW: torch.Tensor, valid_BHW: torch.Tensor | None = None) -> None:
        _check_same_shape(pred_BHW, target_BHW, "prediction and target sizes differ", ndim=3)
        valid = valid_depth_mask(target_BHW) if valid_BHW is None else valid_BHW.bool()
        _check_same_shape(valid, target_BHW, "valid mask and target sizes differ", ndim=3)
        valid = valid & valid_depth_mask(target_BHW)  # a given mask can only drop pixels
        pred = pred_BHW.detach().double()
        if not bool(torch.isfinite(pred[valid]).all()):
            raise ValueError("prediction is NaN or infinite at a valid pixel")
        err2 = torch.where(valid, (pred - torch.where(valid, target_BHW.double(), 0.0)) ** 2, 0.0)
        sq_B = err2.sum(dim=(1, 2))
        n_B = valid.sum(dim=(1, 2))
        has = n_B > 0
        self.sq_err += float(sq_B.sum())
        self.n_valid += int(n_B.sum())
        self.n_invalid += int(valid.numel() - n_B.sum())
        self.rmse_sum += float((sq_B[has] / n_B[has]).sqrt().sum())
        self.n_images += int(has.sum())
        self.n_empty_images += int((~has).sum())

    def merge(self, other: DepthErrors) -> DepthErrors:
        for name in ("sq_err", "n_valid", "n_invalid", "rmse_sum", "n_images", "n_empty_images"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def rmse(self) -> float:
        if self.n_valid == 0:
            raise ValueError("no valid depth pixels counted")
        return math.sqrt(self.sq_err / self.n_valid)

    def rmse_image_mean(self) -> float:
        if self.n_images == 0:
            raise ValueError("no image with a valid depth pixel counted")
        return self.rmse_sum / self.n_images
