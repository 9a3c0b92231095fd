"""Token sampling and the token table schema."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from scope_ray.tokens import activations_of, sample_positions, token_table


@given(st.text(min_size=1, max_size=20), st.integers(1, 400), st.integers(0, 2**31))
def test_sample_positions_distinct_in_range_and_stable(image_id, n_patches, seed):
    k = min(4, n_patches)
    pos = sample_positions(image_id, n_patches, k, seed)
    assert len(set(pos.tolist())) == k
    assert pos.min() >= 0 and pos.max() < n_patches
    assert np.array_equal(pos, sample_positions(image_id, n_patches, k, seed))


def test_sample_positions_depend_on_seed_and_image():
    draws = {tuple(sample_positions(f"img{i}", 196, 4, 0)) for i in range(50)}
    assert len(draws) > 40
    assert not np.array_equal(sample_positions("a", 196, 4, 0), sample_positions("a", 196, 4, 1))


def test_sample_positions_rejects_impossible_requests():
    with pytest.raises(ValueError):
        sample_positions("a", 3, 4, 0)


def test_token_table_round_trip():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(2, 3, 5)).astype(np.float32)
    pos = np.array([[0, 4, 8], [1, 2, 3]])
    table = token_table(["a", "b"], pos, acts, np.linalg.norm(acts, axis=-1))
    assert table.column("image_id").to_pylist() == ["a"] * 3 + ["b"] * 3
    assert table.column("position").to_pylist() == [0, 4, 8, 1, 2, 3]
    assert np.array_equal(activations_of(table), acts.reshape(-1, 5))
    assert table.schema.field("activation").type.list_size == 5
