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
   nearly the same map, so this often shrinks the problem much further. After cancelling, the two
   residuals live on disjoint cells.
3. **One-point side.** If one side's residual is a single point, every plan moves all mass to/from
   it: the EMD is the weighted mean distance, in closed form. If a side's residual is empty the
   maps are identical (up to rounding) and the EMD is 0.

The batched entry point ``grid_emd_many`` does steps 1–3 for all K pairs at once in vectorised
NumPy and loops in Python only over the pairs that still need the network simplex, calling POT's
C solver (``ot.lp.emd_wrap.emd_c``, the routine ``ot.emd2`` wraps) directly on the reduced
problem: ``ot.emd2``'s own per-call work (backend dispatch, marginal checks, dual potentials on the
full grid) costs far more than the solve on these sizes. Every solve runs in float64 and its exit
status is checked: a non-optimal exit (infeasible, unbounded, iteration cap) raises, never a
silent approximation. Every step is row-wise, so a pair's value is bit-for-bit the same whatever
batch it is computed in; ``grid_emd`` (one pair) and ``points_emd`` go through the same kernel.
``grid_emd_dense`` is the unreduced reference (``ot.emd2`` on the full HW × HW problem) that the
tests and bench/bench_emd.py compare against.
"""

from __future__ import annotations

import functools

import numpy as np
import ot
from ot.lp.emd_wrap import emd_c

_OPTIMAL = 1  # POT's result_code for an optimal network-simplex exit
_RESULT_CODES = {0: "infeasible", 2: "unbounded", 3: "iteration limit reached before optimality"}
_SORT_MIN = 64  # problems with at least this many arcs get their points sorted by weight (see _emd_rows)
_GATHER_MAX = 256  # cost blocks up to this many entries are gathered for all pairs at once
_CHUNK = 256  # pairs per vectorised block: keeps the [K, HW] temporaries small (fresh large arrays page-fault)


# ------------------------------------------------------------------------------ validation
def _problem_codes(x_KP: np.ndarray, total_K: np.ndarray) -> np.ndarray:
    """A problem code per row of x_KP (total_K its row sums): 0 ok, 1 NaN/Inf, 2 the sum overflows,
    3 a negative entry, 4 all zero. A NaN or Inf entry always makes the row sum non-finite."""
    code_K = np.zeros(len(x_KP), dtype=np.int8)
    rows = np.flatnonzero(~np.isfinite(total_K))
    code_K[rows] = np.where(np.all(np.isfinite(x_KP[rows]), axis=1), 2, 1)
    code_K[(code_K == 0) & (x_KP.min(axis=1) < 0)] = 3
    code_K[(code_K == 0) & (total_K == 0)] = 4
    return code_K


def _raise_for(code: int, x_P: np.ndarray, label: str) -> None:
    if code == 1:
        raise ValueError(f"{label} contains NaN or Inf")
    if code == 2:
        raise ValueError(f"{label} sums to Inf (entries too large for float64)")
    if code == 3:
        raise ValueError(f"{label} has negative entries (min {x_P.min():.6g}); EMD needs non-negative mass")
    raise ValueError(f"{label} is all zero: it has no mass to normalise")


def _checked_maps(x, y, names: tuple[str, str], ndim: int, indexed: bool):
    """→ (x_KP, y_KP, sx_K, sy_K, (H, W)): the maps as float64 [K, H·W] (views where possible) and
    their sums. x and y have shape [K, H, W] (``ndim`` = 3) or [H, W] (``ndim`` = 2, a batch of
    one). ValueError naming the map (and, for a batch, the index of the first offending pair) on
    NaN/Inf, negative entries, an all-zero map or mismatched shapes."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    for name, z in zip(names, (x, y)):
        if z.ndim != ndim:
            what = "[K, H, W]" if ndim == 3 else "[H, W]"
            raise ValueError(f"{name} must be {ndim}-D {what}, got shape {list(z.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {list(x.shape)} and {list(y.shape)}")
    hw = x.shape[-2:]
    if 0 in hw:
        raise ValueError(f"maps must have at least one cell, got shape {list(x.shape)}")
    x_KP, y_KP = x.reshape(-1, hw[0] * hw[1]), y.reshape(-1, hw[0] * hw[1])
    sx_K, sy_K = x_KP.sum(axis=1), y_KP.sum(axis=1)
    # One cheap test for the usual case (all finite, non-negative, some mass); the diagnosis only
    # runs when it fails. NaN compares False, so a NaN anywhere fails it too.
    lo = min(x_KP.min(initial=np.inf), y_KP.min(initial=np.inf))
    if not (lo >= 0 and np.isfinite(sx_K).all() and np.isfinite(sy_K).all() and (sx_K > 0).all() and (sy_K > 0).all()):
        cx_K, cy_K = _problem_codes(x_KP, sx_K), _problem_codes(y_KP, sy_K)
        i = int(np.argmax((cx_K > 0) | (cy_K > 0)))
        name, code, row = (names[0], cx_K[i], x_KP[i]) if cx_K[i] else (names[1], cy_K[i], y_KP[i])
        _raise_for(int(code), row, f"{name}[{i}] (pair {i})" if indexed else name)
    return x_KP, y_KP, sx_K, sy_K, hw


# ------------------------------------------------------------------------------ geometry
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


@functools.lru_cache(maxsize=8)
def _grid_cost(h: int, w: int) -> np.ndarray:
    """Full [hw, hw] ground-distance matrix, C-ordered, cached per shape (shared, read-only)."""
    m = np.ascontiguousarray(_pairwise_BA(_grid_coords(h, w), _grid_coords(h, w)))
    m.setflags(write=False)
    return m


# ----------------------------------------------------------------------------------- solver
def _iteration_cap(n1, n2):
    # POT's default cap (1e5) is reached on dense problems beyond ~300 × 300 points.
    return np.maximum(100_000, 20 * np.asarray(n1, dtype=np.int64) * n2)


def _raise_not_optimal(code: int, n1: int, n2: int, where: str) -> None:
    raise RuntimeError(f"network simplex did not reach optimality "
                       f"({_RESULT_CODES.get(code, f'result code {code}')}) on a {n1} x {n2} problem{where}")


def _sort_segments(w: np.ndarray, n_S: np.ndarray, off: np.ndarray, todo_S: np.ndarray) -> np.ndarray:
    """Permutation of w that sorts each segment w[off[i]:off[i+1]] (n_S[i] entries) marked in todo_S
    increasingly and stably, in place of its segment, and leaves the others as they are. One
    row-wise argsort on a [segments, max n] table padded with +inf, so a segment's order depends on
    that segment only (not on the batch)."""
    perm = np.arange(w.size)
    seg = np.flatnonzero(todo_S)
    if seg.size:
        n, start = n_S[seg], off[:-1][seg]
        at = np.repeat(start, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # their entries
        tab = np.full((seg.size, int(n.max())), np.inf)
        tab[np.repeat(np.arange(seg.size), n), at - np.repeat(start, n)] = w[at]
        order = np.argsort(tab, axis=1, kind="stable")
        perm[at] = (start[:, None] + order)[np.arange(tab.shape[1]) < n[:, None]]
    return perm


def _gather_blocks(cost_PP, ia_all, ib_all, na_S, nb_S, ob, small_S):
    """The na × nb cost blocks of the pairs marked small_S, row-major, concatenated into one array,
    and the offset of each pair's block in it (a list; unmarked pairs get an empty block)."""
    p = cost_PP.shape[1]
    rowlen = np.repeat(np.where(small_S, nb_S, 0), na_S)  # per source point: its block-row length
    row_start = np.cumsum(rowlen) - rowlen
    col_base = np.repeat(ob[:-1], na_S) - row_start  # entry e of source row r reads ib_all[col_base[r] + e]
    flat = np.repeat(ia_all * p, rowlen) + ib_all[np.repeat(col_base, rowlen) + np.arange(int(rowlen.sum()))]
    gm = np.zeros(len(na_S) + 1, dtype=np.int64)
    np.cumsum(np.where(small_S, na_S * nb_S, 0), out=gm[1:])
    return cost_PP.ravel()[flat], gm.tolist()


def _emd_rows(a_KP: np.ndarray, b_KP: np.ndarray, coords_P2: np.ndarray, cost_PP: np.ndarray | None,
              first: int = 0, indexed: bool = True) -> np.ndarray:
    """EMD of each pair of rows of a_KP, b_KP (each row normalised to sum 1; both arrays are
    overwritten) on the points coords_P2; cost_PP is their full distance matrix when it is cached
    (grids), else None (distances are then computed on the support only). Every operation is
    row-wise, so a pair's value does not depend on the rest of the batch."""
    k, p = a_KP.shape
    out_K = np.zeros(k)
    # Shared mass cancelled: ra = a − min(a, b) = max(a − b, 0), rb = max(b − a, 0), computed in
    # place (large fresh temporaries cost page faults). The residuals live on disjoint cells.
    d_KP = np.subtract(a_KP, b_KP, out=a_KP)
    rb_KP = np.maximum(np.negative(d_KP, out=b_KP), 0.0, out=b_KP)
    ra_KP = np.maximum(d_KP, 0.0, out=d_KP)
    on_a_KP, on_b_KP = ra_KP > 0, rb_KP > 0
    na_K, nb_K = on_a_KP.sum(axis=1), on_b_KP.sum(axis=1)
    ma_K, mb_K = ra_KP.sum(axis=1), rb_KP.sum(axis=1)  # equal up to rounding: both are 1 − Σ min(a, b)
    mass_K = 0.5 * (ma_K + mb_K)
    # na or nb = 0: the maps are identical up to a rounding-level residue → 0 (out_K's initial value).

    if k == 1:  # a single pair (grid_emd, points_emd): the same arithmetic, fewer NumPy calls
        na, nb = int(na_K[0]), int(nb_K[0])
        one_a, one_b = ([0], []) if na == 1 and nb else ([], [0]) if nb == 1 and na > 1 else ([], [])
        sel = [0] if na > 1 and nb > 1 else []
    else:
        one_a = np.flatnonzero((na_K == 1) & (nb_K > 0))
        one_b = np.flatnonzero((nb_K == 1) & (na_K > 1))
        simplex_K = (na_K > 1) & (nb_K > 1)
        sel = np.flatnonzero(simplex_K)

    # One-point side (closed form): all residual mass of the other side moves to / from that point.
    for one, r_one, r_other, m_other in ((one_a, ra_KP, rb_KP, mb_K), (one_b, rb_KP, ra_KP, ma_K)):
        if len(one):
            at = np.argmax(r_one[one], axis=1)
            d_SP = cost_PP[at] if cost_PP is not None else _pairwise_BA(coords_P2[at], coords_P2)
            out_K[one] = mass_K[one] * (d_SP * r_other[one]).sum(axis=1) / m_other[one]

    # Everything else: POT's network simplex on the reduced na × nb problem, one C call per pair.
    if not len(sel):
        return out_K
    # Residual supports of those pairs, concatenated pair after pair (row-major order), with each
    # side's weights divided by its residual mass.
    # On problems of _SORT_MIN arcs or more, each side's points go in increasing order of weight:
    # POT's network simplex then runs 10–20 % faster on CDS-grid maps (measured with
    # bench/bench_emd.py; any order gives the same optimum). On smaller ones the sort costs more.
    if k == 1:
        ia_all, ib_all = np.flatnonzero(on_a_KP[0]), np.flatnonzero(on_b_KP[0])
        wa_all, wb_all = ra_KP[0, ia_all] / ma_K[0], rb_KP[0, ib_all] / mb_K[0]
        if na * nb >= _SORT_MIN:
            order_a, order_b = np.argsort(wa_all, kind="stable"), np.argsort(wb_all, kind="stable")
        else:
            order_a, order_b = slice(None), slice(None)
        na_S, nb_S, oa, ob = na_K, nb_K, [0, na], [0, nb]
    else:
        na_S, nb_S = na_K[sel], nb_K[sel]
        flat_a = np.flatnonzero(on_a_KP & simplex_K[:, None])
        flat_b = np.flatnonzero(on_b_KP & simplex_K[:, None])
        ia_all, ib_all = flat_a % p, flat_b % p
        wa_all = ra_KP.ravel()[flat_a] / np.repeat(ma_K[sel], na_S)
        wb_all = rb_KP.ravel()[flat_b] / np.repeat(mb_K[sel], nb_S)
        oa, ob = np.zeros(sel.size + 1, dtype=np.int64), np.zeros(sel.size + 1, dtype=np.int64)
        np.cumsum(na_S, out=oa[1:])
        np.cumsum(nb_S, out=ob[1:])
        big_S = na_S * nb_S >= _SORT_MIN
        order_a, order_b = _sort_segments(wa_all, na_S, oa, big_S), _sort_segments(wb_all, nb_S, ob, big_S)
    ia_all, wa_all, ib_all, wb_all = ia_all[order_a], wa_all[order_a], ib_all[order_b], wb_all[order_b]
    # As ot.emd2 does: rescale b so both sides have the same total (the solver needs equal sums).
    wb_all *= np.repeat(np.add.reduceat(wa_all, oa[:-1]) / np.add.reduceat(wb_all, ob[:-1]), nb_S)
    caps = _iteration_cap(na_S, nb_S).tolist()
    # Cost blocks: small ones gathered for all pairs in one go (a slice each in the loop), large
    # ones taken per pair (the gather's index arithmetic costs more than it saves there).
    if cost_PP is not None and k > 1:
        small_S = na_S * nb_S <= _GATHER_MAX
        m_all, gm = _gather_blocks(cost_PP, ia_all, ib_all, na_S, nb_S, ob, small_S)
        small = small_S.tolist()
    else:
        small = [False] * len(sel)
    if k > 1:
        oa, ob = oa.tolist(), ob.tolist()
    costs = []
    for j in range(len(sel)):
        a0, a1, b0, b1 = oa[j], oa[j + 1], ob[j], ob[j + 1]
        if small[j]:
            m = m_all[gm[j]:gm[j + 1]].reshape(a1 - a0, b1 - b0)
        elif cost_PP is not None:
            m = cost_PP.take(ia_all[a0:a1], axis=0).take(ib_all[b0:b1], axis=1)
        else:
            m = _pairwise_BA(coords_P2[ia_all[a0:a1]], coords_P2[ib_all[b0:b1]])
        res = emd_c(wa_all[a0:a1], wb_all[b0:b1], m, caps[j], 1)  # (plan, cost, u, v, result code)
        if res[4] != _OPTIMAL:
            _raise_not_optimal(res[4], a1 - a0, b1 - b0, f" (pair {first + int(sel[j])})" if indexed else "")
        costs.append(res[1])
    out_K[sel] = mass_K[sel] * np.array(costs)
    return out_K


# --------------------------------------------------------------------------------- public API
def _grid_emd_checked(x_KP, y_KP, sx_K, sy_K, hw, indexed: bool) -> np.ndarray:
    """The EMD of validated maps (``_checked_maps``), normalised and solved in chunks of pairs."""
    coords, cost = _grid_coords(*hw), _grid_cost(*hw)
    out_K = np.empty(len(x_KP))
    for s in range(0, len(x_KP), _CHUNK):
        e = s + _CHUNK
        a_KP, b_KP = x_KP[s:e] / sx_K[s:e, None], y_KP[s:e] / sy_K[s:e, None]
        out_K[s:e] = _emd_rows(a_KP, b_KP, coords, cost, first=s, indexed=indexed)
    return out_K


def grid_emd_many(maps1: np.ndarray, maps2: np.ndarray) -> np.ndarray:
    """Exact EMD between maps1[i] and maps2[i] for every i: maps of shape [K, H, W] → float64 [K].
    Per pair the same as ``grid_emd`` (each map normalised to sum 1; Euclidean distance between
    cell centres, cell units) and bit-for-bit independent of the rest of the batch. ValueError
    naming the first offending pair on NaN/Inf, negative entries, an all-zero map or mismatched
    shapes; RuntimeError if the network simplex does not reach optimality."""
    return _grid_emd_checked(*_checked_maps(maps1, maps2, ("maps1", "maps2"), 3, indexed=True), indexed=True)


def grid_emd(a: np.ndarray, b: np.ndarray) -> float:
    """Exact EMD between maps a_HW and b_HW (each normalised to sum 1; Euclidean distance between
    cell centres, cell units). ValueError on NaN/Inf, negative entries, an all-zero map or
    mismatched shapes. One pair of ``grid_emd_many``: same kernel, same value."""
    return float(_grid_emd_checked(*_checked_maps(a, b, ("a", "b"), 2, indexed=False), indexed=False)[0])


def grid_emd_dense(a: np.ndarray, b: np.ndarray) -> float:
    """Reference for ``grid_emd``: ``ot.emd2`` on the full HW × HW grid, no reduction on our side.
    (POT itself skips zero-mass rows/columns inside the simplex, but still handles the full
    HW × HW cost matrix, plan and duals on every call.) Same validation as ``grid_emd``."""
    x_KP, y_KP, sx_K, sy_K, (h, w) = _checked_maps(a, b, ("a", "b"), 2, indexed=False)
    a_P, b_P = x_KP[0] / sx_K[0], y_KP[0] / sy_K[0]
    cap = int(_iteration_cap(a_P.size, b_P.size))
    # check_marginals=False: both sides were normalised to sum 1 here (POT still rescales b to a's
    # sum); its check is a numpy.testing assert.
    cost, log = ot.emd2(a_P, b_P, _grid_cost(h, w), numItermax=cap, log=True, check_marginals=False)
    if log["result_code"] != _OPTIMAL:
        raise RuntimeError(f"network simplex did not reach optimality ({log['warning']}) on a "
                           f"{a_P.size} x {b_P.size} problem")
    return float(cost)


def points_emd(w1: np.ndarray, coords1: np.ndarray, w2: np.ndarray, coords2: np.ndarray) -> float:
    """Exact EMD between weights w1_A on points coords1_AD and w2_B on coords2_BD (any D; each
    normalised to sum 1; Euclidean ground distance in the coordinates' units). Used for attention
    rows of the two SCC views on their common canvas (scc.canvas_coordinates), where the overlap
    patches of both views are the same points. Exactly equal coordinates are merged, so that
    shared mass cancels as in ``grid_emd``."""
    for name, wt in (("w1", w1), ("w2", w2)):
        if np.ndim(wt) != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(np.shape(wt))}")
        if np.size(wt) == 0:
            raise ValueError(f"{name} is empty")
    w1_A, w2_B = np.asarray(w1, dtype=np.float64), np.asarray(w2, dtype=np.float64)
    for name, wt in (("w1", w1_A), ("w2", w2_B)):
        code = _problem_codes(wt[None], wt.sum(keepdims=True))
        if code[0]:
            _raise_for(int(code[0]), wt, name)
    w1_A, w2_B = w1_A / w1_A.sum(), w2_B / w2_B.sum()
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
    return float(_emd_rows(a_P[None], b_P[None], coords_P2, None, indexed=False)[0])
