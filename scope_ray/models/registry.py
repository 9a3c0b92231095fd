"""The model zoo: every backbone the study runs, described as data.

One entry holds everything the pipeline needs to know about a backbone without building it:
where its code comes from (open_clip or timm), its pretrained tag, its geometry (patch size,
native resolution, width, depth, heads) and the paper's analysis settings (designated layer,
outlier threshold tau). Layers are 1-based, as in the paper's Table 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scope_ray.data.images import EvalTransform

Loader = Literal["open_clip", "timm"]
Family = Literal["clip", "dinov2", "deit3", "siglip2", "demo", "custom"]  # custom: timm:... / open_clip:... (any_vit)
Builder = Literal["planted"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelSpec:
    """A backbone in the zoo.

    ``arch`` is the open_clip model name or the timm model name; ``pretrained_tag`` the
    library's weight tag (used when a job asks for ``weights: pretrained``).
    ``tau`` is None where the paper gives none (the CLIP models): ``tau: auto`` then applies.
    ``builder_kwargs`` go to the library's constructor: ``timm.create_model`` kwargs for timm
    (e.g. a non-default image size), top-level model-config overrides for open_clip
    (e.g. ``quick_gelu``); for open_clip a value that is itself a tuple of pairs is merged into
    that sub-config (``("vision_cfg", (("layers", 3), ...))``), so the spec stays hashable.
    ``builder`` names a model class of this project built instead of the library's own
    (``"planted"``: ``scope_ray.models.planted``, a timm ViT subclass; ``builder_kwargs`` go to it).
    """

    name: str
    family: Family
    loader: Loader
    arch: str
    pretrained_tag: str | None
    depth: int
    width: int
    num_heads: int
    patch: int
    image_size: int
    layer: int
    tau: float | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_text_tower: bool = False
    builder_kwargs: tuple[tuple[str, object], ...] = ()
    description: str = ""
    builder: Builder | None = None
    # The library's evaluation resize / crop for the pretrained tag (tests/models/test_registry.py
    # checks them against timm's pretrained_cfg and open_clip's preprocess config).
    crop_pct: float = 1.0
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    @property
    def transform(self) -> EvalTransform:
        """How extraction and the probes resize and crop an image for this model (data.images)."""
        return EvalTransform(self.crop_pct, self.resize_mode, self.interpolation)

    @property
    def grid(self) -> int:
        """Patches per side at the native resolution (p in METHOD.md)."""
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


def _clip(name: str, arch: str, depth: int, width: int, heads: int, patch: int, size: int) -> ModelSpec:
    return ModelSpec(
        name=name, family="clip", loader="open_clip", arch=arch, pretrained_tag="openai",
        depth=depth, width=width, num_heads=heads, patch=patch, image_size=size,
        # Decision (METHOD §1, docs/models.md): the penultimate block (11 of 12, 23 of 24). The
        # paper's supplement states no CLIP layer (its Table 5 lists the other ViTs only); CLIP SAE
        # work conventionally reads the second-to-last block, and removal edits patch tokens only,
        # so at the last block it could never reach CLIP's image embedding (class token -> ln_post
        # -> proj): every zero-shot variant would equal the original by construction (METHOD §10).
        layer=depth - 1, tau=None, mean=CLIP_MEAN, std=CLIP_STD, has_text_tower=True,
        # OpenAI trained with QuickGELU, but open_clip's plain "ViT-*" configs build nn.GELU and
        # only warn on a mismatch: without this flag the openai weights load (GELU has no
        # parameters) and silently compute something else.
        builder_kwargs=(("quick_gelu", True),),
        description=f"OpenAI CLIP {arch} image tower (open_clip)",
    )


def _timm(name: str, family: Family, arch: str, tag: str, depth: int, width: int, heads: int,
          patch: int, size: int, layer: int, tau: float, mean, std, crop_pct: float = 1.0, **kwargs) -> ModelSpec:
    return ModelSpec(
        name=name, family=family, loader="timm", arch=arch, pretrained_tag=tag,
        depth=depth, width=width, num_heads=heads, patch=patch, image_size=size,
        layer=layer, tau=tau, mean=mean, std=std, crop_pct=crop_pct,
        builder_kwargs=tuple(sorted(kwargs.items())),
        description=f"{arch}.{tag} (timm)",
    )


_DINO = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
# timm's pretrained configs of these tags centre-crop 90 % (crop_pct 0.9: the shorter side to
# floor(224 / 0.9) = 248, then the central 224).
_DEIT = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9)
_SIG = dict(mean=SIGLIP_MEAN, std=SIGLIP_STD, crop_pct=0.9)

# Decision (documented in docs/models.md): DINOv2 runs at 224 px (a 16x16 grid), the resolution
# of its linear-probe protocol, rather than timm's 518 px default.
PAPER_MODELS: tuple[ModelSpec, ...] = (
    _clip("clip-vit-b16", "ViT-B-16", 12, 768, 12, 16, 224),
    _clip("clip-vit-l14", "ViT-L-14", 24, 1024, 16, 14, 224),
    _clip("clip-vit-l14-336", "ViT-L-14-336", 24, 1024, 16, 14, 336),
    _timm("dinov2-b", "dinov2", "vit_base_patch14_dinov2", "lvd142m", 12, 768, 12, 14, 224, 11, 100.0, img_size=224, **_DINO),
    _timm("dinov2-l", "dinov2", "vit_large_patch14_dinov2", "lvd142m", 24, 1024, 16, 14, 224, 23, 100.0, img_size=224, **_DINO),
    _timm("dinov2-g", "dinov2", "vit_giant_patch14_dinov2", "lvd142m", 40, 1536, 24, 14, 224, 40, 150.0, img_size=224, **_DINO),
    _timm("deit3-s", "deit3", "deit3_small_patch16_224", "fb_in1k", 12, 384, 6, 16, 224, 10, 500.0, **_DEIT),
    _timm("deit3-b", "deit3", "deit3_base_patch16_224", "fb_in1k", 12, 768, 12, 16, 224, 9, 500.0, **_DEIT),
    _timm("deit3-l", "deit3", "deit3_large_patch16_224", "fb_in1k", 24, 1024, 16, 16, 224, 18, 1000.0, **_DEIT),
    _timm("siglip2-b", "siglip2", "vit_base_patch16_siglip_224", "v2_webli", 12, 768, 12, 16, 224, 12, 150.0, **_SIG),
    _timm("siglip2-l", "siglip2", "vit_large_patch16_siglip_256", "v2_webli", 24, 1024, 16, 16, 256, 24, 150.0, **_SIG),
    _timm("siglip2-g", "siglip2", "vit_so400m_patch14_siglip_224", "v2_webli", 27, 1152, 16, 14, 224, 27, 300.0, **_SIG),
)

# Small random-init backbones for tests and the demo: real timm ViTs, shrunk so a CPU runs them
# in milliseconds. Their geometry (7x7 grid, a CLS token) exercises every code path the paper
# models do.
DEMO_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="demo-vit-tiny", family="demo", loader="timm", arch="vit_tiny_patch16_224",
        pretrained_tag=None, depth=4, width=96, num_heads=3, patch=16, image_size=112,
        layer=3, tau=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        builder_kwargs=(("depth", 4), ("embed_dim", 96), ("img_size", 112), ("num_heads", 3)),
        description="4-block, 96-wide timm ViT at 112 px (7x7 grid), random init: for tests and the demo",
    ),
    ModelSpec(
        name="demo-vit-reg", family="demo", loader="timm", arch="vit_tiny_patch16_224",
        pretrained_tag=None, depth=3, width=64, num_heads=2, patch=16, image_size=96,
        layer=2, tau=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        builder_kwargs=(("depth", 3), ("embed_dim", 64), ("img_size", 96), ("num_heads", 2), ("reg_tokens", 4)),
        description="3-block timm ViT with 4 register tokens at 96 px (6x6 grid), random init: exercises prefix dropping",
    ),
    # Ground truth for the scope analysis: demo-vit-tiny's geometry, but its block 3 writes known
    # local-scope and global-scope directions (scope_ray/models/planted.py; docs/models.md).
    ModelSpec(
        name="demo-planted", family="demo", loader="timm", arch="vit_tiny_patch16_224",
        pretrained_tag=None, depth=4, width=96, num_heads=3, patch=16, image_size=112,
        layer=3, tau=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        builder_kwargs=(("depth", 4), ("embed_dim", 96), ("img_size", 112), ("num_heads", 3), ("patch_size", 16)),
        builder="planted",
        description="demo-vit-tiny + 8 local- and 4 global-scope directions planted at block 3: "
                    "scope ground truth, not a real model",
    ),
    # Calibrated ground truth: every planted direction has a hand-derived CDS on a 0..0.73 continuum
    # at shift 4 (scope_ray/models/planted_calibrated.py; docs/scope.md §7). 16x16 grid of 8-px patches.
    ModelSpec(
        name="demo-planted-calibrated", family="demo", loader="timm", arch="vit_tiny_patch16_224",
        pretrained_tag=None, depth=2, width=32, num_heads=2, patch=8, image_size=128,
        layer=1, tau=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        builder_kwargs=(("calibrated", True), ("depth", 2), ("embed_dim", 32), ("img_size", 128), ("num_heads", 2),
                        ("patch_size", 8)),
        builder="planted",
        description="2-block, 32-wide timm ViT at 128 px (16x16 grid of 8-px patches) whose block 1 writes 10 "
                    "directions of known CDS (0 to 0.73 at shift 4): calibrated scope ground truth, not a real model",
    ),
    # A CLIP in miniature: open_clip's own CLIP class (image and text tower, ViT-B-16's config
    # shrunk), so the zero-shot path and the open_clip wrapper run in tests at CPU speed. Its layer
    # (2 of 3) is the penultimate block, as for the real CLIPs, so removal reaches its class token.
    ModelSpec(
        name="demo-clip", family="demo", loader="open_clip", arch="ViT-B-16",
        pretrained_tag=None, depth=3, width=64, num_heads=2, patch=16, image_size=96,
        layer=2, tau=None, mean=CLIP_MEAN, std=CLIP_STD, has_text_tower=True,
        builder_kwargs=(
            ("embed_dim", 32),
            ("text_cfg", (("heads", 2), ("layers", 2), ("width", 64))),
            ("vision_cfg", (("head_width", 32), ("image_size", 96), ("layers", 3), ("patch_size", 16), ("width", 64))),
        ),
        description="3-block, 64-wide open_clip CLIP at 96 px (6x6 grid) with a 2-block text tower, random init: "
                    "for zero-shot tests",
    ),
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in PAPER_MODELS + DEMO_MODELS}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, or a ``timm:`` / ``open_clip:`` model read from its library
    (``models.any_vit``); a ValueError lists the known names otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(("timm:", "open_clip:")):
        from scope_ray.models.any_vit import library_spec

        return library_spec(name)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}, or any plain ViT as "
                     "timm:<name> or open_clip:<arch>[.<tag>] (docs/models.md)")
