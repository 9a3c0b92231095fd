"""EMD properties (METHOD §5): the fast support path equals POT's full-grid network simplex."""

from __future__ import annotations

import numpy as np
import ot
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_ray.emd import grid_emd, grid_emd_dense, points_emd
from scope_ray.scc import canvas_coordinates


def _sparse_map(rng, h, w, density):
    m = rng.exponential(size=(h, w)) * (rng.random((h, w)) < density)
    if not m.any():
        m[rng.integers(h), rng.integers(w)] = 1.0
    return m


def _pot_full(a, b):
    """ot.emd2 called directly on the full grid, independent of scope_ray.emd's own helpers."""
    h, w = a.shape
    r, c = np.divmod(np.arange(h * w), w)
    xy = np.stack([r, c], 1).astype(float)
    return ot.emd2((a / a.sum()).ravel(), (b / b.sum()).ravel(), ot.dist(xy, xy, metric="euclidean"), numItermax=10**7)


maps = st.integers(2, 8).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 10), min_size=n * n, max_size=n * n),
    st.lists(st.floats(0, 10), min_size=n * n, max_size=n * n),
    st.just(n),
)).filter(lambda t: sum(t[0]) > 0 and sum(t[1]) > 0)


@settings(max_examples=60, deadline=None)
@given(maps)
def test_symmetric_and_matches_dense(t):
    a, b = (np.array(x).reshape(t[2], t[2]) for x in t[:2])
    d_ab = grid_emd(a, b)
    assert d_ab >= 0
    assert d_ab == pytest.approx(grid_emd(b, a), abs=1e-9)
    assert d_ab == pytest.approx(grid_emd_dense(a, b), abs=1e-6)


@pytest.mark.parametrize("h,w", [(3, 3), (7, 5), (14, 14), (16, 16)])
@pytest.mark.parametrize("density", [0.02, 0.08, 0.3, 1.0])
def test_support_path_equals_full_grid_pot(h, w, density):
    rng = np.random.default_rng(1000 * h + int(100 * density))
    for _ in range(6):
        a, b = _sparse_map(rng, h, w, density), _sparse_map(rng, h, w, density)
        fast = grid_emd(a, b)
        assert fast == pytest.approx(grid_emd_dense(a, b), abs=1e-6)
        assert fast == pytest.approx(_pot_full(a, b), abs=1e-6)
        # SCC-like pair: mostly the same map, a few cells changed (exercises shared-mass cancelling)
        b2 = a.copy()
        b2[rng.random((h, w)) < 0.1] *= rng.exponential()
        if b2.any():
            assert grid_emd(a, b2) == pytest.approx(_pot_full(a, b2), abs=1e-6)


def test_zero_on_identical_and_scale_invariant():
    rng = np.random.default_rng(0)
    a, b = _sparse_map(rng, 9, 9, 0.2), _sparse_map(rng, 9, 9, 0.2)
    assert grid_emd(a, a) == 0.0
    assert grid_emd(a, 7.5 * a) == pytest.approx(0.0, abs=1e-12)
    ref = grid_emd(a, b)
    assert grid_emd(3.0 * a, b) == pytest.approx(ref, abs=1e-12)
    assert grid_emd(a, 1e-3 * b) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("p,q", [((1, 2), (4, 6)), ((0, 0), (7, 7)), ((3, 5), (3, 0))])
def test_translated_spike_is_the_shift_distance(p, q):
    a, b = np.zeros((8, 8)), np.zeros((8, 8))
    a[p], b[q] = 2.0, 0.3
    expected = float(np.hypot(p[0] - q[0], p[1] - q[1]))
    assert grid_emd(a, b) == pytest.approx(expected, abs=1e-12)
    assert grid_emd_dense(a, b) == pytest.approx(expected, abs=1e-9)
    # A whole pattern translated rigidly moves by the same distance.
    pat = np.zeros((10, 10))
    pat[1:3, 2:4] = [[1, 2], [3, 4]]
    moved = np.roll(np.roll(pat, 3, axis=0), 4, axis=1)
    assert grid_emd(pat, moved) == pytest.approx(5.0, abs=1e-9)


def test_points_emd_equals_grid_emd_on_grid_cells():
    rng = np.random.default_rng(3)
    r, c = np.divmod(np.arange(36), 6)
    xy = np.stack([r, c], 1).astype(float)
    for density in (0.1, 0.5, 1.0):
        a, b = _sparse_map(rng, 6, 6, density), _sparse_map(rng, 6, 6, density)
        assert points_emd(a.ravel(), xy, b.ravel(), xy) == pytest.approx(grid_emd(a, b), abs=1e-9)
        # Point order and the two sets' different orderings do not matter.
        perm = rng.permutation(36)
        assert points_emd(a.ravel()[perm], xy[perm], b.ravel(), xy) == pytest.approx(grid_emd(a, b), abs=1e-9)


def test_points_emd_on_scc_canvas_matches_pot():
    rng = np.random.default_rng(4)
    c1, c2 = canvas_coordinates(6, 2)
    w1, w2 = rng.random(36), rng.random(36)
    full = ot.emd2(w1 / w1.sum(), w2 / w2.sum(), ot.dist(c1, c2, metric="euclidean"))
    assert points_emd(w1, c1, w2, c2) == pytest.approx(full, abs=1e-6)


@pytest.mark.parametrize("fn", [grid_emd, grid_emd_dense])
def test_bad_inputs(fn):
    ok = np.ones((4, 4))
    for bad, msg in [
        (np.where(np.eye(4) > 0, np.nan, 1.0), "NaN"),
        (np.where(np.eye(4) > 0, np.inf, 1.0), "NaN or Inf"),
        (ok - 2 * np.eye(4), "negative"),
        (np.zeros((4, 4)), "all zero"),
        (np.ones(16), "2-D"),
    ]:
        with pytest.raises(ValueError, match=msg):
            fn(bad, ok)
        with pytest.raises(ValueError, match=msg):
            fn(ok, bad)
    with pytest.raises(ValueError, match="same shape"):
        fn(ok, np.ones((4, 5)))


def test_points_emd_bad_inputs():
    xy = np.zeros((3, 2))
    with pytest.raises(ValueError, match="one point per weight"):
        points_emd(np.ones(3), xy, np.ones(2), xy)
    with pytest.raises(ValueError, match="same dimension"):
        points_emd(np.ones(3), xy, np.ones(3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="all zero"):
        points_emd(np.zeros(3), xy, np.ones(3), xy)
