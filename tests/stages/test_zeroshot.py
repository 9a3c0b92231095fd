"""The zero-shot stage: against a direct open_clip computation on a committed feature cache, its
skip / failure paths, class-name files, and (slow) end to end after the Ray probe-features stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from scope_ray.config import load_config
from scope_ray.models import build_backbone, build_model
from scope_ray.stages.probe_features import STAGE as FEATURES
from scope_ray.stages.probe_features import VARIANTS, table_schema
from scope_ray.stages.probe_features import config_hash as features_hash
from scope_ray.stages.zeroshot import resolve_class_names, run_zeroshot
from scope_ray.storage import ResultsRoot

NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]
QUIET = dict(log=lambda *_: None)


def _job(tmp_path, *overrides, model="demo-clip", val=None):
    val = val or {"format": "parquet", "path": str(tmp_path / "imagenet-val")}
    return load_config({"model": {"name": model}, "storage": {"root": str(tmp_path / "results")},
                        "data": {"imagenet": {"val": val}},
                        "zeroshot": {"templates": TEMPLATES, "class_names": NAMES}},
                       ["sae.expansion=1", "sae.k=4", *overrides])


def _direct_classes(job, names=NAMES, templates=TEMPLATES) -> tuple[np.ndarray, float]:
    """class_CE and logit scale straight from open_clip: per-prompt encode_text, normalise, mean, renormalise."""
    import open_clip

    model = build_backbone(job.model.spec, seed=job.seed)
    tok = open_clip.get_tokenizer("ViT-B-16")
    with torch.inference_mode():
        rows = [F.normalize(model.encode_text(tok([t.format(n) for t in templates]), normalize=True).mean(0), dim=0)
                for n in names]
    return torch.stack(rows).numpy(), float(model.logit_scale.detach().exp())


def _expected(emb_BE: np.ndarray, labels_B: np.ndarray, class_CE: np.ndarray, scale: float) -> tuple[float, float]:
    logits = scale * (emb_BE / np.linalg.norm(emb_BE, axis=1, keepdims=True)) @ class_CE.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return float((p.argmax(axis=1) == labels_B).mean()), float(p.max(axis=1).mean())


def _commit_features(job, root, emb: dict[str, np.ndarray], labels: np.ndarray, *, manifest_labels=True,
                     clip_dim=32) -> None:
    """A committed probe-features stage holding only classification_val, in two part files."""
    spec = job.model.spec
    stage = root.stage(job.model.name, FEATURES)
    schema = table_schema("classification", spec.width, spec.num_patches, spec.image_size, clip_dim)
    n = labels.size
    ids = [f"val_{i:06d}" for i in range(n)]
    for part, sl in (("p0", slice(0, n // 2)), ("p1", slice(n // 2, n))):
        rows = [{"image_id": ids[i], "variant": v, "embedding": np.zeros(spec.width, np.float32),
                 "label": int(labels[i]), "clip_embedding": emb[v][i]}
                for v in VARIANTS for i in range(n)[sl]]
        if clip_dim is None:
            for r in rows:
                r.pop("clip_embedding")
        stage.write_part("classification_val", part, pa.Table.from_pylist(rows, schema=schema))
    val = {"used": n, "label_max": int(labels.max())} if manifest_labels else {"used": n}
    stage.commit(features_hash(job), {}, {"classification_val": n * len(VARIANTS)},
                 extra={"clip_embedding_dim": clip_dim, "splits": {"classification": {"val": val}}})


@pytest.fixture(scope="module")
def cache():
    """Image embeddings near their class's text embedding for `original`, noisier per variant."""
    class_CE, scale = _direct_classes(load_config({"model": {"name": "demo-clip"}}))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(NAMES), 40)
    noise = {"original": 0.03, "high_removed": 0.05, "low_removed": 0.3, "random_removed": 0.04}
    emb = {v: (class_CE[labels] + s * rng.normal(size=(labels.size, 32))).astype(np.float32) for v, s in noise.items()}
    return emb, labels, class_CE, scale


def test_rows_equal_a_direct_computation_and_a_rerun_is_skipped(ray_local, tmp_path, cache):
    emb, labels, class_CE, scale = cache
    job = _job(tmp_path)
    root = ResultsRoot(job.storage.root)
    _commit_features(job, root, emb, labels)
    result = run_zeroshot(job, root, **QUIET)
    assert not result.skipped and [r["variant"] for r in result.rows] == list(VARIANTS)
    by_variant = {r["variant"]: r for r in result.rows}
    for v in VARIANTS:
        top1, conf = _expected(emb[v], labels, class_CE, scale)
        row = by_variant[v]
        assert row["n_images"] == labels.size and row["n_classes"] == len(NAMES) and row["templates"] == TEMPLATES
        assert row["top1"] == pytest.approx(top1, abs=1e-9) and row["mean_confidence"] == pytest.approx(conf, rel=1e-5)
        assert row["top1_delta"] == pytest.approx(top1 - by_variant["original"]["top1"])
    # The cache was built so that the variants really differ (the check above is not vacuous).
    assert len({round(r["mean_confidence"], 6) for r in result.rows}) == 4
    assert by_variant["low_removed"]["top1"] < by_variant["original"]["top1"]

    stage = root.stage(job.model.name, "zeroshot")
    assert stage.read_table("zeroshot").to_pylist() == result.rows
    classes = stage.read_table("classes").to_pylist()
    assert [c["name"] for c in classes] == NAMES
    np.testing.assert_allclose(np.array([c["text_embedding"] for c in classes]), class_CE, atol=1e-5)
    m = stage.manifest()
    assert m["templates"] == TEMPLATES and m["n_classes"] == 4 and m["logit_scale"] == pytest.approx(scale)
    assert m["image_embedding"] == "class_token" and {r["image_embedding"] for r in result.rows} == {"class_token"}

    again = run_zeroshot(job, ResultsRoot(root.uri), **QUIET)
    assert again.skipped and again.rows == result.rows
    other = run_zeroshot(_job(tmp_path, "zeroshot.templates=['a {} in a video game.']"), root, **QUIET)
    assert not other.skipped and other.rows[0]["templates"] == ["a {} in a video game."]


def test_warns_when_the_designated_layer_is_the_last_block(ray_local, tmp_path, cache):
    """CLIP's embedding is the class token; removal at the last block never reaches it."""
    emb, labels, *_ = cache
    for layer, blind in ((3, True), (2, False)):
        lines: list[str] = []
        job = _job(tmp_path / str(layer), f"model.layer={layer}")
        root = ResultsRoot(job.storage.root)
        _commit_features(job, root, emb, labels)
        result = run_zeroshot(job, root, log=lines.append)
        assert result.manifest["variants_equal_original_by_construction"] is blind
        assert any("every variant will score exactly like `original`" in line for line in lines) is blind


def test_a_model_without_a_text_tower_is_skipped_with_a_reason(tmp_path):
    job = _job(tmp_path, model="demo-vit-tiny")
    result = run_zeroshot(job, ResultsRoot(job.storage.root), **QUIET)
    assert result.skipped and "no text tower" in result.reason and result.rows == []
    assert not (tmp_path / "results").exists()


def test_labels_outside_the_class_names_are_named(ray_local, tmp_path, cache):
    emb, labels, *_ = cache
    job = _job(tmp_path, "zeroshot.class_names=[tench, goldfish]")
    root = ResultsRoot(job.storage.root)
    _commit_features(job, root, emb, labels)
    with pytest.raises(ValueError, match=r"labels reach 3, outside the 2 class names .*zeroshot.class_names"):
        run_zeroshot(job, root, **QUIET)
    # Without the manifest's label range the rows themselves are checked, naming the first bad image.
    root.stage(job.model.name, FEATURES).reset()
    _commit_features(job, root, emb, labels, manifest_labels=False)
    first = f"val_{int(np.flatnonzero(labels >= 2)[0]):06d}"
    with pytest.raises(ValueError, match=rf"image '{first}' has label [23], outside the 2 class names"):
        run_zeroshot(job, root, **QUIET)


def test_missing_or_old_features_say_what_to_run(tmp_path, cache):
    emb, labels, *_ = cache
    job = _job(tmp_path)
    root = ResultsRoot(job.storage.root)
    with pytest.raises(RuntimeError, match="probe-features stage .* is missing.*run `scope-ray stage probe` first"):
        run_zeroshot(job, root, **QUIET)
    _commit_features(job, root, emb, labels, clip_dim=None)
    with pytest.raises(RuntimeError, match="carry no clip_embedding.*remove its manifest.json"):
        run_zeroshot(job, root, **QUIET)


def test_class_names_from_files_and_folders(tmp_path):
    (tmp_path / "names.txt").write_text("# ImageNet\ntench\n\ngoldfish\n")
    (tmp_path / "list.json").write_text(json.dumps(["tench", "goldfish"]))
    (tmp_path / "index.json").write_text(json.dumps({"1": "goldfish", "0": "tench"}))
    (tmp_path / "gap.json").write_text(json.dumps({"0": "tench", "2": "shark"}))
    (tmp_path / "wnid.json").write_text(json.dumps({"n01443537": "goldfish", "n01440764": "tench"}))
    (tmp_path / "short.json").write_text(json.dumps({"n01440764": "tench"}))
    folder = tmp_path / "val"
    for wnid in ("n01440764", "n01443537"):
        (folder / wnid).mkdir(parents=True)
    fold = {"format": "folder", "path": str(folder)}
    for name in ("names.txt", "list.json", "index.json"):
        assert resolve_class_names(_job(tmp_path, f"zeroshot.class_names={tmp_path / name}"))[0] == ["tench", "goldfish"]
    assert resolve_class_names(_job(tmp_path, f"zeroshot.class_names={tmp_path / 'wnid.json'}", val=fold))[0] \
        == ["tench", "goldfish"]
    assert resolve_class_names(_job(tmp_path, "zeroshot.class_names=null", val=fold))[0] == ["n01440764", "n01443537"]
    assert resolve_class_names(_job(tmp_path, "zeroshot.class_names=null"))[0] == []  # label numbers, filled later
    with pytest.raises(ValueError, match="no name for label 1"):
        resolve_class_names(_job(tmp_path, f"zeroshot.class_names={tmp_path / 'gap.json'}"))
    with pytest.raises(ValueError, match="no name for wnid 'n01443537'"):
        resolve_class_names(_job(tmp_path, f"zeroshot.class_names={tmp_path / 'short.json'}", val=fold))
    with pytest.raises(ValueError, match="needs data.imagenet.val in folder format"):
        resolve_class_names(_job(tmp_path, f"zeroshot.class_names={tmp_path / 'wnid.json'}"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_class_names(_job(tmp_path, f"zeroshot.class_names={tmp_path / 'nope.txt'}"))


# ------------------------------------------------------------------ image_embedding: patch_mean
def _commit_real_features(job, root, px: np.ndarray, labels: np.ndarray):
    """probe-features' own writer (in process, no Ray) over ``px`` at the job's layer, after a seeded
    random SAE and a partition whose high group is the features firing most on these images."""
    from scope_ray.stages.probe_features import ProbeFeatureWriter
    from tests.stages.test_probe_features import _commit_upstream

    sae, groups = _commit_upstream(job, root, px)
    writer = ProbeFeatureWriter(job, root, "classification", "val", groups, torch_threads=torch.get_num_threads())
    n = labels.size
    out = writer({"image_id": np.array([f"val_{i:06d}" for i in range(n)], dtype=object), "pixels": px,
                  "ok": np.ones(n, bool), "reason": np.full(n, "", dtype=object), "label": labels})
    assert out["rows"].tolist() == [n * len(VARIANTS)]
    root.stage(job.model.name, FEATURES).commit(
        features_hash(job), {}, {"classification_val": n * len(VARIANTS)},
        extra={"clip_embedding_dim": 32, "splits": {"classification": {"val": {"used": n, "label_max": 3}}}})
    return sae, groups


def test_patch_mean_sees_removal_at_the_last_block_and_equals_open_clip(ray_local, tmp_path):
    """Designated layer = the last block (3 of 3): CLIP's class-token embedding is the same in every
    variant, the patch mean is not. Every patch_mean row equals a direct computation: for `original`
    open_clip's own tower run by hand (transformer, ln_post per token, mean over patch tokens,
    @ proj), for a removal variant the edited final patch tokens' mean through proj."""
    from scope_ray.removal import removal_edit

    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (8, 96, 96, 3), dtype=np.uint8)
    labels = rng.integers(0, len(NAMES), 8).astype(np.int64)
    job = _job(tmp_path, "model.layer=3")
    root = ResultsRoot(job.storage.root)
    sae, groups = _commit_real_features(job, root, px, labels)

    lines: list[str] = []
    tok = run_zeroshot(job, root, log=lines.append)
    assert tok.manifest["variants_equal_original_by_construction"] is True
    assert any("zeroshot.image_embedding=patch_mean" in line for line in lines)
    assert len({(r["n_correct"], r["mean_confidence"]) for r in tok.rows}) == 1  # blind by construction

    lines.clear()
    job_pm = _job(tmp_path, "model.layer=3", "zeroshot.image_embedding=patch_mean")
    result = run_zeroshot(job_pm, root, log=lines.append)
    assert not result.skipped  # another config hash than the class_token run's
    assert result.manifest["image_embedding"] == "patch_mean"
    assert result.manifest["variants_equal_original_by_construction"] is False
    assert not any("every variant will score exactly" in line for line in lines)
    assert {r["image_embedding"] for r in result.rows} == {"patch_mean"}

    model = build_model(job.model.name, seed=job.seed, layer=3)
    visual = model.backbone.visual
    pixels = model.preprocess(px)
    with torch.inference_mode():
        x = visual.ln_post(visual.transformer(visual._embeds(pixels)))  # open_clip's forward, ln_post per token
        want = {"original": (x[:, 1:].mean(dim=1) @ visual.proj).numpy()}
        for variant, group in (("high_removed", "high"), ("low_removed", "low"), ("random_removed", "random")):
            tokens = model.final_tokens(pixels, edit=removal_edit(sae, groups[group]))
            want[variant] = (tokens[:, 1:].mean(dim=1) @ visual.proj).numpy()
    class_CE, scale = _direct_classes(job)
    by_variant = {r["variant"]: r for r in result.rows}
    for v in VARIANTS:
        top1, conf = _expected(want[v], labels, class_CE, scale)
        assert by_variant[v]["top1"] == pytest.approx(top1, abs=1e-9)
        assert by_variant[v]["mean_confidence"] == pytest.approx(conf, rel=1e-5)
    # Removal is visible: the high group's removal moves the embedding and CLIP's confidence.
    assert np.abs(want["high_removed"] - want["original"]).max() > 1e-3
    assert abs(by_variant["high_removed"]["mean_confidence_delta"]) > 1e-6
    assert by_variant["original"]["mean_confidence"] != tok.rows[0]["mean_confidence"]  # not CLIP's own embedding


def test_patch_mean_needs_no_clip_embedding_column(ray_local, tmp_path, cache):
    """patch_mean reads the cached `embedding`, which every probe-features cache has."""
    emb, labels, *_ = cache
    job = _job(tmp_path, "zeroshot.image_embedding=patch_mean")
    root = ResultsRoot(job.storage.root)
    _commit_features(job, root, emb, labels, clip_dim=None)
    result = run_zeroshot(job, root, **QUIET)
    assert not result.skipped and [r["n_images"] for r in result.rows] == [labels.size] * 4


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_after_the_ray_probe_features_stage(ray_local, tmp_path):
    """probe-features through Ray Data on demo-clip, then zero-shot: `original` agrees with
    open_clip's encode_image on the same pixels and the text tower's class embeddings."""
    from scope_ray.data.images import decode_image, resize_center_crop
    from scope_ray.data.synthetic import write_synthetic
    from scope_ray.stages.probe_features import run_probe_features
    from tests.stages.test_probe_features import _commit_upstream

    src = write_synthetic(str(tmp_path / "data"), n_train=0, n_val=6, size=128, num_classes=4, seed=1,
                          formats=("parquet",))["imagenet"]["parquet"]
    job = _job(tmp_path, "extract.batch_size=4", val=src["val"])
    root = ResultsRoot(job.storage.root)
    images = pq.ParquetDataset(src["val"]["path"]).read().to_pylist()
    size = job.model.spec.image_size
    px = np.stack([resize_center_crop(decode_image(r["image"]), size) for r in images])
    _commit_upstream(job, root, px)
    run_probe_features(job, root, progress=False, log=lambda *_: None)
    result = run_zeroshot(job, root, **QUIET)

    model = build_model(job.model.name, seed=job.seed)
    with torch.inference_mode():
        emb = model.backbone.encode_image(model.preprocess(px)).numpy()
    labels = np.array([r["label"] for r in images])
    class_CE, scale = _direct_classes(job)
    top1, conf = _expected(emb, labels, class_CE, scale)
    row = result.rows[0]
    assert row["variant"] == "original" and row["n_images"] == len(images)
    assert row["top1"] == pytest.approx(top1) and row["mean_confidence"] == pytest.approx(conf, rel=1e-4)
    assert [r["n_images"] for r in result.rows] == [len(images)] * 4
