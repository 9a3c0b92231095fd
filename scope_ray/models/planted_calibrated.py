"""A calibrated planted ground truth: directions whose CDS is KNOWN, on a continuum from 0 to 0.73.

Registry-free and pure NumPy (no torch, no Ray). ``calibrated_codes`` maps the pixels of a view
(what the ViT sees) to the activation of each planted direction on every patch token; the CDS the
pipeline must measure for each direction follows by hand from how its map moves between the two
SCC views (``expected_cds``). ``calibrated_pool`` draws images on which that derivation holds
exactly, plus decoys that only a correct top-k selection ignores. ``calibrated_token_norms`` gives
each token's norm, so that a scorer that reads norms can be shown to fail. The check and the
mutation gate that use it: ``scope_ray.planted_check.ground_truth_check``,
tests/test_calibrated_ground_truth.py, docs/scope.md §7.

Why another planted model. On demo-planted (models/planted.py) every local direction is exactly
shift-invariant (both overlap maps identical, so ANY dissimilarity scores 0) and every global
direction lives on high-norm tokens (separable by norm alone); with an AUROC, which ignores any
monotone rescaling, broken scorers pass. Here each direction has an expected CDS value, local
directions are not exactly shift-invariant, norm is unrelated to scope, and the test compares
values (mean absolute error) as well as ranks (Spearman).

The construction (geometry: patch ``n``, grid ``p``, border ``B = BORDER``; colours in [0, 1])
----------------------------------------------------------------------------------------------
Direction j has a marker colour κ_j, an amplitude A_j, a fraction λ_j ∈ [0, 1] and an anchor kind
(``fixed`` at view cell P_j, or ``mirror``). On a view, with r_j(t) = (1 − (‖colour_t − κ_j‖ /
RADIUS)²)₊ the response of patch t's own mean colour (its own pixels, nothing else):

    z_j(t) = (1 − λ_j)·A_j·r_j(t)                                   content part: follows the pixels
           + λ_j·A_j·m_j·[t = a_j]                                  anchor part: set by the view frame
    m_j    = max of r_j over the view's interior cells (rows and cols B … p−1−B)
    a_j    = P_j (fixed)  or  (p−1−ρ, p−1−γ) (mirror; (ρ, γ) = the interior cell where r_j is largest)

The anchor part reads the whole view (where the marker is, relative to the frame): it is the
context-dependent, "global" share of the direction; λ_j sets the share.

Expected CDS (METHOD §3, §5; s = shift, overlap cell (u, v) = view-1 cell (u+s, v+s) = view-2
cell (u, v), D_grid = √2·(p − s − 1)). Take an image, already (p+s)·n pixels square (the SCC
resize is then the identity), that holds direction j's colour on exactly one patch, canvas cell
c = (c_r, c_c) with s + B ≤ c_r, c_c ≤ p − 1 − B (needs s ≤ B), and nowhere else; r_j = 1 there.
View 1 sees the marker at view cell c, view 2 at c − s: both interior, so m_j = 1 in both views.
In overlap coordinates the content part sits at c − s in BOTH views (same pixels) with mass
(1 − λ)A, identical, while the anchor part (mass λA) sits at

    fixed:   view 1: P − s        view 2: P              → moved by (s, s)
    mirror:  view 1: p−1−c−s      view 2: p−1−(c−s)      → moved by (2s, 2s)

(both inside the overlap when s ≤ P ≤ p−1−s, resp. when s ≤ B). So M1 = μ + λA·δ_x and
M2 = μ + λA·δ_y with the same μ and the same total mass A; normalised, W₁(M1, M2) = λ·|x − y|
exactly (≤: move the λ share from x to y; ≥: Kantorovich–Rubinstein with f(z) = |z − y|). Hence

    EMD_j = λ_j·g_j·s·√2,   g_j = 1 (fixed) or 2 (mirror),
    CDS_j = EMD_j / D_grid = λ_j·g_j·s / (p − s − 1)                       — on every such image.

With p = 16, s = 4 (the default geometry): CDS_j = e_j·4/11, e_j = λ_j·g_j ∈ {0, 0.1, …, 2.0}:
0, 0.036, 0.109, 0.145, 0.218, 0.291, 0.364, 0.436, 0.582, 0.727 (table ``DIRECTIONS``).

Decoys (``calibrated_pool``): direction j's colour painted over canvas rows 0 … s−1 (all
columns). In view 1 those are border rows (< B: no anchor) outside the overlap; view 2 does not
contain them. Both overlap maps are empty, so a selection on the SCC overlap scores them 0 and
never picks them; a selection on a differently preprocessed image (a centre crop of the whole
image, as pass 1 once did) sees a full-strength patch of colour j and prefers them to the single,
resampled marker of a good image — and pass 2 then finds nothing in the overlap.

Norms (``calibrated_token_norms``): a token on which any ``high``-norm direction is active has
norm HIGH_NORM (15), every other token TOKEN_NORM (5). The three most local directions are high-
norm, the two most global ordinary: norm does not order scope (it is anti-correlated with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PATCH, GRID, SHIFT = 8, 16, 4  # default geometry: 128-pixel views, 160-pixel canvas, 12 x 12 overlap
BORDER = 4  # interior cells (where the anchor looks for the marker) are B … p−1−B; needs shift <= BORDER
RADIUS = 0.3  # colour response radius; marker colours are >= 0.4 apart and >= 0.4 from the background
TOKEN_NORM, HIGH_NORM = 5.0, 15.0
BACKGROUND = 128  # grey, with uniform noise of +-BACKGROUND_NOISE per pixel
BACKGROUND_NOISE = 6


@dataclass(frozen=True)
class CalibratedDirection:
    colour: tuple[int, int, int]  # marker colour, uint8
    lam: float  # λ: the anchor's share of the direction's mass
    anchor: str  # "fixed" (at cell ``cell``) or "mirror"
    amplitude: float  # A
    norm: str  # "high" or "ordinary": the norm of tokens it is active on
    cell: tuple[int, int] = (0, 0)  # P for a fixed anchor (view row, col)

    @property
    def gain(self) -> int:
        return 1 if self.anchor == "fixed" else 2


_L, _M, _H = 26, 128, 230
DIRECTIONS = (
    CalibratedDirection((_L, _M, _M), 0.0, "fixed", 3.0, "high", (4, 4)),     # e 0.0  CDS 0
    CalibratedDirection((_H, _M, _M), 0.1, "fixed", 2.0, "high", (5, 9)),     # e 0.1  CDS 0.036
    CalibratedDirection((_M, _L, _M), 0.3, "fixed", 3.5, "ordinary", (6, 6)),  # e 0.3  CDS 0.109
    CalibratedDirection((_M, _H, _M), 0.2, "mirror", 2.5, "high"),            # e 0.4  CDS 0.145
    CalibratedDirection((_M, _M, _L), 0.6, "fixed", 3.0, "ordinary", (11, 4)),  # e 0.6  CDS 0.218
    CalibratedDirection((_M, _M, _H), 0.4, "mirror", 2.0, "high"),            # e 0.8  CDS 0.291
    CalibratedDirection((_L, _L, _L), 1.0, "fixed", 3.5, "ordinary", (9, 10)),  # e 1.0  CDS 0.364
    CalibratedDirection((_H, _H, _H), 0.6, "mirror", 3.0, "high"),            # e 1.2  CDS 0.436
    CalibratedDirection((_L, _H, _H), 0.8, "mirror", 2.5, "ordinary"),        # e 1.6  CDS 0.582
    CalibratedDirection((_H, _L, _L), 1.0, "mirror", 2.0, "ordinary"),        # e 2.0  CDS 0.727
)


def _check_geometry(grid: int, shift: int, directions=DIRECTIONS) -> None:
    if not 1 <= shift <= BORDER:
        raise ValueError(f"the calibrated derivation needs 1 <= shift <= BORDER = {BORDER}, got {shift}")
    if grid < 2 * BORDER + shift + 1:
        raise ValueError(f"grid {grid} leaves no cell for a marker at shift {shift} (needs >= {2 * BORDER + shift + 1})")
    for d in directions:
        if d.anchor == "fixed" and d.lam > 0 and not all(shift <= x <= grid - 1 - shift for x in d.cell):
            raise ValueError(f"fixed anchor {d.cell} is outside the overlap of both views at shift {shift}")


def expected_cds(grid: int = GRID, shift: int = SHIFT, directions=DIRECTIONS) -> np.ndarray:
    """[J] the CDS each direction must score (module docstring): λ_j·g_j·s / (p − s − 1)."""
    _check_geometry(grid, shift, directions)
    return np.array([d.lam * d.gain * shift / (grid - shift - 1) for d in directions])


def calibrated_codes(views_BSS3: np.ndarray, patch: int = PATCH, directions=DIRECTIONS) -> np.ndarray:
    """Views (uint8 [B, p·n, p·n, 3], or float RGB in [0, 1]) → z_BNJ float64: each direction's
    activation on every patch token (row-major, N = p²), as the module docstring defines it.
    Non-negative."""
    v = np.asarray(views_BSS3)
    scale = 255.0 if v.dtype == np.uint8 else 1.0
    if v.ndim != 4 or v.shape[3] != 3 or v.shape[1] != v.shape[2] or v.shape[1] % patch:
        raise ValueError(f"views must be [B, p·{patch}, p·{patch}, 3], got {list(v.shape)}")
    b, side = v.shape[0], v.shape[1]
    p = side // patch
    colour_BN3 = (v.reshape(b, p, patch, p, patch, 3).astype(np.float64).mean(axis=(2, 4)) / scale).reshape(b, p * p, 3)
    kappa_J3 = np.array([d.colour for d in directions], np.float64) / 255.0
    dist_BNJ = np.linalg.norm(colour_BN3[:, :, None, :] - kappa_J3[None, None], axis=-1)
    r_BNJ = np.clip(1.0 - (dist_BNJ / RADIUS) ** 2, 0.0, None)
    lam_J = np.array([d.lam for d in directions])
    amp_J = np.array([d.amplitude for d in directions])
    z_BNJ = (1.0 - lam_J) * amp_J * r_BNJ
    rows, cols = np.divmod(np.arange(p * p), p)
    interior_N = (rows >= BORDER) & (rows <= p - 1 - BORDER) & (cols >= BORDER) & (cols <= p - 1 - BORDER)
    r_in_BNJ = np.where(interior_N[None, :, None], r_BNJ, -1.0)
    best_BJ = r_in_BNJ.argmax(axis=1)  # first interior cell with the largest response
    m_BJ = np.clip(np.take_along_axis(r_in_BNJ, best_BJ[:, None, :], axis=1)[:, 0], 0.0, None)
    for j, d in enumerate(directions):
        if d.lam == 0:
            continue
        if d.anchor == "fixed":
            at_B = np.full(b, d.cell[0] * p + d.cell[1])
        else:
            br, bc = np.divmod(best_BJ[:, j], p)
            at_B = (p - 1 - br) * p + (p - 1 - bc)
        z_BNJ[np.arange(b), at_B, j] += d.lam * d.amplitude * m_BJ[:, j]
    return z_BNJ


def calibrated_token_norms(z_BNJ: np.ndarray, directions=DIRECTIONS) -> np.ndarray:
    """[B, N] the norm of each token: HIGH_NORM where a ``high`` direction is active, else TOKEN_NORM.
    (A token = ordinary part + Σ_j z_j·u_j with the ordinary part filling the norm up; the planted
    part's norm stays below TOKEN_NORM when at most two ordinary directions share a token.)"""
    high_J = np.array([d.norm == "high" for d in directions])
    return np.where((np.asarray(z_BNJ)[..., high_J] > 0).any(axis=-1), HIGH_NORM, TOKEN_NORM)


def calibrated_pool(seed: int = 0, good: int = 8, decoys: int = 8, grid: int = GRID, patch: int = PATCH,
                    shift: int = SHIFT, directions=DIRECTIONS) -> dict[str, np.ndarray]:
    """image id → uint8 image of (p+s)·n pixels square. ``good`` images hold every direction's
    marker once, on distinct random canvas cells in s+B … p−1−B (the derivation's condition);
    ``decoys`` images per direction hold its colour over canvas rows 0 … s−1 (nothing in the
    overlap). The grey background never triggers a direction (>= 0.4 from every marker colour)."""
    _check_geometry(grid, shift, directions)
    rng = np.random.default_rng(seed)
    side = (grid + shift) * patch
    lo, hi = shift + BORDER, grid - 1 - BORDER
    cells = [(r, c) for r in range(lo, hi + 1) for c in range(lo, hi + 1)]
    if len(cells) < len(directions):
        raise ValueError(f"{len(cells)} marker cells for {len(directions)} directions")

    def background() -> np.ndarray:
        noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, (side, side, 3))
        return (BACKGROUND + noise).astype(np.uint8)

    out: dict[str, np.ndarray] = {}
    for g in range(good):
        img = background()
        for d, k in zip(directions, rng.permutation(len(cells))[:len(directions)]):
            r, c = cells[k]
            img[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = d.colour
        out[f"good/{g:03d}"] = img
    for j, d in enumerate(directions):
        for i in range(decoys):
            img = background()
            img[:shift * patch] = d.colour
            out[f"decoy{j}/{i:03d}"] = img
    return out
