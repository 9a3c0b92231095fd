"""Feature-group removal (METHOD §8): subtract chosen SAE features' contributions from tokens.

Shape suffixes: T tokens (any leading shape, flattened), D input width (``sae.d_in``),
F dictionary width (``sae.d_sae``), G the removed group, B/N batch and patch tokens.

``x' = x − Σ_{j∈G} z_j(x) d_j`` with z the SAE's inference-mode code (JumpReLU at θ) of the
*original* x. Only the group's share of the reconstruction leaves; the SAE error term x − x̂ and
every other feature's contribution stay in the token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

Features = Tensor | np.ndarray | Sequence[int]

# The variants the probes and zero-shot compare (Tables 3, 8): nothing removed, then each group.
VARIANTS = ("original", "high_removed", "low_removed", "random_removed")
VARIANT_GROUP = {"high_removed": "high", "low_removed": "low", "random_removed": "random"}


def remove_features(x: Tensor, sae, features: Features) -> Tensor:
    """x_TD with the group's contributions removed; same shape, dtype and device as ``x``.

    ``x`` may have any leading shape ``[..., D]``. ``features`` is a 1-D collection of integer
    feature ids in ``0..F−1``; duplicates count once and an empty group returns an exact copy of
    ``x`` (the SAE is not even run). Tokens on which no group feature fires come back bitwise
    unchanged. Raises ValueError on a bad group or width, and the SAE's RuntimeError when its
    threshold θ was never estimated (removal is defined for the inference-mode code only).
    """
    return _remove(x, sae, _feature_index(features, sae.d_sae))


def removal_edit(sae, features: Features) -> Callable[[Tensor], Tensor]:
    """A ``PatchEdit`` for ``ViTWrapper.final_tokens``: patch_tokens_BND -> the same with G removed.

    The group is validated here, once, so a bad group fails before any forward pass.
    """
    index_G = _feature_index(features, sae.d_sae)

    def edit(patch_BND: Tensor) -> Tensor:
        return _remove(patch_BND, sae, index_G)

    return edit


def random_group(q: int, size: int, *, pool: Features | None = None, exclude: Features | None = None,
                 seed: int = 0) -> Tensor:
    """``size`` distinct feature ids drawn from ``pool`` minus ``exclude`` (sorted, int64, CPU), fixed by ``seed``.

    This is the control of METHOD §8 (addition): a random group of the same size as the high-CDS
    group. ``pool`` is the eligible ids (default: all of ``0..q−1``; duplicates count once);
    ``exclude`` ids are never drawn. The pipeline (``stages.probe_features.load_groups``) passes
    the low-CDS group as the pool and the high group as ``exclude``: the control is drawn from
    scored, live features outside the high group, so it never holds a dead or unscored feature
    (which removal would hardly touch) nor a high-CDS one (whose removal is the effect under
    test). The draw is a permutation of the sorted eligible ids by a generator of its own, so the
    same pool, size and seed always give the same group. ValueError when ``size`` exceeds the
    eligible ids, naming both sizes.
    """
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1:
        raise ValueError(f"q must be a positive integer, got {q!r}")
    keep = torch.zeros(int(q), dtype=torch.bool)
    if pool is None:
        keep[:] = True
    else:
        keep[_feature_index(pool, int(q))] = True
    n_pool = int(keep.sum())
    if exclude is not None:
        keep[_feature_index(exclude, int(q))] = False
    eligible = torch.arange(int(q))[keep]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 <= size <= eligible.numel():
        raise ValueError(f"size must be an integer in 0..{eligible.numel()} (the eligible features: a pool of "
                         f"{n_pool} of q = {q}, {n_pool - eligible.numel()} of them excluded), got {size!r}")
    # A CPU generator of our own: the draw depends on the seed alone, never on global RNG state.
    generator = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(eligible.numel(), generator=generator)[: int(size)]
    return eligible[picked].sort().values


def _feature_index(features: Features, q: int) -> Tensor:
    """Sorted distinct int64 ids (CPU) of a 1-D integer group, each in ``0..q−1``; else ValueError."""
    if isinstance(features, Tensor):
        ids = features.detach().cpu()
    else:
        array = np.asarray(features)
        if array.size == 0:
            array = array.astype(np.int64)  # [] parses as float64; an empty group is still a group
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise ValueError(f"features must be integer feature ids, got {array.dtype} values")
        ids = torch.from_numpy(array)
    # A bool mask would silently index features 0 and 1: make callers pass ids explicitly.
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"features must be integer feature ids, got dtype {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"features must be 1-D, got shape {list(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < q):
        bad = ids[(ids < 0) | (ids >= q)]
        raise ValueError(f"feature ids must lie in 0..{q - 1}; got {bad[:8].tolist()}"
                         f"{' …' if bad.numel() > 8 else ''}")
    return ids.unique()


def _remove(x: Tensor, sae, index_G: Tensor) -> Tensor:
    if not x.is_floating_point():
        raise ValueError(f"tokens must be floating point, got {x.dtype}")
    if x.shape[-1:] != (sae.d_in,):
        raise ValueError(f"tokens of width {sae.d_in} expected, got shape {list(x.shape)}")
    if index_G.numel() == 0:
        return x.clone()
    with torch.no_grad():
        device = sae.W_dec.device
        x_TD = x.reshape(-1, sae.d_in).to(device)
        z_TF = sae.encode(x_TD, use_threshold=True)
        z_group_TF = torch.zeros_like(z_TF)
        index_G = index_G.to(device)
        z_group_TF[:, index_G] = z_TF[:, index_G]
        # Going through decode keeps the contribution in whatever units decode maps z to, which
        # are x's units, without assuming how the SAE stores its scale. decode is affine, so
        # decode(z·1_G) − decode(0) = Σ_{j∈G} z_j d_j; the bias cancels exactly (bitwise 0 on rows
        # where no group feature fires), and one full decode is all it costs.
        delta_TD = sae.decode(z_group_TF) - sae.decode(z_TF.new_zeros(1, z_TF.shape[1]))
        # The wider dtype: a float64 x is not rounded to the SAE's float32, and a bf16 x is
        # widened exactly, so untouched tokens survive the round trip bitwise.
        common = torch.promote_types(x_TD.dtype, delta_TD.dtype)
        out_TD = x_TD.to(common) - delta_TD.to(common)
        return out_TD.to(device=x.device, dtype=x.dtype).reshape(x.shape)
