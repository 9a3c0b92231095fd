"""Linear probes of METHOD §9 (supp. C): heads, losses and metrics, in pure PyTorch (no Ray)."""

from scope_ray.probes.heads import ClassificationProbe, DepthProbe, SegmentationProbe, gap, grid_side
from scope_ray.probes.losses import scale_invariant_loss, segmentation_loss
from scope_ray.probes.metrics import (
    IGNORE_INDEX,
    Accuracy,
    ConfusionMatrix,
    DepthErrors,
    check_labels,
    top1,
    top1_correct,
    valid_depth_mask,
)

__all__ = [
    "IGNORE_INDEX",
    "Accuracy",
    "ClassificationProbe",
    "ConfusionMatrix",
    "DepthErrors",
    "DepthProbe",
    "SegmentationProbe",
    "check_labels",
    "gap",
    "grid_side",
    "scale_invariant_loss",
    "segmentation_loss",
    "top1",
    "top1_correct",
    "valid_depth_mask",
]
