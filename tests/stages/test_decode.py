"""The one image decoder (stages/decode.py) and its resize + centre-crop geometry for targets.

Properties, not pinned outputs: a label plane lands where its image's pixels land, depth keeps
NaN and invents no value, and every bad annotation is a reject with its reason while the rest of
the batch survives."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scope_ray.data.images import (
    PLAIN,
    EvalTransform,
    bad_image_samples,
    decode_depth,
    resize_center_crop,
    resize_center_crop_plane,
)
from scope_ray.stages.decode import decode_batch
from tests.image_bytes import jpeg as _jpeg
from tests.image_bytes import png as _png


# ------------------------------------------------------------------------- pure: geometry
@pytest.mark.parametrize("transform", [PLAIN, EvalTransform(0.9), EvalTransform(resize_mode="squash")], ids=str)
def test_plane_follows_the_image_geometry(transform):
    """A label plane lands where the image's pixels land: wherever the resized image shows a block's
    colour clearly, the resized mask names that block, except next to a block boundary."""
    rng = np.random.default_rng(0)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)
    for h, w in ((90, 60), (60, 90)):  # portrait crops rows, landscape crops columns
        labels = rng.integers(0, len(palette), (h // 10, w // 10)).astype(np.uint8)
        mask_HW = np.kron(labels, np.ones((10, 10), np.uint8))
        img_HW3 = palette[mask_HW]
        img = resize_center_crop(img_HW3, 32, transform=transform).astype(int)
        mask = resize_center_crop_plane(mask_HW, 32, transform)
        assert mask.shape == (32, 32) and mask.dtype == np.uint8
        wrong = np.abs(img - palette[mask].astype(int)).max(axis=2) > 60
        padded = np.pad(mask, 1, mode="edge")
        neighbours = np.stack([padded[1 + dy: 33 + dy, 1 + dx: 33 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        at_edge = (neighbours != mask[None]).any(axis=0)
        assert not (wrong & ~at_edge).any(), (h, w)
        # A shift by even one block would break most pixels; the check above is not vacuous.
        assert (~at_edge).mean() > 0.3


@pytest.mark.parametrize("model", ["deit3_small_patch16_224.fb_in1k", "vit_base_patch16_siglip_224.v2_webli",
                                   "vit_base_patch14_dinov2.lvd142m"])
@pytest.mark.parametrize("hw", [(300, 200), (157, 411), (224, 224)])
def test_eval_view_equals_timms_own_eval_transform(model, hw):
    """The library is the reference: timm's eval transform for the tag's pretrained config
    (resize to floor(S / crop_pct), bicubic, centre crop, normalise) gives the same tensor as our
    resize + crop and the model's mean / std (DINOv2 at 224, the registry's decision)."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from scope_ray.models.any_vit import library_spec

    cfg = timm.models.get_pretrained_cfg(model).to_dict()
    if "dinov2" in model:
        cfg["input_size"] = (3, 224, 224)
    theirs = create_transform(**resolve_data_config({}, pretrained_cfg=cfg))
    spec = library_spec(f"timm:{model}")
    size = cfg["input_size"][-1]
    img = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ours = resize_center_crop(img, size, transform=spec.transform).astype(np.float32) / 255
    ours = (torch.from_numpy(ours).permute(2, 0, 1) - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(
        spec.std)[:, None, None]
    torch.testing.assert_close(ours, theirs(Image.fromarray(img)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["clip-vit-b16", "clip-vit-l14-336"])
def test_eval_view_equals_open_clips_own_preprocess(name):
    """The same for open_clip: its inference preprocess for the registry's CLIP tags."""
    import open_clip
    import torch

    from scope_ray.models.registry import get_spec

    spec = get_spec(name)
    pre = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained_tag)
    theirs = open_clip.image_transform(spec.image_size, is_train=False, mean=pre["mean"], std=pre["std"],
                                       resize_mode=pre["resize_mode"], interpolation=pre["interpolation"])
    img = np.random.default_rng(3).integers(0, 256, (301, 453, 3), dtype=np.uint8)
    ours = resize_center_crop(img, spec.image_size, transform=spec.transform).astype(np.float32) / 255
    ours = (torch.from_numpy(ours).permute(2, 0, 1) - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(
        spec.std)[:, None, None]
    torch.testing.assert_close(ours, theirs(Image.fromarray(img)), atol=1e-6, rtol=0)


def test_depth_plane_keeps_nan_and_only_source_values():
    rng = np.random.default_rng(1)
    depth = rng.uniform(0.5, 9.0, (48, 64)).astype(np.float32)
    depth[:, :3] = np.nan
    depth[20:30, 30:40] = np.nan
    out = resize_center_crop_plane(depth, 20)
    assert out.shape == (20, 20) and out.dtype == np.float32
    finite = out[np.isfinite(out)]
    assert np.isnan(out).any() and finite.size > 0
    assert np.isin(finite, depth[np.isfinite(depth)]).all()  # nearest: no value is invented


# --------------------------------------------------------------------- pure: bad inputs
def _photo(h: int = 40, w: int = 40) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_decode_rejects_bad_annotations_with_reasons():
    img = _jpeg(_photo())
    corrupt_png = _png(np.zeros((40, 40), np.uint8))[:30] + b"\x00" * 40
    seg = decode_batch({
        "image_id": np.array(["ok", "size", "missing", "corrupt", "rgb", "bad_image"], dtype=object),
        "image": np.array([img, img, img, img, img, bad_image_samples()["truncated"][0]], dtype=object),
        "mask": np.array([_png(np.full((40, 40), 3, np.uint8)), _png(np.zeros((30, 40), np.uint8)), None,
                          corrupt_png, _png(np.zeros((40, 40, 3), np.uint8)), _png(np.zeros((40, 40), np.uint8))],
                         dtype=object),
    }, task="segmentation", size=16, max_pixels=10**8, min_side=8)
    assert seg["ok"].tolist() == [True, False, False, False, False, False]
    reasons = seg["reason"].tolist()
    assert reasons[1] == "mask size mismatch: image 40x40, mask 30x40"
    assert reasons[2] == "missing label"
    assert reasons[3].startswith("corrupt mask")
    assert reasons[4].startswith("corrupt mask: expected a single-channel")
    assert reasons[5].startswith("corrupt or truncated image")
    assert seg["mask"].shape == (6, 16, 16) and (seg["mask"][0] == 2).all()  # release class 3 -> 2
    assert (seg["mask"][1:] == 255).all() and not seg["pixels"][1:].any()
    assert "image" not in seg and seg["pixels"].shape == (6, 16, 16, 3)


def test_decode_keeps_invalid_depth_and_large_labels():
    img = _jpeg(_photo())
    mm = np.full((40, 40), 2500, np.uint16)
    mm[:, :5] = 0
    depth = decode_batch({
        "image_id": np.array(["ok", "zeros", "missing", "eight_bit", "size"], dtype=object),
        "image": np.array([img] * 5, dtype=object),
        "depth": np.array([_png(mm), _png(np.zeros((40, 40), np.uint16)), None, _png(np.zeros((40, 40), np.uint8)),
                           _png(mm[:, :20])], dtype=object),
    }, task="depth", size=20, max_pixels=10**8, min_side=8)
    assert depth["ok"].tolist() == [True, True, False, False, False]
    assert depth["reason"].tolist()[2:] == ["missing depth",
                                            "corrupt depth: expected a 16-bit PNG in millimetres, got mode L",
                                            "depth size mismatch: image 40x40, depth 40x20"]
    np.testing.assert_array_equal(depth["depth"][0], resize_center_crop_plane(decode_depth(_png(mm)), 20))
    assert np.isnan(depth["depth"][0]).any() and np.nanmax(depth["depth"][0]) == np.float32(2.5)
    assert np.isnan(depth["depth"][1]).all()  # an all-zero map is kept: every pixel invalid

    cls = decode_batch({
        "image_id": np.array(["a", "b", "c"], dtype=object), "image": np.array([img] * 3, dtype=object),
        "label": np.array([4, -1, 5000], dtype=np.int64),
    }, task="classification", size=20, max_pixels=10**8, min_side=8)
    assert cls["ok"].tolist() == [True, False, True]
    assert cls["reason"][1] == "missing label" and cls["label"].tolist() == [4, -1, 5000]
