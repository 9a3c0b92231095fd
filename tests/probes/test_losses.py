"""Probe losses against hand computations, with masked pixels and the empty-batch rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scope_ray.probes import scale_invariant_loss, segmentation_loss, valid_depth_mask

E = math.e
NAN, INF = float("nan"), float("inf")


def _si_batch():
    # image 0: valid pixels 0, 1 (target 0 is missing): d = (1 − 0, 0 − 1) = (1, −1)
    #          mean d² = 1, mean d = 0 → L = 1 (any lam)
    # image 1: valid pixels 0, 2 (NaN missing): d = (2, 0); mean d² = 2, mean d = 1 → L = 2 − lam
    # image 2: no valid pixel (0, NaN, inf): contributes nothing
    pred = torch.tensor([[[E, 1.0, 5.0]], [[E**2, 1.0, 1.0]], [[3.0, 0.0, 2.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, E, 0.0]], [[1.0, NAN, 1.0]], [[0.0, NAN, INF]]])
    return pred, target


def test_valid_depth_mask_rejects_zero_nan_inf_negative():
    target = torch.tensor([[[1.0, 0.0, NAN, INF, -2.0, 0.5]]])
    assert valid_depth_mask(target).tolist() == [[[True, False, False, False, False, True]]]


def test_scale_invariant_loss_by_hand_with_masked_pixels():
    pred, target = _si_batch()
    loss = scale_invariant_loss(pred, target)  # lam = 0.5
    assert loss.item() == pytest.approx((1.0 + 1.5) / 2)
    assert scale_invariant_loss(pred, target, lam=1.0).item() == pytest.approx((1.0 + 1.0) / 2)
    assert scale_invariant_loss(pred, target, lam=0.0).item() == pytest.approx((1.0 + 2.0) / 2)

    loss.backward()
    grad = pred.grad
    assert torch.isfinite(grad).all()  # a 0 prediction and NaN/inf targets at masked pixels do no harm
    assert grad[0, 0, 2] == 0 and grad[1, 0, 1] == 0 and torch.all(grad[2] == 0)


def test_scale_invariant_loss_is_invariant_to_a_global_scale_at_lam_one():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 4, 5) + 0.1, torch.rand(2, 4, 5) + 0.1
    a = scale_invariant_loss(pred, target, lam=1.0)
    b = scale_invariant_loss(3.7 * pred, target, lam=1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert scale_invariant_loss(target, target).item() == pytest.approx(0.0, abs=1e-7)


def test_given_mask_is_intersected_with_the_target_mask():
    pred, target = _si_batch()
    keep = torch.ones_like(target, dtype=torch.bool)
    keep[1, 0, 2] = False  # image 1 keeps only d = 2: mean d² = 4, mean d = 2 → L = 4 − 0.5·4 = 2
    keep[0, 0, 2] = True  # asks for a target-0 pixel: still excluded
    assert scale_invariant_loss(pred, target, keep).item() == pytest.approx((1.0 + 2.0) / 2)


def test_all_invalid_batch_returns_a_zero_with_a_grad_path():
    pred = torch.tensor([[[1.0, 2.0]]], requires_grad=True)
    loss = scale_invariant_loss(pred, torch.tensor([[[0.0, NAN]]]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_scale_invariant_loss_errors():
    pred, target = _si_batch()
    with pytest.raises(ValueError, match="lam"):
        scale_invariant_loss(pred, target, lam=1.5)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        scale_invariant_loss(pred, target[:, :, :2])
    with pytest.raises(ValueError, match="> 0"):
        scale_invariant_loss(torch.tensor([[[0.0]]]), torch.tensor([[[1.0]]]))
    with pytest.raises(ValueError, match="valid mask"):
        scale_invariant_loss(pred, target, torch.ones(3, 1, 2, dtype=torch.bool))


def test_segmentation_loss_matches_cross_entropy_and_skips_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5), dtype=torch.uint8)  # dataset labels are uint8
    labels[0, 0, :] = 255
    expected = F.cross_entropy(logits, labels.long(), ignore_index=255)
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # Uniform logits: −log(1/C) on every counted pixel.
    assert segmentation_loss(torch.zeros(2, 4, 3, 5), labels).item() == pytest.approx(math.log(4))


def test_segmentation_loss_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("bad", [3, -1, 254])
def test_segmentation_loss_refuses_labels_outside_the_class_range(bad):
    labels = torch.zeros(1, 2, 2, dtype=torch.int64)
    labels[0, 1, 1] = bad
    with pytest.raises(ValueError, match="label outside the class range"):
        segmentation_loss(torch.zeros(1, 3, 2, 2), labels)


def test_segmentation_loss_refuses_size_mismatch_and_float_labels():
    with pytest.raises(ValueError, match="does not match logits"):
        segmentation_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        segmentation_loss(torch.zeros(3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        segmentation_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))
