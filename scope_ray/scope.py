"""Information-scope statistics (METHOD §1, §5–7): thresholds chosen from data, CDS, awCDS.

Pure NumPy (no Ray). ``otsu_threshold`` picks tau (on log token norms) and gamma (on CDS values);
``cds_score`` turns a feature's SCC overlap maps into its Contextual Dependency Score;
``aw_cds`` and ``norm_percentile_bins`` give Figure 7. docs/scope.md explains the choices.
"""

from __future__ import annotations

import numpy as np

from scope_ray.emd import grid_emd_many


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The Otsu threshold of ``values`` as scikit-image defines it (``threshold_otsu``): over a
    ``bins``-bin histogram on [min, max], the centre of the bin after which a cut maximises the
    between-class variance; values up to it form the lower class. Non-finite values are ignored; a
    constant input returns that constant."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one finite value")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)  # weight of the lower class for a cut after bin i
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    i = int(np.argmax(between[:-1]))  # a cut after the last bin would leave one class empty
    return float(centres[i])


def choose_gamma(cds_Q: np.ndarray, scored_Q: np.ndarray, gamma: float | str,
                 min_usable_images: int) -> tuple[float, str]:
    """γ and where it came from (METHOD §6): ``gamma`` when it is a number, else ('auto') the Otsu
    threshold of the *scored* features' finite CDS: unscored features (a CDS from fewer than
    ``min_usable_images`` images piles up at 1) never move γ."""
    if gamma != "auto":
        return float(gamma), "config"
    values = cds_Q[scored_Q & np.isfinite(cds_Q)]
    if values.size == 0:
        raise RuntimeError(f"no feature has a CDS from at least scope.min_usable_images={min_usable_images} "
                           "usable images: gamma cannot be chosen; see the cds table's status column")
    return otsu_threshold(values), "auto (Otsu on scored CDS)"


def auto_tau(norms: np.ndarray) -> float:
    """tau: 'auto' (METHOD §1): the Otsu threshold of log token norms, back in norm units."""
    norms = np.asarray(norms, dtype=np.float64)
    norms = norms[np.isfinite(norms) & (norms > 0)]
    return float(np.exp(otsu_threshold(np.log(norms))))


# ---------------------------------------------------------------------------------- CDS (§5)
def _grid_diameter(h: int, w: int) -> float:
    """Largest cell-centre distance of an h × w grid: √2·(p − s − 1) for the square overlap.
    Same arithmetic as the EMD cost matrix, so a corner-to-corner spike scores exactly 1."""
    return float(np.sqrt(float(h - 1) ** 2 + float(w - 1) ** 2))


def _check_maps(m1_KHW: np.ndarray, m2_KHW: np.ndarray) -> None:
    if m1_KHW.ndim != 3 or m1_KHW.shape != m2_KHW.shape:
        raise ValueError(f"maps1 and maps2 must both be [K, H, W], got {list(m1_KHW.shape)} and {list(m2_KHW.shape)}")
    _, h, w = m1_KHW.shape
    if h < 2 or w < 2:
        raise ValueError(f"the overlap grid must be at least 2 x 2 (D_grid would be 0), got {h} x {w}")
    for name, m in (("maps1", m1_KHW), ("maps2", m2_KHW)):
        if not np.all(np.isfinite(m)):
            raise ValueError(f"{name} contains NaN or Inf")
        if np.any(m < 0):
            raise ValueError(f"{name} has negative entries; activation maps are non-negative")


def scc_pair_scores(maps1: np.ndarray, maps2: np.ndarray) -> np.ndarray:
    """Per-image CDS terms (METHOD §5 steps 2–4) for K image pairs of one or several features.

    maps1_KHW / maps2_KHW: a feature's activation maps over the (p − s)² overlap in view 1 and
    view 2. Returns score_K in [0, 1] or NaN: ``EMD(M1, M2) / D_grid`` with ``D_grid = √2·(H − 1)``
    (the overlap's diagonal); 1 when exactly one map is all zero (the feature left the overlap);
    NaN when both are (the image is unusable). ValueError on NaN/Inf or negative entries, or
    shapes that are not matching [K, H, W] with at least 2 cells a side."""
    m1_KHW, m2_KHW = np.asarray(maps1, dtype=np.float64), np.asarray(maps2, dtype=np.float64)
    _check_maps(m1_KHW, m2_KHW)
    _, h, w = m1_KHW.shape
    empty1_K = ~m1_KHW.reshape(len(m1_KHW), -1).any(axis=1)
    empty2_K = ~m2_KHW.reshape(len(m2_KHW), -1).any(axis=1)
    score_K = np.where(empty1_K & empty2_K, np.nan, 1.0)
    both_K = ~empty1_K & ~empty2_K
    if both_K.any():
        emd_K = grid_emd_many(m1_KHW[both_K], m2_KHW[both_K])
        # Clip: EMD <= D_grid holds exactly; only rounding can cross it.
        score_K[both_K] = np.minimum(emd_K / _grid_diameter(h, w), 1.0)
    return score_K


def cds_from_scores(scores: np.ndarray, k: int | None = None) -> tuple[float, int]:
    """A feature's CDS from its per-image scores in rank order (strongest image first): the mean
    of the first ``k`` usable (non-NaN) scores — later images are spares that stand in for
    unusable ones — or of all usable ones when k is None. Returns (CDS, images used); CDS is NaN
    when no image is usable."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    usable = s[~np.isnan(s)]
    if k is not None:
        usable = usable[:k]
    return (float(usable.mean()) if usable.size else float("nan")), int(usable.size)


def cds_score(maps1: np.ndarray, maps2: np.ndarray) -> float:
    """Contextual Dependency Score of one feature (METHOD §5) from its overlap maps
    maps1_KHW (view 1) and maps2_KHW (view 2) over K images, cell (i, j) the same pixels in both:
    the mean of ``scc_pair_scores`` over the usable images (one map empty → 1; both empty →
    skipped). The CDS stage passes spare images beyond k_CDS and keeps the first k_CDS usable
    ones (``cds_from_scores``). NaN when no image is usable; otherwise in [0, 1]."""
    return cds_from_scores(scc_pair_scores(maps1, maps2))[0]


# -------------------------------------------------------------------------- buckets (§5, §6)
UNSCORED_REASONS = ("never fired", "images rejected", "no usable image", "too few usable images")
GAMMA_SENSITIVITY = 0.05  # the report shows group sizes at γ ± this


def unscored_reasons(status_Q: np.ndarray, images_used_Q: np.ndarray, min_usable: int) -> np.ndarray:
    """Why each feature has no CDS that may enter the partition ("" = scored), from the cds
    table's ``status`` and ``images_used`` (METHOD §5): it never fired on a pool image (dead on
    the pool), all its images were rejected, none of its images had the feature in the overlap,
    or fewer than ``min_usable`` images were usable — a CDS from one or two images sits at the
    extremes (one map empty scores exactly 1) and would pile up there."""
    status_Q = np.asarray(status_Q, dtype=object)
    used_Q = np.asarray(images_used_Q)
    out = np.full(status_Q.shape, "", dtype=object)
    for reason in UNSCORED_REASONS[:3]:
        out[status_Q == reason] = reason
    out[(out == "") & (used_Q < min_usable)] = "too few usable images"
    return out


def split_by_gamma(cds_Q: np.ndarray, scored_Q: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """Feature indices per bucket: low = scored and CDS <= γ, high = scored and CDS > γ,
    unscored = the rest. Every feature is in exactly one."""
    cds_Q, scored_Q = np.asarray(cds_Q, np.float64), np.asarray(scored_Q, bool) & np.isfinite(cds_Q)
    return {"low": np.flatnonzero(scored_Q & (cds_Q <= gamma)), "high": np.flatnonzero(scored_Q & (cds_Q > gamma)),
            "unscored": np.flatnonzero(~scored_Q)}


def gamma_sensitivity(cds_Q: np.ndarray, scored_Q: np.ndarray, gamma: float,
                      delta: float = GAMMA_SENSITIVITY) -> list[dict]:
    """Group sizes at γ − δ, γ and γ + δ: how much the split depends on where γ falls."""
    rows = []
    for g in (gamma - delta, gamma, gamma + delta):
        groups = split_by_gamma(cds_Q, scored_Q, g)
        rows.append({"gamma": float(g), "low": int(groups["low"].size), "high": int(groups["high"].size)})
    return rows


# -------------------------------------------------------------------------------- awCDS (§7)
def aw_cds(acts: np.ndarray, cds: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Activation-weighted CDS per token (METHOD §7): ``Σ_j a_tj CDS_j / Σ_j a_tj`` over the
    features active on token t (a_tj > 0), from SAE codes acts_TQ and cds_Q.

    Features whose CDS is NaN (no usable image) are left out of both sums; a token where no
    feature with a finite CDS fires gets NaN. ValueError on NaN/Inf or negative activations.
    Rows are processed ``chunk`` at a time so the float64 accumulation stays bounded in memory."""
    acts_TQ = np.asarray(acts)
    cds_Q = np.asarray(cds, dtype=np.float64)
    if acts_TQ.ndim != 2 or cds_Q.ndim != 1 or acts_TQ.shape[1] != cds_Q.size:
        raise ValueError(f"expected acts [T, q] and cds [q], got {list(acts_TQ.shape)} and {list(cds_Q.shape)}")
    known_Q = np.isfinite(cds_Q)
    cds_known_Q = np.where(known_Q, cds_Q, 0.0)
    out_T = np.empty(acts_TQ.shape[0], dtype=np.float64)
    for start in range(0, acts_TQ.shape[0], chunk):
        a_tQ = acts_TQ[start:start + chunk].astype(np.float64)  # a copy: zeroed in place below
        if not np.all(np.isfinite(a_tQ)):
            raise ValueError("acts contains NaN or Inf")
        if np.any(a_tQ < 0):
            raise ValueError("acts has negative entries; SAE codes are non-negative")
        a_tQ[:, ~known_Q] = 0.0  # NaN-CDS features leave numerator and denominator alike
        den_t = a_tQ.sum(axis=1)
        num_t = a_tQ @ cds_known_Q
        with np.errstate(invalid="ignore", divide="ignore"):
            out_T[start:start + chunk] = np.where(den_t > 0, num_t / den_t, np.nan)
    return out_T


def norm_percentile_bins(norms: np.ndarray, values: np.ndarray, n_bins: int, *, return_counts: bool = False):
    """Figure 7: mean of ``values`` (e.g. awCDS) per token-norm percentile bin.

    Tokens are ranked by norm (ties share their mid-rank, so equal norms land in one bin), the
    percentile of rank r among T is ``100·(r − ½)/T``, and ``n_bins`` equal-width percentile bins
    cover 0–100. Returns (bin centres in percent [n_bins], NaN-aware mean per bin [n_bins]);
    tokens with a non-finite norm are dropped, NaN values are ignored, an empty bin gives NaN.
    With ``return_counts`` also the number of values averaged per bin [n_bins]."""
    from scipy.stats import rankdata

    norms_T = np.asarray(norms, dtype=np.float64).ravel()
    values_T = np.asarray(values, dtype=np.float64).ravel()
    if norms_T.shape != values_T.shape:
        raise ValueError(f"norms and values must have the same length, got {norms_T.size} and {values_T.size}")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    keep_T = np.isfinite(norms_T)
    norms_T, values_T = norms_T[keep_T], values_T[keep_T]
    centres_B = 100.0 * (np.arange(n_bins) + 0.5) / n_bins
    if norms_T.size == 0:
        empty = (centres_B, np.full(n_bins, np.nan))
        return (*empty, np.zeros(n_bins, np.int64)) if return_counts else empty
    pct_T = 100.0 * (rankdata(norms_T, method="average") - 0.5) / norms_T.size
    bin_T = np.minimum((pct_T * n_bins / 100.0).astype(np.int64), n_bins - 1)
    ok_T = np.isfinite(values_T)
    count_B = np.bincount(bin_T[ok_T], minlength=n_bins)
    total_B = np.bincount(bin_T[ok_T], weights=values_T[ok_T], minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_B = np.where(count_B > 0, total_B / np.maximum(count_B, 1), np.nan)
    return (centres_B, mean_B, count_B) if return_counts else (centres_B, mean_B)
