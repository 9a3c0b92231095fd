"""scope_ray/models/any_vit.py: any plain timm / open_clip ViT by name, geometry read from the
library, refusals naming what does not fit; and two non-registry models through the real
extract and cds stages."""

from __future__ import annotations

import posixpath

import numpy as np
import pytest
import torch

from scope_ray.config import ConfigError, load_config
from scope_ray.models import REGISTRY, ViTWrapper, build_backbone, get_spec

TIMM_MODEL = "timm:deit_tiny_patch16_224"  # not in the registry: 192 wide, 3 heads, a 14x14 grid
OPEN_CLIP_MODEL = "open_clip:ViT-B-32"     # not in the registry: a 7x7 grid of 32-px patches


@pytest.mark.parametrize("name", [TIMM_MODEL, OPEN_CLIP_MODEL, "timm:vit_small_patch16_224.augreg_in21k"])
def test_geometry_is_the_built_models(name):
    spec = get_spec(name)
    assert name not in REGISTRY and spec.family == "custom" and spec.tau is None
    with torch.device("meta"):
        wrapper = ViTWrapper(build_backbone(spec), spec)
    assert (wrapper.depth, wrapper.width, wrapper.num_heads, wrapper.grid) == (spec.depth, spec.width, spec.num_heads,
                                                                                spec.grid)
    assert spec.layer == spec.depth - 1  # the default designated layer: the penultimate block


def test_normalisation_comes_from_the_tags_pretrained_config():
    import open_clip
    import timm

    spec = get_spec("timm:vit_small_patch16_224.augreg_in21k")
    cfg = timm.models.get_pretrained_cfg("vit_small_patch16_224.augreg_in21k")
    assert (spec.mean, spec.std, spec.pretrained_tag) == (tuple(cfg.mean), tuple(cfg.std), "augreg_in21k")
    spec = get_spec("open_clip:ViT-B-32.laion2b_s34b_b79k")
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    np.testing.assert_allclose(spec.mean, cfg["mean"])
    assert spec.has_text_tower and spec.pretrained_tag == "laion2b_s34b_b79k"


@pytest.mark.parametrize("name, why", [
    ("timm:vit_tiny_r_s16_p8_224", "hybrid CNN stem"),
    ("timm:resnet50", "not a plain ViT"),
    ("open_clip:RN50", "ResNet image tower"),
    ("timm:no_such_vit", "timm has no model"),
    ("open_clip:No-Such", "open_clip has no model config"),
    ("open_clip:ViT-B-32.no_such_tag", "no pretrained tag 'no_such_tag'"),
    ("open_clip:ViT-B-32/openai", "has no '/'; write the tag after a dot: open_clip:ViT-B-32.openai"),
])
def test_what_does_not_fit_is_refused_naming_why(name, why):
    with pytest.raises(ValueError, match=why):
        get_spec(name)
    with pytest.raises(ConfigError, match=why):
        load_config({"model": {"name": name}})


@pytest.mark.slow
@pytest.mark.parametrize("name", [TIMM_MODEL, OPEN_CLIP_MODEL])
def test_extract_then_cds_through_the_real_stages(ray_local, tmp_path, name):
    from scope_ray.data.synthetic import write_synthetic
    from scope_ray.sae import BatchTopKSAE
    from scope_ray.stages.cds import run_cds
    from scope_ray.stages.extract import run_extract
    from scope_ray.stages.train_sae import SAE_FILE
    from scope_ray.stages.train_sae import config_hash as train_hash
    from scope_ray.storage import ResultsRoot
    from scope_ray.tokens import activations_of

    data = write_synthetic(str(tmp_path / "data"), n_train=4, n_val=6, size=112, num_classes=3, seed=0)["imagenet"]
    job = load_config({"model": {"name": name}, "storage": {"root": str(tmp_path / "r")},
                       "data": {"imagenet": {"train": data["folder"]["train"], "val": data["folder"]["val"]}}},
                      ["sae.expansion=1", "sae.k=4", "extract.batch_size=4", "extract.val_split=null",
                       "scope.pool_split=val", "scope.k_cds=2", "scope.spare_images=1", "scope.batch_size=4",
                       "scope.min_usable_images=1", "ray.num_actors=1"])
    root = ResultsRoot(job.storage.root)
    run_extract(job, root, progress=False, log=lambda *_: None)
    spec = job.model.spec
    tokens = root.stage(name, "extract").read_table("train_tokens")
    assert tokens.num_rows == 4 * job.extract.tokens_per_image
    x = torch.from_numpy(activations_of(tokens))
    assert x.shape[1] == spec.width and torch.isfinite(x).all()
    # A random dictionary over these tokens stands in for train-sae (tested on its own elsewhere).
    torch.manual_seed(0)
    sae = BatchTopKSAE(spec.width, job.dictionary_size, job.sae.k).eval()
    with torch.no_grad():
        pre = sae.pre_acts(x)
        sae.threshold.fill_(float(torch.quantile(pre[pre > 0], 0.9)))
    stage = root.stage(name, "train-sae")
    sae.save(posixpath.join(stage.uri, SAE_FILE))
    stage.commit(train_hash(job), {}, {})
    result = run_cds(job, root, progress=False, log=lambda *_: None)
    cds = result.table.column("cds").to_numpy()
    assert cds.size == spec.width and np.isfinite(cds).any()
    finite = cds[np.isfinite(cds)]
    assert finite.min() >= 0 and finite.max() <= 1
