"""The sparse training step (scope_ray/sae_step.py) against the dense reference in BatchTopKSAE.loss:
same loss, statistics and gradients to round-off, with and without AuxK, with ties at zero."""

from __future__ import annotations

import copy

import pytest
import torch

from scope_ray.sae import BatchTopKSAE
from scope_ray.sae_step import adam, use_sparse_step

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def make_sae(dead: str, dtype=torch.float32, d: int = 32, f: int = 512, k: int = 8, k_aux: int = 16,
             seed: int = 0) -> tuple[BatchTopKSAE, torch.Tensor]:
    """An SAE with non-trivial biases and input scale, a batch, and ``dead`` latents: none, a few
    (fewer than k_aux), or most (more than k_aux)."""
    torch.manual_seed(seed)
    sae = BatchTopKSAE(d, f, k, k_aux=k_aux, dead_after_tokens=1000).to(dtype)
    x = (torch.randn(256, d) * 4 + 1).to(dtype)
    sae.set_input_scale_from(x)
    sae.init_b_dec(x)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.2)
    n_dead = {"none": 0, "few": 5, "most": 400}[dead]
    sae.tokens_since_fired[torch.randperm(f)[:n_dead]] = 5000
    return sae.train(), x


def one_loss(sae: BatchTopKSAE, x: torch.Tensor, sparse: bool):
    sae = copy.deepcopy(sae)
    sae.sparse_step = sparse
    rec = sae.loss(x, aux_coef=1 / 32)
    rec.total.backward()
    return sae, rec


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dead", ["none", "few", "most"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_sparse_loss_statistics_and_gradients_equal_the_dense_reference(dead, dtype, tol):
    sae, x = make_sae(dead, dtype)
    dense, rd = one_loss(sae, x, sparse=False)
    sparse, rs = one_loss(sae, x, sparse=True)
    assert float(rd.aux) > 0 if dead != "none" else float(rd.aux) == 0
    for name in ("total", "mse", "aux"):
        assert rel_diff(getattr(rs, name).detach(), getattr(rd, name).detach()) <= tol, name
    assert rs.l0 == rd.l0 and rs.dead_fraction == rd.dead_fraction
    assert rs.fvu == pytest.approx(rd.fvu, rel=tol)
    for name in PARAMS:
        assert rel_diff(getattr(sparse, name).grad, getattr(dense, name).grad) <= tol, name
    # θ, dead counters, revivals, tokens seen: the same updates (θ from the same kept values).
    for name, buf in dense.named_buffers():
        assert torch.equal(dict(sparse.named_buffers())[name], buf), name


def test_kept_zeros_and_ties_give_the_dense_gradients():
    # Strongly negative encoder bias: fewer than K·B positive pre-activations, so BatchTopK keeps
    # zeros (ties); they must contribute nothing, in either path.
    sae, x = make_sae("few")
    with torch.no_grad():
        sae.b_enc.fill_(-30.0)
    dense, rd = one_loss(sae, x, sparse=False)
    sparse, rs = one_loss(sae, x, sparse=True)
    assert rd.l0 < sae.k  # zeros were among the kept entries
    assert rs.l0 == rd.l0
    for name in PARAMS:
        assert rel_diff(getattr(sparse, name).grad, getattr(dense, name).grad) <= 2e-5, name
    for name, buf in dense.named_buffers():  # a kept zero is not a firing latent
        assert torch.equal(dict(sparse.named_buffers())[name], buf), name


def test_training_steps_follow_the_dense_steps():
    """Whole steps (projection, Adam, renormalisation, θ EMA, AuxK) stay together over several steps."""
    sae, x = make_sae("few")
    runs = {}
    for sparse in (False, True):
        m = copy.deepcopy(sae)
        m.sparse_step = sparse
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        losses = [float(m.training_step(x[i * 64:(i + 1) * 64].repeat(4, 1), opt).total) for i in range(3)]
        runs[sparse] = (m, losses)
    (md, ld), (ms, ls) = runs[False], runs[True]
    assert ls == pytest.approx(ld, rel=1e-5)
    for name in PARAMS:
        assert rel_diff(getattr(ms, name), getattr(md, name)) <= 1e-4, name
    assert float(ms.threshold) == pytest.approx(float(md.threshold), rel=1e-5)
    assert torch.equal(ms.tokens_since_fired, md.tokens_since_fired)


def test_loss_picks_the_sparse_step_by_size(monkeypatch):
    import scope_ray.sae as sae_module

    calls = []
    monkeypatch.setattr(sae_module, "sparse_loss", lambda *a: calls.append(a) or "sparse")
    big, x = make_sae("none")
    assert big.loss(x) == "sparse"
    small = BatchTopKSAE(8, 32, 4).train()
    assert small.loss(torch.randn(16, 8)).mse.requires_grad and len(calls) == 1  # dense: tiny batch
    assert use_sparse_step(1024, 24_576, 30, torch.device("cpu"))
    assert use_sparse_step(1024, 3_072, 30, torch.device("cpu"))
    assert not use_sparse_step(16, 32, 4, torch.device("cpu"))
    assert not use_sparse_step(1024, 64, 30, torch.device("cpu"))  # K/F too large to gain


def test_adam_is_fused_where_available():
    opt = adam(BatchTopKSAE(8, 32, 4).parameters(), 1e-3)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults.get("fused")


def test_fused_adam_resumes_from_row_major_moments():
    """A checkpoint stores Adam's moments contiguous (row-major); W_enc is column-major. The fused
    kernel needs them in the parameter's layout, or a resumed run silently diverges."""
    sae, x = make_sae("none", f=256)
    opt = adam(sae.parameters(), 1e-3)
    for _ in range(2):
        sae.training_step(x, opt)
    saved = opt.state_dict()
    saved["state"] = {i: {k: v.contiguous().clone() for k, v in st.items()} for i, st in saved["state"].items()}
    resumed_sae = copy.deepcopy(sae)
    resumed = adam(resumed_sae.parameters(), 1e-3)
    resumed.load_state_dict(saved)
    sae.training_step(x, opt)
    resumed_sae.training_step(x, resumed)
    for name in PARAMS:
        assert torch.equal(getattr(resumed_sae, name), getattr(sae, name)), name
