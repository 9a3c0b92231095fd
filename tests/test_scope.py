"""CDS, awCDS, Figure-7 bins and Otsu (METHOD §5–7): ranges, empty-map rules, hand examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scope_ray.emd import grid_emd
from scope_ray.scope import (aw_cds, cds_from_scores, cds_score, choose_gamma, norm_percentile_bins, otsu_threshold,
                             scc_pair_scores)

nonneg = st.floats(0, 100, allow_nan=False, allow_infinity=False)
map_pairs = st.tuples(st.integers(1, 4), st.integers(2, 6)).flatmap(
    lambda kh: st.tuples(arrays(np.float64, (kh[0], kh[1], kh[1]), elements=nonneg),
                         arrays(np.float64, (kh[0], kh[1], kh[1]), elements=nonneg))
)


@settings(max_examples=80, deadline=None)
@given(map_pairs)
def test_cds_in_unit_interval(pair):
    m1, m2 = pair
    score = cds_score(m1, m2)
    usable = [(a.any() or b.any()) for a, b in zip(m1, m2)]
    if not any(usable):
        assert math.isnan(score)
    else:
        assert 0.0 <= score <= 1.0
    self_score = cds_score(m1, m1)  # identical maps: 0, unless every image is empty
    assert self_score == 0.0 if m1.any() else math.isnan(self_score)


def test_cds_normaliser_and_corner_spike():
    h = 13  # p − s for CLIP-B/16 with s = 1
    a, b = np.zeros((1, h, h)), np.zeros((1, h, h))
    a[0, 0, 0], b[0, -1, -1] = 1.0, 5.0
    assert cds_score(a, b) == 1.0  # the diagonal √2·(h − 1) is the largest possible EMD
    b2 = np.zeros_like(b)
    b2[0, 3, 4] = 1.0
    assert cds_score(a, b2) == pytest.approx(5.0 / (math.sqrt(2) * (h - 1)), abs=1e-12)


def test_cds_empty_map_rules():
    h = 6
    full = np.random.default_rng(0).random((h, h))
    zero = np.zeros((h, h))
    same = full.copy()
    # one empty → that image counts 1; both empty → skipped; mean over the usable ones
    assert cds_score(np.stack([full, zero]), np.stack([same, full])) == pytest.approx(0.5)
    assert cds_score(np.stack([zero, full]), np.stack([full, same])) == pytest.approx(0.5)
    assert cds_score(np.stack([zero, full]), np.stack([zero, same])) == 0.0
    moved = np.roll(full, 1, axis=0)
    expect = grid_emd(full, moved) / (math.sqrt(2) * (h - 1))
    assert cds_score(np.stack([zero, full, zero]), np.stack([zero, moved, full])) == pytest.approx((expect + 1) / 2)
    assert math.isnan(cds_score(np.zeros((3, h, h)), np.zeros((3, h, h))))


def test_cds_bad_inputs():
    ok = np.ones((2, 4, 4))
    zero = np.zeros((2, 4, 4))
    nan = ok.copy()
    nan[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cds_score(zero, nan)  # caught even where the other map is empty
    with pytest.raises(ValueError, match="negative"):
        cds_score(ok, -ok)
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        cds_score(ok, np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="2 x 2"):
        cds_score(np.ones((2, 1, 1)), np.ones((2, 1, 1)))


def test_aw_cds_hand_example():
    cds = np.array([0.1, 0.5, np.nan, 0.9])
    acts = np.array([
        [1.0, 3.0, 0.0, 0.0],  # (0.1 + 1.5) / 4 = 0.4
        [0.0, 0.0, 0.0, 0.0],  # nothing fires → NaN
        [0.0, 0.0, 5.0, 0.0],  # only a NaN-CDS feature fires → NaN
        [2.0, 0.0, 7.0, 2.0],  # NaN-CDS feature left out of both sums: (0.2 + 1.8) / 4 = 0.5
    ], dtype=np.float32)
    out = aw_cds(acts, cds)
    assert out[0] == pytest.approx(0.4) and out[3] == pytest.approx(0.5)
    assert np.isnan(out[1]) and np.isnan(out[2])
    assert np.allclose(aw_cds(acts, cds, chunk=1), out, equal_nan=True)  # chunking changes nothing
    with pytest.raises(ValueError, match="negative"):
        aw_cds(-acts, cds)
    with pytest.raises(ValueError, match=r"\[T, q\]"):
        aw_cds(acts, cds[:3])


def test_norm_percentile_bins():
    norms = np.arange(1, 101, dtype=float)  # token t has norm t
    values = norms / 100
    values[95] = np.nan  # ignored, not propagated
    centres, means = norm_percentile_bins(norms, values, 4)
    assert centres.tolist() == [12.5, 37.5, 62.5, 87.5]
    assert means[0] == pytest.approx(np.mean(values[:25]))
    assert means[3] == pytest.approx(np.nanmean(values[75:]))
    # ties share a bin; an empty bin is NaN
    _, m = norm_percentile_bins(np.ones(10), np.arange(10.0), 3)
    assert np.isnan(m[0]) and m[1] == pytest.approx(4.5) and np.isnan(m[2])


def test_otsu_equals_scikit_image():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(3)
    cases = [
        np.concatenate([rng.normal(0.05, 0.02, 3000), rng.normal(0.6, 0.08, 800)]),
        rng.beta(0.5, 3.0, 5000),
        # A CDS-like histogram with a pile of features at exactly 1 (the one-empty-map rule).
        np.concatenate([rng.beta(2, 12, 20_000), rng.beta(6, 8, 4_000), np.ones(1_000)]),
        rng.integers(0, 5, 400).astype(np.float64),  # ties: many values on few bin edges
        np.log(rng.lognormal(1.6, 0.2, 10_000)),  # log token norms, as auto_tau uses it
    ]
    for bins in (256, 64):
        for v in cases:
            assert otsu_threshold(v, bins=bins) == pytest.approx(float(threshold_otsu(v, nbins=bins)), abs=1e-12)


def test_otsu_between_modes():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.05, 0.02, 3000), rng.normal(0.6, 0.08, 800)
    v = np.concatenate([low, high])
    t = otsu_threshold(v)
    # Separated modes: the cut falls in the first bin after which every cut is equally good, i.e.
    # at the centre of the bin that holds the lower mode's largest value (scikit-image's choice).
    half_bin = (v.max() - v.min()) / 256 / 2
    assert low.max() - half_bin <= t <= low.max() + half_bin and t < high.min()
    # Overlapping modes: the cut lies between the two means.
    a, b = rng.normal(0.1, 0.05, 2000), rng.normal(0.4, 0.1, 2000)
    assert 0.1 < otsu_threshold(np.concatenate([a, b])) < 0.4


# ------------------------------------------------------------------ per-image terms, spares
def test_scc_pair_scores_rules_and_agreement_with_cds_score():
    rng = np.random.default_rng(5)
    m1 = rng.random((6, 5, 5)) * (rng.random((6, 5, 5)) < 0.3)
    m2 = rng.random((6, 5, 5)) * (rng.random((6, 5, 5)) < 0.3)
    m1[0] = m2[0] = 0  # both empty -> unusable
    m1[1], m2[1] = 0, 1  # the feature left the overlap in view 1 -> 1
    m2[2] = m1[2]  # identical -> 0
    m1[3] += 0.01  # make sure the rest are non-empty
    m2[3] += 0.01
    scores = scc_pair_scores(m1, m2)
    assert np.isnan(scores[0]) and scores[1] == 1.0 and scores[2] == 0.0
    d = np.sqrt(2) * 4
    for i in range(3, 6):
        if m1[i].any() and m2[i].any():
            assert scores[i] == pytest.approx(grid_emd(m1[i], m2[i]) / d, abs=1e-12)
    assert cds_score(m1, m2) == pytest.approx(np.nanmean(scores))


def test_cds_from_scores_uses_first_k_usable_in_rank_order():
    s = np.array([np.nan, 0.2, 0.4, np.nan, 0.9, 0.1])
    assert cds_from_scores(s, 2) == (pytest.approx(0.3), 2)  # spares stand in for the NaN ones
    assert cds_from_scores(s, 10) == (pytest.approx(np.nanmean(s)), 4)
    cds, used = cds_from_scores(np.array([np.nan, np.nan]), 3)
    assert np.isnan(cds) and used == 0


@pytest.mark.parametrize("bad", [np.nan, -0.5, np.inf])
def test_scc_pair_scores_reject_bad_maps(bad):
    m = np.ones((2, 3, 3))
    broken = m.copy()
    broken[1, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN|negative"):
        scc_pair_scores(m, broken)
    with pytest.raises(ValueError, match="K, H, W"):
        scc_pair_scores(m, m[:, :2])


def test_gamma_is_the_configured_value_or_otsu_on_the_scored_cds_only():
    """A pile of unscored features at CDS 1 (one-empty-map rule, too few images) does not move an
    automatic γ; a configured γ is taken as it is; no scored feature is a clear error."""
    rng = np.random.default_rng(0)
    scored = np.concatenate([rng.normal(0.1, 0.03, 800), rng.normal(0.5, 0.05, 200)])
    cds = np.concatenate([scored, np.ones(1000), [np.nan] * 5])
    is_scored = np.concatenate([np.ones(1000, bool), np.zeros(1005, bool)])
    gamma, source = choose_gamma(cds, is_scored, "auto", 4)
    assert gamma == otsu_threshold(scored) and source.startswith("auto")
    assert 0.1 < gamma < 0.5  # between the two modes of the scored features
    assert otsu_threshold(cds[np.isfinite(cds)]) > gamma + 0.1  # the pile would have moved it
    assert choose_gamma(cds, is_scored, 0.13, 4) == (0.13, "config")
    with pytest.raises(RuntimeError, match="min_usable_images=4"):
        choose_gamma(cds, np.zeros_like(is_scored), "auto", 4)
