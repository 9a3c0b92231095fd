"""Build a registry backbone with the weights a job asks for.

Three sources, one function: ``none`` (seeded random init: tests, the demo), ``pretrained``
(the library's own download by tag, for clusters with internet) and a file (local path or
``s3://`` URI, for offline clusters). Files are read as safetensors, or as a torch checkpoint
with ``weights_only=True`` so a checkpoint can never run code on load.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import PurePosixPath

import torch
from torch import nn

from scope_ray.models.registry import ModelSpec

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SHRINK_KEYS = frozenset({"width", "num_heads"})


def build_backbone(
    spec: ModelSpec,
    weights: str = "none",
    seed: int = 0,
    shrink: Mapping[str, int] | None = None,
    endpoint_url: str | None = None,
) -> nn.Module:
    """The raw library module for ``spec`` in eval mode.

    timm: the ``VisionTransformer``; open_clip: the whole ``CLIP`` (the text tower stays, for
    zero-shot). ``weights`` is ``"none"``, ``"pretrained"`` or a path / ``s3://`` URI.
    ``shrink`` (tests) overrides width and heads but keeps depth, patch and image size, so layer
    indices and grids stay those of the real model.
    """
    if shrink:
        unknown = set(shrink) - SHRINK_KEYS
        if unknown:
            raise ValueError(f"shrink keys {sorted(unknown)} not understood; allowed: {sorted(SHRINK_KEYS)}")
    if weights == "pretrained":
        if shrink:
            raise ValueError("shrink only applies to random or file weights, not to 'pretrained'")
        model = _pretrained(spec)
    else:
        # fork_rng: seeding here must not reset the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _architecture(spec, shrink)
        if weights != "none":
            state = read_state_dict(weights, endpoint_url)
            _load_strict(model, spec, state, weights)
    return model.eval()


def _architecture(spec: ModelSpec, shrink: Mapping[str, int] | None) -> nn.Module:
    if spec.loader == "timm":
        return _timm_architecture(spec, shrink)
    if spec.loader == "open_clip":
        return _open_clip_architecture(spec, shrink)
    raise ValueError(f"unknown loader {spec.loader!r} for model {spec.name!r}")


def _timm_architecture(spec: ModelSpec, shrink: Mapping[str, int] | None) -> nn.Module:
    import timm

    kwargs = dict(spec.builder_kwargs)
    if shrink:
        kwargs["embed_dim"] = shrink.get("width", spec.width)
        kwargs["num_heads"] = shrink.get("num_heads", spec.num_heads)
    try:
        if spec.builder == "planted":
            from scope_ray.models.planted import build_planted

            return build_planted(spec, **kwargs)
        if spec.builder is not None:
            raise ValueError(f"{spec.name}: unknown builder {spec.builder!r}")
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    except AssertionError as err:
        # timm asserts on geometry it cannot build (e.g. DINOv2-g's SwiGLU needs an even hidden size).
        raise ValueError(f"{spec.name}: timm cannot build {spec.arch} with {kwargs}: {err}") from err


def _open_clip_architecture(spec: ModelSpec, shrink: Mapping[str, int] | None) -> nn.Module:
    import open_clip

    cfg = open_clip.get_model_config(spec.arch)
    if cfg is None:
        raise ValueError(f"{spec.name}: open_clip has no model config {spec.arch!r}")
    for key, value in spec.builder_kwargs:
        if isinstance(value, tuple) and isinstance(cfg.get(key), dict):
            cfg[key].update(dict(value))  # a sub-config (vision_cfg, text_cfg): merged, not replaced
        else:
            cfg[key] = value
    if shrink:
        width = shrink.get("width", spec.width)
        heads = shrink.get("num_heads", spec.num_heads)
        if width % heads:
            raise ValueError(f"shrink width {width} is not divisible by num_heads {heads}")
        cfg["embed_dim"] = width
        cfg["vision_cfg"].update(width=width, head_width=width // heads)
        cfg["text_cfg"].update(width=width, heads=heads)
    return open_clip.model.CLIP(**cfg)


def _pretrained(spec: ModelSpec) -> nn.Module:
    """The library's own download path (needs internet and a model hub)."""
    if spec.pretrained_tag is None:
        raise ValueError(f"{spec.name} has no pretrained tag; use weights 'none' or a file")
    kwargs = dict(spec.builder_kwargs)
    if spec.loader == "timm":
        import timm

        return timm.create_model(f"{spec.arch}.{spec.pretrained_tag}", pretrained=True, **kwargs)
    import open_clip

    quick_gelu = bool(kwargs.pop("quick_gelu", False))
    # force_quick_gelu rather than a kwarg: open_clip checks the tag's activation before kwargs apply.
    return open_clip.create_model(spec.arch, pretrained=spec.pretrained_tag,
                                  force_quick_gelu=quick_gelu, **kwargs)


def read_state_dict(uri: str, endpoint_url: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors in a ``.safetensors`` or ``.pt/.pth/.bin`` file, local or on S3."""
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        allowed = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
        raise ValueError(f"weights file {uri!r} has an unsupported type {suffix!r}; expected one of {allowed}")
    data = _read_bytes(uri, endpoint_url)
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as err:  # safetensors raises its own SafetensorError (not a ValueError)
            raise ValueError(f"weights file {uri!r} is not a valid safetensors file: {err}") from err
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"weights file {uri!r} is not a tensors-only torch checkpoint: {err}") from err
    return _tensor_dict(obj, uri)


def _read_bytes(uri: str, endpoint_url: str | None) -> bytes:
    from scope_ray.storage import read_uri_bytes

    return read_uri_bytes(uri, endpoint_url, "weights file")


def _tensor_dict(obj: object, uri: str) -> dict[str, torch.Tensor]:
    # Training scripts often wrap the weights as {"state_dict": ...} or {"model": ...}.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {uri!r} does not hold a state dict of tensors")
    return dict(obj)


def _load_strict(model: nn.Module, spec: ModelSpec, state: dict[str, torch.Tensor], uri: str) -> None:
    try:
        if spec.loader == "timm":
            from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

            if isinstance(model, VisionTransformer):
                # timm's own filter is the identity on a dict saved from this model, but resamples
                # the position table of hub checkpoints made at another size (DINOv2 ships at 518 px).
                state = checkpoint_filter_fn(state, model)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as err:
        # The filter fails on shapes it cannot resample, load_state_dict on anything else.
        raise ValueError(f"weights file {uri!r} does not fit {spec.name}: {err}") from err
