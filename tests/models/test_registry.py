"""Every registry entry against the installed libraries: geometry at full size (on the meta
device, so nothing is allocated), and a real forward of a width-shrunk, full-depth build."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scope_ray.models import REGISTRY, ModelSpec, ViTWrapper, build_backbone, build_model, get_spec

SPECS = list(REGISTRY.values())
IDS = [spec.name for spec in SPECS]
# Width 96 rather than 64: DINOv2-g's packed SwiGLU needs an even hidden size (int(96 * 16/3) = 512).
SHRINK = {"width": 96, "num_heads": 2}
PREFIX_BY_FAMILY = {"clip": 1, "dinov2": 1, "deit3": 1, "siglip2": 0}


def expected_prefix(spec: ModelSpec) -> int:
    if spec.family == "demo":
        return 1 + int(dict(spec.builder_kwargs).get("reg_tokens", 0))
    return PREFIX_BY_FAMILY[spec.family]


def test_registry_has_the_twelve_paper_models_and_demo_ones():
    families = [spec.family for spec in SPECS]
    for family in PREFIX_BY_FAMILY:
        assert families.count(family) == 3
    assert {"demo-vit-tiny", "demo-vit-reg"} <= set(REGISTRY)
    assert expected_prefix(REGISTRY["demo-vit-reg"]) == 5


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_entry_is_self_consistent(spec: ModelSpec):
    assert spec.grid == spec.image_size // spec.patch
    assert spec.image_size % spec.patch == 0
    assert 1 <= spec.layer <= spec.depth
    assert spec.width % spec.num_heads == 0
    assert spec.tau is None or spec.tau > 0
    assert get_spec(spec.name) is spec


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="demo-vit-tiny"):
        get_spec("no-such-model")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_full_size_geometry_matches_library(spec: ModelSpec):
    with torch.device("meta"):
        wrapper = ViTWrapper(build_backbone(spec), spec)
    assert (wrapper.depth, wrapper.width, wrapper.num_heads) == (spec.depth, spec.width, spec.num_heads)
    assert wrapper.grid == spec.grid
    assert wrapper.num_prefix_tokens == expected_prefix(spec)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.pretrained_tag], ids=lambda s: s.name)
def test_preprocessing_matches_the_pretrained_tag(spec: ModelSpec):
    if spec.loader == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.pretrained_tag}")
        assert cfg is not None, f"timm has no {spec.arch}.{spec.pretrained_tag}"
        mean, std, size = cfg.mean, cfg.std, cfg.input_size[-1]
        # The eval resize / crop is the library's (timm's eval transform: floor(S / crop_pct), centre crop).
        assert (spec.crop_pct, spec.interpolation) == (cfg.crop_pct, cfg.interpolation)
        assert spec.resize_mode == ("squash" if cfg.crop_mode == "squash" else "shortest")
        if spec.family == "dinov2":
            assert size == 518 and spec.image_size == 224  # the documented DINOv2-at-224 decision
            size = spec.image_size
    else:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained_tag)
        assert cfg, f"open_clip has no {spec.arch} / {spec.pretrained_tag}"
        mean, std, size = cfg["mean"], cfg["std"], open_clip.get_model_config(spec.arch)["vision_cfg"]["image_size"]
        assert (spec.crop_pct, spec.resize_mode, spec.interpolation) == (
            1.0, cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic"))
        assert dict(spec.builder_kwargs).get("quick_gelu", False) == cfg.get("quick_gelu", False)
    np.testing.assert_allclose(spec.mean, mean)
    np.testing.assert_allclose(spec.std, std)
    assert spec.image_size == size


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_entry_builds_and_runs_at_native_size(spec: ModelSpec):
    shrink = None if spec.family == "demo" else SHRINK
    model = build_model(spec, shrink=shrink)
    width = SHRINK["width"] if shrink else spec.width
    images = np.random.default_rng(0).integers(0, 256, (1, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = model.forward_layer(model.preprocess(images))
    assert model.layer == spec.layer
    assert model.depth == spec.depth
    assert out.patch_tokens.shape == (1, spec.grid**2, width)
    assert out.prefix_tokens.shape == (1, expected_prefix(spec), width)
    assert out.norms.shape == (1, spec.grid**2)
    assert torch.isfinite(out.patch_tokens).all()
