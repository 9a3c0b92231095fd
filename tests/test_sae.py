"""BatchTopKSAE: BatchTopK sparsity, decoder constraints, threshold rule, input scaling, files, AuxK, training."""

from __future__ import annotations

import pickle
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_ray.metrics import sae_metrics
from scope_ray.sae import BatchTopKSAE, batch_topk


def sparse_synthetic(n: int, d: int = 32, n_true: int = 64, k_true: int = 4, offset: float = 0.0,
                     seed: int = 0) -> torch.Tensor:
    """Tokens that are sparse non-negative combinations of ``n_true`` fixed random unit directions."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_true, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_true, generator=g).argsort(dim=1)[:, :k_true]
    coef = torch.zeros(n, n_true).scatter(1, idx, torch.rand(n, k_true, generator=g) * 2 + 0.5)
    return coef @ atoms + offset


def random_sae(seed: int = 0, d: int = 8, f: int = 32, k: int = 4, scale: bool = True) -> BatchTopKSAE:
    """An SAE with non-trivial biases, input scale (≈0.2 when ``scale``) and an estimated θ."""
    torch.manual_seed(seed)
    sae = BatchTopKSAE(d, f, k)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3)
        sae.b_dec.normal_(0.0, 0.3)
    if scale:
        sae.set_input_scale_from(torch.randn(256, d) * 5 + 1)
    sae.train()
    for _ in range(3):
        sae(torch.randn(64, d) * 5 + 1)
    return sae.eval()


# --- BatchTopK ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 12), f=st.integers(1, 40), data=st.data(),
       ties=st.sampled_from(["none", "repeated_rows", "all_equal"]))
def test_batch_topk_keeps_exactly_k_times_b(b, f, data, ties):
    k = data.draw(st.integers(1, f))
    seed = data.draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    sae = BatchTopKSAE(4, f, k)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so each kept entry is non-zero
        if ties == "all_equal":
            sae.W_enc.zero_()
    x = torch.randn(b, 4)
    if ties == "repeated_rows":
        x = x[torch.arange(b) % 2]  # at most two distinct rows: every value appears ≥ b//2 times
    sae.train()
    _, z = sae(x)
    pre = sae.pre_acts(x)
    assert int((z != 0).sum()) == k * b
    kept = z != 0
    assert torch.equal(z[kept], pre[kept])
    if (~kept).any():
        assert pre[kept].min() >= pre[~kept].max()


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 12), f=st.integers(1, 40), data=st.data())
def test_batch_topk_never_keeps_more_than_k_times_b(b, f, data):
    k = data.draw(st.integers(1, f))
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    pre = torch.relu(torch.randn(b, f)).round()  # many exact ties, many zeros
    z, kept = batch_topk(pre, k)
    assert kept.numel() == k * b
    assert int((z != 0).sum()) == min(k * b, int((pre > 0).sum()))


# --- decoder constraints --------------------------------------------------------------------------
def test_decoder_atoms_stay_unit_norm_through_training():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, 4).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(10):
        sae.training_step(torch.randn(32, 16) * 3, opt)
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(64), atol=1e-5, rtol=0)


def test_remove_parallel_grad_leaves_gradients_orthogonal_to_atoms():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, 4).train()
    sae.loss(torch.randn(32, 16) * 3).total.backward()
    grad = sae.W_dec.grad.clone()
    along = (grad * sae.W_dec).sum(dim=1)
    assert along.abs().max() > 1e-3  # there was something to remove
    sae.remove_parallel_grad()
    residual = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert residual.abs().max() < 1e-5 * along.abs().max()
    torch.testing.assert_close(sae.W_dec.grad, grad - along[:, None] * sae.W_dec)


# --- threshold ------------------------------------------------------------------------------------
def test_eval_mode_is_jumprelu_at_theta():
    sae = random_sae(scale=False)
    x = torch.randn(50, 8) * 5 + 1
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    theta = sae.threshold
    assert 0 < (pre > theta).sum() < (pre > 0).sum()  # θ actually removes some activations
    with torch.no_grad():
        x_hat, z = sae(x)
    assert torch.equal(z, pre * (pre > theta))
    assert torch.equal(sae.encode(x), z)
    assert torch.equal(x_hat, z @ sae.W_dec + sae.b_dec)


def test_equations_hold_in_the_scaled_space():
    sae = random_sae(scale=True)
    s = sae.input_scale
    assert abs(float(s) - 1) > 0.5
    x = torch.randn(50, 8) * 5 + 1
    pre_s = torch.relu((x * s - sae.b_dec) @ sae.W_enc + sae.b_enc)  # METHOD §2 on scaled inputs
    z_s = pre_s * (pre_s > sae.threshold)
    with torch.no_grad():
        x_hat, z = sae(x)
        torch.testing.assert_close(z, z_s / s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_hat, (z_s @ sae.W_dec + sae.b_dec) / s, rtol=1e-5, atol=1e-5)
        z_topk = sae.encode(x, use_threshold=False)
        mse = ((x - sae.decode(z_topk)) * s).pow(2).sum(dim=1).mean()
        torch.testing.assert_close(sae.loss(x, aux_coef=0.0).mse, mse)


def test_theta_is_ema_of_smallest_kept_activation():
    sae = BatchTopKSAE(4, 4, 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    sae.train()
    assert float(sae.threshold) == 0.0
    sae(torch.tensor([[5.0, 1, 0, 0], [0, 0, 3, 2]]))  # keeps 5 and 3
    assert float(sae.threshold) == pytest.approx(3.0)  # the first estimate replaces the 0 sentinel
    sae(torch.tensor([[1.0, 4, 0, 0], [0, 0, 0, 6]]))  # keeps 6 and 4
    assert float(sae.threshold) == pytest.approx(0.99 * 3 + 0.01 * 4)
    sae(torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0]]))  # keeps 2 and a zero: zeros do not count
    assert float(sae.threshold) == pytest.approx(0.99 * 3.01 + 0.01 * 2)
    before = float(sae.threshold)
    sae(torch.zeros(2, 4))  # nothing positive kept: θ unchanged
    assert float(sae.threshold) == before
    sae.eval()
    with torch.no_grad():
        sae(torch.zeros(3, 4))  # eval mode leaves θ and counters alone
    assert float(sae.threshold) == before and int(sae.num_tokens_seen) == 8


def test_theta_is_stored_in_the_scaled_space():
    sae = BatchTopKSAE(4, 4, 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.input_scale.fill_(2.0)
    sae.train()
    sae(torch.tensor([[5.0, 1, 0, 0], [0, 0, 3, 2]]))
    assert float(sae.threshold) == pytest.approx(6.0)  # 3 in input units
    sae.eval()
    z = sae.encode(torch.tensor([[2.9, 3.1, 0, 0]]))
    assert torch.equal(z, torch.tensor([[0.0, 3.1, 0, 0]]))


def test_eval_without_an_estimated_theta_is_an_error():
    sae = BatchTopKSAE(8, 16, 2).eval()
    with pytest.raises(RuntimeError, match="never estimated"):
        sae(torch.randn(4, 8))
    assert int((sae.encode(torch.randn(4, 8), use_threshold=False) != 0).sum()) <= 8
    with pytest.raises(RuntimeError, match="train mode"):
        sae.training_step(torch.randn(4, 8), torch.optim.SGD(sae.parameters(), lr=0.1))


def test_dead_latent_counters():
    sae = BatchTopKSAE(4, 4, 1, dead_after_tokens=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
    sae.train()
    sae(torch.tensor([[5.0, 0, 0, 0], [0, 3, 0, 0]]))
    assert sae.tokens_since_fired.tolist() == [0, 0, 2, 2]
    sae(torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 1]]))
    assert sae.tokens_since_fired.tolist() == [0, 2, 4, 0]
    assert sae.dead_mask().tolist() == [False, False, True, False]
    assert int(sae.num_tokens_seen) == 4
    assert int(sae.revived_total) == 0  # latent 3 fired after 2 silent tokens: never dead
    sae(torch.tensor([[0, 0, 7.0, 0], [0, 0, 0, 0]]))  # latent 2, dead (4 > 3), fires: one revival
    assert int(sae.revived_total) == 1
    assert sae.tokens_since_fired.tolist() == [2, 4, 0, 2]
    assert "revived_total" not in sae.state_dict()  # a log counter, not part of the saved SAE


# --- input scale and folding ----------------------------------------------------------------------
def test_input_scale_makes_mean_squared_norm_d():
    sae = BatchTopKSAE(8, 16, 2)
    sample = torch.randn(1000, 8) * 7 + 3
    s = sae.set_input_scale_from(sample)
    assert float((sample * s).pow(2).sum(dim=1).mean()) == pytest.approx(8.0, rel=1e-5)


def test_set_input_scale_does_not_change_the_function():
    sae = random_sae(scale=False)
    x = torch.randn(20, 8) * 5 + 1
    with torch.no_grad():
        x_hat, z = sae(x)
        sae.set_input_scale_from(x * 10)
        x_hat2, z2 = sae(x)
    torch.testing.assert_close(x_hat2, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-6)


def test_fold_input_scale_keeps_outputs_and_sets_scale_to_one():
    sae = random_sae(scale=True)
    x = torch.randn(40, 8) * 5 + 1
    with torch.no_grad():
        x_hat, z = sae(x)
        z_topk = sae.encode(x, use_threshold=False)
        b_enc = sae.b_enc.clone()
        sae.fold_input_scale()
        x_hat2, z2 = sae(x)
    assert float(sae.input_scale) == 1.0
    assert not torch.allclose(sae.b_enc, b_enc)  # the fold did rewrite the weights
    torch.testing.assert_close(x_hat2, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5)
    # By construction (same division at run time and at fold time) it is even bit-exact.
    assert torch.equal(x_hat2, x_hat) and torch.equal(z2, z)
    assert torch.equal(sae.encode(x, use_threshold=False), z_topk)


# --- files ----------------------------------------------------------------------------------------
def assert_same_function(a: BatchTopKSAE, b: BatchTopKSAE, x: torch.Tensor) -> None:
    with torch.no_grad():
        xa, za = a(x)
        xb, zb = b(x)
        assert torch.equal(za, zb) and torch.equal(xa, xb)
        assert torch.equal(a.encode(x, use_threshold=False), b.encode(x, use_threshold=False))
        assert torch.equal(a.decode(za), b.decode(za))


def test_save_load_reproduces_outputs_exactly(tmp_path, monkeypatch):
    sae = random_sae(scale=True)
    scale_before, b_enc_before = float(sae.input_scale), sae.b_enc.clone()
    path = tmp_path / "sub" / "sae.safetensors"
    sae.save(path)
    assert float(sae.input_scale) == scale_before and torch.equal(sae.b_enc, b_enc_before)  # original untouched

    def no_pickle(*args, **kwargs):
        raise AssertionError("load used pickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = BatchTopKSAE.load(path)
    monkeypatch.undo()

    assert not loaded.training
    assert float(loaded.input_scale) == 1.0  # folded into the saved weights
    assert loaded.config() == sae.config()
    assert torch.equal(loaded.tokens_since_fired, sae.tokens_since_fired)
    assert_same_function(sae, loaded, torch.randn(64, 8) * 5 + 1)
    assert path.read_bytes()[8:9] == b"{"  # safetensors: u64 header length, then a JSON header


def test_load_rejects_pickles_and_foreign_files(tmp_path):
    sae = random_sae()
    evil = tmp_path / "evil.safetensors"
    torch.save(sae.state_dict(), evil)  # a pickle under a safetensors name
    with pytest.raises(ValueError, match="evil.safetensors"):
        BatchTopKSAE.load(evil)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        BatchTopKSAE.load(garbage)
    import safetensors.torch

    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))  # valid safetensors, not an SAE
    with pytest.raises(ValueError, match="foreign.safetensors"):
        BatchTopKSAE.load(foreign)


def test_save_load_through_s3(s3_bucket):
    bucket, endpoint = s3_bucket
    sae = random_sae(scale=True)
    uri = f"{bucket}/saes/sae.safetensors"
    sae.save(uri, endpoint_url=endpoint)
    assert_same_function(sae, BatchTopKSAE.load(uri, endpoint_url=endpoint), torch.randn(16, 8) * 5 + 1)


# --- training -------------------------------------------------------------------------------------
def train(sae: BatchTopKSAE, data: torch.Tensor, steps: int, aux_coef: float, lr: float = 3e-3,
          batch: int = 256) -> None:
    sae.set_input_scale_from(data)
    sae.init_b_dec(data)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        sae.training_step(data[torch.randint(0, len(data), (batch,), generator=g)], opt, aux_coef=aux_coef)


def test_auxk_revives_dead_latents():
    data = sparse_synthetic(8192)

    def dead_after_training(aux_coef: float) -> int:
        torch.manual_seed(0)
        sae = BatchTopKSAE(32, 128, 4, k_aux=64, dead_after_tokens=2048)
        with torch.no_grad():
            sae.W_enc[:, :96] *= 0.05  # 96 latents start too weak to ever win BatchTopK
        train(sae, data, steps=300, aux_coef=aux_coef)
        revivals[aux_coef] = int(sae.revived_total)
        return int(sae.dead_mask().sum())

    revivals: dict[float, int] = {}

    dead_without, dead_with = dead_after_training(0.0), dead_after_training(1 / 32)
    assert revivals[1 / 32] > revivals[0.0]  # the revival counter sees AuxK's work
    print(f"dead latents after 300 steps: without AuxK {dead_without}/128, with AuxK {dead_with}/128")
    assert dead_without > 0
    assert dead_with < dead_without


def test_training_recovers_sparse_synthetic_data():
    t0 = time.perf_counter()
    data = sparse_synthetic(24_000, offset=1.0)
    train_x, test_x = data[:20_000], data[20_000:]
    torch.manual_seed(0)
    sae = BatchTopKSAE(32, 128, 4, k_aux=64, dead_after_tokens=5000)
    train(sae, train_x, steps=300, aux_coef=1 / 32)
    sae.eval()
    with torch.no_grad():
        x_hat, z = sae(test_x)
    m = sae_metrics(test_x, x_hat, z)
    print(f"held-out, eval mode (θ = {float(sae.threshold / sae.input_scale):.3f}): {m}, "
          f"{time.perf_counter() - t0:.1f} s")
    assert m["fvu"] < 0.3
    assert 0.6 * sae.k <= m["l0"] <= 1.4 * sae.k


def test_prefiltered_topk_selects_exactly_what_full_topk_selects():
    """The sampled-threshold path of batch_topk (large batches) is exact, and gradients flow."""
    from scope_ray.sae import _PREFILTER_MIN_ENTRIES

    for seed, (b, f, k) in enumerate([(256, 512, 8), (1024, 3072, 30), (300, 1000, 50)]):
        g = torch.Generator().manual_seed(seed)
        pre = torch.relu(torch.randn(b, f, generator=g)).requires_grad_(True)
        assert pre.numel() >= _PREFILTER_MIN_ENTRIES
        z, kept = batch_topk(pre, k)
        ref_vals, ref_idx = pre.detach().flatten().topk(k * b)
        nz = z.detach().flatten().nonzero().squeeze(1)
        assert set(nz.tolist()) == set(ref_idx[ref_vals > 0].tolist())
        assert torch.equal(torch.sort(kept.detach()).values, torch.sort(ref_vals).values)
        z.sum().backward()
        assert torch.equal(pre.grad.flatten() != 0, z.detach().flatten() != 0)
    # Mostly zeros (fewer positive entries than K·B): the cut is 0 and the result still matches.
    pre = torch.zeros(512, 512)
    pre[0, :10] = torch.arange(1.0, 11.0)
    z, kept = batch_topk(pre, 4)
    assert int((z != 0).sum()) == 10 and kept.numel() == 4 * 512
