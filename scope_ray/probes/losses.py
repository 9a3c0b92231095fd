"""Training losses of the dense probes (METHOD §9): scale-invariant log-depth loss, segmentation CE.

Shape suffixes: B batch, C classes, H×W label size. ``valid_depth_mask`` and ``check_labels`` are
re-exported from ``metrics``, where evaluation shares them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scope_ray.probes.metrics import IGNORE_INDEX, check_labels, valid_depth_mask

__all__ = ["scale_invariant_loss", "segmentation_loss", "valid_depth_mask", "check_labels", "IGNORE_INDEX"]


def scale_invariant_loss(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor | None = None,
    lam: float = 0.5,
) -> torch.Tensor:
    """Eigen et al.'s scale-invariant loss on log depth, over valid pixels only; a scalar.

    Per image, with d = log pred − log target over its n valid pixels:
    L = mean(d²) − lam · mean(d)². The batch loss is the mean of L over the images with at least
    one valid pixel, each image weighted equally however many pixels it has (Eigen et al.'s
    per-image form). lam = 0.5 is the value Eigen et al. train with; lam = 1 would be fully
    scale-invariant, lam = 0 plain log-MSE. No square root is taken. lam must lie in [0, 1],
    which keeps L ≥ 0.

    ``valid_BHW`` defaults to ``valid_depth_mask(target)``; a given mask is intersected with it, so
    a 0 or NaN target never reaches the log. A valid pixel needs pred > 0: the depth probe's
    prediction is a convex combination of positive bin centres, so a non-positive one is a bug and
    raises.

    A batch with no valid pixel at all returns 0 that is still connected to ``pred`` (backward
    gives zero gradients), rather than raising: a single image with empty ground truth should not
    stop a 100-epoch run, and the caller can count such batches from the mask.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1]; got {lam}")
    if pred_BHW.ndim != 3 or pred_BHW.shape != target_BHW.shape:
        raise ValueError(f"pred and target must both be [B, H, W]; got {tuple(pred_BHW.shape)} and {tuple(target_BHW.shape)}")
    valid = valid_depth_mask(target_BHW)
    if valid_BHW is not None:
        if valid_BHW.shape != target_BHW.shape:
            raise ValueError(f"valid mask {tuple(valid_BHW.shape)} does not match target {tuple(target_BHW.shape)}")
        valid = valid & valid_BHW.bool()
    if not bool((pred_BHW.detach()[valid] > 0).all()):
        raise ValueError("pred must be > 0 at every valid pixel (log depth)")

    # Invalid pixels get log(1) on both sides: their d is exactly 0, and no NaN/inf enters the
    # graph (a NaN there would poison the gradient even though the pixel is masked).
    one = torch.ones((), dtype=pred_BHW.dtype, device=pred_BHW.device)
    d_BHW = torch.where(valid, pred_BHW, one).log() - torch.where(valid, target_BHW.to(pred_BHW.dtype), one).log()
    n_B = valid.sum(dim=(1, 2)).to(pred_BHW.dtype)
    has_B = n_B > 0
    n_safe_B = n_B.clamp(min=1)
    mean_d_B = d_BHW.sum(dim=(1, 2)) / n_safe_B
    mean_d2_B = (d_BHW**2).sum(dim=(1, 2)) / n_safe_B
    loss_B = mean_d2_B - lam * mean_d_B**2  # exactly 0 for an image without valid pixels
    return loss_B.sum() / has_B.sum().clamp(min=1)


def segmentation_loss(logits_BCHW: torch.Tensor, labels_BHW: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel cross-entropy, labels ``ignore_index`` skipped; the mean over the counted pixels of the batch.

    Labels are checked first: torch's own out-of-range error (a device-side assert on GPU) does
    not say which label was wrong. A batch whose pixels are all ignored returns 0 connected to the
    logits (torch's mean would be 0/0 = NaN).
    """
    if logits_BCHW.ndim != 4 or labels_BHW.ndim != 3:
        raise ValueError(f"need logits [B, C, H, W] and labels [B, H, W]; got {tuple(logits_BCHW.shape)} and {tuple(labels_BHW.shape)}")
    b, c, h, w = logits_BCHW.shape
    if tuple(labels_BHW.shape) != (b, h, w):
        raise ValueError(f"label size {tuple(labels_BHW.shape)} does not match logits (B, H, W) = {(b, h, w)}")
    check_labels(labels_BHW, c, ignore_index)
    labels = labels_BHW.long().to(logits_BCHW.device)
    total = F.cross_entropy(logits_BCHW, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)
