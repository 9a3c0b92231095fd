"""EMD properties (METHOD §5): the fast support path (single and batched) equals POT's full-grid
network simplex, and a pair's value does not depend on the batch it is computed in."""

from __future__ import annotations

import numpy as np
import ot
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scope_ray.emd as emd_mod
from scope_ray.emd import grid_emd, grid_emd_dense, grid_emd_many, points_emd
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


# ------------------------------------------------------------------------------ grid_emd_many
def _pair(rng, kind, h, w):
    """One pair of maps of the given kind (the shapes SAE features give CDS maps)."""
    if kind == "sparse":  # unrelated sparse maps
        return _sparse_map(rng, h, w, rng.uniform(0.02, 0.3)), _sparse_map(rng, h, w, rng.uniform(0.02, 0.3))
    if kind == "dense":
        return _sparse_map(rng, h, w, 1.0), _sparse_map(rng, h, w, rng.uniform(0.3, 1.0))
    if kind == "same-support":  # local-scope-like: same support, values slightly perturbed
        a = _sparse_map(rng, h, w, rng.uniform(0.05, 0.5))
        return a, a * rng.lognormal(0.0, 0.15, size=a.shape)
    if kind == "spikes":  # global-scope-like: a few spikes, at different cells in the two maps
        cells = rng.permutation(h * w)
        n1, n2 = rng.integers(1, min(4, h * w) + 1, size=2)  # they overlap only on tiny grids
        a, b = np.zeros(h * w), np.zeros(h * w)
        a[cells[:n1]] = rng.exponential(size=n1) + 0.01
        b[cells[-n2:]] = rng.exponential(size=n2) + 0.01
        return a.reshape(h, w), b.reshape(h, w)
    if kind == "integer":  # small integer values: many equal weights (degenerate problems)
        return rng.integers(0, 3, size=(h, w)) + np.eye(h, w), rng.integers(0, 3, size=(h, w)) + np.eye(h, w)[::-1]
    if kind == "identical":
        a = _sparse_map(rng, h, w, rng.uniform(0.05, 1.0))
        return a, a.copy()
    raise AssertionError(kind)


KINDS = ["sparse", "dense", "same-support", "spikes", "integer", "identical"]


def _batch(seed, k, h, w, kinds=KINDS):
    rng = np.random.default_rng(seed)
    pairs = [_pair(rng, kinds[rng.integers(len(kinds))], h, w) for _ in range(k)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 12), h=st.integers(1, 9), w=st.integers(1, 9))
def test_many_matches_full_grid_pot_and_single_calls(seed, k, h, w):
    m1, m2 = _batch(seed, k, h, w)
    out = grid_emd_many(m1, m2)
    assert out.shape == (k,) and out.dtype == np.float64
    assert np.all(out >= 0)
    for i in range(k):
        assert out[i] == pytest.approx(grid_emd_dense(m1[i], m2[i]), abs=1e-6)
        assert out[i] == grid_emd(m1[i], m2[i])  # the same kernel: bit for bit
    np.testing.assert_allclose(grid_emd_many(m2, m1), out, rtol=0, atol=1e-9)  # symmetric


@settings(max_examples=40, deadline=None)
@given(maps)
def test_many_on_arbitrary_values(t):
    """Adversarial values from hypothesis (zeros, repeats, tiny and huge ratios) through the batch path."""
    a, b = (np.array(x).reshape(t[2], t[2]) for x in t[:2])
    out = grid_emd_many(np.stack([a, b, a]), np.stack([b, a, a]))
    dense = grid_emd_dense(a, b)
    assert out[0] == pytest.approx(dense, abs=1e-6)
    assert out[1] == pytest.approx(dense, abs=1e-6)
    assert out[2] == 0.0


@pytest.mark.parametrize("h", [13, 15])  # the CDS overlap grids of CLIP-B/16 (p = 14) and p = 16, s = 1
@pytest.mark.parametrize("kind", KINDS)
def test_many_on_cds_grids_equals_ot_emd2(h, kind):
    m1, m2 = _batch(100 + h, 20, h, h, kinds=[kind])
    out = grid_emd_many(m1, m2)
    ref = np.array([_pot_full(a, b) for a, b in zip(m1, m2)])
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    assert np.array_equal(out, [grid_emd(a, b) for a, b in zip(m1, m2)])
    if kind == "identical":
        assert np.all(out == 0.0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 30), chunk=st.sampled_from([1, 3, 7, 256]))
def test_value_does_not_depend_on_the_batch(seed, k, chunk):
    rng = np.random.default_rng(seed)
    m1, m2 = _batch(seed, k, 8, 7)
    whole = grid_emd_many(m1, m2)
    # Alone, in a shuffled batch, in a sub-batch, and with the batch cut into small chunks.
    alone = np.array([grid_emd_many(m1[i:i + 1], m2[i:i + 1])[0] for i in range(k)])
    perm = rng.permutation(k)
    shuffled = grid_emd_many(m1[perm], m2[perm])
    sub = rng.choice(k, size=rng.integers(1, k + 1), replace=False)
    old = emd_mod._CHUNK
    emd_mod._CHUNK = chunk
    try:
        chunked = grid_emd_many(m1, m2)
    finally:
        emd_mod._CHUNK = old
    assert np.array_equal(alone, whole)
    assert np.array_equal(shuffled, whole[perm])
    assert np.array_equal(grid_emd_many(m1[sub], m2[sub]), whole[sub])
    assert np.array_equal(chunked, whole)


def test_many_spikes_and_identical_maps():
    h = w = 9
    starts, ends = [(1, 2), (0, 0), (3, 5), (8, 8)], [(4, 6), (8, 8), (3, 0), (8, 8)]
    m1, m2 = np.zeros((4, h, w)), np.zeros((4, h, w))
    for i, (p, q) in enumerate(zip(starts, ends)):
        m1[(i, *p)], m2[(i, *q)] = 2.0, 0.3
    expected = [float(np.hypot(p[0] - q[0], p[1] - q[1])) for p, q in zip(starts, ends)]
    np.testing.assert_allclose(grid_emd_many(m1, m2), expected, rtol=0, atol=1e-12)
    # A rigidly translated pattern moves by the shift; a map against a rescaled copy of itself is 0.
    pat = np.zeros((10, 10))
    pat[1:3, 2:4] = [[1, 2], [3, 4]]
    moved = np.roll(np.roll(pat, 3, axis=0), 4, axis=1)
    out = grid_emd_many(np.stack([pat, pat, pat]), np.stack([moved, pat, 5.0 * pat]))
    assert out[0] == pytest.approx(5.0, abs=1e-9)
    assert out[1] == 0.0 and out[2] == pytest.approx(0.0, abs=1e-12)


def test_many_scale_invariant_and_empty_batch():
    m1, m2 = _batch(7, 6, 6, 6, kinds=["sparse", "same-support", "dense"])
    np.testing.assert_allclose(grid_emd_many(3.0 * m1, 1e-3 * m2), grid_emd_many(m1, m2), rtol=0, atol=1e-12)
    out = grid_emd_many(np.zeros((0, 5, 5)), np.zeros((0, 5, 5)))
    assert out.shape == (0,) and out.dtype == np.float64
    # Integer and non-contiguous inputs are accepted.
    ints = (m1 * 10).astype(np.int64)
    as_float = grid_emd_many(ints.astype(float), ints[::-1].astype(float))
    np.testing.assert_allclose(grid_emd_many(ints, ints[::-1]), as_float)


def test_many_bad_inputs_name_the_pair():
    ok = np.ones((5, 4, 4))
    for bad_value, msg in [(np.nan, "contains NaN or Inf"), (np.inf, "contains NaN or Inf"),
                           (-1.0, "has negative entries"), (None, "is all zero")]:
        for which in (0, 1):
            x, y = ok.copy(), ok.copy()
            target = (x, y)[which]
            if bad_value is None:
                target[3] = 0.0
            else:
                target[3, 1, 2] = bad_value
            name = f"maps{which + 1}"
            with pytest.raises(ValueError, match=rf"{name}\[3\] \(pair 3\) {msg}"):
                grid_emd_many(x, y)
    # The first offending pair is the one named.
    x = ok.copy()
    x[4, 0, 0], x[2] = np.nan, 0.0
    with pytest.raises(ValueError, match=r"maps1\[2\] \(pair 2\) is all zero"):
        grid_emd_many(x, ok)
    with pytest.raises(ValueError, match=r"maps1\[0\] \(pair 0\) sums to Inf"), np.errstate(over="ignore"):
        grid_emd_many(np.full((2, 4, 4), 1e308), ok[:2])
    with pytest.raises(ValueError, match="same shape"):
        grid_emd_many(ok, np.ones((5, 4, 5)))
    with pytest.raises(ValueError, match="same shape"):
        grid_emd_many(ok, np.ones((4, 4, 4)))
    with pytest.raises(ValueError, match=r"3-D \[K, H, W\]"):
        grid_emd_many(ok[0], ok[0])


def test_non_optimal_exit_raises(monkeypatch):
    """An iteration cap reached inside POT's solver is an error naming the pair, never a value."""
    m1, m2 = _batch(11, 4, 8, 8, kinds=["dense"])
    monkeypatch.setattr(emd_mod, "_iteration_cap", lambda n1, n2: np.ones_like(np.asarray(n1)))
    with pytest.raises(RuntimeError, match=r"iteration limit reached before optimality.*\(pair 0\)"):
        grid_emd_many(m1, m2)
    with pytest.raises(RuntimeError, match="iteration limit"):
        grid_emd(m1[1], m2[1])
    # Any non-optimal result code raises, and the pair is named by its index in the whole batch
    # (here in the second chunk).
    real, calls = emd_mod.emd_c, []

    def fourth_call_infeasible(*args):
        calls.append(1)
        g, cost, u, v, code = real(*args)
        return g, cost, u, v, (0 if len(calls) == 4 else code)
    monkeypatch.undo()
    monkeypatch.setattr(emd_mod, "emd_c", fourth_call_infeasible)
    monkeypatch.setattr(emd_mod, "_CHUNK", 2)
    with pytest.raises(RuntimeError, match=r"infeasible.*\(pair 3\)"):
        grid_emd_many(m1, m2)
