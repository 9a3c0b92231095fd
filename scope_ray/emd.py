"""Exact earth mover's distance (METHOD §4, §5) between activation maps and between point sets.

Pure NumPy + POT (no Ray). Each input is normalised to sum 1; the ground distance is Euclidean
(between cell centres in cell units for maps, between the given coordinates for point sets).

Why the fast path is still exact (docs/scope.md has the longer version):

1. **Support.** A cell with zero mass has row (column) sum 0 in every transport plan, so all its
   flows are 0: dropping it changes neither the feasible plans nor the cost. A map with k non-zero
   cells therefore gives a k1 × k2 problem instead of HW × HW.
2. **Shared mass.** With a metric ground distance, EMD depends only on a − b
   (Kantorovich–Rubinstein duality), so the mass min(a, b) that both maps hold in the same cell
   stays where it is at zero cost and is cancelled before solving. SCC pairs of a local feature are
   nearly the same map, so this often shrinks the problem much further.
3. **One-point side.** If one side is a single point, every plan moves all mass to/from it: the
   EMD is the weighted mean distance, in closed form.

What remains goes to POT's network simplex (``ot.emd2``) in float64, and a non-optimal exit
(e.g. the iteration cap) is an error, never a silent approximation. ``grid_emd_dense`` is the
unreduced reference (full HW × HW problem) the tests and bench/bench_emd.py compare against.
"""

from __future__ import annotations

import functools

import numpy as np
import ot

_OPTIMAL = 1  # POT's result_code for an optimal network-simplex exit


# ------------------------------------------------------------------------------ validation
def _checked_weights(w: np.ndarray, name: str, ndim: int) -> np.ndarray:
    """→ float64 copy normalised to sum 1; ValueError on wrong rank, NaN/Inf, negative, zero mass."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(w.shape)}")
    if w.size == 0:
        raise ValueError(f"{name} is empty")
    # Two reductions on the hot path; a NaN or Inf entry always makes the sum non-finite.
    total, lo = w.sum(), w.min()
    if not np.isfinite(total):
        if not np.all(np.isfinite(w)):
            raise ValueError(f"{name} contains NaN or Inf")
        raise ValueError(f"{name} sums to Inf (entries too large for float64)")
    if lo < 0:
        raise ValueError(f"{name} has negative entries (min {lo:.6g}); EMD needs non-negative mass")
    if total == 0:
        raise ValueError(f"{name} is all zero: it has no mass to normalise")
    return w / total


def _pairwise_BA(c1_B2: np.ndarray, c2_A2: np.ndarray) -> np.ndarray:
    """Euclidean distances [B, A]; the one formula used by every path, so costs agree bit for bit."""
    return np.sqrt(((c1_B2[:, None, :] - c2_A2[None, :, :]) ** 2).sum(axis=-1))


@functools.lru_cache(maxsize=16)
def _grid_coords(h: int, w: int) -> np.ndarray:
    """Cell centres (row, col) of an h × w grid, row-major, cell units; read-only (shared)."""
    r, c = np.divmod(np.arange(h * w), w)
    coords = np.stack([r, c], axis=1).astype(np.float64) + 0.5
    coords.setflags(write=False)
    return coords


@functools.lru_cache(maxsize=4)
def _grid_cost(h: int, w: int) -> np.ndarray:
    """Full [hw, hw] ground-distance matrix, cached per shape so the dense reference is not
    charged for rebuilding it on every call."""
    m = _pairwise_BA(_grid_coords(h, w), _grid_coords(h, w))
    m.setflags(write=False)
    return m


# ----------------------------------------------------------------------------------- solver
def _emd2(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
    """ot.emd2 with an iteration cap that grows with the problem, and the exit status checked."""
    # POT's default cap (1e5) is reached on dense problems beyond ~300 × 300 points.
    cap = max(100_000, 20 * a.size * b.size)
    # check_marginals=False: both sides were normalised to sum 1 here (POT still rescales b to a's
    # sum); its check is a numpy.testing assert costing more than the solve on small supports.
    cost, log = ot.emd2(a, b, np.ascontiguousarray(m), numItermax=cap, log=True, check_marginals=False)
    if log["result_code"] != _OPTIMAL:
        raise RuntimeError(f"network simplex did not reach optimality ({log['warning']}) on a "
                           f"{a.size} x {b.size} problem")
    return float(cost)


def _emd_shared_points(a_P: np.ndarray, b_P: np.ndarray, coords_P2: np.ndarray) -> float:
    """EMD between two normalised distributions on the same point list, reduced exactly
    (shared mass cancelled, zero cells dropped, closed form for a one-point side)."""
    common_P = np.minimum(a_P, b_P)
    ra_P, rb_P = a_P - common_P, b_P - common_P
    ia, ib = np.flatnonzero(ra_P), np.flatnonzero(rb_P)
    if ia.size == 0 or ib.size == 0:  # identical maps (or a rounding-level residue on one side)
        return 0.0
    ma, mb = ra_P[ia].sum(), rb_P[ib].sum()  # equal up to rounding: both are 1 − Σ min(a, b)
    mass = 0.5 * (ma + mb)
    wa, wb = ra_P[ia] / ma, rb_P[ib] / mb
    cost_BA = _pairwise_BA(coords_P2[ia], coords_P2[ib])
    if ia.size == 1:
        return mass * float(cost_BA[0] @ wb)
    if ib.size == 1:
        return mass * float(cost_BA[:, 0] @ wa)
    return mass * _emd2(wa, wb, cost_BA)


# --------------------------------------------------------------------------------- public API
def grid_emd(a: np.ndarray, b: np.ndarray) -> float:
    """Exact EMD between maps a_HW and b_HW (each normalised to sum 1; Euclidean distance between
    cell centres, cell units). ValueError on NaN/Inf, negative entries, an all-zero map or
    mismatched shapes."""
    a_HW, b_HW = _checked_weights(a, "a", 2), _checked_weights(b, "b", 2)
    if a_HW.shape != b_HW.shape:
        raise ValueError(f"maps must have the same shape, got {list(a_HW.shape)} and {list(b_HW.shape)}")
    h, w = a_HW.shape
    return _emd_shared_points(a_HW.ravel(), b_HW.ravel(), _grid_coords(h, w))


def grid_emd_dense(a: np.ndarray, b: np.ndarray) -> float:
    """Reference for ``grid_emd``: ``ot.emd2`` on the full HW × HW grid, no reduction on our side.
    (POT itself skips zero-mass rows/columns inside the simplex, but still handles the full
    HW × HW cost matrix, plan and duals on every call.) Same validation as ``grid_emd``."""
    a_HW, b_HW = _checked_weights(a, "a", 2), _checked_weights(b, "b", 2)
    if a_HW.shape != b_HW.shape:
        raise ValueError(f"maps must have the same shape, got {list(a_HW.shape)} and {list(b_HW.shape)}")
    return _emd2(a_HW.ravel(), b_HW.ravel(), _grid_cost(*a_HW.shape))


def points_emd(w1: np.ndarray, coords1: np.ndarray, w2: np.ndarray, coords2: np.ndarray) -> float:
    """Exact EMD between weights w1_A on points coords1_AD and w2_B on coords2_BD (any D; each
    normalised to sum 1; Euclidean ground distance in the coordinates' units). Used for attention
    rows of the two SCC views on their common canvas (scc.canvas_coordinates), where the overlap
    patches of both views are the same points. Exactly equal coordinates are merged, so that
    shared mass cancels as in ``grid_emd``."""
    w1_A, w2_B = _checked_weights(w1, "w1", 1), _checked_weights(w2, "w2", 1)
    coords1_AD = np.asarray(coords1, dtype=np.float64)
    coords2_BD = np.asarray(coords2, dtype=np.float64)
    for name, c, wt in (("coords1", coords1_AD, w1_A), ("coords2", coords2_BD, w2_B)):
        if c.ndim != 2 or c.shape[0] != wt.size:
            raise ValueError(f"{name} must be [{wt.size}, D] (one point per weight), got shape {list(c.shape)}")
        if not np.all(np.isfinite(c)):
            raise ValueError(f"{name} contains NaN or Inf")
    if coords1_AD.shape[1] != coords2_BD.shape[1]:
        raise ValueError(f"coords1 and coords2 must have the same dimension, got "
                         f"{coords1_AD.shape[1]} and {coords2_BD.shape[1]}")
    # One point list for both sides: duplicates within or across the sets become one point.
    coords_P2, inv = np.unique(np.concatenate([coords1_AD, coords2_BD]), axis=0, return_inverse=True)
    inv = inv.ravel()
    a_P = np.bincount(inv[: w1_A.size], weights=w1_A, minlength=len(coords_P2))
    b_P = np.bincount(inv[w1_A.size:], weights=w2_B, minlength=len(coords_P2))
    return _emd_shared_points(a_P, b_P, coords_P2)
