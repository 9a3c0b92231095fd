"""sae_metrics and MetricAccumulator: FVU, L0, CS per METHOD §2, one-shot and streamed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scope_ray.metrics import MetricAccumulator, sae_metrics


def numpy_reference(x, x_hat, z) -> dict[str, float]:
    """METHOD §2 written out plainly, token by token."""
    x, x_hat, z = (np.asarray(a, dtype=np.float64) for a in (x, x_hat, z))
    x_bar = x.mean(axis=0)
    err = sum(float(np.sum((x[i] - x_hat[i]) ** 2)) for i in range(len(x)))
    var = sum(float(np.sum((x[i] - x_bar) ** 2)) for i in range(len(x)))
    l0 = np.mean([np.count_nonzero(z[i]) for i in range(len(z))])
    cos = [float(x[i] @ x_hat[i]) / (np.linalg.norm(x[i]) * np.linalg.norm(x_hat[i])) for i in range(len(x))]
    return {"fvu": err / var, "l0": float(l0), "cs": float(np.mean(cos))}


def random_batch(rng: np.random.Generator, n: int, d: int = 16, f: int = 40, offset: float = 3.0):
    x = rng.normal(size=(n, d)) + offset
    x_hat = x + rng.normal(scale=0.5, size=(n, d))
    z = rng.exponential(size=(n, f)) * (rng.random((n, f)) < 0.2)
    return x, x_hat, z


@pytest.mark.parametrize("as_torch", [False, True])
def test_sae_metrics_matches_numpy_reference(as_torch):
    rng = np.random.default_rng(0)
    x, x_hat, z = random_batch(rng, 300)
    x, x_hat, z = (a.astype(np.float32) for a in (x, x_hat, z))
    expected = numpy_reference(x, x_hat, z)
    args = tuple(torch.from_numpy(a) for a in (x, x_hat, z)) if as_torch else (x, x_hat, z)
    got = sae_metrics(*args)
    assert set(got) == {"fvu", "l0", "cs"} and all(isinstance(v, float) for v in got.values())
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    assert 0 < got["fvu"] < 1 and 0 < got["cs"] < 1 and 0 < got["l0"] < 40


def test_hand_cases():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    perfect = sae_metrics(x, x, np.array([[1, 0, 0], [0, 2, 0], [1, 1, 1]]))
    assert perfect == {"fvu": 0.0, "l0": 5 / 3, "cs": pytest.approx(1.0)}
    mean_only = sae_metrics(x, np.broadcast_to(x.mean(axis=0), x.shape), np.zeros((3, 3)))
    assert mean_only["fvu"] == pytest.approx(1.0) and mean_only["l0"] == 0.0
    # A zero reconstruction has no direction: its cosine counts as 0.
    assert sae_metrics(x, np.zeros_like(x), np.zeros((3, 1)))["cs"] == 0.0
    assert np.isnan(sae_metrics(np.ones((4, 2)), np.zeros((4, 2)), np.zeros((4, 1)))["fvu"])  # no variance


def test_leading_dims_are_tokens():
    rng = np.random.default_rng(1)
    x, x_hat, z = random_batch(rng, 24)
    flat = sae_metrics(x, x_hat, z)
    assert sae_metrics(x.reshape(2, 12, -1), x_hat.reshape(2, 12, -1), z.reshape(2, 12, -1)) == flat


def test_bad_shapes_and_empty_input():
    with pytest.raises(ValueError, match="shapes"):
        sae_metrics(np.zeros((4, 3)), np.zeros((4, 2)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shapes"):
        sae_metrics(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="no tokens"):
        sae_metrics(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 5)))


@pytest.mark.parametrize("offset", [3.0, 1e5])
def test_accumulator_over_batches_equals_one_shot(offset):
    # offset 1e5, unit variance: Σ‖x‖² − N‖x̄‖² would lose ~10 of float64's 16 digits (error ≈ 1e-6).
    rng = np.random.default_rng(2)
    batches = [random_batch(rng, n, offset=offset) for n in (1, 17, 64, 3, 115)]
    acc = MetricAccumulator()
    for x, x_hat, z in batches:
        acc.update(torch.from_numpy(x), torch.from_numpy(x_hat), torch.from_numpy(z))
    whole = [np.concatenate(parts) for parts in zip(*batches)]
    expected = sae_metrics(*whole)
    got = acc.result()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
    assert got["fvu"] == pytest.approx(numpy_reference(*whole)["fvu"], rel=1e-9)
    assert acc.n_tokens == 200
    np.testing.assert_array_equal(acc.fire_counts, (whole[2] != 0).sum(axis=0))
    np.testing.assert_allclose(acc.firing_rate(), (whole[2] != 0).mean(axis=0))


def test_merging_accumulators_equals_one_pass():
    rng = np.random.default_rng(3)
    batches = [random_batch(rng, n) for n in (10, 30, 7, 50)]
    one, left, right = MetricAccumulator(), MetricAccumulator(), MetricAccumulator()
    for i, b in enumerate(batches):
        one.update(*b)
        (left if i < 2 else right).update(*b)
    merged = left.merge(right).result()
    for key, value in one.result().items():
        assert merged[key] == pytest.approx(value, rel=1e-12)
    np.testing.assert_array_equal(left.fire_counts, one.fire_counts)
    with pytest.raises(ValueError, match="merge"):
        one.merge(MetricAccumulator().update(*random_batch(rng, 5, f=7)))


def test_read_only_arrays_are_accepted():
    rng = np.random.default_rng(4)
    x, x_hat, z = random_batch(rng, 8)
    for a in (x, x_hat, z):
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sae_metrics(x, x_hat, z) == sae_metrics(x.copy(), x_hat.copy(), z.copy())
