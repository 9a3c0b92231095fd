"""A planted-scope ViT: a tiny random-init timm ViT whose designated block writes KNOWN directions.

Not a real model. It exists so the scope pipeline (SAE → CDS → partition) can be checked against
ground truth on a CPU: at the output of the designated block every patch token is

    token = √(TOKEN_NORM² − Σ_j f_j²) · unit(h − Π h)         the ordinary residual stream h,
                                                               planted subspace projected out
          + Σ_j f_j(own patch pixels) · u_j                    L local-scope directions
          + [token is an outlier] · Σ_k a_k(view) · g_k        G global-scope directions

so every token that is not an outlier has norm exactly TOKEN_NORM, whatever its local codes.

- **Local** (``u_1..u_L``): ``f_j`` is a non-negative bump on the distance between the patch's
  own mean colour and prototype colour j (the eight corners of the RGB cube); a patch fires 0–2
  of them. It reads nothing but that patch's pixels, so on the overlap of an SCC pair (identical
  pixels) it is identical in both views: a local-scope feature, CDS ≈ 0.
- **Global** (``g_1..g_G``): the weights ``a`` (the two directions whose chroma axes flank the
  view's mean chroma, scaled by OUTLIER_NORM · (1 + |chroma|)) and the number of carrying tokens
  (1–3, from the view's mean luminance) are functions of the whole view; the carrying tokens are
  the top scorers of ``mix · position_bias[:, grid position] − CONTRAST_WEIGHT · patch contrast``
  (flat, low-information patches at context-dependent grid positions, as high-norm outlier
  tokens behave in real ViTs). The position term is tied to the token's place in the *view*, so
  between the two SCC views the outliers jump: a global-scope feature, CDS high. Outlier tokens
  have norm > ``OUTLIER_NORM`` (12) against exactly ``TOKEN_NORM`` (5) for all others, so Otsu on
  log norms cuts just above 5 on any sample and separates them on every image.

All directions are orthonormal, drawn from the build seed (``build_backbone`` seeds torch before
building; a seed is taken from that stream before timm initialises anything), and stored as
buffers, so a saved state dict carries them. ``planted_directions`` returns them;
``planted_codes`` returns the ground-truth codes of a batch of pixels.

The planting needs pixels: ``PlantedViT.forward_features`` (and ``forward_intermediates``)
computes the per-view plan from its input pixels and hands it to the designated ``PlantedBlock``
for that one forward (cleared afterwards, also when a hook stops the forward early). One forward
at a time per model instance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

NUM_LOCAL = 8
NUM_GLOBAL = 4
TOKEN_NORM = 5.0  # norm of every non-outlier patch token (ordinary part + local part)
LOCAL_SCALE = 4.0  # f_j at a patch whose mean colour equals prototype j
# f_j = LOCAL_SCALE · (1 − (d_j / LOCAL_RADIUS)²)₊ for RGB distance d_j (colours in [0, 1]).
# Any three cube corners include a pair √2 apart, so a colour is within 0.6 of at most two; two
# corners are >= 1 apart, so then both d >= 0.4 and each f <= 2.3. Hence the local part's norm is
# at most LOCAL_SCALE < TOKEN_NORM and the ordinary part keeps a norm >= 3.
LOCAL_RADIUS = 0.6
# The global part's norm is OUTLIER_NORM · (1 + |view chroma|). Not larger: BatchTopK lets a
# high-norm token take many latents, and at 40 the SAE spread the global directions over dozens
# of partly aligned atoms rather than one atom each (docs/models.md has the numbers).
OUTLIER_NORM = 12.0
CONTRAST_WEIGHT = 10.0  # outliers avoid textured patches: score −= this · patch pixel std
MAX_OUTLIERS = 3
GREY_CHROMA = 1e-4  # added to both chroma coordinates before taking the angle

# Local prototypes: the corners of the RGB cube (black, the six primaries/secondaries, white).
LOCAL_PROTOTYPES = tuple((r, g, b) for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0))
# Global axes: four directions in the chroma plane (a = r − g, b = (r + g)/2 − blue), at 45° + i·90°.
GLOBAL_AXES = tuple((float(np.cos(t)), float(np.sin(t))) for t in np.pi / 4 + np.arange(NUM_GLOBAL) * np.pi / 2)


@dataclass(frozen=True)
class PlantedCodes:
    """Ground truth for a batch of views (B views, N patch tokens)."""

    local: Tensor  # [B, N, L] float32, f_j of each patch (≥ 0)
    global_weights: Tensor  # [B, G] float32 ≥ 0: the global part of each outlier token, per direction
    outliers: Tensor  # [B, N] bool, the tokens that carry it

    def addition(self, local_LD: Tensor, global_GD: Tensor) -> Tensor:
        """The planted part of every patch token, [B, N, D] float32."""
        out_BND = self.local @ local_LD
        g_BD = self.global_weights @ global_GD
        return out_BND + self.outliers[..., None].float() * g_BD[:, None, :]


class PlantedBlock(Block):
    """A timm ``Block`` whose output is rewritten by the plan its ``PlantedViT`` hands it.

    Parameters, ``attn`` and ``norm1`` are the plain Block's, so attention recomputation and
    state-dict keys are unchanged. Running it outside a ``PlantedViT`` forward is an error."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plan = None  # callable tokens_BTD -> tokens_BTD, set for one forward

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        out = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.plan is None:
            raise RuntimeError("PlantedBlock ran outside PlantedViT.forward_features / forward_intermediates")
        return self.plan(out)


class PlantedViT(VisionTransformer):
    """timm VisionTransformer with a planting block at ``planted_layer`` (1-based)."""

    def __init__(self, *, planted_layer: int, pixel_mean, pixel_std, depth: int = 12,
                 num_local: int = NUM_LOCAL, num_global: int = NUM_GLOBAL, **kwargs) -> None:
        if not 1 <= planted_layer <= depth:
            raise ValueError(f"planted_layer {planted_layer} outside 1..{depth}")
        if num_local != len(LOCAL_PROTOTYPES) or num_global != len(GLOBAL_AXES):
            raise ValueError(f"the planted model has {len(LOCAL_PROTOTYPES)} local and "
                             f"{len(GLOBAL_AXES)} global directions")
        # One draw from torch's (seeded) stream fixes every planted quantity, before timm's own
        # initialisation consumes the stream: the directions do not depend on timm's init order.
        plant_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())

        def block_fn(*args, depth: int, **kw) -> Block:
            cls = PlantedBlock if depth == planted_layer - 1 else Block
            return cls(*args, depth=depth, **kw)

        super().__init__(depth=depth, block_fn=block_fn, **kwargs)
        self.planted_layer = planted_layer
        dim = self.embed_dim
        k = num_local + num_global
        if dim < k:
            raise ValueError(f"width {dim} cannot hold {k} orthogonal planted directions")
        rng = np.random.default_rng(plant_seed)
        basis_DK, _ = np.linalg.qr(rng.standard_normal((dim, k)))
        basis_KD = np.ascontiguousarray(basis_DK.T, dtype=np.float32)
        grid = self.patch_embed.grid_size
        self.register_buffer("planted_local", torch.tensor(basis_KD[:num_local]))
        self.register_buffer("planted_global", torch.tensor(basis_KD[num_local:]))
        self.register_buffer("position_bias", torch.tensor(
            rng.standard_normal((num_global, grid[0] * grid[1])).astype(np.float32)))
        # Constants of the construction, not weights: kept out of the state dict.
        fixed = {"local_prototypes": torch.tensor(LOCAL_PROTOTYPES), "global_axes": torch.tensor(GLOBAL_AXES),
                 "pixel_mean": torch.tensor(pixel_mean).view(1, 3, 1, 1),
                 "pixel_std": torch.tensor(pixel_std).view(1, 3, 1, 1)}
        for name, value in fixed.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def planted_block(self) -> PlantedBlock:
        return self.blocks[self.planted_layer - 1]

    # ---- ground truth ----------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, pixels_B3SS: Tensor) -> PlantedCodes:
        """The planted codes of a batch of normalised pixels (what ``preprocess`` returns)."""
        rgb = pixels_B3SS.detach().float() * self.pixel_std + self.pixel_mean  # back to [0, 1] RGB
        patch = self.patch_embed.patch_size
        mean_B3HW = F.avg_pool2d(rgb, patch, patch)
        sq_B3HW = F.avg_pool2d(rgb * rgb, patch, patch)
        colour_BN3 = mean_B3HW.flatten(2).transpose(1, 2)
        contrast_BN = (sq_B3HW - mean_B3HW**2).clamp_min(0).sqrt().mean(dim=1).flatten(1)

        # Local: a bump on the distance of the patch's own colour to each prototype.
        dist_BNL = torch.cdist(colour_BN3, self.local_prototypes[None].expand(len(rgb), -1, -1))
        local_BNL = LOCAL_SCALE * (1.0 - (dist_BNL / LOCAL_RADIUS).square()).clamp_min(0.0)

        # Global: the view's chroma picks the direction and its weight; its luminance the count.
        view_B3 = colour_BN3.mean(dim=1)
        r, g, b = view_B3.unbind(dim=1)
        chroma_B2 = torch.stack([r - g, (r + g) / 2 - b], dim=1)
        # A grey view has no chroma angle: a tiny fixed offset gives it one (the same for all).
        proj_BG = (chroma_B2 + GREY_CHROMA) @ self.global_axes.T
        # The axes are 90° apart: the two next to the chroma vector's angle get positive weights.
        mix_BG = proj_BG.clamp_min(0.0)
        mix_BG = mix_BG / mix_BG.norm(dim=1, keepdim=True).clamp_min(1e-12)
        weights_BG = OUTLIER_NORM * (1.0 + chroma_B2.norm(dim=1, keepdim=True)) * mix_BG
        lum_B = view_B3.mean(dim=1)
        count_B = 1 + (lum_B > 0.43).long() + (lum_B > 0.50).long()  # 1..MAX_OUTLIERS
        score_BN = mix_BG @ self.position_bias - CONTRAST_WEIGHT * contrast_BN
        rank_BN = score_BN.argsort(dim=1, descending=True).argsort(dim=1)
        outliers_BN = rank_BN < count_B[:, None]
        return PlantedCodes(local=local_BNL, global_weights=weights_BG, outliers=outliers_BN)

    def _plant(self, codes: PlantedCodes, tokens_BTD: Tensor) -> Tensor:
        basis_KD = torch.cat([self.planted_local, self.planted_global]).float()
        x = tokens_BTD.float()
        normal = x - (x @ basis_KD.T) @ basis_KD
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        p = self.num_prefix_tokens
        room_BN1 = (TOKEN_NORM**2 - codes.local.square().sum(dim=-1, keepdim=True)).clamp_min(0.0).sqrt()
        patch = room_BN1 * normal[:, p:] + codes.addition(self.planted_local.float(), self.planted_global.float())
        return torch.cat([TOKEN_NORM * normal[:, :p], patch], dim=1).to(tokens_BTD.dtype)

    @contextmanager
    def _planting(self, pixels_B3SS: Tensor) -> Iterator[None]:
        block = self.planted_block
        if block.plan is not None:
            raise RuntimeError("PlantedViT runs one forward at a time")
        block.plan = partial(self._plant, self.codes(pixels_B3SS))
        try:
            yield
        finally:
            block.plan = None

    # ---- forwards --------------------------------------------------------------------------
    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        with self._planting(x):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        with self._planting(x):
            return super().forward_intermediates(x, *args, **kwargs)


class CalibratedPlantedViT(PlantedViT):
    """The calibrated planted ground truth (``scope_ray.models.planted_calibrated``) as a timm ViT:
    at the output of block ``planted_layer`` every patch token is

        token = √(norm_t² − Σ_j z_j(t)²) · unit(h − Π h) + Σ_j z_j(t) · u_j

    with z_j the calibrated codes of the view's pixels (``calibrated_codes``), u_j orthonormal
    directions drawn from the build seed (buffer ``planted_calibrated`` [J, D]) and norm_t
    ``calibrated_token_norms`` (15 where a high-norm direction is active, else 5). So an SAE
    whose atoms are the u_j returns exactly z, and each u_j's CDS is ``expected_cds``.
    Registry entry: ``demo-planted-calibrated``."""

    def __init__(self, *, planted_layer: int, pixel_mean, pixel_std, depth: int = 12, **kwargs) -> None:
        from scope_ray.models.planted_calibrated import DIRECTIONS

        if not 1 <= planted_layer <= depth:
            raise ValueError(f"planted_layer {planted_layer} outside 1..{depth}")
        plant_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())

        def block_fn(*args, depth: int, **kw) -> Block:
            cls = PlantedBlock if depth == planted_layer - 1 else Block
            return cls(*args, depth=depth, **kw)

        VisionTransformer.__init__(self, depth=depth, block_fn=block_fn, **kwargs)
        self.planted_layer = planted_layer
        dim, k = self.embed_dim, len(DIRECTIONS)
        if dim < k:
            raise ValueError(f"width {dim} cannot hold {k} orthogonal planted directions")
        basis_DK, _ = np.linalg.qr(np.random.default_rng(plant_seed).standard_normal((dim, k)))
        self.register_buffer("planted_calibrated", torch.tensor(np.ascontiguousarray(basis_DK.T, dtype=np.float32)))
        for name, value in {"pixel_mean": torch.tensor(pixel_mean).view(1, 3, 1, 1),
                            "pixel_std": torch.tensor(pixel_std).view(1, 3, 1, 1)}.items():
            self.register_buffer(name, value.float(), persistent=False)

    @torch.no_grad()
    def codes(self, pixels_B3SS: Tensor) -> tuple[Tensor, Tensor]:
        """(z_BNJ, norm_BN) float32 of a batch of normalised pixels: calibrated codes and token norms."""
        from scope_ray.models.planted_calibrated import calibrated_codes, calibrated_token_norms

        rgb = (pixels_B3SS.detach().float() * self.pixel_std + self.pixel_mean).permute(0, 2, 3, 1)
        z = calibrated_codes(rgb.cpu().double().numpy(), self.patch_embed.patch_size[0])
        device = pixels_B3SS.device
        return (torch.from_numpy(z).float().to(device),
                torch.from_numpy(calibrated_token_norms(z)).float().to(device))

    def _plant(self, codes: tuple[Tensor, Tensor], tokens_BTD: Tensor) -> Tensor:
        z_BNJ, norm_BN = codes
        basis_JD = self.planted_calibrated.float()
        x = tokens_BTD.float()
        normal = x - (x @ basis_JD.T) @ basis_JD
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        p = self.num_prefix_tokens
        room_BN1 = (norm_BN[..., None].square() - z_BNJ.square().sum(dim=-1, keepdim=True)).clamp_min(0.0).sqrt()
        patch = room_BN1 * normal[:, p:] + z_BNJ @ basis_JD
        return torch.cat([TOKEN_NORM * normal[:, :p], patch], dim=1).to(tokens_BTD.dtype)


def build_planted(spec, calibrated: bool = False, **kwargs) -> PlantedViT:
    """The backbone of a registry entry with ``builder='planted'``; ``kwargs`` are its builder_kwargs
    (``calibrated=True``: the calibrated ground truth, ``CalibratedPlantedViT``)."""
    kwargs.setdefault("patch_size", spec.patch)
    kwargs.setdefault("img_size", spec.image_size)
    cls = CalibratedPlantedViT if calibrated else PlantedViT
    return cls(planted_layer=spec.layer, pixel_mean=spec.mean, pixel_std=spec.std, **kwargs)


def _backbone(model: nn.Module) -> PlantedViT:
    backbone = getattr(model, "backbone", model)  # a ViTWrapper or the backbone itself
    if not isinstance(backbone, PlantedViT):
        raise TypeError(f"not a planted-scope model: {type(backbone).__name__}")
    return backbone


def planted_directions(model: nn.Module) -> dict[str, Tensor]:
    """``{"local": [L, D], "global": [G, D]}``: the planted unit directions (copies), orthonormal
    together. Accepts the ``ViTWrapper`` from ``build_model`` or the backbone."""
    backbone = _backbone(model)
    if isinstance(backbone, CalibratedPlantedViT):
        raise TypeError("the calibrated planted model has no local/global split; use calibrated_directions "
                        "and planted_calibrated.expected_cds (planted_check.ground_truth_check)")
    return {"local": backbone.planted_local.detach().clone(), "global": backbone.planted_global.detach().clone()}


def calibrated_directions(model: nn.Module) -> Tensor:
    """[J, D] the calibrated model's planted unit directions (a copy), in DIRECTIONS order."""
    backbone = _backbone(model)
    if not isinstance(backbone, CalibratedPlantedViT):
        raise TypeError(f"not the calibrated planted model: {type(backbone).__name__}")
    return backbone.planted_calibrated.detach().clone()


def planted_codes(model: nn.Module, pixels_B3SS: Tensor) -> PlantedCodes:
    """Ground-truth codes of normalised pixels: per-patch local weights, each view's global
    direction, weight and outlier tokens."""
    return _backbone(model).codes(pixels_B3SS)
