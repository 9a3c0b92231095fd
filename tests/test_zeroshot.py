"""The zero-shot core: prompts, class text embeddings against open_clip itself, and the tally
against top-1 and confidence worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scope_ray.config import load_config
from scope_ray.models import ViTWrapper, build_backbone, get_spec
from scope_ray.zeroshot import (ZeroShotTally, class_embeddings, clip_tokenizer, logit_scale, patch_mean_embedding,
                                patch_mean_projection, prompts, removal_invisible, zeroshot_logits)


@pytest.fixture(scope="module")
def clip():
    spec = get_spec("demo-clip")
    model = build_backbone(spec, seed=3)
    return model, clip_tokenizer(model, spec.arch)


def test_prompts_are_class_major_and_templates_need_one_placeholder():
    assert prompts(["a {}.", "art of {}"], ["cat", "dog"]) == ["a cat.", "art of cat", "a dog.", "art of dog"]
    with pytest.raises(ValueError, match="exactly one"):
        prompts(["a photo"], ["cat"])
    with pytest.raises(ValueError, match="need templates and class names"):
        prompts(["a {}."], [])


def test_tally_matches_hand_computed_top1_and_confidence():
    class_CE = np.array([[1.0, 0.0], [0.0, 1.0]])
    image_BE = np.array([[3.0, 0.0],    # unit [1, 0]: logits [2, 0], predicts 0
                         [1.0, 2.0],    # unit [1, 2]/sqrt5: logits [2/sqrt5, 4/sqrt5], predicts 1
                         [0.0, -5.0]])  # unit [0, -1]: logits [0, -2], predicts 0
    labels = np.array([0, 0, 1])
    logits = zeroshot_logits(image_BE, class_CE, scale=2.0)
    np.testing.assert_allclose(logits.numpy(), [[2, 0], [2 / math.sqrt(5), 4 / math.sqrt(5)], [0, -2]], atol=1e-6)
    t = ZeroShotTally().update(logits, labels)
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # a two-class softmax's larger probability
    assert (t.n, t.correct) == (3, 1) and t.top1 == pytest.approx(1 / 3)
    assert t.mean_confidence == pytest.approx((sigmoid(2) + sigmoid(2 / math.sqrt(5)) + sigmoid(2)) / 3, rel=1e-6)


def test_tally_merges_like_one_pass_and_rejects_labels_outside_the_classes():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(10, 5)) * 3)
    labels = rng.integers(0, 5, 10)
    whole = ZeroShotTally().update(logits, labels)
    merged = ZeroShotTally().update(logits[:4], labels[:4]).merge(ZeroShotTally().update(logits[4:], labels[4:]))
    assert (merged.n, merged.correct) == (whole.n, whole.correct)
    assert merged.mean_confidence == pytest.approx(whole.mean_confidence)
    # Against a plain numpy softmax of the same logits (not merely "within [1/5, 1]", which any
    # max-softmax over 5 classes is).
    z = logits.numpy()
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert whole.mean_confidence == pytest.approx(float(p.max(axis=1).mean()), rel=1e-12)
    assert whole.correct == int((p.argmax(axis=1) == labels).sum())
    assert math.isnan(ZeroShotTally().top1)
    with pytest.raises(ValueError, match="label 5 is outside the 5 class names"):
        ZeroShotTally().update(logits[:2], np.array([1, 5]))


def test_class_embeddings_equal_a_direct_open_clip_recomputation(clip):
    import open_clip

    model, tokenizer = clip
    names, templates = ["tench", "goldfish", "great white shark"], ["a photo of a {}.", "art of the {}.", "itap of a {}."]
    got = class_embeddings(model, tokenizer, names, templates, batch_size=2)  # batches split a class's prompts
    direct = open_clip.get_tokenizer("ViT-B-16")
    with torch.inference_mode():
        want = torch.stack([
            F.normalize(model.encode_text(direct([t.format(n) for t in templates]), normalize=True).mean(dim=0), dim=0)
            for n in names])
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    assert (got @ got.T - torch.eye(3)).abs().max() > 1e-3  # the classes differ


def test_logits_equal_open_clips_own(clip):
    model, tokenizer = clip
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    names = ["cat", "dog", "car", "tree"]
    with torch.inference_mode():
        text = model.encode_text(tokenizer([f"a photo of a {n}." for n in names]), normalize=True)
        image_features, text_features, scale = model(pixels, tokenizer([f"a photo of a {n}." for n in names]))
        want = scale * image_features @ text_features.T
        got = zeroshot_logits(model.encode_image(pixels), text, logit_scale(model))
    assert logit_scale(model) == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's initial temperature
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ image_embedding: patch_mean
def test_patch_mean_from_the_cached_token_mean_equals_open_clips_own_computation(clip):
    """What probe-features caches as `embedding` (the mean over patch tokens of the wrapper's final
    tokens, float32 in numpy) through ``patch_mean_projection`` equals open_clip's tower run by hand
    (transformer, ln_post per token, mean over patch tokens, @ proj) and open_clip's own `avg` pooling."""
    import copy

    model, _ = clip
    spec = get_spec("demo-clip")
    pixels = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    wrapper = ViTWrapper(model, spec).eval()
    with torch.inference_mode():
        cached_BD = wrapper.final_tokens(pixels).float().numpy()[:, 1:].mean(axis=1)  # as probe_features._rows
        got = patch_mean_embedding(cached_BD, patch_mean_projection(model))
        v = model.visual
        x = v.transformer(v._embeds(pixels))
        by_hand = v.ln_post(x)[:, 1:].mean(dim=1) @ v.proj
        avg = copy.deepcopy(v)
        avg.pool_type = "avg"
        own_avg = avg(pixels)
        ln_after_mean = v.ln_post(x[:, 1:].mean(dim=1)) @ v.proj  # the wrong order
        class_token = model.encode_image(pixels)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, own_avg, atol=1e-5, rtol=1e-5)
    # Not vacuous: the order of ln_post and the mean matters, and it is not the class token.
    assert (got - ln_after_mean).abs().max() > 1e-3
    assert (got - class_token).abs().max() > 1e-3


def test_patch_mean_projection_refuses_towers_that_pool_before_ln_post(clip):
    import copy

    model, _ = clip
    assert patch_mean_projection(model).shape == (64, 32)
    late = copy.deepcopy(model.visual)
    late.final_ln_after_pool = True
    with pytest.raises(NotImplementedError, match="ln_post per token"):
        patch_mean_projection(late)
    with pytest.raises(ValueError, match=r"patch mean \[B, D\] and a projection \[D, E\]"):
        patch_mean_embedding(np.zeros((2, 32)), patch_mean_projection(model))


def test_only_the_class_token_at_the_last_block_is_blind_to_removal(clip):
    model, _ = clip  # demo-clip: 3 blocks, class-token pooling
    assert removal_invisible(model, 3, "class_token") is True
    assert removal_invisible(model, 2, "class_token") is False
    assert removal_invisible(model, 3, "patch_mean") is False
    with pytest.raises(ValueError, match="allowed: class_token, patch_mean"):
        removal_invisible(model, 3, "cls")


def test_image_embedding_config_key_validates():
    assert load_config({}).zeroshot.image_embedding == "class_token"
    assert load_config({}, ["zeroshot.image_embedding=patch_mean"]).zeroshot.image_embedding == "patch_mean"
    with pytest.raises(ValueError, match="image_embedding"):
        load_config({}, ["zeroshot.image_embedding=mean"])
    a, b = (load_config({}, [f"zeroshot.image_embedding={v}"]) for v in ("class_token", "patch_mean"))
    assert a.stage_hash("zeroshot") != b.stage_hash("zeroshot")


# ------------------------------------------------- the registry's CLIP layer: removal reaches it
def test_removal_at_the_default_layer_moves_clips_own_class_token_zero_shot(clip):
    """demo-clip at its registry layer (2 of 3, the penultimate block like the real CLIPs' 11 / 23):
    removing a group of SAE features from the patch tokens reaches CLIP's own image embedding (class
    token -> ln_post -> proj) through block 3, so class-token zero-shot logits and confidence move.
    The embeddings come from probe-features' own forward (what the stage caches as `clip_embedding`)
    and equal open_clip's modules run by hand with the edit between blocks 2 and 3; confidence and
    top-1 are recomputed with a plain softmax. At layer 3 (the last block) the same path is blind."""
    from scope_ray.removal import removal_edit
    from scope_ray.sae import BatchTopKSAE
    from scope_ray.stages.probe_features import ProbeFeatureWriter

    model, tokenizer = clip
    spec = get_spec("demo-clip")
    assert spec.layer == spec.depth - 1 == 2
    pixels = torch.randn(6, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    wrapper = ViTWrapper(model, spec).eval()  # layer=None: the registry's default
    with torch.inference_mode():
        tokens = wrapper.forward_layer(pixels).patch_tokens.reshape(-1, spec.width)
        torch.manual_seed(0)
        sae = BatchTopKSAE(spec.width, 64, 4).eval()
        pre = sae.pre_acts(tokens)
        sae.threshold.fill_(float(torch.quantile(pre[pre > 0], 0.8)))
        fires = (sae.encode(tokens) > 0).sum(dim=0)
    group = torch.argsort(fires, descending=True, stable=True)[:8]  # the 8 features firing most here
    assert int(fires[group].min()) > 0  # a non-empty group that really fires on these images
    edit = removal_edit(sae, group)

    # probe-features' forward (the hook on the image tower's output), without a results root.
    writer = ProbeFeatureWriter.__new__(ProbeFeatureWriter)
    writer.model, writer.clip_dim = wrapper, 32
    original_BE = torch.from_numpy(writer._forward(pixels, None)[1])
    removed_BE = torch.from_numpy(writer._forward(pixels, edit)[1])

    v = model.visual
    with torch.inference_mode():
        assert v.transformer.batch_first  # tokens_BTD through every block, as open_clip's forward
        x = v._embeds(pixels)
        for block in v.transformer.resblocks[:2]:
            x = block(x)
        edited = torch.cat([x[:, :1], edit(x[:, 1:])], dim=1)
        by_hand = {name: v.ln_post(v.transformer.resblocks[2](h))[:, 0] @ v.proj
                   for name, h in (("original", x), ("removed", edited))}
        own = model.encode_image(pixels)
    torch.testing.assert_close(original_BE, own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(original_BE, by_hand["original"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(removed_BE, by_hand["removed"], atol=1e-5, rtol=1e-5)
    assert (removed_BE - original_BE).abs().max() > 1e-2  # the class token moved

    names = ["cat", "dog", "car", "tree", "boat"]
    class_CE = class_embeddings(model, tokenizer, names, ["a photo of a {}."])
    labels = np.arange(6) % 5
    scale = logit_scale(model)
    conf, hits = {}, {}
    for name, emb in (("original", original_BE), ("removed", removed_BE)):
        e = emb.double().numpy()
        logits = scale * (e / np.linalg.norm(e, axis=1, keepdims=True)) @ class_CE.double().numpy().T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        conf[name], hits[name] = p.max(axis=1).mean(), int((p.argmax(axis=1) == labels).sum())
        t = ZeroShotTally().update(zeroshot_logits(emb, class_CE, scale), labels)
        assert t.mean_confidence == pytest.approx(conf[name], rel=1e-5) and t.correct == hits[name]
    # Measured: the class-token embedding moves by up to 0.10, mean confidence 0.33775 -> 0.33727
    # (random init, 5 classes); float32 noise is ~1e-7.
    assert abs(conf["removed"] - conf["original"]) > 1e-4  # a zero-shot effect, not float noise

    # The contrast: the same removal at the last block leaves CLIP's embedding bit-for-bit unchanged.
    writer.model = ViTWrapper(model, spec, layer=3).eval()
    with torch.inference_mode():
        last = writer.model.forward_layer(pixels).patch_tokens
    assert (edit(last) - last).abs().max() > 1e-3  # the edit does change the patch tokens there
    np.testing.assert_array_equal(writer._forward(pixels, edit)[1], writer._forward(pixels, None)[1])
