"""fit_probe: the pure probe-training loop every trial, test and benchmark shares."""

import math

import numpy as np
import pytest
import torch

from scope_ray.probes.train import FitState, ProbeSpec, evaluate, fit_probe

D, N, S = 6, 4, 4  # width, patch tokens (2x2 grid), image size


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These fits are a few hundred tiny matmuls: a second intra-op thread only adds OpenMP
    hand-offs, which cost seconds per fit on a loaded 2-core machine (0.1 s with one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    fit = fit_probe(_spec(), _classes(64, 0), _classes(32, 1),
                    on_epoch=lambda e, m, h, last, state: seen.append((e, last)))
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


def _checkpoints(spec, train, val, every, tmp_path):
    """Fit with checkpoints saved to disk as the Train worker does; returns the fit and {epoch: dir}."""
    saved = {}

    def save(epoch, metrics, head, last, state):
        if state is not None:
            d = tmp_path / f"epoch{epoch}"
            d.mkdir()
            state.save(str(d))
            saved[epoch] = d

    return fit_probe(spec, train, val, on_epoch=save, checkpoint_every=every), saved


@pytest.mark.parametrize("task", ["classification", "depth"])
def test_a_fit_resumed_from_a_saved_state_ends_exactly_as_an_uninterrupted_one(task, tmp_path):
    spec = _spec(task, epochs=7, lr=0.3)
    data = _classes if task == "classification" else _depth
    train, val = data(40, 0), data(16, 1)  # 40 rows / batch 8: momentum, schedule and shuffling all matter
    whole, saved = _checkpoints(spec, train, val, 3, tmp_path)
    assert sorted(saved) == [3, 6, 7]  # every 3 epochs and after the last
    for k in (3, 6):
        state = FitState.load(str(saved[k]))
        assert state.epoch == k and len(state.curve) == k and state.momentum  # momentum buffers were saved
        seen = []
        resumed = fit_probe(spec, train, val, resume=state, on_epoch=lambda e, m, h, last, s: seen.append(e))
        assert seen == list(range(k + 1, 8))
        assert resumed.curve == whole.curve and resumed.train_loss == whole.train_loss
        assert resumed.samples_seen == whole.samples_seen
        w, r = whole.head.state_dict(), resumed.head.state_dict()
        assert all(torch.equal(w[name], r[name]) for name in w)
    # A finished state is the fit itself: nothing left to train.
    done = fit_probe(spec, train, val, resume=FitState.load(str(saved[7])), on_epoch=lambda *a: pytest.fail("trained"))
    assert done.curve == whole.curve


def test_each_part_of_the_state_is_needed_for_an_exact_resume(tmp_path):
    """Dropping the momentum, the schedule position or the shuffling state changes the result, so
    the equality above is not an accident of a state that does not matter."""
    spec, train, val = _spec(epochs=6, lr=0.3), _classes(40, 0), _classes(16, 1)
    whole, saved = _checkpoints(spec, train, val, 3, tmp_path)
    state = FitState.load(str(saved[3]))
    fresh_rng = np.random.default_rng(0).bit_generator.state
    for broken in (dict(momentum={}), dict(rng=fresh_rng), dict(scheduler={**state.scheduler, "last_epoch": 0})):
        fit = fit_probe(spec, train, val, resume=FitState(**{**vars(state), **broken}))
        w, r = whole.head.state_dict(), fit.head.state_dict()
        assert not all(torch.equal(w[name], r[name]) for name in w), broken.keys()


def test_state_is_safetensors_and_json_and_only_resumes_its_own_fit(tmp_path):
    spec, train, val = _spec(epochs=2), _classes(16, 0), _classes(8, 1)
    _, saved = _checkpoints(spec, train, val, 1, tmp_path)
    assert sorted(p.name for p in saved[1].iterdir()) == ["head.safetensors", "optimizer.safetensors", "state.json"]
    state = FitState.load(str(saved[1]))
    with pytest.raises(ValueError, match="cannot resume"):
        fit_probe(_spec(epochs=2, lr=0.2), train, val, resume=state)
    with pytest.raises(ValueError, match="cannot resume"):
        fit_probe(spec, _classes(24, 0), val, resume=state)
    with pytest.raises(ValueError, match="checkpoint_every"):
        fit_probe(spec, train, val, checkpoint_every=0)


def test_spec_checks_its_task_and_classes():
    with pytest.raises(ValueError, match="unknown probe task"):
        _spec("detection")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        _spec("segmentation", num_classes=1)
