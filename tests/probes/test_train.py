"""fit_probe: the pure probe-training loop every trial, test and benchmark shares."""

import math

import numpy as np
import pytest
import torch

from scope_ray.probes.train import ProbeSpec, evaluate, fit_probe

D, N, S = 6, 4, 4  # width, patch tokens (2x2 grid), image size


def _classes(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (np.eye(D, dtype=np.float32)[y] * 3 + rng.normal(size=(n, D))).astype(np.float32)
    return {"x": x, "y": y}


def _depth(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(n, N, D)).astype(np.float32)
    per_token = 1.0 + 2.0 / (1.0 + np.exp(-2.0 * tokens[:, :, 0]))
    depth = per_token.reshape(n, 2, 2).repeat(2, 1).repeat(2, 2).astype(np.float32)
    depth[:, 0, 0] = np.nan  # an invalid pixel: masked in the loss and the metric
    return {"cls": tokens.mean(1), "tokens": tokens, "depth": depth}


def _spec(task="classification", **kw) -> ProbeSpec:
    base = dict(task=task, width=D, image_size=S, epochs=5, batch_size=8, lr=0.3, weight_decay=1e-5, seed=3,
                num_classes=3 if task != "depth" else None, depth_bins=16, max_depth=4.0)
    return ProbeSpec(**{**base, **kw})


def test_learns_is_deterministic_and_reports_every_epoch():
    seen = []
    fit = fit_probe(_spec(), _classes(64, 0), _classes(32, 1), on_epoch=lambda e, m, h, last: seen.append((e, last)))
    assert fit.value > 0.8 and not fit.diverged  # separable classes: far above chance (1/3)
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, True)]
    assert len(fit.curve) == 5 and fit.curve[-1] == fit.value and fit.samples_seen == 5 * 64
    again = fit_probe(_spec(), _classes(64, 0), _classes(32, 1))
    assert again.curve == fit.curve
    # The seed is used: another seed gives other weights.
    w3 = fit.head.state_dict()
    w4 = fit_probe(_spec(seed=4), _classes(64, 0), _classes(32, 1)).head.state_dict()
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)


def test_does_not_touch_the_callers_random_stream():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    fit_probe(_spec(epochs=1), _classes(16, 0), _classes(8, 1))
    assert torch.equal(torch.rand(3), expected)


def test_a_blown_up_fit_is_diverged_with_nan_not_an_error():
    fit = fit_probe(_spec(lr=1e12, epochs=3), _classes(32, 0), _classes(16, 1))
    assert fit.diverged and math.isnan(fit.value)


def test_depth_probe_improves_and_scores_rmse_on_valid_pixels_only():
    train, val = _depth(64, 0), _depth(32, 1)
    spec = _spec("depth", epochs=8, lr=0.5)
    untrained = evaluate(spec, fit_probe(_spec("depth", epochs=1, lr=1e-9), train, val).head, val)
    fit = fit_probe(spec, train, val)
    assert math.isfinite(fit.value) and fit.value < untrained


def test_spec_checks_its_task_and_classes():
    with pytest.raises(ValueError, match="unknown probe task"):
        _spec("detection")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        _spec("segmentation", num_classes=1)
