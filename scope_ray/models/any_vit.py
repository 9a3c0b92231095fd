"""Any timm or open_clip ViT as a model: ``timm:<name>[.<tag>]`` or ``open_clip:<arch>[.<tag>]``.

The tag follows a dot in both (as timm writes it; no open_clip model or tag name has a dot), not a
slash: a model's name is its results folder (``ROOT/<model>/``), and a slash would nest it.

The registry's entries are written out by hand (the paper's 12 backbones, the demo's); any other
plain ViT of either library gets its ModelSpec read from the library itself: the architecture is
built on PyTorch's meta device (no memory, no weights, no network) and its geometry read off it
(grid, patch, width, depth, heads, prefix tokens); normalisation from the library's pretrained
config. Defaults the paper cannot give: the designated layer is the penultimate block (set
``model.layer`` for another), τ is ``auto`` (Otsu on the token norms).

What does not fit is refused with what was found: a non-square patch grid, a hybrid CNN stem, a
model with no patch tokens to pool, a tower that is not a ViT.
"""

from __future__ import annotations

from functools import lru_cache

from scope_ray.data.images import EvalTransform
from scope_ray.models.registry import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ModelSpec

PREFIXES = ("timm:", "open_clip:")


def is_library_name(name: str) -> bool:
    return name.startswith(PREFIXES)


@lru_cache(maxsize=None)
def library_spec(name: str) -> ModelSpec:
    """The ModelSpec of ``timm:...`` / ``open_clip:...`` (module docstring); ValueError when it does not fit."""
    if "/" in name:
        raise ValueError(f"{name!r}: a model name is its results folder, so it has no '/'; write the tag after a "
                         f"dot: {name.replace('/', '.')}")
    if name.startswith("timm:"):
        return _timm_spec(name, name[len("timm:"):])
    if name.startswith("open_clip:"):
        return _open_clip_spec(name, name[len("open_clip:"):])
    raise ValueError(f"{name!r} is not a library model name; use timm:<name>[.<tag>] or open_clip:<arch>[.<tag>]")


def _square(value, what: str, name: str) -> int:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or pair[0] != pair[1]:
        raise ValueError(f"{name}: non-square {what} {pair}; the SCC views need a square patch grid")
    return int(pair[0])


def _timm_spec(name: str, arch_tag: str) -> ModelSpec:
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    arch, _, tag = arch_tag.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"{name}: timm has no model {arch!r} (timm.list_models('*vit*') lists the ViTs)")
    with torch.device("meta"):  # the tagged name: that tag's pretrained config (mean, std)
        model = timm.create_model(arch_tag if tag else arch, pretrained=False)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name}: {type(model).__name__} is not a plain ViT (timm VisionTransformer); not supported")
    embed = model.patch_embed
    if type(embed).__name__ != "PatchEmbed" or not hasattr(embed, "proj"):
        raise ValueError(f"{name}: a hybrid CNN stem ({type(embed).__name__}) is not supported: its 'patches' are "
                         "CNN feature cells, not image patches the SCC views can shift by")
    grid = _square(embed.grid_size, "patch grid", name)
    patch = _square(embed.patch_size, "patch size", name)
    if grid < 2:
        raise ValueError(f"{name}: a {grid}x{grid} grid has no patch tokens to shift")
    cfg = model.pretrained_cfg or {}
    depth = len(model.blocks)
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"{name}: timm's eval transform crop_mode {crop_mode!r} is not supported (center, squash)")
    transform = _transform(name, float(cfg.get("crop_pct", 1.0)), "squash" if crop_mode == "squash" else "shortest",
                           cfg.get("interpolation", "bicubic"))
    return ModelSpec(
        name=name, family="custom", loader="timm", arch=arch, pretrained_tag=tag or cfg.get("tag") or None,
        depth=depth, width=int(model.embed_dim), num_heads=int(model.blocks[0].attn.num_heads), patch=patch,
        image_size=grid * patch, layer=max(1, depth - 1), tau=None,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
        crop_pct=transform.crop_pct, resize_mode=transform.resize_mode, interpolation=transform.interpolation,
        description=f"{arch_tag} (timm, read from the library)")


def _open_clip_spec(name: str, arch_tag: str) -> ModelSpec:
    import open_clip

    arch, _, tag = arch_tag.partition(".")
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"{name}: open_clip has no model config {arch!r} (open_clip.list_models() lists them)")
    vision = cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        raise ValueError(f"{name}: the image tower is timm's {vision['timm_model_name']}; use timm:"
                         f"{vision['timm_model_name']} for it")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(f"{name}: a ResNet image tower (layers {vision['layers']}) is not a ViT")
    size = _square(vision.get("image_size", 224), "image size", name)
    patch = _square(vision.get("patch_size", 16), "patch size", name)
    width, depth = int(vision["width"]), int(vision["layers"])
    heads = width // int(vision.get("head_width", 64))
    mean, std = CLIP_MEAN, CLIP_STD
    pre = dict(cfg.get("preprocess_cfg") or {})
    if tag:
        tagged = open_clip.get_pretrained_cfg(arch, tag) or {}
        if not tagged:
            raise ValueError(f"{name}: open_clip has no pretrained tag {tag!r} for {arch}; its tags: "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
        pre.update({k: v for k, v in tagged.items() if k in ("mean", "std", "interpolation", "resize_mode")})
    mean, std = tuple(pre.get("mean", mean)), tuple(pre.get("std", std))
    transform = _transform(name, 1.0, pre.get("resize_mode", "shortest"), pre.get("interpolation", "bicubic"))
    return ModelSpec(
        name=name, family="custom", loader="open_clip", arch=arch, pretrained_tag=tag or None,
        depth=depth, width=width, num_heads=heads, patch=patch, image_size=size // patch * patch,
        layer=max(1, depth - 1), tau=None, mean=mean, std=std, has_text_tower=True,
        resize_mode=transform.resize_mode, interpolation=transform.interpolation,
        description=f"{arch_tag} (open_clip image tower, read from the library)")


def _transform(name: str, crop_pct: float, resize_mode: str, interpolation: str) -> EvalTransform:
    """The library's eval transform, or a clear refusal of one this project does not reproduce."""
    try:
        return EvalTransform(crop_pct, resize_mode, interpolation)
    except ValueError as exc:
        raise ValueError(f"{name}: the library's eval transform is not supported: {exc}") from None
