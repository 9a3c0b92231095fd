"""One interface over timm ViTs and open_clip's VisionTransformer.

Shape names: B batch, S image side, T all tokens (= P + N), P prefix tokens (CLS, registers;
0 for SigLIP), N patch tokens (= grid²), D width, H heads.

The wrapper never re-implements a model's forward: it runs the library's own forward and uses
hooks on the designated block, so embeddings, ``norm_pre``, registers, position tables and
layouts stay exactly the library's. Hooks are registered for one call and always removed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scope_ray.models.registry import ModelSpec

PatchEdit = Callable[[Tensor], Tensor]  # patch_tokens_BND -> patch_tokens_BND


@dataclass(frozen=True)
class LayerOutput:
    """The residual stream at the output of the designated block."""

    patch_tokens: Tensor  # [B, N, D]
    prefix_tokens: Tensor  # [B, P, D]
    norms: Tensor  # [B, N], L2 norm of each patch token


class _Stop(Exception):
    """Carries a captured tensor out of a hook, so no block after the designated one runs."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


class ViTWrapper(nn.Module):
    """Tokens, attention and final tokens of one ViT at one designated block (1-based)."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec, layer: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        if spec.loader == "timm":
            self.num_prefix_tokens = int(backbone.num_prefix_tokens)
            self.width = int(backbone.embed_dim)
            self._batch_first = True
            model_grid = tuple(backbone.patch_embed.grid_size)
        elif spec.loader == "open_clip":
            vision = self.vision
            if not hasattr(vision, "transformer") or not hasattr(vision, "class_embedding"):
                raise TypeError(f"{spec.name}: only open_clip's own VisionTransformer is supported")
            self.num_prefix_tokens = 1  # the class embedding; open_clip has no registers
            self.width = int(vision.transformer.width)
            # open_clip 3.x runs blocks batch-first; older releases (and batch_first=False) use LND.
            self._batch_first = bool(getattr(vision.transformer, "batch_first", False))
            model_grid = tuple(vision.grid_size)
        else:
            raise ValueError(f"unknown loader {spec.loader!r}")
        if model_grid != (spec.grid, spec.grid):
            raise ValueError(f"{spec.name}: model grid {model_grid} differs from the registry's {spec.grid}")
        self.grid = spec.grid
        self.depth = len(self.blocks)
        self.layer = spec.layer if layer is None else int(layer)
        if not 1 <= self.layer <= self.depth:
            raise ValueError(f"{spec.name}: layer {self.layer} outside 1..{self.depth}")
        self.num_heads = int(self.block.attn.num_heads)
        # "fp32", or "bf16": the library's forward runs under bf16 autocast; what this wrapper
        # returns is float32 either way (callers store and compare float32).
        self.precision = "fp32"

    # ---- structure -------------------------------------------------------------------------
    @property
    def vision(self) -> nn.Module:
        """The image tower: the timm model itself, or open_clip's ``model.visual``."""
        return getattr(self.backbone, "visual", self.backbone)

    @property
    def blocks(self) -> nn.Sequential | nn.ModuleList:
        if self.spec.loader == "timm":
            return self.backbone.blocks
        return self.vision.transformer.resblocks

    @property
    def block(self) -> nn.Module:
        """The designated block."""
        return self.blocks[self.layer - 1]

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def _param(self) -> Tensor:
        return next(self.vision.parameters())

    # ---- inputs ----------------------------------------------------------------------------
    def preprocess(self, images_BSS3: np.ndarray | Tensor) -> Tensor:
        """uint8 RGB images already at native size -> normalised pixels_B3SS on the model's device."""
        x = torch.from_numpy(images_BSS3) if isinstance(images_BSS3, np.ndarray) else images_BSS3
        size = self.spec.image_size
        if x.dtype != torch.uint8:
            raise TypeError(f"preprocess expects uint8 images, got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (size, size, 3):
            raise ValueError(f"{self.spec.name} expects images [B, {size}, {size}, 3], got {list(x.shape)}")
        param = self._param()
        # Move the uint8 bytes first: a quarter of the float traffic.
        x = x.to(param.device).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(param.dtype)

    def _check_pixels(self, pixels_B3SS: Tensor) -> None:
        size = self.spec.image_size
        if pixels_B3SS.ndim != 4 or tuple(pixels_B3SS.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.spec.name} expects pixels [B, 3, {size}, {size}], got {list(pixels_B3SS.shape)}")

    # ---- layout ----------------------------------------------------------------------------
    def _to_bnd(self, tokens: Tensor) -> Tensor:
        return tokens if self._batch_first else tokens.transpose(0, 1)

    def _from_bnd(self, tokens_BTD: Tensor) -> Tensor:
        return tokens_BTD if self._batch_first else tokens_BTD.transpose(0, 1)

    def _run(self, pixels_B3SS: Tensor) -> Tensor:
        """The library's own image forward; what it returns depends on the library."""
        self._check_pixels(pixels_B3SS)
        autocast = (torch.autocast(pixels_B3SS.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else nullcontext())
        with autocast:
            if self.spec.loader == "timm":
                # forward_features, not forward: tokens after `norm`, before SigLIP's attn_pool / fc_norm.
                return self.backbone.forward_features(pixels_B3SS)
            return self.vision(pixels_B3SS)

    @contextmanager
    def _hooks(self, *pairs: tuple[nn.Module, str, Callable]) -> Iterator[None]:
        handles = []
        try:
            for module, kind, fn in pairs:
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(fn))
                else:
                    handles.append(module.register_forward_hook(fn))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _capture(self, pixels_B3SS: Tensor, module: nn.Module, kind: str) -> Tensor:
        """The input (``pre``) or output (``post``) of ``module``, stopping the forward right there."""

        def pre(_m: nn.Module, args: tuple) -> None:
            raise _Stop(args[0])

        def post(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            raise _Stop(output)

        with self._hooks((module, kind, pre if kind == "pre" else post)):
            try:
                self._run(pixels_B3SS)
            except _Stop as stop:
                return stop.value
        raise RuntimeError(f"{self.spec.name}: the hooked module never ran")

    def _split(self, tokens_BTD: Tensor) -> tuple[Tensor, Tensor]:
        expected = self.num_prefix_tokens + self.num_patches
        if tokens_BTD.shape[1] != expected:
            # e.g. timm patch_drop active in training mode: patch positions would no longer be a grid.
            raise RuntimeError(f"{self.spec.name}: {tokens_BTD.shape[1]} tokens, expected {expected}")
        return tokens_BTD[:, : self.num_prefix_tokens], tokens_BTD[:, self.num_prefix_tokens :]

    # ---- the four views --------------------------------------------------------------------
    def forward_layer(self, pixels_B3SS: Tensor) -> LayerOutput:
        """Residual stream at the designated block's output; later blocks do not run."""
        tokens_BTD = self._to_bnd(self._capture(pixels_B3SS, self.block, "post")).float()
        prefix_BPD, patch_BND = self._split(tokens_BTD)
        return LayerOutput(patch_tokens=patch_BND, prefix_tokens=prefix_BPD,
                           norms=patch_BND.float().norm(dim=-1))

    def forward(self, pixels_B3SS: Tensor) -> LayerOutput:
        return self.forward_layer(pixels_B3SS)

    def attention(self, pixels_B3SS: Tensor) -> Tensor:
        """attn_BHTT: softmax attention of the designated block over all tokens (float32).

        The models run fused attention and never materialise probabilities, so they are
        recomputed from the block's own normalised input and q/k projections.
        """
        x_BTD = self._to_bnd(self._capture(pixels_B3SS, self.block, "pre")).float()
        if self.spec.loader == "timm":
            return _timm_attention(self.block, x_BTD)
        return _open_clip_attention(self.block, x_BTD)

    def patch_attention(self, pixels_B3SS: Tensor) -> Tensor:
        """attn_BHNN: patch-to-patch attention, prefix columns dropped, rows renormalised (METHOD §4)."""
        p = self.num_prefix_tokens
        attn_BHNN = self.attention(pixels_B3SS)[:, :, p:, p:]
        return attn_BHNN / attn_BHNN.sum(dim=-1, keepdim=True)

    def patch_attention_and_layer(self, pixels_B3SS: Tensor) -> tuple[Tensor, LayerOutput]:
        """``patch_attention`` and ``forward_layer`` from one forward through blocks 1…L (the
        block's input is kept on the way in, its output ends the forward), instead of two."""
        seen: list[Tensor] = []

        def keep_input(_m: nn.Module, args: tuple) -> None:
            seen.append(args[0])

        def stop(_m: nn.Module, _args: tuple, output: Tensor) -> None:
            raise _Stop(output)

        self._check_pixels(pixels_B3SS)
        with self._hooks((self.block, "pre", keep_input), (self.block, "post", stop)):
            try:
                self._run(pixels_B3SS)
            except _Stop as end:
                output = end.value
            else:
                raise RuntimeError(f"{self.spec.name}: the designated block never ran")
        x_BTD = self._to_bnd(seen[0]).float()
        attend = _timm_attention if self.spec.loader == "timm" else _open_clip_attention
        p = self.num_prefix_tokens
        attn_BHNN = attend(self.block, x_BTD)[:, :, p:, p:]
        prefix_BPD, patch_BND = self._split(self._to_bnd(output).float())
        layer = LayerOutput(patch_tokens=patch_BND, prefix_tokens=prefix_BPD, norms=patch_BND.float().norm(dim=-1))
        return attn_BHNN / attn_BHNN.sum(dim=-1, keepdim=True), layer

    def designated_output(self, pixels_B3SS: Tensor) -> Tensor:
        """The designated block's raw output (the library's layout), later blocks not run: what
        ``final_tokens(..., start_from=...)`` continues from, once per batch for every edit."""
        return self._capture(pixels_B3SS, self.block, "post")

    @contextmanager
    def _resume_from(self, designated_out: Tensor | None) -> Iterator[None]:
        """Within: blocks 1…L−1 pass their input through and the designated block returns
        ``designated_out``, so a forward runs only the patch embedding and blocks L+1… (and any
        post hook on the designated block, e.g. an edit, still applies)."""
        if designated_out is None:
            yield
            return
        patched: list[nn.Module] = []
        try:
            for block in list(self.blocks)[: self.layer - 1]:
                block.forward = lambda x, *_args, **_kwargs: x
                patched.append(block)
            self.block.forward = lambda *_args, **_kwargs: designated_out
            patched.append(self.block)
            yield
        finally:
            for block in patched:
                del block.forward  # the class's own forward again

    def final_tokens(self, pixels_B3SS: Tensor, edit: PatchEdit | None = None,
                     start_from: Tensor | None = None) -> Tensor:
        """tokens_BTD after the last block and the final norm; ``edit`` rewrites the patch tokens
        at the designated block's output (prefix untouched) before the remaining blocks run.
        ``start_from``: ``designated_output(pixels_B3SS)``, computed once and reused, so blocks
        1…L are not run again for each edit (same result, bit for bit)."""
        with self._resume_from(start_from):
            return self._final_tokens(pixels_B3SS, edit)

    def _final_tokens(self, pixels_B3SS: Tensor, edit: PatchEdit | None) -> Tensor:
        hooks: list[tuple[nn.Module, str, Callable]] = []
        if edit is not None:
            hooks.append((self.block, "post", self._edit_hook(edit)))
        if self.spec.loader == "timm":
            with self._hooks(*hooks):
                return self._run(pixels_B3SS).float()
        vision = self.vision
        if vision.attn_pool is not None or vision.final_ln_after_pool:
            raise NotImplementedError(f"{self.spec.name}: ln_post is not applied per token in this open_clip tower")
        captured: list[Tensor] = []
        # open_clip applies ln_post to all tokens and only then pools; its forward returns the pooled
        # embedding, so the per-token output is read off ln_post.
        hooks.append((vision.ln_post, "post", lambda _m, _a, out: captured.append(out)))
        with self._hooks(*hooks):
            self._run(pixels_B3SS)
        return captured[0].float()

    def _edit_hook(self, edit: PatchEdit) -> Callable:
        def hook(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor:
            tokens_BTD = self._to_bnd(output)
            prefix_BPD, patch_BND = self._split(tokens_BTD)
            edited_BND = edit(patch_BND)
            if edited_BND.shape != patch_BND.shape:
                raise ValueError(f"edit changed the patch-token shape "
                                 f"{list(patch_BND.shape)} -> {list(edited_BND.shape)}")
            return self._from_bnd(torch.cat([prefix_BPD, edited_BND.to(patch_BND.dtype)], dim=1))

        return hook


def _timm_attention(block: nn.Module, x_BTD: Tensor) -> Tensor:
    from timm.layers import Attention

    attn = block.attn
    if not isinstance(attn, Attention) or not hasattr(block, "norm1"):
        raise NotImplementedError(f"attention recomputation supports timm Block/Attention, not {type(attn).__name__}")
    B, T, _ = x_BTD.shape
    qkv = attn.qkv(block.norm1(x_BTD)).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q_BHTd, k_BHTd = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits_BHTT = (q_BHTd.float() * attn.scale) @ k_BHTd.float().transpose(-2, -1)
    return logits_BHTT.softmax(dim=-1)


def _open_clip_attention(block: nn.Module, x_BTD: Tensor) -> Tensor:
    mha = block.attn
    if not isinstance(mha, nn.MultiheadAttention) or mha.in_proj_weight is None or hasattr(block, "ln_1_kv"):
        raise NotImplementedError("attention recomputation supports open_clip ResidualAttentionBlock self-attention")
    B, T, D = x_BTD.shape
    heads = mha.num_heads
    head_dim = D // heads
    # in_proj packs [W_q; W_k; W_v] along the output axis.
    w_q, w_k, _ = mha.in_proj_weight.chunk(3, dim=0)
    b_q, b_k = (None, None) if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3, dim=0)[:2]
    x_BTD = block.ln_1(x_BTD)
    q_BHTd = F.linear(x_BTD, w_q, b_q).view(B, T, heads, head_dim).transpose(1, 2)
    k_BHTd = F.linear(x_BTD, w_k, b_k).view(B, T, heads, head_dim).transpose(1, 2)
    logits_BHTT = (q_BHTd.float() / math.sqrt(head_dim)) @ k_BHTd.float().transpose(-2, -1)
    return logits_BHTT.softmax(dim=-1)
