"""Extraction stage through real Ray Data: correctness, skip/redo, reproducibility, bad input, S3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from scope_ray.config import load_config
from scope_ray.data.images import bad_image_samples, decode_image, resize_center_crop
from scope_ray.data.synthetic import write_image_folder, write_synthetic
from scope_ray.models import build_model
from scope_ray.stages.cluster import ClusterResourceError
from scope_ray.stages.extract import run_extract
from scope_ray.storage import ResultsRoot
from scope_ray.tokens import activations_of, token_schema
from tests.secrets_scan import dir_files, find_credentials, plant, ray_logs_dir, root_objects, scan_dir, scan_root

pytestmark = pytest.mark.slow

N_TRAIN, N_VAL = 20, 6


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_synthetic(str(root), n_train=N_TRAIN, n_val=N_VAL, size=112, num_classes=4, seed=0)["imagenet"]


def _job(sources, root, *overrides, train="folder", val="parquet"):
    spec = {"data": {"imagenet": {"train": sources[train]["train"], "val": sources[val]["val"]}},
            "storage": {"root": str(root)}}
    return load_config(spec, ["extract.batch_size=8", *overrides])


def _quiet(*_):
    pass


def test_tokens_match_a_direct_forward_pass(ray_local, sources, tmp_path):
    job = _job(sources, tmp_path / "r")
    res = run_extract(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)
    assert res.counts["train_tokens"].rows == N_TRAIN * 4
    assert res.counts["val_tokens"].rows == N_VAL * job.model.spec.num_patches
    stage = ResultsRoot(job.storage.root).stage(job.model.name, "extract")
    train = stage.read_table("train_tokens")
    # Recompute one image by hand: decode, resize, forward to the designated layer.
    image_id = sorted(set(train.column("image_id").to_pylist()))[3]
    rows = train.filter(pc.equal(train.column("image_id"), image_id))
    path = Path(sources["folder"]["train"]["path"]) / image_id
    img = resize_center_crop(decode_image(path.read_bytes(), max_pixels=10**8, min_side=8), job.model.spec.image_size)
    model = build_model(job.model.name, weights="none", seed=job.seed)
    with torch.inference_mode():
        out = model.forward_layer(model.preprocess(torch.from_numpy(img[None])))
    pos = np.asarray(rows.column("position").to_pylist())
    assert len(pos) == 4 and len(set(pos)) == 4
    np.testing.assert_allclose(activations_of(rows), out.patch_tokens[0, pos].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows.column("norm").to_numpy(), out.norms[0, pos].numpy(), rtol=1e-5)
    val = stage.read_table("val_tokens")
    per_image = pc.value_counts(val.column("image_id")).field("counts").to_pylist()
    assert set(per_image) == {job.model.spec.num_patches}


def test_rerun_skips_and_changed_config_redoes(ray_local, sources, tmp_path):
    # (An interrupted attempt, parts on storage and no manifest, is redone from scratch: shown with
    # a real SIGKILLed driver in tests/test_driver_kill.py.)
    job = _job(sources, tmp_path / "r")
    root = ResultsRoot(job.storage.root)
    assert not run_extract(job, root, progress=False, log=_quiet).skipped
    assert run_extract(job, root, progress=False, log=_quiet).skipped
    changed = _job(sources, tmp_path / "r", "extract.tokens_per_image=2")
    res = run_extract(changed, root, progress=False, log=_quiet)
    assert not res.skipped and res.counts["train_tokens"].rows == N_TRAIN * 2
    assert root.stage(job.model.name, "extract").read_table("train_tokens").num_rows == N_TRAIN * 2


def test_same_seed_same_tokens_other_seed_other_sample(ray_local, sources, tmp_path):
    tables = []
    for i, seed in enumerate((7, 7, 8)):
        job = _job(sources, tmp_path / f"r{i}", f"seed={seed}", "extract.val_split=null")
        run_extract(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)
        t = ResultsRoot(job.storage.root).stage(job.model.name, "extract").read_table("train_tokens")
        tables.append(t.sort_by([("image_id", "ascending"), ("position", "ascending")]))
    assert tables[0].equals(tables[1])
    assert not tables[0].equals(tables[2])


def test_every_source_format_gives_the_same_tokens(ray_local, sources, tmp_path):
    """Folder, Parquet and WebDataset copies of one split hold the same images: same activations."""
    per_format = {}
    for fmt in ("folder", "parquet", "webdataset"):
        spec = {"data": {"imagenet": {"train": sources[fmt]["val"]}}, "storage": {"root": str(tmp_path / fmt)}}
        # All 49 tokens per image, so the comparison does not depend on ids (which differ by format).
        job = load_config(spec, ["extract.batch_size=8", "extract.val_split=null", "extract.tokens_per_image=49"])
        res = run_extract(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)
        assert res.counts["train_tokens"].images == N_VAL
        acts = activations_of(ResultsRoot(job.storage.root).stage(job.model.name, "extract").read_table("train_tokens"))
        per_format[fmt] = np.sort(acts.sum(axis=1))
    np.testing.assert_allclose(per_format["folder"], per_format["parquet"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(per_format["folder"], per_format["webdataset"], rtol=1e-4, atol=1e-4)


def test_bad_images_rejected_or_converted_nothing_good_lost(ray_local, sources, tmp_path):
    import shutil

    data = tmp_path / "mixed"
    shutil.copytree(sources["folder"]["train"]["path"], data)
    bad = bad_image_samples()
    write_image_folder(str(data), {f"n00000000/bad_{kind}.img": blob for kind, (blob, _) in bad.items()})
    expect_reject = {f"n00000000/bad_{k}.img" for k, (_, outcome) in bad.items() if outcome == "reject"}
    expect_convert = {f"n00000000/bad_{k}.img" for k, (_, outcome) in bad.items() if outcome == "convert"}
    assert expect_reject and expect_convert
    spec = {"data": {"imagenet": {"train": {"format": "folder", "path": str(data)}}},
            "storage": {"root": str(tmp_path / "r")}}
    job = load_config(spec, ["extract.batch_size=8", "extract.val_split=null"])
    res = run_extract(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)
    stage = ResultsRoot(job.storage.root).stage(job.model.name, "extract")
    rejects = stage.read_table("rejects")
    assert set(rejects.column("image_id").to_pylist()) == expect_reject
    assert all(r for r in rejects.column("reason").to_pylist())
    ids = stage.read_table("train_tokens").column("image_id").to_pylist()
    n_images = N_TRAIN + len(bad)
    assert res.counts["train_tokens"].images == n_images
    assert len(ids) == (n_images - len(expect_reject)) * 4
    assert expect_convert <= set(ids)
    assert len(set(ids)) == n_images - len(expect_reject)  # each image once
    manifest = stage.manifest()
    assert manifest["rows"]["rejects"] == len(expect_reject)
    # Provenance the report needs to judge comparisons with the paper.
    assert (manifest["weights"], manifest["synthetic_data"]) == ("none", False)


def test_s3_results_and_s3_data_and_no_credential_stored_or_logged(ray_local, s3_bucket, capfd, tmp_path):
    bucket, endpoint = s3_bucket
    s3_sources = write_synthetic(f"{bucket}/data", n_train=8, n_val=2, size=112, num_classes=2, seed=1,
                                 formats=("parquet",), endpoint_url=endpoint)["imagenet"]
    spec = {"data": {"imagenet": {"train": s3_sources["parquet"]["train"], "val": s3_sources["parquet"]["val"]}},
            "storage": {"root": f"{bucket}/results", "endpoint_url": endpoint}}
    job = load_config(spec, ["extract.batch_size=4"])
    root = ResultsRoot(job.storage.root, endpoint)
    assert not run_extract(job, root, progress=False, log=print).skipped
    assert root.fs.exists(f"{root.path}/{job.model.name}/extract/manifest.json")
    assert run_extract(job, ResultsRoot(job.storage.root, endpoint), progress=False, log=_quiet).skipped
    t = root.stage(job.model.name, "extract").read_table("train_tokens")
    assert t.num_rows == 8 * 4 and activations_of(t).shape == (32, job.model.spec.width)

    # Security: no credential in anything the run left behind — every object in the bucket (the
    # results and the data it read), every Ray log file of this session, the captured output.
    whole_bucket = ResultsRoot(bucket, endpoint)
    objects = root_objects(whole_bucket)
    assert scan_root(whole_bucket) == []
    logs = ray_logs_dir(ray_local)
    assert any(p.name.startswith("worker-") for p in dir_files(logs))  # the actors' logs are there
    assert scan_dir(logs) == []
    out, err = capfd.readouterr()
    assert "[extract]" in out  # the stage's own log lines were captured, and are scanned
    assert find_credentials([("captured stdout/stderr", (out + err).encode())]) == []
    # The scans can fail: a copy of a real part file and of a real worker log, each with both
    # credentials planted, are found, and nothing else is.
    part = next(o for o in objects if o.endswith(".parquet") and "train_tokens/" in o)
    copy = f"{whole_bucket.path}/planted/copy.parquet"
    whole_bucket.fs.pipe_file(copy, plant(whole_bucket.fs.cat_file(part)))
    assert scan_root(ResultsRoot(f"{bucket}/planted", endpoint)) == [
        f"{copy}: AWS_SECRET_ACCESS_KEY", f"{copy}: AWS_ACCESS_KEY_ID"]
    log = next(p for p in dir_files(logs) if p.name.startswith("worker-") and p.stat().st_size > 0)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / log.name).write_bytes(plant(log.read_bytes()))
    assert len(scan_dir(tmp_path / "logs")) == 2


def test_gpu_demand_on_a_cpu_cluster_fails_at_once(ray_local, sources, tmp_path):
    if ray_local.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    job = _job(sources, tmp_path / "r", "ray.gpus_per_actor=1")
    with pytest.raises(ClusterResourceError, match="no GPUs"):
        run_extract(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)


def test_missing_split_is_a_clear_error(ray_local, tmp_path):
    job = load_config({"storage": {"root": str(tmp_path)}})
    with pytest.raises(ValueError, match="data.imagenet.train is not set"):
        run_extract(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)


def test_write_tokens_writes_off_the_model_actor_and_counts_per_node(tmp_path):
    """The CPU task after the model actor: the token and rejects parts (content-named: a retry
    rewrites the same names), and per node that ran the model its images, rejects and rows."""
    from scope_ray.stages.extract import COUNTS, REJECT, TOKEN, write_tokens

    d = 3
    acts = np.arange(4 * d, dtype=np.float32).reshape(4, d)
    batch = {"kind": np.array([COUNTS, REJECT, TOKEN, TOKEN, COUNTS, TOKEN], np.int8),
             "image_id": np.array(["", "bad", "a", "a", "", "b"], dtype=object),
             "reason": np.array(["", "corrupt", "", "", "", ""], dtype=object),
             "position": np.array([-1, -1, 3, 5, -1, 0], np.int32),
             "norm": np.array([0, 0, 1.5, 2.5, 0, 3.5], np.float32),
             "activation": np.concatenate([np.zeros((2, d), np.float32), acts[:2], np.zeros((1, d), np.float32),
                                           acts[2:3]]),
             "images": np.array([2, 0, 0, 0, 1, 0]),
             "node_id": np.array(["n1"] * 4 + ["n2"] * 2, dtype=object),
             "node_ip": np.array(["1.1.1.1"] * 4 + ["2.2.2.2"] * 2, dtype=object)}
    root = ResultsRoot(str(tmp_path))
    for _ in range(2):  # a retry
        out = write_tokens(batch, root=root, model="m", split="train", table="train_tokens", run="h" * 16)
    assert {k: list(v) for k, v in out.items()} == {
        "images": [2, 1], "rejected": [1, 0], "rows": [2, 1], "node_id": ["n1", "n2"], "node_ip": ["1.1.1.1", "2.2.2.2"]}
    stage = root.stage("m", "extract", run="h" * 16)
    assert len(stage.run_files("train_tokens")) == len(stage.run_files("rejects")) == 1
    t = stage.written_table("train_tokens", token_schema(d)).to_pydict()
    assert t["image_id"] == ["a", "a", "b"] and t["position"] == [3, 5, 0] and t["norm"] == [1.5, 2.5, 3.5]
    assert np.array_equal(np.array(t["activation"], np.float32), acts[:3])
