"""Backbones: the registry, weight loading and one wrapper over timm and open_clip ViTs."""

from __future__ import annotations

from collections.abc import Mapping

from scope_ray.models.loading import build_backbone
from scope_ray.models.registry import REGISTRY, ModelSpec, get_spec
from scope_ray.models.wrapper import LayerOutput, ViTWrapper

__all__ = ["REGISTRY", "LayerOutput", "ModelSpec", "PlantedCodes", "ViTWrapper", "build_backbone", "build_model",
           "get_spec", "planted_codes", "planted_directions"]

_PLANTED = ("PlantedCodes", "planted_codes", "planted_directions")


def __getattr__(name: str):
    # The planted model subclasses timm's ViT; importing it lazily keeps `import scope_ray.models`
    # (which the config loader does) from importing timm.
    if name in _PLANTED:
        from scope_ray.models import planted

        return getattr(planted, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
