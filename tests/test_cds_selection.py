"""CDS pass 1 selects on the pixels the SCC views show (METHOD §5 step 1): an image whose feature
fires only outside the overlap of its SCC pair is not selected. Pure (no Ray, no model)."""

import numpy as np
import pytest
import torch

from scope_ray.scc import overlap_indices
from scope_ray.stages.cds import overlap_selection_scores
from scope_ray.topk import NO_KEY, FeatureTopK

GRID, SHIFT = 6, 2  # overlap: view-1 rows/cols 2..5, view-2 rows/cols 0..3


def _codes(hits, q=2):
    """[1, N, q] codes with value v at (view row, view col, feature)."""
    z = np.zeros((1, GRID * GRID, q), np.float32)
    for r, c, f, v in hits:
        z[0, r * GRID + c, f] = v
    return z


@pytest.mark.parametrize("as_torch", [False, True])
def test_feature_firing_only_outside_the_overlap_is_not_selected(as_torch):
    idx1, idx2 = overlap_indices(GRID, SHIFT)
    # Image A: feature 0 fires hard, but only where the views do not overlap: view 1's first rows
    # (cut away in view 2) and view 2's last rows (beyond view 1). A centre crop would pick it.
    a1, a2 = _codes([(0, 0, 0, 9.0), (1, 5, 0, 9.0)]), _codes([(5, 5, 0, 9.0), (2, 4, 0, 9.0)])
    # Image B: feature 0 fires weakly inside the overlap (view 1 cell (3, 3) = view 2 cell (1, 1)).
    b1, b2 = _codes([(3, 3, 0, 0.5)]), _codes([(1, 1, 0, 0.4), (0, 5, 1, 7.0)])
    z1, z2 = np.concatenate([a1, b1]), np.concatenate([a2, b2])
    if as_torch:
        z1, z2 = torch.from_numpy(z1), torch.from_numpy(z2)
    scores = overlap_selection_scores(z1, z2, idx1, idx2)
    scores = scores.numpy() if as_torch else scores
    # A: 0 for feature 0 (nothing in the overlap); B: 0.5 (view 1's overlap max). Feature 1 fires
    # on B only at view 2 (0, 5): column 5 is outside view 2's overlap columns 0..3.
    np.testing.assert_array_equal(scores, [[0.0, 0.0], [0.5, 0.0]])
    topk = FeatureTopK(2, 2)
    topk.update(scores, np.array([11, 22]))
    assert topk.keys[0].tolist() == [22, NO_KEY]  # only B, although A's max over all tokens is 18x B's
    assert topk.keys[1].tolist() == [NO_KEY, NO_KEY]


def test_both_views_count_and_the_max_is_taken():
    idx1, idx2 = overlap_indices(GRID, SHIFT)
    # The feature fires in the overlap of view 2 only (it left view 1's overlap): still selectable,
    # and pass 2 scores it 1 (one empty map) instead of skipping it.
    z1 = _codes([(0, 3, 0, 4.0)])  # view-1 row 0: outside the overlap
    z2 = _codes([(3, 3, 0, 2.0)])  # view-2 cell (3, 3): inside
    assert overlap_selection_scores(z1, z2, idx1, idx2).tolist() == [[2.0, 0.0]]
