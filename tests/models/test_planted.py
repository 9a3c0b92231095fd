"""demo-planted: the planted-scope ViT is ground truth for CDS only if its planted directions
behave as documented — local ones fixed to the patch's pixels, global ones on high-norm tokens
that move between the two SCC views — and if it works through the unchanged ViTWrapper."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import safetensors.torch
import torch

from scope_ray.data.synthetic import make_scene
from scope_ray.models import REGISTRY, build_backbone, build_model, planted_codes, planted_directions
from scope_ray.models.planted import NUM_GLOBAL, NUM_LOCAL, OUTLIER_NORM, TOKEN_NORM, PlantedBlock, PlantedViT
from scope_ray.scc import overlap_indices, scc_views

NAME = "demo-planted"
GRID, PATCH, WIDTH = 7, 16, 96


@pytest.fixture(scope="module")
def model():
    return build_model(NAME, seed=0)


def _scenes(n: int, seed: int, size: int = 128) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, 10).image for _ in range(n)]


def _pixels(model, n: int = 4, seed: int = 0) -> torch.Tensor:
    return model.preprocess(np.stack(_scenes(n, seed, size=112)))


@pytest.fixture(scope="module")
def scc_pairs(model):
    """Layer tokens and codes of both SCC views (shift 1 and 2) of 64 synthetic scenes."""
    images = _scenes(64, seed=11)
    out = {}
    for shift in (1, 2):
        views = [scc_views(im, PATCH, GRID, shift) for im in images]
        pixels = [model.preprocess(np.stack([v[i] for v in views])) for i in (0, 1)]
        with torch.inference_mode():
            tokens = [model.forward_layer(p).patch_tokens for p in pixels]
        out[shift] = (tokens, [planted_codes(model, p) for p in pixels])
    return out


# ---- registry and directions -----------------------------------------------------------------
def test_registry_entry():
    spec = REGISTRY[NAME]
    assert (spec.family, spec.loader, spec.builder, spec.tau) == ("demo", "timm", "planted", None)
    assert (spec.grid, spec.width, spec.patch, spec.image_size) == (GRID, WIDTH, PATCH, 112)
    assert spec.pretrained_tag is None


def test_directions_are_orthonormal_seeded_and_exposed(model):
    d = planted_directions(model)
    assert d["local"].shape == (NUM_LOCAL, WIDTH) and d["global"].shape == (NUM_GLOBAL, WIDTH)
    basis = torch.cat([d["local"], d["global"]])
    torch.testing.assert_close(basis @ basis.T, torch.eye(NUM_LOCAL + NUM_GLOBAL), atol=1e-6, rtol=0)
    same = planted_directions(build_backbone(REGISTRY[NAME], seed=0))  # the backbone works too
    other = planted_directions(build_model(NAME, seed=1))
    assert torch.equal(same["local"], d["local"]) and torch.equal(same["global"], d["global"])
    assert not torch.allclose(other["local"], d["local"])
    with pytest.raises(TypeError, match="planted"):
        planted_directions(build_model("demo-vit-tiny"))


@torch.inference_mode()
def test_same_seed_gives_bit_identical_outputs(model):
    again = build_model(NAME, seed=0)
    pixels = _pixels(model)
    a, b = model.forward_layer(pixels), again.forward_layer(pixels)
    assert torch.equal(a.patch_tokens, b.patch_tokens) and torch.equal(a.prefix_tokens, b.prefix_tokens)
    assert torch.equal(model.final_tokens(pixels), again.final_tokens(pixels))
    assert torch.equal(model.patch_attention(pixels), again.patch_attention(pixels))


# ---- the wrapper, unchanged ------------------------------------------------------------------
@torch.inference_mode()
def test_wrapper_api(model):
    pixels = _pixels(model, n=3)
    out = model.forward_layer(pixels)
    assert out.patch_tokens.shape == (3, GRID * GRID, WIDTH)
    assert out.prefix_tokens.shape == (3, 1, WIDTH)
    torch.testing.assert_close(out.norms, out.patch_tokens.norm(dim=-1))
    assert isinstance(model.block, PlantedBlock) and model.layer == REGISTRY[NAME].layer

    attn = model.patch_attention(pixels)
    assert attn.shape == (3, model.num_heads, GRID * GRID, GRID * GRID)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))

    final = model.final_tokens(pixels)
    assert final.shape == (3, 1 + GRID * GRID, WIDTH) and torch.isfinite(final).all()
    torch.testing.assert_close(final, model.backbone.forward_features(pixels))
    seen = []
    torch.testing.assert_close(model.final_tokens(pixels, edit=lambda t: seen.append(t.clone()) or t), final)
    torch.testing.assert_close(seen[0], out.patch_tokens)
    assert not torch.allclose(model.final_tokens(pixels, edit=lambda t: t * 0), final)

    # timm's own intermediates go through the planting too.
    (patches, prefix), = model.backbone.forward_intermediates(
        pixels, indices=[model.layer - 1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    torch.testing.assert_close(patches, out.patch_tokens)
    torch.testing.assert_close(prefix, out.prefix_tokens)


@torch.inference_mode()
def test_plan_lives_for_one_forward_only(model):
    pixels = _pixels(model, n=1)
    model.forward_layer(pixels)  # stopped early by the wrapper's hook
    assert model.block.plan is None
    with pytest.raises(RuntimeError, match="outside"):
        model.block(torch.zeros(1, 1 + GRID * GRID, WIDTH))
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone.forward_layer(pixels).patch_tokens, model.forward_layer(pixels).patch_tokens)


@torch.inference_mode()
def test_tokens_are_the_documented_sum(model):
    pixels = _pixels(model, n=16)
    tokens = model.forward_layer(pixels).patch_tokens
    codes = planted_codes(model, pixels)
    d = planted_directions(model)
    torch.testing.assert_close(tokens @ d["local"].T, codes.local, atol=1e-5, rtol=0)
    expected_global = codes.outliers[..., None] * codes.global_weights[:, None, :]
    torch.testing.assert_close(tokens @ d["global"].T, expected_global, atol=1e-5, rtol=0)
    norms = tokens.norm(dim=-1)
    torch.testing.assert_close(norms[~codes.outliers], torch.full_like(norms[~codes.outliers], TOKEN_NORM))
    assert (norms[codes.outliers] > OUTLIER_NORM).all()
    assert codes.outliers.sum(1).min() >= 1 and codes.outliers.sum(1).max() <= 3
    fires = (codes.local > 0).sum(-1)
    assert fires.max() <= 2 and (fires > 0).any()  # sparse, and the scenes do fire some
    assert ((codes.global_weights > 0).sum(1) <= 2).all()  # the two axes next to the view's chroma


@torch.inference_mode()
def test_grey_and_flat_views_still_get_high_norm_outliers(model):
    rng = np.random.default_rng(3)
    grey = np.repeat(rng.integers(0, 256, (2, 112, 112, 1), dtype=np.uint8), 3, axis=-1)
    flat = np.full((2, 112, 112, 3), (0, 0, 0), dtype=np.uint8)
    flat[1] = 255
    pixels = model.preprocess(np.concatenate([grey, flat]))
    norms = model.forward_layer(pixels).norms
    codes = planted_codes(model, pixels)
    assert (norms[codes.outliers] > OUTLIER_NORM).all()
    torch.testing.assert_close(norms[~codes.outliers], torch.full_like(norms[~codes.outliers], TOKEN_NORM))


# ---- ground truth for CDS --------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1, 2])
def test_local_directions_are_identical_on_the_overlap(model, scc_pairs, shift):
    (t1, t2), _ = scc_pairs[shift]
    local = planted_directions(model)["local"]
    i1, i2 = overlap_indices(GRID, shift)
    a1, a2 = (t1 @ local.T)[:, i1], (t2 @ local.T)[:, i2]
    assert a1.max() > 1.0  # something fires
    torch.testing.assert_close(a1, a2, atol=1e-4 * float(a1.abs().max()), rtol=0)


@pytest.mark.parametrize("shift", [1, 2])
def test_global_directions_move_between_the_views(model, scc_pairs, shift):
    (t1, t2), (c1, _) = scc_pairs[shift]
    glob = planted_directions(model)["global"]
    i1, i2 = overlap_indices(GRID, shift)
    m1, m2 = (t1 @ glob.T)[:, i1], (t2 @ glob.T)[:, i2]  # [B, O, G] over the overlap
    k = c1.global_weights.argmax(dim=1)  # view 1's dominant global direction
    moved = 0
    for b in range(len(k)):
        a, c = m1[b, :, k[b]], m2[b, :, k[b]]
        a, c = a * (a > 1.0), c * (c > 1.0)  # off the outliers the projection is float noise
        if not a.any() and not c.any():
            continue  # never on the overlap: does not count as moved
        if not a.any() or not c.any() or a.argmax() != c.argmax():
            moved += 1
    assert moved >= 0.8 * len(k), f"global maps moved in only {moved} of {len(k)} images"


def test_auto_tau_separates_the_planted_outliers(model, scc_pairs):
    from scope_ray.scope import auto_tau

    (t1, t2), (c1, c2) = scc_pairs[1]
    norms = torch.cat([t1, t2]).norm(dim=-1)
    outliers = torch.cat([c1.outliers, c2.outliers])
    tau = auto_tau(norms.numpy())
    assert norms[outliers].min() > tau > norms[~outliers].max()
    # Fitted on one sample, it holds on another: every other token has norm exactly TOKEN_NORM.
    (u1, _), (d1, _) = scc_pairs[2]
    other = u1.norm(dim=-1)
    assert torch.equal(other > tau, d1.outliers)


# ---- weights and speed -----------------------------------------------------------------------
def test_state_dict_round_trip_loads_strict(model, tmp_path):
    state = model.backbone.state_dict()
    assert {"planted_local", "planted_global", "position_bias"} <= set(state)
    path = tmp_path / "planted.safetensors"
    safetensors.torch.save_file(state, str(path))
    loaded = build_model(NAME, weights=str(path), seed=7)  # the file's directions win over the seed
    assert isinstance(loaded.backbone, PlantedViT)
    pixels = _pixels(model, n=2)
    with torch.inference_mode():
        assert torch.equal(loaded.final_tokens(pixels), model.final_tokens(pixels))
    assert torch.equal(planted_directions(loaded)["global"], planted_directions(model)["global"])
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone(REGISTRY["demo-vit-tiny"], weights=str(path))


def test_shrunk_width_still_plants():
    small = build_model(NAME, shrink={"width": 64, "num_heads": 2})
    with torch.inference_mode():
        out = small.forward_layer(_pixels(small, n=1))
    assert out.patch_tokens.shape == (1, GRID * GRID, 64)
    assert planted_directions(small)["local"].shape == (NUM_LOCAL, 64)


@torch.inference_mode()
def test_a_batch_of_32_runs_well_under_a_second(model):
    pixels = _pixels(model, n=32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        model.forward_layer(pixels)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"forward of 32 images took {best:.3f} s"
