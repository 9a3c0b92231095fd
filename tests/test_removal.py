"""Feature-group removal (METHOD §8): identity, error term kept, additivity, units, validation,
the ViT edit hook (patch tokens only) and the seeded random control group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_ray.models import build_model
from scope_ray.removal import random_group, removal_edit, remove_features
from scope_ray.sae import BatchTopKSAE

D, F = 8, 32


def random_sae(seed: int = 0, d: int = D, f: int = F, scale_from: torch.Tensor | None = None) -> BatchTopKSAE:
    """Eval-mode SAE with non-zero biases, an input scale ≠ 1 and θ > 0 (so encode uses JumpReLU)."""
    g = torch.Generator().manual_seed(seed)
    sae = BatchTopKSAE(d, f, k=4)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(f, d, generator=g))
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.copy_(torch.randn(f, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.3)
    sample = torch.randn(256, d, generator=g) * 3 + 1 if scale_from is None else scale_from
    sae.set_input_scale_from(sample)
    with torch.no_grad():
        # θ (stored in the scaled space) at the median positive pre-activation: about half fire.
        pre = sae.pre_acts(sample)
        sae.threshold.fill_(float(pre[pre > 0].median() * sae.input_scale))
    return sae.eval()


def tokens(n: int = 64, d: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1


SAE = random_sae()
X = tokens()
Z = SAE.encode(X)
assert (Z > 0).any(dim=0).sum() > F // 2  # most features fire somewhere: the tests below bite
group = st.lists(st.integers(0, F - 1), max_size=F)


def contribution(x: torch.Tensor, features) -> torch.Tensor:
    return x - remove_features(x, SAE, torch.as_tensor(features, dtype=torch.long))


# ---- the formula ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("empty", [[], (), torch.empty(0, dtype=torch.long), np.array([], dtype=np.int32)])
def test_removing_no_features_is_the_identity(dtype, empty):
    x = X.to(dtype)
    out = remove_features(x, SAE, empty)
    assert out.dtype == dtype and torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()  # a copy: editing the result never edits x


def test_removing_all_features_leaves_the_error_term_and_decoder_bias():
    out = remove_features(X, SAE, torch.arange(F))
    expected = X - SAE.decode(Z) + SAE.decode(torch.zeros(1, F))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # decode(0) is b_dec in input units (stored scaled): the error term x − x̂ is untouched.
    torch.testing.assert_close(SAE.decode(torch.zeros(1, F))[0], SAE.b_dec / SAE.input_scale)


@settings(max_examples=40, deadline=None)
@given(group)
def test_removal_subtracts_code_times_atom_in_input_units(features):
    # Rows of W_dec are the atoms in the backbone's units (input scale folded), z from the JumpReLU.
    ids = sorted(set(features))
    expected = X - Z[:, ids] @ SAE.W_dec[ids].detach()
    torch.testing.assert_close(remove_features(X, SAE, features), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.sets(st.integers(0, F - 1)), st.sets(st.integers(0, F - 1)))
def test_removal_is_additive_over_disjoint_groups(a, b):
    a, b = sorted(a), sorted(b - a)
    # z is computed once on the original x, so contributions of disjoint groups add up.
    torch.testing.assert_close(contribution(X, a + b), contribution(X, a) + contribution(X, b),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(group)
def test_duplicates_count_once_and_order_does_not_matter(features):
    once = remove_features(X, SAE, sorted(set(features)))
    assert torch.equal(remove_features(X, SAE, features), once)
    assert torch.equal(remove_features(X, SAE, features[::-1] + features), once)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tokens_where_no_group_feature_fires_are_bitwise_unchanged(dtype):
    x = X.to(dtype)
    z = SAE.encode(x)
    feature = int((z > 0).sum(dim=0).argmax())  # fires on some tokens, not on all
    silent = z[:, feature] == 0
    assert silent.any() and (~silent).any()
    out = remove_features(x, SAE, [feature])
    assert out.dtype == dtype
    assert torch.equal(out[silent], x[silent])
    assert not torch.equal(out[~silent], x[~silent])


def test_any_leading_shape_and_no_graph():
    x = X.reshape(4, 2, 8, D).requires_grad_(True)
    out = remove_features(x, SAE, [0, 3, 7])
    assert out.shape == x.shape and not out.requires_grad
    assert torch.equal(out.reshape(-1, D), remove_features(X, SAE, [0, 3, 7]))


# ---- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("features", [
    [-1], [F], [0, F + 5], torch.tensor([2.0]), [1.5], torch.tensor([True, False]),
    torch.tensor([[1, 2]]), torch.tensor(3), ["a"], np.array([1.0]),
])
def test_bad_groups_raise_value_error(features):
    with pytest.raises(ValueError, match="feature"):
        remove_features(X, SAE, features)
    with pytest.raises(ValueError, match="feature"):
        removal_edit(SAE, features)  # eager: fails before any forward pass


def test_bad_tokens_raise_value_error():
    with pytest.raises(ValueError, match="width"):
        remove_features(torch.zeros(3, D + 1), SAE, [0])
    with pytest.raises(ValueError, match="floating"):
        remove_features(torch.zeros(3, D, dtype=torch.long), SAE, [0])


def test_unestimated_threshold_is_refused():
    fresh = BatchTopKSAE(D, F, k=4)
    with pytest.raises(RuntimeError, match="threshold"):
        remove_features(X, fresh, [0])


# ---- through the ViT --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    model = build_model("demo-vit-tiny", weights="none", seed=0)
    size = model.spec.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    pixels = model.preprocess(images)
    with torch.no_grad():
        layer_tokens = model.forward_layer(pixels).patch_tokens
    sae = random_sae(seed=3, d=model.width, f=96, scale_from=layer_tokens.reshape(-1, model.width))
    assert float(sae.threshold) > 0
    return model, pixels, sae


def test_empty_edit_leaves_final_tokens_bitwise_unchanged(vit):
    model, pixels, sae = vit
    with torch.no_grad():
        assert torch.equal(model.final_tokens(pixels, edit=removal_edit(sae, [])), model.final_tokens(pixels))


def test_edit_changes_patch_tokens_only_at_the_designated_block(vit):
    model, pixels, sae = vit
    p = model.num_prefix_tokens
    with torch.no_grad():
        z = sae.encode(model.forward_layer(pixels).patch_tokens.reshape(-1, model.width))
    features = (z > 0).sum(dim=0).topk(5).indices  # features that do fire on these patches
    seen: dict[str, torch.Tensor] = {}
    # Registered before final_tokens adds its edit hook, so this sees the block's unedited output;
    # the next block's input is what the edit hook handed on.
    h_out = model.block.register_forward_hook(lambda _m, _a, out: seen.__setitem__("block_out", out.clone()))
    h_next = model.blocks[model.layer].register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("next_in", args[0].clone()))
    try:
        with torch.no_grad():
            edited = model.final_tokens(pixels, edit=removal_edit(sae, features))
    finally:
        h_out.remove()
        h_next.remove()
    before, after = seen["block_out"], seen["next_in"]
    assert torch.equal(after[:, :p], before[:, :p])  # CLS untouched
    assert torch.equal(after[:, p:], remove_features(before[:, p:], sae, features))
    assert not torch.equal(after[:, p:], before[:, p:])
    with torch.no_grad():
        assert not torch.equal(edited, model.final_tokens(pixels))
    assert not model.block._forward_hooks  # final_tokens removed its hook


# ---- the random control group -----------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.data(), st.integers(0, 2**31 - 1))
def test_random_group_is_seeded_distinct_and_of_the_asked_size(q, data, seed):
    size = data.draw(st.integers(0, q))
    g = random_group(q, size, seed=seed)
    assert g.dtype == torch.int64 and g.shape == (size,)
    assert g.unique().numel() == size and torch.equal(g, g.sort().values)
    assert size == 0 or (0 <= int(g.min()) and int(g.max()) < q)
    assert torch.equal(random_group(q, size, seed=seed), g)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 100), st.data(), st.integers(0, 1000))
def test_random_group_never_draws_excluded_features(q, data, seed):
    exclude = data.draw(st.lists(st.integers(0, q - 1), max_size=q))
    size = data.draw(st.integers(0, q - len(set(exclude))))
    g = random_group(q, size, exclude=torch.tensor(exclude, dtype=torch.long), seed=seed)
    assert g.numel() == size and not set(g.tolist()) & set(exclude)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 120), st.data(), st.integers(0, 2**31 - 1))
def test_random_group_from_the_low_pool_never_holds_a_high_or_unscored_feature(q, data, seed):
    """The pipeline's control: pool = the low group (finite CDS <= γ), exclude = the high group
    (finite CDS > γ); features with CDS NaN (dead / unscored) are in neither. Whatever the
    partition, the group has |high| members, all from the pool, and the seed fixes it."""
    cds = np.array(data.draw(st.lists(st.one_of(st.floats(0, 2), st.just(float("nan"))), min_size=q, max_size=q)))
    gamma = data.draw(st.floats(0, 2))
    high = np.flatnonzero(np.isfinite(cds) & (cds > gamma))
    low = np.flatnonzero(np.isfinite(cds) & (cds <= gamma))
    if low.size < high.size:
        with pytest.raises(ValueError, match=f"0..{low.size} .*pool of {low.size} of q = {q}"):
            random_group(q, int(high.size), pool=low, exclude=high, seed=seed)
        return
    g = random_group(q, int(high.size), pool=low, exclude=high, seed=seed)
    assert g.numel() == high.size and g.unique().numel() == g.numel()
    assert set(g.tolist()) <= set(low.tolist())
    assert not set(g.tolist()) & set(high.tolist()) and np.isfinite(cds[g.numpy()]).all()
    assert torch.equal(random_group(q, int(high.size), pool=low, exclude=high, seed=seed), g)
    # pool and exclude as any 1-D integer collection, unsorted and with duplicates: the same group.
    shuffled = np.concatenate([low[::-1], low[:1]]).tolist()
    assert torch.equal(random_group(q, int(high.size), pool=shuffled, exclude=high.tolist(), seed=seed), g)


def test_random_group_from_a_pool_is_seeded_and_covers_the_pool():
    pool = torch.tensor([3, 5, 8, 13, 21, 34])
    draws = {tuple(random_group(40, 3, pool=pool, seed=s).tolist()) for s in range(200)}
    assert len(draws) == 20  # every 3-subset of the 6 ids turns up, and nothing else
    assert all(set(d) <= set(pool.tolist()) for d in draws)
    with pytest.raises(ValueError, match=r"0\.\.5 \(the eligible features: a pool of 6 of q = 40, 1 of them excluded\)"):
        random_group(40, 6, pool=pool, exclude=[5], seed=0)


def test_random_group_draws_from_all_features_by_default():
    high = torch.arange(10)  # a "high-CDS group"; the control may overlap it
    draws = [random_group(40, high.numel(), seed=s) for s in range(50)]
    assert any(set(d.tolist()) & set(high.tolist()) for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 1  # the seed matters


def test_random_group_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_group(50, 7, seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("q, size, exclude", [(0, 0, None), (10, 11, None), (10, -1, None),
                                               (10, 9, [0, 1]), (10, 2, [10]), (10, 2.0, None)])
def test_random_group_rejects_bad_arguments(q, size, exclude):
    with pytest.raises(ValueError):
        random_group(q, size, exclude=exclude, seed=0)
