"""The probe-features stage through real Ray Data, checked row by row against an in-process
``final_tokens`` with the same ViT, SAE and groups; plus its decoding of bad inputs."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch

from scope_ray.config import load_config
from scope_ray.data.images import bad_image_samples, decode_image, decode_mask, resize_center_crop, resize_center_crop_plane
from scope_ray.data.synthetic import write_synthetic
from scope_ray.models import build_model
from scope_ray.removal import random_group, removal_edit
from scope_ray.sae import BatchTopKSAE
from scope_ray.stages.partition import config_hash as partition_hash
from scope_ray.stages.probe_features import (
    VARIANTS,
    RANDOM_POOL,
    ProbeFeatureWriter,
    SplitCounts,
    load_groups,
    run_probe_features,
    table_schema,
    verify_table,
)
from scope_ray.stages.train_sae import SAE_FILE, run_train_sae
from scope_ray.stages.train_sae import config_hash as train_hash
from scope_ray.storage import ResultsRoot
from tests.image_bytes import jpeg as _jpeg
from tests.image_bytes import png as _png

SIZE = 112  # demo-vit-tiny's input side
QUIET = dict(progress=False, log=lambda *_: None)


def _photo(h: int = 40, w: int = 40) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- Ray stage
def _add_shard(source: dict, rows: dict[str, list]) -> None:
    """A second Parquet shard with bad rows beside the synthetic one (same columns)."""
    first = pq.read_table(posixpath.join(source["path"], "part-00000.parquet"))
    pq.write_table(pa.table(rows, schema=first.schema), posixpath.join(source["path"], "part-00001.parquet"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-data")
    src = write_synthetic(str(root), n_train=0, n_val=3, size=128, num_classes=6, seed=5, formats=("parquet",))
    src = {d: src[d]["parquet"] for d in src}
    good = pq.read_table(posixpath.join(src["imagenet"]["val"]["path"], "part-00000.parquet")).column("image")[0].as_py()
    truncated = bad_image_samples()["truncated"][0]
    _add_shard(src["imagenet"]["val"], {"key": ["bad_big_label", "bad_no_label", "bad_image"],
                                        "image": [good, good, truncated], "label": [5000, -1, 0]})
    mask = _png(np.ones((128, 128), np.uint8))
    _add_shard(src["ade20k"]["val"], {"key": ["bad_mask_size", "bad_no_mask", "bad_corrupt_mask"],
                                      "image": [good] * 3,
                                      "mask": [_png(np.ones((100, 128), np.uint8)), None, mask[:40]]})
    _add_shard(src["nyud"]["val"], {"key": ["bad_zero_depth", "bad_no_depth"], "image": [good] * 2,
                                    "depth": [_png(np.zeros((128, 128), np.uint16)), None]})
    return src


def _job(data, results, *overrides):
    return load_config({"storage": {"root": str(results)},
                        "data": {"imagenet": {"val": data["imagenet"]["val"]},
                                 "ade20k": {"val": data["ade20k"]["val"]}, "nyud": {"val": data["nyud"]["val"]}}},
                       ["sae.expansion=1", "sae.k=4", "extract.batch_size=4", *overrides])


def _rows(source: dict) -> list[dict]:
    """Every row of a Parquet source, bad shard included (key, image, target)."""
    return pq.ParquetDataset(source["path"]).read().to_pylist()


def _pixels(image: bytes) -> np.ndarray:
    return resize_center_crop(decode_image(image), SIZE)


def _commit_upstream(job, root: ResultsRoot, pixels_BSS3: np.ndarray) -> tuple[BatchTopKSAE, dict[str, np.ndarray]]:
    """A seeded random SAE (threshold > 0) committed as train-sae, and a partition `features`
    table whose high group is the features firing most on these images, so removal matters.
    When the job has ``sae.source`` (a plain-layout file), the same dictionary is written there
    and train-sae imports it: the stage then runs on an SAE from outside, as issue 17 asks."""
    spec = job.model.spec
    model = build_model(job.model.name, weights="none", seed=job.seed, layer=job.model.resolved_layer)
    with torch.inference_mode():
        tokens = model.forward_layer(model.preprocess(pixels_BSS3)).patch_tokens.reshape(-1, spec.width)
    torch.manual_seed(0)
    q = job.dictionary_size
    sae = BatchTopKSAE(spec.width, q, job.sae.k).eval()
    with torch.no_grad():
        pre = sae.pre_acts(tokens)
        sae.threshold.fill_(float(torch.quantile(pre[pre > 0], 0.8)))
        fires = (sae.encode(tokens) > 0).sum(dim=0).numpy()
    stage = root.stage(job.model.name, "train-sae")
    if job.sae.source is None:
        sae.save(posixpath.join(stage.uri, SAE_FILE))
        stage.commit(train_hash(job), {}, {})
    else:  # the documented plain layout: ReLU((x − b_pre) W_enc + b_enc), kept where > θ
        with torch.no_grad():
            tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc / sae.input_scale, "W_dec": sae.W_dec,
                       "b_dec": sae.b_dec / sae.input_scale, "b_pre": sae.b_dec / sae.input_scale,
                       "threshold": (sae.threshold / sae.input_scale).reshape(())}
        safetensors.torch.save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()},
                                    job.sae.source.path, metadata={"activation": "threshold", "compare": ">"})
        run_train_sae(job, root, log=lambda *_: None)
        assert stage.manifest()["imported"]["toolkit"] == "plain"
    order = np.argsort(-fires, kind="stable")
    group = np.full(q, "unscored", dtype=object)
    group[order[:12]] = "high"
    group[order[12:60]] = "low"
    cds = np.full(q, np.nan)
    cds[order[:12]], cds[order[12:60]] = np.linspace(0.6, 1.0, 12), np.linspace(0.0, 0.3, 48)
    cds[order[60:66]] = 0.1  # unscored with a finite CDS (too few usable images): not in the random pool
    _commit_partition(job, root, cds, group)
    groups = {"high": np.sort(order[:12]), "low": np.sort(order[12:60])}
    groups["random"] = random_group(q, 12, pool=groups["low"], exclude=groups["high"], seed=job.seed).numpy()
    return sae, groups


def _commit_partition(job, root: ResultsRoot, cds_Q: np.ndarray, group_Q: np.ndarray) -> None:
    part = root.stage(job.model.name, "partition")
    part.write_part("features", "part-0", pa.table({"feature": pa.array(np.arange(cds_Q.size), pa.int64()),
                                                    "cds": pa.array(cds_Q, pa.float64()),
                                                    "group": pa.array(group_Q.tolist(), pa.string())}))
    part.commit(partition_hash(job), {}, {"features": int(cds_Q.size)})


def test_config_hash_names_the_random_pool(tmp_path, monkeypatch):
    """Features cached with the control drawn from all q (before 2026-12) are not reused."""
    from scope_ray import pipeline

    job = load_config({"storage": {"root": str(tmp_path)}}, ["sae.expansion=1"])
    now = pipeline.probe_features_hash(job)
    monkeypatch.setattr(pipeline, "RANDOM_POOL", "all q features")
    assert pipeline.probe_features_hash(job) != now


@pytest.mark.parametrize("unscored", ["unscored", "nan"])
def test_random_group_comes_from_scored_features_outside_the_high_group(tmp_path, unscored):
    """load_groups (no Ray): the control has |high| members, all from the low group (finite CDS <= γ),
    never a high one and never an unscored one, whether its CDS is NaN or finite (too few usable
    images) and whatever that bucket is called (``nan`` before 2026-12); the job seed fixes it."""
    def job_at(name, *overrides):
        return load_config({"storage": {"root": str(tmp_path / name)}}, ["sae.expansion=1", *overrides])

    job = job_at("a")
    q = job.dictionary_size
    rng = np.random.default_rng(3)
    cds = rng.uniform(0, 1, q)
    group = np.where(cds > 0.7, "high", "low").astype(object)
    unscored_ids = rng.choice(q, q // 3, replace=False)
    group[unscored_ids] = unscored
    cds[unscored_ids[: q // 6]] = np.nan  # dead / never selected; the rest keep a finite CDS
    high, low = np.flatnonzero(group == "high"), np.flatnonzero(group == "low")
    assert 0 < high.size <= low.size and np.isfinite(cds[group == unscored]).any()
    draws = []
    for name, overrides in (("a", ()), ("b", ()), ("c", ("seed=1",))):
        j = job_at(name, *overrides)
        _commit_partition(j, ResultsRoot(str(tmp_path / name)), cds, group)
        g = load_groups(j, ResultsRoot(str(tmp_path / name)))
        assert np.array_equal(g["high"], high) and np.array_equal(g["low"], low) and np.array_equal(g["random_pool"], low)
        r = g["random"]
        assert r.size == high.size and np.unique(r).size == r.size
        assert set(r.tolist()) <= set(low.tolist()) and np.isfinite(cds[r]).all() and (group[r] == "low").all()
        draws.append(r.tolist())
    assert draws[0] == draws[1] != draws[2]  # the same seed draws the same group, another seed another

    # Fewer eligible features than |high|: a clear error naming both sizes.
    few = np.where(cds > 0.2, "high", "low").astype(object)
    few[unscored_ids] = unscored
    n_high, n_low = int((few == "high").sum()), int(((few == "low") & np.isfinite(cds)).sum())
    assert n_low < n_high
    j = job_at("d")
    _commit_partition(j, ResultsRoot(str(tmp_path / "d")), cds, few)
    with pytest.raises(RuntimeError, match=rf"needs \|high\| = {n_high} .*only {n_low} exist"):
        load_groups(j, ResultsRoot(str(tmp_path / "d")))


@pytest.fixture(scope="module")
def stage_run(ray_local, data, tmp_path_factory):
    results = tmp_path_factory.mktemp("probe-results")
    # The SAE comes from outside (sae.source): probe-features, and the probes reading its cache,
    # take an imported SAE as they take a trained one (the demo covers the trained one).
    job = _job(data, results, f"sae.source={{format: plain, path: '{results / 'plain-sae.safetensors'}'}}")
    root = ResultsRoot(str(results))
    good = [r for r in _rows(data["imagenet"]["val"]) if not r["key"].startswith("bad")]
    sae, groups = _commit_upstream(job, root, np.stack([_pixels(r["image"]) for r in good]))
    result = run_probe_features(job, root, **QUIET)
    return job, root, sae, groups, result


def _read(root, job, table) -> dict[tuple[str, str], dict]:
    t = root.stage(job.model.name, "probe-features").read_table(table)
    return {(r["image_id"], r["variant"]): r for r in t.to_pylist()}


def _direct(job, sae, groups, image: bytes) -> dict[str, np.ndarray]:
    """tokens_TD of every variant for one image, in process, image by image."""
    model = build_model(job.model.name, weights="none", seed=job.seed)
    px = model.preprocess(_pixels(image)[None])
    edits = {"original": None, "high_removed": removal_edit(sae, groups["high"]),
             "low_removed": removal_edit(sae, groups["low"]), "random_removed": removal_edit(sae, groups["random"])}
    with torch.inference_mode():
        return {v: model.final_tokens(px, edit=e)[0].float().numpy() for v, e in edits.items()}


@pytest.mark.slow
def test_rows_equal_direct_final_tokens(stage_run, data):
    job, root, sae, groups, result = stage_run
    assert not result.skipped
    spec, p = job.model.spec, 1  # demo-vit-tiny: one class token, no registers
    n, d = spec.num_patches, spec.width
    cls_rows = _read(root, job, "classification_val")
    seg_rows = _read(root, job, "segmentation_val")
    depth_rows = _read(root, job, "depth_val")
    checks = [(cls_rows, data["imagenet"]["val"]), (seg_rows, data["ade20k"]["val"]), (depth_rows, data["nyud"]["val"])]
    for rows, source in checks:
        first = next(r for r in _rows(source) if r["key"] == "val_000000")
        want = _direct(job, sae, groups, first["image"])
        for variant, tokens_TD in want.items():
            row = rows[("val_000000", variant)]
            if "embedding" in row:
                np.testing.assert_allclose(row["embedding"], tokens_TD[p:].mean(axis=0), atol=1e-5, rtol=1e-5)
            else:
                np.testing.assert_allclose(np.reshape(row["tokens"], (n, d)), tokens_TD[p:], atol=1e-5, rtol=1e-5)
            if "cls" in row:
                np.testing.assert_allclose(row["cls"], tokens_TD[0], atol=1e-5, rtol=1e-5)
    # Removal really changed the tokens; the class token changed only through the block after the
    # designated one (layer 3 of 4), so it moves too, but less than the patch tokens.
    orig, high = depth_rows[("val_000000", "original")], depth_rows[("val_000000", "high_removed")]
    patch_shift = np.abs(np.subtract(orig["tokens"], high["tokens"])).max()
    assert patch_shift > 1e-3
    assert 0 < np.abs(np.subtract(orig["cls"], high["cls"])).max()
    assert result.group_sizes["high"] == 12 and result.group_sizes["low"] == 48 and result.group_sizes["random"] == 12
    assert result.group_sizes["random_shared_with_high"] == 0
    assert result.manifest["random_group"] == {"drawn_from": RANDOM_POOL, "pool": 48, "size": 12, "seed": job.seed}


@pytest.mark.slow
def test_layout_counts_and_bad_inputs(stage_run, data):
    job, root, sae, groups, result = stage_run
    spec = job.model.spec
    stage = root.stage(job.model.name, "probe-features")
    m = stage.manifest()
    assert m["width"] == spec.width and m["grid"] == spec.grid and m["image_size"] == SIZE
    assert m["variants"] == list(VARIANTS) and m["cls_source"] == "class token"
    expected_used = {"classification_val": 4, "segmentation_val": 3, "depth_val": 4}
    for table, used in expected_used.items():
        task, split = table.rsplit("_", 1)
        t = stage.read_table(table)
        assert t.schema == table_schema(task, spec.width, spec.num_patches, SIZE), table
        assert t.num_rows == used * len(VARIANTS) == m["rows"][table]
        assert t.group_by(["image_id", "variant"]).aggregate([]).num_rows == t.num_rows
        assert m["splits"][task][split]["used"] == used
    reject_rows = stage.read_table("rejects").to_pylist()
    assert {r["task"] for r in reject_rows} == {"classification", "segmentation", "depth"}
    rejects = {r["image_id"]: r["reason"] for r in reject_rows}
    assert rejects.pop("bad_no_label") == "missing label"
    assert rejects.pop("bad_image").startswith("corrupt or truncated image")
    assert rejects.pop("bad_mask_size") == "mask size mismatch: image 128x128, mask 100x128"
    assert rejects.pop("bad_no_mask") == "missing label"
    assert rejects.pop("bad_corrupt_mask").startswith("corrupt mask")
    assert rejects.pop("bad_no_depth") == "missing depth"
    assert rejects == {}
    assert sorted(m["tables"]) == sorted([*expected_used, "rejects"])
    # An out-of-range label is kept (the probe validates the range) and reported in the manifest.
    labels = {r["image_id"]: r["label"] for r in stage.read_table("classification_val").to_pylist()}
    assert labels["bad_big_label"] == 5000 and m["splits"]["classification"]["val"]["label_max"] == 5000
    # Masks: the annotation at the input geometry, release class k -> k-1, 255 = ignore.
    seg = _read(root, job, "segmentation_val")
    ade = next(r for r in _rows(data["ade20k"]["val"]) if r["key"] == "val_000001")
    want_mask = resize_center_crop_plane(decode_mask(ade["mask"]), SIZE)
    np.testing.assert_array_equal(np.asarray(seg[("val_000001", "low_removed")]["mask"], np.uint8).reshape(SIZE, SIZE),
                                  want_mask)
    # Depth: invalid pixels stay NaN (the synthetic maps' zero border, and an all-zero map) and are counted.
    depth = _read(root, job, "depth_val")
    zero = np.asarray(depth[("bad_zero_depth", "original")]["depth"], np.float32)
    assert np.isnan(zero).all()
    nans = sum(int(np.isnan(np.asarray(r["depth"], np.float32)).sum()) for (i, v), r in depth.items() if v == "original")
    assert m["splits"]["depth"]["val"]["invalid_depth_pixels"] == nans > SIZE * SIZE


@pytest.mark.slow
def test_rerun_is_skipped(stage_run):
    job, root, *_ = stage_run
    again = run_probe_features(job, ResultsRoot(root.uri), **QUIET)
    assert again.skipped and again.manifest["config_hash"] == root.stage(job.model.name, "probe-features").manifest()["config_hash"]


# ------------------------------------------------------------------------ failing early
def test_missing_or_stale_partition_names_the_cds_stage(data, tmp_path):
    job = _job(data, tmp_path / "r")
    root = ResultsRoot(str(tmp_path / "r"))
    with pytest.raises(RuntimeError, match="scope-ray stage cds"):
        run_probe_features(job, root, **QUIET)
    part = root.stage(job.model.name, "partition")
    part.write_part("features", "part-0", pa.table({"feature": [0], "group": ["high"]}))
    part.commit("some-other-config", {}, {"features": 1})
    with pytest.raises(RuntimeError, match="from another config.*scope-ray stage cds"):
        run_probe_features(job, root, **QUIET)


def test_verify_refuses_doubled_or_missing_rows(tmp_path):
    root = ResultsRoot(str(tmp_path))
    stage = root.stage("m", "probe-features")
    rows = {"image_id": ["a"] * 4 + ["b"] * 4, "variant": list(VARIANTS) * 2}
    stage.write_part("classification_val", "p0", pa.table(rows))
    verify_table(stage, "classification_val", SplitCounts(images=3, rejected=1))
    stage.write_part("classification_val", "p1", pa.table({"image_id": ["b"], "variant": ["original"]}))
    with pytest.raises(RuntimeError, match="not committing"):
        verify_table(stage, "classification_val", SplitCounts(images=3, rejected=1))
    with pytest.raises(RuntimeError, match="not committing"):
        verify_table(stage, "classification_val", SplitCounts(images=4, rejected=1))


def test_class_token_is_untouched_when_the_designated_layer_is_last():
    """The stage's `cls` is the final-layer class token: removal edits patch tokens only, so the
    class token moves only through blocks after the designated one (none when it is the last)."""
    px = resize_center_crop(_photo(64, 80), SIZE)[None]
    torch.manual_seed(0)
    for layer, moves in ((4, False), (3, True)):
        model = build_model("demo-vit-tiny", weights="none", seed=0, layer=layer)
        pixels = model.preprocess(px)
        sae = BatchTopKSAE(96, 96, 4).eval()
        with torch.inference_mode():
            tokens = model.forward_layer(pixels).patch_tokens[0]
            pre = sae.pre_acts(tokens)
            sae.threshold.fill_(float(pre[pre > 0].quantile(0.5)))
            edit = removal_edit(sae, np.arange(48))
            orig, edited = model.final_tokens(pixels), model.final_tokens(pixels, edit=edit)
        assert not torch.equal(orig[0, 1:], edited[0, 1:])
        assert torch.equal(orig[0, 0], edited[0, 0]) is not moves


def test_writer_rejects_an_image_with_nonfinite_tokens(data, tmp_path, monkeypatch):
    """The actor class, called in process: an image whose final tokens hold NaN in any variant is
    rejected in every variant, so no probe ever trains on it."""
    import pyarrow.dataset as pads

    job = _job(data, tmp_path / "r")
    root = ResultsRoot(str(tmp_path / "r"))
    rows = [r for r in _rows(data["imagenet"]["val"]) if not r["key"].startswith("bad")]
    px = np.stack([_pixels(r["image"]) for r in rows])
    _, groups = _commit_upstream(job, root, px)
    writer = ProbeFeatureWriter(job, root, "classification", "val", groups, torch_threads=torch.get_num_threads())
    real = writer.model.final_tokens

    def broken(pixels, edit=None, start_from=None):
        tokens = real(pixels, edit=edit, start_from=start_from).clone()
        if edit is not None:  # only a removal variant breaks
            tokens[1, 3, 0] = float("nan")
        return tokens

    monkeypatch.setattr(writer.model, "final_tokens", broken)
    ids = [r["key"] for r in rows]
    out = writer({"image_id": np.array(ids, dtype=object), "pixels": px, "ok": np.ones(len(ids), bool),
                  "reason": np.full(len(ids), "", dtype=object), "label": np.arange(len(ids), dtype=np.int64)})
    assert out["rejected"].tolist() == [1] and out["rows"].tolist() == [(len(ids) - 1) * len(VARIANTS)]
    stage = root.stage(job.model.name, "probe-features")
    rejects = pads.dataset(root.fs.glob(f"{stage.table_path('rejects')}/*.parquet")).to_table().to_pylist()
    assert [(r["image_id"], r["reason"].split(":")[0]) for r in rejects] == [(ids[1], "nonfinite_activations")]
    table = pads.dataset(root.fs.glob(f"{stage.table_path('classification_val')}/*.parquet")).to_table()
    assert ids[1] not in table.column("image_id").to_pylist()


def test_rejects_of_two_tasks_with_the_same_ids_are_both_kept(data, tmp_path):
    """Parquet keys repeat across datasets (val_000000 in each): one task's reject part must not
    overwrite another's."""
    import pyarrow.dataset as pads

    job = _job(data, tmp_path / "r")
    root = ResultsRoot(str(tmp_path / "r"))
    rows = [r for r in _rows(data["imagenet"]["val"]) if not r["key"].startswith("bad")]
    _, groups = _commit_upstream(job, root, np.stack([_pixels(r["image"]) for r in rows]))
    batch = {"image_id": np.array(["val_000000"], dtype=object), "pixels": np.zeros((1, SIZE, SIZE, 3), np.uint8),
             "ok": np.zeros(1, bool), "reason": np.array(["missing label"], dtype=object)}
    for task in ("segmentation", "depth"):
        writer = ProbeFeatureWriter(job, root, task, "val", groups, torch_threads=torch.get_num_threads())
        assert writer(dict(batch))["rejected"].tolist() == [1]
    stage = root.stage(job.model.name, "probe-features")
    got = pads.dataset(root.fs.glob(f"{stage.table_path('rejects')}/*.parquet")).to_table()
    assert sorted(got.column("task").to_pylist()) == ["depth", "segmentation"]


def test_clip_models_cache_the_image_towers_own_embedding(data, tmp_path):
    """A model with a text tower gets ``clip_embedding`` in its classification rows, from the same
    edited forward: for ``original`` exactly open_clip's ``encode_image``, for a removal variant
    the class token of the edited final tokens through the visual projection (``tok`` pooling)."""
    import pyarrow.dataset as pads

    from scope_ray.stages.probe_features import spec_clip_dim

    job = _job(data, tmp_path / "r", "model.name=demo-clip")
    root = ResultsRoot(str(tmp_path / "r"))
    spec = job.model.spec
    size = spec.image_size
    rows = [r for r in _rows(data["imagenet"]["val"]) if not r["key"].startswith("bad")]
    px = np.stack([resize_center_crop(decode_image(r["image"]), size) for r in rows])
    sae, groups = _commit_upstream(job, root, px)
    writer = ProbeFeatureWriter(job, root, "classification", "val", groups, torch_threads=torch.get_num_threads())
    ids = [r["key"] for r in rows]
    out = writer({"image_id": np.array(ids, dtype=object), "pixels": px, "ok": np.ones(len(ids), bool),
                  "reason": np.full(len(ids), "", dtype=object), "label": np.arange(len(ids), dtype=np.int64)})
    assert out["rows"].tolist() == [len(ids) * len(VARIANTS)]
    stage = root.stage(job.model.name, "probe-features")
    table = pads.dataset(root.fs.glob(f"{stage.table_path('classification_val')}/*.parquet")).to_table()
    e = spec_clip_dim(spec)
    assert e == 32 and table.schema == table_schema("classification", spec.width, spec.num_patches, size, e)
    got = {(r["image_id"], r["variant"]): np.asarray(r["clip_embedding"], np.float32) for r in table.to_pylist()}

    model = build_model(job.model.name, weights="none", seed=job.seed)
    pixels = model.preprocess(px)
    with torch.inference_mode():
        want = {"original": model.backbone.encode_image(pixels).numpy()}
        for variant, group in (("high_removed", "high"), ("low_removed", "low")):
            tokens = model.final_tokens(pixels, edit=removal_edit(sae, groups[group]))
            want[variant] = (tokens[:, 0] @ model.vision.proj).numpy()
    for variant, emb_BE in want.items():
        for i, image_id in enumerate(ids):
            np.testing.assert_allclose(got[(image_id, variant)], emb_BE[i], atol=1e-5, rtol=1e-5)
    # Removal reaches the CLIP embedding (the designated block is 2 of 3, the edit runs through block 3).
    assert np.abs(got[(ids[0], "high_removed")] - got[(ids[0], "original")]).max() > 1e-4
    # Models without a text tower keep the old schema.
    assert "clip_embedding" not in table_schema("classification", 96, 49, 112).names
