"""ViTWrapper against the libraries' own computations, and weight loading.

Models: two timm demo ViTs (one with 4 registers), a width-shrunk SigLIP2-B (no prefix token)
and a width-shrunk CLIP ViT-B/16 (open_clip), all random init at full depth and native size.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from scope_ray.models import REGISTRY, ViTWrapper, build_backbone, build_model

SMALL = {"width": 64, "num_heads": 2}
TIMM_NAMES = ["demo-vit-tiny", "demo-vit-reg", "siglip2-b"]
ALL_NAMES = TIMM_NAMES + ["clip-vit-b16"]


def _shrink(name: str) -> dict | None:
    return None if REGISTRY[name].family == "demo" else SMALL


@pytest.fixture(scope="module")
def models() -> dict[str, ViTWrapper]:
    return {name: build_model(name, shrink=_shrink(name)) for name in ALL_NAMES}


def _pixels(model: ViTWrapper, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.spec.image_size
    images = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return model.preprocess(images)


def _block_input(model: ViTWrapper, pixels: torch.Tensor, index: int) -> torch.Tensor:
    """Input of block ``index`` (0-based), captured by a hook of the test's own."""
    seen = []
    handle = model.blocks[index].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model.final_tokens(pixels)
    finally:
        handle.remove()
    return seen[0]


# ---- preprocess ------------------------------------------------------------------------------
def test_preprocess_normalises_with_the_spec(models):
    model = models["clip-vit-b16"]
    size = model.spec.image_size
    images = np.zeros((1, size, size, 3), dtype=np.uint8)
    images[..., 0] = 255
    pixels = model.preprocess(images)
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, 0, 0, 0].item(), (1 - model.spec.mean[0]) / model.spec.std[0])
    torch.testing.assert_close(pixels[0, 1, 0, 0].item(), -model.spec.mean[1] / model.spec.std[1])
    torch.testing.assert_close(model.preprocess(torch.from_numpy(images)), pixels)


def test_preprocess_rejects_wrong_size_and_dtype(models):
    model = models["demo-vit-tiny"]
    with pytest.raises(ValueError, match="112"):
        model.preprocess(np.zeros((1, 224, 224, 3), dtype=np.uint8))
    with pytest.raises(TypeError):
        model.preprocess(np.zeros((1, 112, 112, 3), dtype=np.float32))


def test_layer_out_of_range_is_rejected(models):
    with pytest.raises(ValueError, match="outside"):
        ViTWrapper(models["demo-vit-tiny"].backbone, REGISTRY["demo-vit-tiny"], layer=5)


# ---- forward_layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
@torch.inference_mode()
def test_forward_layer_stops_after_the_designated_block(models, name):
    model = models[name]
    wrapper = ViTWrapper(model.backbone, model.spec, layer=2)
    calls = {"designated": 0, "after": 0}
    hooks = [
        wrapper.blocks[1].register_forward_hook(lambda *_: calls.__setitem__("designated", calls["designated"] + 1)),
        wrapper.blocks[2].register_forward_hook(lambda *_: calls.__setitem__("after", calls["after"] + 1)),
    ]
    try:
        wrapper.forward_layer(_pixels(model, batch=1))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"designated": 1, "after": 0}


@pytest.mark.parametrize("name", TIMM_NAMES)
@torch.inference_mode()
def test_forward_layer_matches_timm_forward_intermediates(models, name):
    model = models[name]
    pixels = _pixels(model)
    out = model.forward_layer(pixels)
    taken = model.backbone.forward_intermediates(
        pixels, indices=[model.layer - 1], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    if model.num_prefix_tokens:
        patches, prefix = taken[0]
        torch.testing.assert_close(out.prefix_tokens, prefix)
    else:
        patches = taken[0]
        assert out.prefix_tokens.shape[1] == 0
    torch.testing.assert_close(out.patch_tokens, patches)
    torch.testing.assert_close(out.norms, patches.norm(dim=-1))


@torch.inference_mode()
def test_forward_layer_matches_open_clip_forward_intermediates(models):
    model = models["clip-vit-b16"]
    wrapper = ViTWrapper(model.backbone, model.spec, layer=7)
    pixels = _pixels(model)
    out = wrapper.forward_layer(pixels)
    taken = model.vision.forward_intermediates(
        pixels, indices=[6], output_fmt="NLC", intermediates_only=True, output_extra_tokens=True)
    torch.testing.assert_close(out.patch_tokens, taken["image_intermediates"][0])
    torch.testing.assert_close(out.prefix_tokens, taken["image_intermediates_prefix"][0])


# ---- attention -------------------------------------------------------------------------------
def _manual_timm_attention(model: ViTWrapper, x_BTD: torch.Tensor) -> torch.Tensor:
    block = model.block
    d, h = model.width, model.num_heads
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    y = block.norm1(x_BTD)
    q = F.linear(y, w[:d], None if b is None else b[:d])
    k = F.linear(y, w[d : 2 * d], None if b is None else b[d : 2 * d])
    B, T, _ = y.shape
    q = block.attn.q_norm(q.view(B, T, h, d // h).transpose(1, 2))
    k = block.attn.k_norm(k.view(B, T, h, d // h).transpose(1, 2))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)


@pytest.mark.parametrize("name", TIMM_NAMES)
@torch.inference_mode()
def test_timm_attention_matches_manual_and_unfused_library(models, name):
    model = models[name]
    pixels = _pixels(model)
    attn = model.attention(pixels)
    tokens = model.num_prefix_tokens + model.grid**2
    assert attn.shape == (2, model.num_heads, tokens, tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    torch.testing.assert_close(attn, _manual_timm_attention(model, _block_input(model, pixels, model.layer - 1)))

    # The library's own probabilities: unfused attention feeds them to attn_drop (identity in eval).
    seen = []
    module = model.block.attn
    handle = module.attn_drop.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    fused, module.fused_attn = module.fused_attn, False
    try:
        model.forward_layer(pixels)
    finally:
        module.fused_attn = fused
        handle.remove()
    torch.testing.assert_close(attn, seen[0])


@torch.inference_mode()
def test_open_clip_attention_matches_manual_and_multihead_attention(models):
    model = models["clip-vit-b16"]
    pixels = _pixels(model)
    attn = model.attention(pixels)
    assert attn.shape == (2, model.num_heads, 1 + model.grid**2, 1 + model.grid**2)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))

    block = model.block
    y = block.ln_1(_block_input(model, pixels, model.layer - 1))
    d, h = model.width, model.num_heads
    q, k, _ = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias).split(d, dim=-1)
    q, k = (t.unflatten(-1, (h, d // h)).transpose(1, 2) for t in (q, k))
    torch.testing.assert_close(attn, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1))

    # torch's own (unfused) path returns per-head probabilities when asked for them.
    _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(attn, weights)


@pytest.mark.parametrize("name", ["demo-vit-reg", "clip-vit-b16"])
@torch.inference_mode()
def test_patch_attention_drops_prefix_and_renormalises(models, name):
    model = models[name]
    pixels = _pixels(model)
    p, n = model.num_prefix_tokens, model.grid**2
    patch = model.patch_attention(pixels)
    assert patch.shape == (2, model.num_heads, n, n)
    torch.testing.assert_close(patch.sum(-1), torch.ones(patch.shape[:-1]))
    full = model.attention(pixels)[:, :, p:, p:]
    torch.testing.assert_close(patch, full / full.sum(-1, keepdim=True))


def _count_block_calls(model: ViTWrapper) -> tuple[list[int], list]:
    calls = [0] * len(model.blocks)
    handles = [b.register_forward_pre_hook(lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(model.blocks)]
    return calls, handles


@pytest.mark.parametrize("name", ["demo-vit-reg", "clip-vit-b16"])
@torch.inference_mode()
def test_attention_and_layer_come_from_one_forward(models, name):
    model = models[name]
    pixels = _pixels(model)
    calls, handles = _count_block_calls(model)
    try:
        attn, layer = model.patch_attention_and_layer(pixels)
        # Blocks 1…L once each, nothing after L (instability used to run them twice).
        assert calls == [1] * model.layer + [0] * (len(model.blocks) - model.layer)
        separate = [model.patch_attention(pixels), model.forward_layer(pixels)]
        assert calls == [3] * model.layer + [0] * (len(model.blocks) - model.layer)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(attn, separate[0])
    assert torch.equal(layer.patch_tokens, separate[1].patch_tokens)
    assert torch.equal(layer.prefix_tokens, separate[1].prefix_tokens)


@pytest.mark.parametrize("name", ["demo-vit-reg", "clip-vit-b16"])
@torch.inference_mode()
def test_bf16_autocast_returns_float32_close_to_fp32(models, name):
    model = models[name]
    pixels = _pixels(model)
    fp32 = (model.forward_layer(pixels).patch_tokens, model.final_tokens(pixels), model.patch_attention(pixels))
    model.precision = "bf16"
    try:
        bf16 = (model.forward_layer(pixels).patch_tokens, model.final_tokens(pixels), model.patch_attention(pixels))
        combined = model.patch_attention_and_layer(pixels)
    finally:
        model.precision = "fp32"
    for a, b in zip(fp32, bf16):
        assert b.dtype == torch.float32 and b.shape == a.shape
        err = float((a - b).norm() / a.norm())
        # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.002 per op); through a few blocks
        # the error stays around 1e-2 and is never zero (autocast really ran).
        assert 0 < err < 5e-2, err
    assert torch.equal(combined[0], bf16[2]) and torch.equal(combined[1].patch_tokens, bf16[0])


# ---- final_tokens and edits ------------------------------------------------------------------
@pytest.mark.parametrize("name", TIMM_NAMES)
@torch.inference_mode()
def test_timm_final_tokens_match_a_manual_run(models, name):
    model = models[name]
    vit = model.backbone
    pixels = _pixels(model)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
    for block in vit.blocks:
        x = block(x)
    expected = vit.norm(x)
    final = model.final_tokens(pixels)
    # Per token, not pooled: SigLIP's attn_pool must not have run.
    assert final.shape == (2, model.num_prefix_tokens + model.grid**2, model.width)
    torch.testing.assert_close(final, expected)
    torch.testing.assert_close(final, vit.forward_features(pixels))


@torch.inference_mode()
def test_open_clip_final_tokens_match_a_manual_run_and_the_image_embedding(models):
    model = models["clip-vit-b16"]
    visual = model.vision
    pixels = _pixels(model)
    x = visual._embeds(pixels)
    for block in visual.transformer.resblocks:
        x = block(x)
    final = model.final_tokens(pixels)
    torch.testing.assert_close(final, visual.ln_post(x))
    # The CLS token after ln_post, projected, is what zero-shot classification uses.
    torch.testing.assert_close(final[:, 0] @ visual.proj, model.backbone.encode_image(pixels))


@pytest.mark.parametrize("name", ALL_NAMES)
@torch.inference_mode()
def test_identity_edit_is_a_no_op_and_sees_the_layer_tokens(models, name):
    model = models[name]
    pixels = _pixels(model)
    seen = []

    def identity(tokens):
        seen.append(tokens.clone())
        return tokens

    torch.testing.assert_close(model.final_tokens(pixels, edit=identity), model.final_tokens(pixels))
    torch.testing.assert_close(seen[0], model.forward_layer(pixels).patch_tokens)


@pytest.mark.parametrize("name", ["demo-vit-tiny", "demo-vit-reg", "clip-vit-b16"])
@torch.inference_mode()
def test_edit_changes_only_patch_tokens_at_the_edit_point(models, name):
    base = models[name]
    model = ViTWrapper(base.backbone, base.spec, layer=base.depth - 1)
    pixels = _pixels(model)
    layer_out = model.forward_layer(pixels)
    # The next block's input is the edited residual stream.
    seen = []
    handle = model.blocks[model.layer].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        edited_final = model.final_tokens(pixels, edit=lambda t: t + 1.0)
    finally:
        handle.remove()
    p = model.num_prefix_tokens
    torch.testing.assert_close(seen[0][:, :p], layer_out.prefix_tokens)
    torch.testing.assert_close(seen[0][:, p:], layer_out.patch_tokens + 1.0)
    assert not torch.allclose(edited_final, model.final_tokens(pixels))


@pytest.mark.parametrize("name", ["demo-vit-reg", "clip-vit-b16"])
@torch.inference_mode()
def test_zero_edit_at_the_last_block_gives_the_final_norm_of_zeros(models, name):
    base = models[name]
    model = ViTWrapper(base.backbone, base.spec, layer=base.depth)
    pixels = _pixels(model)
    final = model.final_tokens(pixels, edit=torch.zeros_like)
    norm = model.backbone.norm if model.spec.loader == "timm" else model.vision.ln_post
    p = model.num_prefix_tokens
    zeros = torch.zeros(2, model.grid**2, model.width)
    torch.testing.assert_close(final[:, p:], norm(zeros))
    torch.testing.assert_close(final[:, :p], model.final_tokens(pixels)[:, :p])


@pytest.mark.parametrize("name", ALL_NAMES)
@torch.inference_mode()
def test_resuming_from_the_designated_output_is_exact_and_runs_only_the_later_blocks(models, name):
    base = models[name]
    model = ViTWrapper(base.backbone, base.spec, layer=max(1, base.depth - 2))
    pixels = _pixels(model)
    edits = [None, lambda t: t * 0.5, lambda t: t + 1.0]
    full = [model.final_tokens(pixels, edit=e) for e in edits]
    # Real work is counted at the attention modules: a skipped block never reaches its attention.
    calls = [0]
    handles = [b.attn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in model.blocks]
    try:
        designated = model.designated_output(pixels)
        assert calls[0] == model.layer
        resumed = [model.final_tokens(pixels, edit=e, start_from=designated) for e in edits]
        assert calls[0] == model.layer + len(edits) * (model.depth - model.layer)  # 4 variants: L + 4(depth - L)
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)  # the same computation, bit for bit
    # The blocks' own forwards are back: a plain call runs every block again.
    assert torch.equal(model.final_tokens(pixels), full[0])
    assert all("forward" not in vars(b) for b in model.blocks)


def test_edit_must_keep_the_shape(models):
    model = models["demo-vit-tiny"]
    with pytest.raises(ValueError, match="shape"), torch.inference_mode():
        model.final_tokens(_pixels(model), edit=lambda t: t[:, :3])


@torch.inference_mode()
def test_open_clip_sequence_first_layout_gives_the_same_results(models):
    """Older open_clip (and batch_first=False) runs blocks on [T, B, D]; hooks must transpose."""
    base = models["clip-vit-b16"]
    lnd = build_model("clip-vit-b16", shrink=SMALL)
    lnd.vision.transformer.batch_first = False
    for block in lnd.vision.transformer.resblocks:
        block.attn.batch_first = False
    lnd = ViTWrapper(lnd.backbone, lnd.spec, layer=6)
    bnd = ViTWrapper(base.backbone, base.spec, layer=6)
    assert not lnd._batch_first
    pixels = _pixels(bnd)
    torch.testing.assert_close(lnd.forward_layer(pixels).patch_tokens, bnd.forward_layer(pixels).patch_tokens)
    torch.testing.assert_close(lnd.attention(pixels), bnd.attention(pixels))
    double = lambda t: t * 2  # noqa: E731
    torch.testing.assert_close(lnd.final_tokens(pixels, edit=double), bnd.final_tokens(pixels, edit=double))


# ---- weights ---------------------------------------------------------------------------------
def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    spec = REGISTRY["demo-vit-tiny"]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = _params(build_backbone(spec, seed=0))
    torch.testing.assert_close(torch.rand(3), expected_next)
    b = _params(build_backbone(spec, seed=0))
    c = _params(build_backbone(spec, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name", ["demo-vit-reg", "clip-vit-b16"])
def test_safetensors_round_trip_gives_identical_outputs(tmp_path, name):
    spec = REGISTRY[name]
    source = build_model(spec, seed=0, shrink=_shrink(name))
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source.backbone.state_dict(), str(path))
    loaded = build_model(spec, weights=str(path), seed=7, shrink=_shrink(name))
    pixels = _pixels(source, batch=1)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.final_tokens(pixels), source.final_tokens(pixels), rtol=0, atol=0)


def test_torch_checkpoint_loads_with_weights_only(tmp_path):
    spec = REGISTRY["demo-vit-tiny"]
    source = build_backbone(spec, seed=0)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = build_backbone(spec, weights=str(path), seed=3)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


class _NotATensor:
    pass


def test_torch_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"weight": _NotATensor()}, path)
    with pytest.raises(ValueError, match=str(path)):
        build_backbone(REGISTRY["demo-vit-tiny"], weights=str(path))


@pytest.mark.parametrize("content", [pickle.dumps({"a": 1}), b"just some text\n"])
def test_non_safetensors_content_raises_naming_the_file(tmp_path, content):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        build_backbone(REGISTRY["demo-vit-tiny"], weights=str(path))


def test_unsupported_file_type_and_wrong_model_raise(tmp_path):
    spec = REGISTRY["demo-vit-tiny"]
    npz = tmp_path / "weights.npz"
    npz.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        build_backbone(spec, weights=str(npz))
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(build_backbone(REGISTRY["demo-vit-reg"]).state_dict(), str(other))
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone(spec, weights=str(other))


def test_shrink_is_refused_for_pretrained_and_unknown_keys():
    spec = REGISTRY["dinov2-b"]
    with pytest.raises(ValueError, match="pretrained"):
        build_backbone(spec, weights="pretrained", shrink=SMALL)
    with pytest.raises(ValueError, match="depth"):
        build_backbone(spec, shrink={"depth": 2})


def test_weights_load_from_s3(s3_bucket):
    from scope_ray.storage import fsspec_filesystem

    bucket, endpoint = s3_bucket
    spec = REGISTRY["demo-vit-tiny"]
    source = build_backbone(spec, seed=0)
    uri = f"{bucket}/models/demo.safetensors"
    fs, path = fsspec_filesystem(uri, endpoint)
    with fs.open(path, "wb") as f:
        f.write(safetensors.torch.save(source.state_dict()))
    loaded = build_backbone(spec, weights=uri, seed=5, endpoint_url=endpoint)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_dinov2_hub_checkpoint_at_518_px_loads_into_the_224_model(tmp_path):
    """timm ships DINOv2 at 518 px (37x37 positions); the registry runs it at 224 (16x16)."""
    import timm

    spec = REGISTRY["dinov2-b"]
    hub = timm.create_model(spec.arch, pretrained=False, embed_dim=SMALL["width"], num_heads=SMALL["num_heads"])
    assert hub.pos_embed.shape[1] == 1 + 37 * 37
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(hub.state_dict(), str(path))
    loaded = build_backbone(spec, weights=str(path), shrink=SMALL)
    assert loaded.pos_embed.shape[1] == 1 + spec.grid**2
    assert torch.equal(loaded.blocks[3].attn.qkv.weight, hub.blocks[3].attn.qkv.weight)
