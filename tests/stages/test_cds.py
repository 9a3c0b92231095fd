"""The CDS stages (two passes) and the partition through real Ray Data, checked against a direct
in-process computation on the same images with the same ViT and SAE."""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from scope_ray.config import load_config
from scope_ray.data.images import bad_image_samples, decode_image, resize_center_crop
from scope_ray.data.synthetic import write_image_folder, write_synthetic
from scope_ray.models import build_model
from scope_ray.sae import BatchTopKSAE
from scope_ray.scc import overlap_indices, overlap_maps, scc_views
from scope_ray.scope import cds_from_scores, scc_pair_scores
from scope_ray.stages.cds import PAIRS_SCHEMA, run_cds, run_cds_topk
from scope_ray.stages.extract import config_hash as extract_hash
from scope_ray.stages.instability import analysis_image_ids
from scope_ray.stages.partition import run_partition
from scope_ray.stages.train_sae import SAE_FILE
from scope_ray.stages.train_sae import config_hash as train_hash
from scope_ray.storage import ResultsRoot
from scope_ray.tokens import REJECTS_SCHEMA
from scope_ray.tokens import token_table
from scope_ray.topk import image_key

pytestmark = pytest.mark.slow

N_POOL = 18
NEVER_FIRES = 5  # a feature whose encoder bias is so negative it cannot fire


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    sources = write_synthetic(str(root), n_train=2, n_val=N_POOL, size=112, num_classes=6, seed=3)["imagenet"]
    val = sources["folder"]["val"]
    write_image_folder(val["path"], {"n00000000/zz_truncated.JPEG": bad_image_samples()["truncated"][0]})
    return val


def _job(pool, root, *overrides):
    return load_config({"storage": {"root": str(root)}, "data": {"imagenet": {"val": pool}}},
                       ["sae.expansion=1", "sae.k=4", "scope.k_cds=3", "scope.min_usable_images=2", "scope.spare_images=2",
                        "scope.batch_size=4",
                        "scope.gallery_features=2", "scope.gallery_images=2", "scope.instability_images=8",
                        "ray.num_actors=2", *overrides])


def _pool_images(pool) -> dict[str, np.ndarray]:
    """image id -> decoded RGB array, for every readable pool image (ids as the folder source names them)."""
    from pathlib import Path

    out = {}
    base = Path(pool["path"])
    for p in sorted(base.rglob("*")):
        if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png"):
            try:
                out[str(p.relative_to(base))] = decode_image(p.read_bytes(), max_pixels=10**8, min_side=8)
            except Exception:
                pass
    return out


def _commit_sae_and_tokens(job, root: ResultsRoot, images: dict[str, np.ndarray], commit_sae: bool = True) -> BatchTopKSAE:
    """A seeded random SAE with a threshold that keeps codes sparse, committed as train-sae (unless
    ``commit_sae`` is False); and the pool's val tokens committed as extract (the partition reads
    them), as real stages would."""
    model = build_model(job.model.name, weights="none", seed=job.seed)
    spec = job.model.spec
    pixels = np.stack([resize_center_crop(img, spec.image_size) for img in images.values()])
    with torch.inference_mode():
        out = model.forward_layer(model.preprocess(pixels))
    tokens = out.patch_tokens.reshape(-1, spec.width)
    torch.manual_seed(0)
    sae = BatchTopKSAE(spec.width, job.dictionary_size, job.sae.k).eval()
    with torch.no_grad():
        sae.b_enc[NEVER_FIRES] = -1e6
        pre = sae.pre_acts(tokens)
        sae.threshold.fill_(float(torch.quantile(pre[pre > 0], 0.8)))
    if commit_sae:
        stage = root.stage(job.model.name, "train-sae")
        sae.save(posixpath.join(stage.uri, SAE_FILE), endpoint_url=root.endpoint_url)
        stage.commit(train_hash(job), {}, {})
    ext = root.stage(job.model.name, "extract")
    n = spec.num_patches
    ids = list(images)
    acts = out.patch_tokens.numpy()
    ext.write_part("val_tokens", "p0", token_table(ids, np.broadcast_to(np.arange(n), (len(ids), n)), acts,
                                                   out.norms.numpy()))
    ext.commit(extract_hash(job), {}, {"val_tokens": len(ids) * n})
    return sae


def _direct_cds(job, sae, images: dict[str, np.ndarray], keep: int):
    """Top images per feature and CDS computed in-process, image by image (no Ray, no batching tricks)."""
    model = build_model(job.model.name, weights="none", seed=job.seed)
    spec = job.model.spec
    grid, s = spec.grid, job.scope.shift

    def codes(pix):
        with torch.inference_mode():
            t = model.forward_layer(model.preprocess(pix[None])).patch_tokens[0]
            return sae.encode(t).numpy()

    # Pass 1 selects on the overlap of the image's SCC pair (both views), not on a centre crop.
    idx1, idx2 = overlap_indices(grid, s)
    max_IQ = np.stack([np.maximum(codes(v1)[idx1].max(axis=0), codes(v2)[idx2].max(axis=0))
                       for v1, v2 in (scc_views(img, spec.patch, grid, s) for img in images.values())])
    ids = list(images)
    top = {}
    for f in range(job.dictionary_size):
        cand = [(-max_IQ[i, f], image_key(ids[i]), ids[i]) for i in range(len(ids)) if max_IQ[i, f] > 0]
        top[f] = [c[2] for c in sorted(cand)[:keep]]
    cds = np.full(job.dictionary_size, np.nan)
    for f, chosen in top.items():
        m1, m2 = [], []
        for i in chosen:
            v1, v2 = scc_views(images[i], spec.patch, grid, s)
            a, b = overlap_maps(codes(v1)[:, f], codes(v2)[:, f], grid, s)
            m1.append(a)
            m2.append(b)
        if chosen:
            cds[f] = cds_from_scores(scc_pair_scores(np.stack(m1), np.stack(m2)), job.scope.k_cds)[0]
    return top, cds


def test_cds_stage_equals_direct_computation_and_partition(ray_local, pool, tmp_path):
    root = ResultsRoot(str(tmp_path / "results"))
    job = _job(pool, tmp_path / "results")
    images = _pool_images(pool)
    sae = _commit_sae_and_tokens(job, root, images)
    result = run_cds(job, root, progress=False, log=lambda *_: None)
    assert not result.skipped
    topk = root.stage(job.model.name, "cds-topk").read_table("topk")
    keep = job.scope.k_cds + job.scope.spare_images
    top, cds_direct = _direct_cds(job, sae, images, keep)
    got = {}
    for f, r, i in zip(topk.column("feature").to_pylist(), topk.column("rank").to_pylist(), topk.column("image_id").to_pylist()):
        got.setdefault(f, {})[r] = i
    for f in range(job.dictionary_size):
        assert [got.get(f, {})[r] for r in range(len(got.get(f, {})))] == top[f], f"feature {f}"
    table = result.table
    cds = table.column("cds").to_numpy()
    assert table.num_rows == job.dictionary_size  # every feature listed, NaN ones included
    np.testing.assert_allclose(cds, cds_direct, atol=1e-5, equal_nan=True)
    finite = cds[np.isfinite(cds)]
    assert finite.size > 0 and finite.min() >= 0 and finite.max() <= 1
    status = dict(zip(table.column("feature").to_pylist(), table.column("status").to_pylist()))
    assert status[NEVER_FIRES] == "never fired" and np.isnan(cds[NEVER_FIRES])
    # The truncated JPEG in the pool is recorded as rejected in pass 1; every other image was used.
    rejects = root.stage(job.model.name, "cds-topk").read_table("rejects").to_pylist()
    assert [r["image_id"] for r in rejects] == ["n00000000/zz_truncated.JPEG"]
    assert root.stage(job.model.name, "cds-topk").manifest()["images"] == len(images) + 1

    part = run_partition(job, root, progress=False, log=lambda *_: None)
    row = part.row
    # Every feature in exactly one bucket; unscored = no CDS, or a CDS from too few usable images.
    used = table.column("images_used").to_numpy()
    unscored = np.isnan(cds) | (used < job.scope.min_usable_images)
    assert 0 < unscored.sum() < job.dictionary_size
    assert row["low_cds"] + row["high_cds"] + row["unscored"] == job.dictionary_size
    assert row["unscored"] == int(unscored.sum())
    assert row["unscored_never_fired"] == list(status.values()).count("never fired")
    assert row["unscored_too_few_usable_images"] == int((~np.isnan(cds) & unscored).sum())
    assert row["gamma_source"].startswith("auto")
    # γ 'auto' is scikit-image's Otsu threshold over the scored features only.
    from skimage.filters import threshold_otsu

    assert row["gamma"] == pytest.approx(float(threshold_otsu(cds[~unscored])), abs=1e-12)
    members = root.stage(job.model.name, "partition").read_table("features").to_pylist()
    assert [m["group"] == "unscored" for m in members] == unscored.tolist()
    assert all((m["unscored_reason"] is None) == (m["group"] != "unscored") for m in members)
    assert [m["group"] for m in members].count("high") == row["high_cds"]
    assert all((m["group"] == "high") == (m["cds"] > row["gamma"]) for m in members if m["group"] != "unscored")
    sensitivity = root.stage(job.model.name, "partition").read_table("gamma_sensitivity").to_pylist()
    assert [s["high"] for s in sensitivity] == [int((cds[~unscored] > g).sum()) for g in
                                                 (row["gamma"] - 0.05, row["gamma"], row["gamma"] + 0.05)]
    for key, uri in part.figures.items():
        with Image.open(uri) as im:
            assert im.size[0] > 100, key
    awcds = root.stage(job.model.name, "partition").read_table("awcds")
    assert awcds.num_rows == job.scope.awcds_bins
    # The token statistics cover the analysis set: the first image of each class present in the
    # pool; a selected image that could not be decoded has no tokens and is not counted.
    pm = root.stage(job.model.name, "partition").manifest()
    selected = analysis_image_ids(job, root, pm["tau"])
    labels = {i.split("/")[0] for i in images}
    assert len(selected) == pm["images_requested"] == len(labels)
    readable = [i for i in selected if i in images]
    assert pm["images"] == len(readable) and pm["tokens"] == len(readable) * job.model.spec.num_patches
    assert 0 < int(np.sum(awcds.column("tokens").to_numpy())) <= pm["tokens"]  # tokens with a finite awCDS
    gallery = root.stage(job.model.name, "partition").read_table("gallery").to_pylist()
    low = {g["feature"] for g in gallery if g["group"] == "low"}
    high = {g["feature"] for g in gallery if g["group"] == "high"}
    assert low and high and not low & high
    assert max(cds[f] for f in low) <= min(cds[f] for f in high)

    # Re-runs skip; a new gamma redoes only the partition, not the CDS passes.
    again = run_cds(job, root, progress=False, log=lambda *_: None)
    assert again.skipped and again.topk.skipped
    fixed = _job(pool, tmp_path / "results", "scope.gamma=0.5")
    assert run_cds(fixed, root, progress=False, log=lambda *_: None).skipped
    part2 = run_partition(fixed, root, progress=False, log=lambda *_: None)
    assert not part2.skipped and part2.row["gamma"] == 0.5 and part2.row["gamma_source"] == "config"
    assert part2.row["high_cds"] == int((cds[~unscored] > 0.5).sum())


def test_an_imported_sae_gives_the_same_cds_and_the_report_names_its_origin(ray_local, pool, tmp_path):
    """sae.source: the same dictionary saved as dictionary_learning saves a BatchTopKSAE (ae.pt +
    config.json) is imported by train-sae; cds equals the direct computation with that dictionary,
    the partition runs on it, and the report's Table 6 says where the SAE came from."""
    from scope_ray.report.content import write_report
    from scope_ray.sae_export import export_sae, read_provenance
    from scope_ray.sae_import import ImportedSAE
    from scope_ray.stages.common import load_sae
    from scope_ray.stages.eval_sae import run_eval_sae
    from scope_ray.stages.train_sae import run_train_sae

    root = ResultsRoot(str(tmp_path / "results"))
    images = _pool_images(pool)
    sae = _commit_sae_and_tokens(_job(pool, tmp_path / "results"), root, images, commit_sae=False)
    folder = tmp_path / "dictionary_learning" / "trainer_0"
    folder.mkdir(parents=True)
    state = {"encoder.weight": sae.W_enc.T, "encoder.bias": sae.b_enc, "decoder.weight": sae.W_dec.T,
             "b_dec": sae.b_dec, "threshold": sae.threshold, "k": torch.tensor(sae.k, dtype=torch.int32)}
    torch.save({k: v.detach().clone().contiguous() for k, v in state.items()}, folder / "ae.pt")
    (folder / "config.json").write_text('{"trainer": {"dict_class": "BatchTopKSAE"}}')
    job = load_config({"storage": {"root": str(tmp_path / "results")}, "data": {"imagenet": {"val": pool}},
                       "sae": {"source": {"format": "dictionary_learning", "path": str(folder / "ae.pt")}}},
                      ["sae.expansion=1", "sae.k=4", "scope.k_cds=3", "scope.min_usable_images=2",
                       "scope.spare_images=2", "scope.batch_size=4", "scope.gallery_features=2",
                       "scope.gallery_images=2", "scope.instability_images=8", "ray.num_actors=2"])
    imported = run_train_sae(job, root, log=lambda *_: None)
    assert imported.manifest["imported"]["toolkit"] == "dictionary_learning"
    assert run_train_sae(job, root, log=lambda *_: None).skipped
    result = run_cds(job, root, progress=False, log=lambda *_: None)
    _, cds_direct = _direct_cds(job, sae, images, job.scope.k_cds + job.scope.spare_images)
    np.testing.assert_allclose(result.table.column("cds").to_numpy(), cds_direct, atol=1e-5, equal_nan=True)
    part = run_partition(job, root, progress=False, log=lambda *_: None)
    assert part.row["low_cds"] + part.row["high_cds"] + part.row["unscored"] == job.dictionary_size
    # extract committed only val tokens here; eval-sae reads them the same way.
    run_eval_sae(job, root, log=lambda *_: None)
    markdown = open(write_report(root.uri).markdown).read()
    assert "imported: dictionary_learning BatchTopKSAE (threshold)" in markdown
    # Exported for sharing: the same encoding, the source's digest in the header, a card naming it.
    exported = export_sae(job, root, str(tmp_path / "shared"))
    x = torch.randn(32, sae.d_in, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ImportedSAE.load(exported.sae).encode(x), load_sae(job, root).encode(x))
    prov = read_provenance(exported.sae)
    assert prov["origin"]["toolkit"] == "dictionary_learning"
    assert prov["origin"]["sha256"] == hashlib.sha256((folder / "ae.pt").read_bytes()).hexdigest()
    assert prov["scope"]["high_cds"] == part.row["high_cds"] and prov["metrics"] is not None
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "Origin: imported (dictionary_learning BatchTopKSAE)" in card and prov["origin"]["sha256"] in card
    committed = root.stage(job.model.name, "partition").read_table("features")
    shared = pq.read_table(exported.features)
    for name in ("feature", "group", "unscored_reason"):
        assert shared.column(name).to_pylist() == committed.column(name).to_pylist()
    np.testing.assert_array_equal(shared.column("cds").to_numpy(), committed.column("cds").to_numpy())  # NaN == NaN


def test_topk_does_not_depend_on_actors_or_batches(ray_local, pool, tmp_path):
    images = _pool_images(pool)
    tables = []
    for i, extra in enumerate((["ray.num_actors=1", "scope.batch_size=16"], ["ray.num_actors=2", "scope.batch_size=3"])):
        root = ResultsRoot(str(tmp_path / f"r{i}"))
        job = _job(pool, tmp_path / f"r{i}", *extra)
        _commit_sae_and_tokens(job, root, images)
        run_cds_topk(job, root, progress=False, log=lambda *_: None)
        t = root.stage(job.model.name, "cds-topk").read_table("topk").sort_by([("feature", "ascending"), ("rank", "ascending")])
        tables.append(t)
    a, b = tables
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    assert a.column("feature").to_pylist() == b.column("feature").to_pylist()
    np.testing.assert_allclose(a.column("max_act").to_numpy(), b.column("max_act").to_numpy(), rtol=1e-5)


def test_cds_needs_a_trained_sae(ray_local, pool, tmp_path):
    job = _job(pool, tmp_path / "results")
    with pytest.raises(RuntimeError, match="train-sae"):
        run_cds(job, ResultsRoot(str(tmp_path / "results")), progress=False, log=lambda *_: None)


def test_cds_and_partition_on_s3(ray_local, s3_bucket, pool, tmp_path):
    """Pool on local disk, results root on the loopback S3 server: both passes, the partition and
    its figures go through the same code; no stored object holds the test secret."""
    from tests.conftest import TEST_AWS_SECRET

    bucket, endpoint = s3_bucket
    job = load_config({"storage": {"root": f"{bucket}/results", "endpoint_url": endpoint},
                       "data": {"imagenet": {"val": pool}}},
                      ["sae.expansion=1", "sae.k=4", "scope.k_cds=2", "scope.min_usable_images=1",
                       "scope.spare_images=1", "scope.batch_size=8",
                       "scope.gallery_features=1", "scope.gallery_images=1", "scope.instability_images=4"])
    root = ResultsRoot(job.storage.root, endpoint)
    _commit_sae_and_tokens(job, root, _pool_images(pool))
    result = run_cds(job, root, progress=False, log=lambda *_: None)
    assert result.table.num_rows == job.dictionary_size
    part = run_partition(job, root, progress=False, log=lambda *_: None)
    for uri in part.figures.values():
        assert uri.startswith("s3://") and root.fs.exists(uri)
    assert run_cds(job, ResultsRoot(job.storage.root, endpoint), progress=False, log=lambda *_: None).skipped
    for obj in root.fs.find(root.path):
        assert TEST_AWS_SECRET.encode() not in root.fs.cat_file(obj), obj


def test_score_pairs_scores_and_writes_off_the_model_actor(tmp_path):
    """The CPU task after the model actor: exact EMD per pair row (as scc_pair_scores gives it),
    one pairs part and one rejects part, counts from the batch's counts row; a retried batch
    rewrites the same part names."""
    from scope_ray.scope import scc_pair_scores
    from scope_ray.stages.cds import COUNTS, PAIR, REJECT, score_pairs

    side, rng = 3, np.random.default_rng(0)
    m1, m2 = rng.random((2, side * side)).astype(np.float32), rng.random((2, side * side)).astype(np.float32)
    m2[1] = 0  # an empty second view
    zero = np.zeros(side * side, np.float32)
    batch = {"kind": np.array([COUNTS, REJECT, PAIR, PAIR], np.int8),
             "image_id": np.array(["", "bad", "a", "a"], dtype=object),
             "reason": np.array(["", "corrupt", "", ""], dtype=object),
             "feature": np.array([-1, -1, 7, 9]), "rank": np.array([-1, -1, 0, 1], np.int32),
             "map1": np.stack([zero, zero, m1[0], m1[1]]), "map2": np.stack([zero, zero, m2[0], m2[1]]),
             "images": np.array([3, 0, 0, 0])}
    root = ResultsRoot(str(tmp_path))
    for _ in range(2):  # a retry
        out = score_pairs(batch, root=root, model="m", split="val", side=side, run="h" * 16)
    assert {k: int(v[0]) for k, v in out.items()} == {"images": 3, "rejected": 1, "pairs": 2}
    stage = root.stage("m", "cds", run="h" * 16)
    assert len(stage.run_files("pairs")) == len(stage.run_files("rejects")) == 1
    pairs = stage.written_table("pairs", PAIRS_SCHEMA).to_pydict()
    want = scc_pair_scores(m1.reshape(-1, side, side), m2.reshape(-1, side, side))
    assert pairs["feature"] == [7, 9] and np.allclose(pairs["score"], want, rtol=0, atol=1e-12)
    assert pairs["empty_view2"] == [False, True]
    assert stage.written_table("rejects", REJECTS_SCHEMA).column("reason").to_pylist() == ["corrupt"]
