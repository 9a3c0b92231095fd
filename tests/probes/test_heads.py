"""Probe heads: shapes, the row-major grid, the depth bins by hand, and the upsample-order identity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scope_ray.probes import ClassificationProbe, DepthProbe, SegmentationProbe, gap, grid_side, scale_invariant_loss


def test_gap_is_the_token_mean():
    tokens_BTD = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [4.0, -2.0]]])
    assert torch.equal(gap(tokens_BTD), torch.tensor([[2.0, 4.0], [2.0, -1.0]]))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        gap(torch.zeros(2, 0, 3))


def test_classification_probe_shape_and_width_check():
    probe = ClassificationProbe(d=8, num_classes=5)
    assert probe(torch.randn(3, 8)).shape == (3, 5)
    assert probe(torch.randn(3, 8, dtype=torch.float16)).dtype == torch.float32  # cached half features
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        probe(torch.randn(3, 7))


def test_grid_side_refuses_non_square_token_counts():
    assert grid_side(196) == 14
    for n in (0, 17, 197):  # 197 = 14² + a CLS token left in
        with pytest.raises(ValueError, match="square grid"):
            grid_side(n)


def test_segmentation_probe_upsamples_to_label_size():
    probe = SegmentationProbe(d=8, num_classes=5)
    assert probe(torch.randn(2, 16, 8), size=(30, 45)).shape == (2, 5, 30, 45)
    assert SegmentationProbe(d=8).num_classes == 150
    with pytest.raises(ValueError, match="square grid"):
        probe(torch.randn(2, 17, 8), size=(30, 45))
    with pytest.raises(ValueError, match=r"\[B, N, 8\]"):
        probe(torch.randn(2, 16, 4), size=(30, 45))
    with pytest.raises(ValueError, match="size"):
        probe(torch.randn(2, 16, 8), size=(0, 45))


def test_segmentation_grid_is_row_major_and_same_size_is_identity():
    probe = SegmentationProbe(d=1, num_classes=2)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        probe.linear.bias.zero_()
    tokens_BND = torch.arange(12.0).reshape(1, 12, 1)  # not square: refused
    with pytest.raises(ValueError):
        probe(tokens_BND, size=(3, 4))
    tokens_BND = torch.arange(9.0).reshape(1, 9, 1)
    out = probe(tokens_BND, size=(3, 3))
    assert torch.equal(out[0, 0], torch.arange(9.0).reshape(3, 3))  # token i·g + j → row i, column j
    assert torch.equal(out[0, 1], -torch.arange(9.0).reshape(3, 3))


def test_depth_bins_are_uniform_centres():
    probe = DepthProbe(d=4)  # defaults: 256 bins on [1e-3, 10]
    w = (10.0 - 1e-3) / 256
    assert probe.centres_K.shape == (256,)
    assert probe.centres_K[0].item() == pytest.approx(1e-3 + w / 2)
    assert probe.centres_K[-1].item() == pytest.approx(10.0 - w / 2)
    assert torch.allclose(probe.centres_K.diff(), torch.full((255,), w), atol=1e-6)  # float32 buffer
    assert "centres_K" not in probe.state_dict()


def test_depth_is_the_softmax_weighted_bin_centre_by_hand():
    # 3 bins on [0, 3] → centres 0.5, 1.5, 2.5; logits (0, 0, ln 2) → softmax (1/4, 1/4, 1/2)
    # → depth 0.5/4 + 1.5/4 + 2.5/2 = 1.75.
    probe = DepthProbe(d=1, bins=3, max_depth=3.0, min_depth=0.0)
    assert torch.allclose(probe.centres_K, torch.tensor([0.5, 1.5, 2.5]))
    logits_BKHW = torch.tensor([0.0, 0.0, math.log(2.0)]).reshape(1, 3, 1, 1)
    assert probe.depth_from_logits(logits_BKHW).item() == pytest.approx(1.75)
    assert probe.depth_from_logits(torch.zeros(1, 3, 1, 1)).item() == pytest.approx(1.5)  # uniform → mean centre

    # The same through forward: zero weights, bias = those logits → 1.75 everywhere.
    with torch.no_grad():
        probe.linear.weight.zero_()
        probe.linear.bias.copy_(torch.tensor([0.0, 0.0, math.log(2.0)]))
    depth_BHW = probe(torch.randn(2, 1), torch.randn(2, 4, 1), size=(5, 7))
    assert depth_BHW.shape == (2, 5, 7)
    assert torch.allclose(depth_BHW, torch.full((2, 5, 7), 1.75))


def test_depth_features_concatenate_cls_to_every_patch():
    probe = DepthProbe(d=2, bins=4)
    cls_BD = torch.tensor([[10.0, 20.0]])
    tokens_BND = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])
    feats = probe.features(cls_BD, tokens_BND)
    assert feats.shape == (1, 4, 4)
    assert torch.equal(feats[0, :, :2], tokens_BND[0])
    assert torch.equal(feats[0, :, 2:], cls_BD.expand(4, 2))
    with pytest.raises(ValueError, match="cls"):
        probe.features(torch.zeros(2, 2), tokens_BND)  # batch mismatch


def test_depth_linear_then_upsample_equals_the_literal_order():
    # METHOD: concat → grid → upsample 2D-channel features → 1×1 linear. The probe applies the
    # linear on the grid first; bilinear weights sum to 1, so the two agree (to rounding).
    torch.manual_seed(0)
    d, g, size = 6, 3, (13, 17)
    probe = DepthProbe(d=d, bins=16)
    cls_BD, tokens_BND = torch.randn(2, d), torch.randn(2, g * g, d)
    feats_BNF = probe.features(cls_BD, tokens_BND)
    grid_BFgg = feats_BNF.transpose(1, 2).reshape(2, 2 * d, g, g)
    up_BFHW = F.interpolate(grid_BFgg, size=size, mode="bilinear", align_corners=False)
    literal_BKHW = torch.einsum("bfhw,kf->bkhw", up_BFHW, probe.linear.weight) + probe.linear.bias[:, None, None]
    ours_BKHW = probe.logits(cls_BD, tokens_BND, size)
    assert ours_BKHW.shape == (2, 16, *size)
    assert torch.allclose(ours_BKHW, literal_BKHW, atol=1e-5, rtol=0)


def test_depth_probe_trains_end_to_end_with_the_si_loss():
    torch.manual_seed(0)
    probe = DepthProbe(d=4, bins=8, max_depth=10.0)
    cls_BD, tokens_BND = torch.randn(4, 4), torch.randn(4, 4, 4)
    patch_depth_Bgg = 2.0 + tokens_BND[:, :, 0].abs().reshape(4, 2, 2)  # a depth the features determine
    target_BHW = patch_depth_Bgg.repeat_interleave(4, 1).repeat_interleave(4, 2)
    target_BHW[:, 0, 0] = 0.0  # missing ground truth
    opt = torch.optim.SGD(probe.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = scale_invariant_loss(probe(cls_BD, tokens_BND, size=(8, 8)), target_BHW)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in probe.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
