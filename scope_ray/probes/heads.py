"""The three linear probe heads of METHOD §9 (supp. C): classification, segmentation, depth.

Shape suffixes: B batch, T tokens (any), N patch tokens = g², D token width, C classes,
K depth bins, H×W label size. Patch tokens are in the ViT's row-major order (token i·g + j is
grid row i, column j) and must be patch tokens only: a CLS or register token left in makes N
not a square and is refused.

Every head is linear in its input features (bilinear interpolation included), so a probe measures
what the frozen features make linearly available. Cached features may be stored in half
precision; the heads cast them to their own parameter dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------- helpers
def gap(tokens_BTD: torch.Tensor) -> torch.Tensor:
    """Global average pool over the token axis: [B, T, D] → [B, D].

    The caller chooses the tokens (for the classification probe: all visual tokens after feature
    removal); pooling is done once when the features are cached, not in every probe epoch.
    """
    if tokens_BTD.ndim != 3 or tokens_BTD.shape[1] == 0:
        raise ValueError(f"gap needs tokens [B, T, D] with T ≥ 1; got {tuple(tokens_BTD.shape)}")
    return tokens_BTD.mean(dim=1)


def grid_side(n: int) -> int:
    """g with g² = n, or a ValueError that says why n patch tokens cannot form a square grid."""
    g = math.isqrt(n) if n > 0 else 0
    if g == 0 or g * g != n:
        raise ValueError(
            f"{n} patch tokens do not form a square grid; pass patch tokens only "
            "(no CLS or register tokens) from a square input"
        )
    return g


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be (H, W) with positive integers; got {size!r}")
    return int(size[0]), int(size[1])


def _check_tokens(tokens_BND: torch.Tensor, d: int, name: str = "tokens") -> None:
    if tokens_BND.ndim != 3 or tokens_BND.shape[-1] != d:
        raise ValueError(f"{name} must be [B, N, {d}]; got {tuple(tokens_BND.shape)}")


def _to_grid(x_BNF: torch.Tensor) -> torch.Tensor:
    """[B, N, F] row-major patch values → [B, F, g, g]."""
    b, n, f = x_BNF.shape
    g = grid_side(n)
    return x_BNF.transpose(1, 2).reshape(b, f, g, g)


def _upsample(x_BFgg: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # align_corners=False: each of the g cells covers 1/g of the image, as a patch does.
    return F.interpolate(x_BFgg, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------- heads
class ClassificationProbe(nn.Module):
    """Linear classifier on pooled embeddings: [B, D] → logits [B, C]."""

    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        if d < 1 or num_classes < 2:
            raise ValueError(f"need d ≥ 1 and num_classes ≥ 2; got d={d}, num_classes={num_classes}")
        self.d, self.num_classes = d, num_classes
        self.linear = nn.Linear(d, num_classes)

    def forward(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        if pooled_BD.ndim != 2 or pooled_BD.shape[1] != self.d:
            raise ValueError(f"pooled embeddings must be [B, {self.d}]; got {tuple(pooled_BD.shape)}")
        return self.linear(pooled_BD.to(self.linear.weight.dtype))


class SegmentationProbe(nn.Module):
    """Per-patch linear logits, bilinearly upsampled to the label size: [B, N, D] → [B, C, H, W].

    Pure linear: DINOv2's "linear" segmentation head puts a BatchNorm before its 1×1 conv, but a
    BatchNorm trained on batch statistics is not a fixed linear map of the features during
    training, and supp. C calls the probe linear, so there is none here.
    """

    def __init__(self, d: int, num_classes: int = 150) -> None:
        super().__init__()
        if d < 1 or num_classes < 2:
            raise ValueError(f"need d ≥ 1 and num_classes ≥ 2; got d={d}, num_classes={num_classes}")
        self.d, self.num_classes = d, num_classes
        self.linear = nn.Linear(d, num_classes)

    def forward(self, tokens_BND: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        _check_tokens(tokens_BND, self.d)
        logits_BNC = self.linear(tokens_BND.to(self.linear.weight.dtype))
        return _upsample(_to_grid(logits_BNC), _check_size(size))


class DepthProbe(nn.Module):
    """Depth as a softmax over K uniform bins (supp. C): CLS [B, D] + patches [B, N, D] → [B, H, W].

    METHOD's order is: concatenate CLS to every patch → [B, N, 2D], reshape to [B, 2D, g, g],
    upsample to (H, W), 1×1 linear head to K logits, softmax over bins, depth = Σ p_k · centre_k.
    Here the linear head runs on the g×g grid *before* upsampling. The two orders are identical:
    every bilinear output pixel is Σ_i w_i x_i with w_i ≥ 0 and Σ_i w_i = 1 (align_corners=False
    clamps at the border, and the weights still sum to 1), so A(Σ w_i x_i) + b = Σ w_i (A x_i + b).
    It holds for the bias only because the weights sum to 1. Upsampling K channels instead of 2D
    is ~6× less memory for a 768-wide model at K = 256 (the [8, 1536, 480, 640] literal tensor is
    15 GB in float32). The softmax is not linear and stays after the upsampling.

    Bins: K equal bins partition [min_depth, max_depth]; the prediction uses their centres, so it
    lies in [min_depth + w/2, max_depth − w/2] with w = (max − min)/K, strictly positive, and the
    log in the scale-invariant loss is always finite. min_depth = 1e-3 m: NYUd ground truth has no
    valid depth that close, and a positive lower edge keeps the first centre away from 0 for any K.
    max_depth is the upper edge (config ``probes.max_depth``, 10 m for NYUd).
    """

    def __init__(self, d: int, bins: int = 256, max_depth: float = 10.0, min_depth: float = 1e-3) -> None:
        super().__init__()
        if d < 1 or bins < 2:
            raise ValueError(f"need d ≥ 1 and bins ≥ 2; got d={d}, bins={bins}")
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 ≤ min_depth < max_depth; got {min_depth}, {max_depth}")
        self.d, self.bins = d, bins
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.linear = nn.Linear(2 * d, bins)
        width = (self.max_depth - self.min_depth) / bins
        centres_K = self.min_depth + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
        # Not persistent: the centres follow from the constructor arguments, not from training.
        self.register_buffer("centres_K", centres_K.float(), persistent=False)

    def features(self, cls_BD: torch.Tensor, tokens_BND: torch.Tensor) -> torch.Tensor:
        """CLS broadcast and concatenated to every patch token: [B, N, 2D] (CLS second)."""
        _check_tokens(tokens_BND, self.d)
        if cls_BD.ndim != 2 or cls_BD.shape != (tokens_BND.shape[0], self.d):
            raise ValueError(f"cls must be [{tokens_BND.shape[0]}, {self.d}]; got {tuple(cls_BD.shape)}")
        dtype = self.linear.weight.dtype
        cls_BND = cls_BD.to(dtype)[:, None, :].expand(-1, tokens_BND.shape[1], -1)
        return torch.cat([tokens_BND.to(dtype), cls_BND], dim=-1)

    def logits(self, cls_BD: torch.Tensor, tokens_BND: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bin logits at label size: [B, K, H, W] (linear on the grid, then upsampled; see class doc)."""
        logits_BNK = self.linear(self.features(cls_BD, tokens_BND))
        return _upsample(_to_grid(logits_BNK), _check_size(size))

    def depth_from_logits(self, logits_BKHW: torch.Tensor) -> torch.Tensor:
        """Softmax over bins, then the expected bin centre: [B, K, H, W] → depth [B, H, W]."""
        if logits_BKHW.ndim != 4 or logits_BKHW.shape[1] != self.bins:
            raise ValueError(f"logits must be [B, {self.bins}, H, W]; got {tuple(logits_BKHW.shape)}")
        p_BKHW = logits_BKHW.softmax(dim=1)
        return torch.einsum("bkhw,k->bhw", p_BKHW, self.centres_K.to(p_BKHW.dtype))

    def forward(self, cls_BD: torch.Tensor, tokens_BND: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.depth_from_logits(self.logits(cls_BD, tokens_BND, size))
