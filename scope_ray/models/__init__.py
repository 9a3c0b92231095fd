"""Backbones: the registry, weight loading and one wrapper over timm and open_clip ViTs."""

from __future__ import annotations

from collections.abc import Mapping

from scope_ray.models.loading import build_backbone
from scope_ray.models.registry import REGISTRY, ModelSpec, get_spec
from scope_ray.models.wrapper import LayerOutput, ViTWrapper

__all__ = ["REGISTRY", "LayerOutput", "ModelSpec", "ViTWrapper", "build_backbone", "build_model", "get_spec"]


def build_model(
    spec_or_name: ModelSpec | str,
    weights: str = "none",
    seed: int = 0,
    layer: int | None = None,
    shrink: Mapping[str, int] | None = None,
    endpoint_url: str | None = None,
) -> ViTWrapper:
    """A wrapped backbone in eval mode: ``build_backbone`` then ``ViTWrapper``."""
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    backbone = build_backbone(spec, weights=weights, seed=seed, shrink=shrink, endpoint_url=endpoint_url)
    return ViTWrapper(backbone, spec, layer=layer).eval()
