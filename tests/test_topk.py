"""Per-feature top-k (topk.py): equal to a brute-force sort, independent of how the images are
split into batches and actors, duplicates counted once, non-firing images never selected."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_ray.scope import cds_from_scores
from scope_ray.stages.cds import cds_table
from scope_ray.topk import NO_KEY, FeatureTopK, image_key, image_keys


def _brute(acts_BQ, keys_B, k):
    q = acts_BQ.shape[1]
    out = np.full((q, k), NO_KEY, dtype=np.int64)
    for f in range(q):
        cand = sorted((-acts_BQ[i, f], keys_B[i]) for i in range(len(keys_B)) if acts_BQ[i, f] > 0)
        out[f, : len(cand[:k])] = [c[1] for c in cand[:k]]
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_topk_equals_brute_force_for_any_split(q, b, k, seed, parts):
    rng = np.random.default_rng(seed)
    # Coarse values so ties between distinct images really happen; zeros mean "did not fire".
    acts = np.round(rng.random((b, q)) * 4) / 4
    keys = rng.permutation(10 * b)[:b].astype(np.int64)
    expected = _brute(acts, keys, k)
    # Split the images over `parts` "actors" in shuffled order, merge what they report at a "driver".
    order = rng.permutation(b)
    driver = FeatureTopK(q, k)
    for chunk in np.array_split(order, parts):
        actor = FeatureTopK(q, k)
        for batch in np.array_split(chunk, 2):
            if batch.size:
                driver.offer(*actor.update(acts[batch], keys[batch]))
    np.testing.assert_array_equal(driver.keys, expected)
    # The same image reported again (a retried batch) changes nothing.
    again = FeatureTopK(q, k)
    again.offer(*FeatureTopK(q, k).update(acts, keys))
    again.offer(*FeatureTopK(q, k).update(acts, keys))
    np.testing.assert_array_equal(again.keys, expected)


def test_non_firing_and_nonfinite_never_selected():
    t = FeatureTopK(2, 3)
    t.update(np.array([[0.0, 1.0], [np.nan, 2.0], [-1.0, np.inf]]), np.array([1, 2, 3]))
    assert (t.keys[0] == NO_KEY).all() and t.counts().tolist() == [0, 2]
    assert t.keys[1, :2].tolist() == [2, 1]


def test_image_key_is_stable_and_non_negative():
    assert image_key("n01440764/ILSVRC2012_val_00000293.JPEG") == image_key("n01440764/ILSVRC2012_val_00000293.JPEG")
    keys = image_keys([f"img{i}" for i in range(1000)])
    assert (keys >= 0).all() and len(set(keys.tolist())) == 1000


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="q=3"):
        FeatureTopK(3, 2).update(np.ones((2, 4)), np.array([1, 2]))
    with pytest.raises(ValueError, match="out of range"):
        FeatureTopK(3, 2).offer(np.array([3]), np.array([1]), np.array([1.0]))


def _pairs(rows) -> pa.Table:
    return pa.table({"feature": pa.array([r[0] for r in rows], pa.int64()), "rank": pa.array([r[1] for r in rows], pa.int32()),
                     "image_id": [r[2] for r in rows], "score": pa.array([r[3] for r in rows], pa.float64()),
                     "empty_view1": pa.array([r[4] for r in rows], pa.bool_()),
                     "empty_view2": pa.array([r[5] for r in rows], pa.bool_())})


def test_cds_table_rules():
    # feature 0: ranks 0..3 with a both-empty image at rank 1 -> spares fill in; k = 2
    # feature 1: every held image empty in both views -> NaN, "no usable image"
    # feature 2: never fired (nothing held) -> NaN, "never fired"
    # feature 3: one usable image of k = 2, which left the overlap -> 1.0, "fewer usable images"
    # feature 4: its only held image was rejected in pass 2 -> NaN, "images rejected"
    rows = [(0, 3, "d", 0.9, False, False), (0, 1, "b", np.nan, True, True), (3, 0, "c", 1.0, True, False),
            (0, 0, "a", 0.2, False, False), (1, 0, "a", np.nan, True, True), (0, 2, "c", 0.4, False, False)]
    t = cds_table(_pairs(rows), 5, 2, held_Q=np.array([4, 1, 0, 1, 1]), rejected_Q=np.array([0, 0, 0, 0, 1])).to_pylist()
    assert t[0]["cds"] == pytest.approx(0.3) and t[0]["images_used"] == 2 and t[0]["status"] == "ok"
    assert t[0]["images_both_empty"] == 1
    assert np.isnan(t[1]["cds"]) and t[1]["status"] == "no usable image"
    assert np.isnan(t[2]["cds"]) and t[2]["status"] == "never fired"
    assert t[3]["cds"] == 1.0 and t[3]["images_left_overlap"] == 1 and t[3]["status"] == "fewer usable images than k_cds"
    assert np.isnan(t[4]["cds"]) and t[4]["status"] == "images rejected" and t[4]["images_rejected"] == 1
    empty = cds_table(_pairs([]), 3, 2, held_Q=np.zeros(3, np.int64)).to_pylist()
    assert [r["status"] for r in empty] == ["never fired"] * 3


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_cds_table_equals_cds_from_scores_per_feature(q, k, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(q):
        for r in range(int(rng.integers(0, 9))):
            s = np.nan if rng.random() < 0.3 else float(rng.random())
            rows.append((f, r, f"i{r}", s, bool(np.isnan(s)), bool(np.isnan(s))))
    rows = [rows[i] for i in rng.permutation(len(rows))]  # the stage's part files come in any order
    t = cds_table(_pairs(rows), q, k, held_Q=np.full(q, 9))
    for f in range(q):
        mine = sorted((r[1], r[3]) for r in rows if r[0] == f)
        expected, used = cds_from_scores(np.array([m[1] for m in mine]), k)
        got = t.column("cds")[f].as_py()
        assert (np.isnan(expected) and np.isnan(got)) or got == pytest.approx(expected)
        assert t.column("images_used")[f].as_py() == used


def test_rerun_of_a_batch_on_the_same_actor_still_reports_it():
    """Ray may rebuild a lost output block by running the batch again on the same actor: the
    second report must still carry the batch's entries (the driver drops the duplicates)."""
    actor = FeatureTopK(2, 2)
    acts, keys = np.array([[1.0, 0.5], [0.2, 0.9]]), np.array([7, 9])
    first = actor.update(acts, keys)
    second = actor.update(acts, keys)
    assert sorted(zip(*map(list, first[:2]))) == sorted(zip(*map(list, second[:2])))
    driver = FeatureTopK(2, 2)
    driver.offer(*second)
    np.testing.assert_array_equal(driver.keys, actor.keys)
