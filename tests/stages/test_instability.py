"""Outlier-instability stage (METHOD §4) through real Ray Data, plus its pure per-token core.

One stage run (module fixture) on a handful of synthetic val images, two shifts and a token cap
serves the end-to-end tests; the rest are unit tests without Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from scope_ray.config import load_config
from scope_ray.data.images import bad_image_samples, decode_image, resize_center_crop
from scope_ray.data.synthetic import write_synthetic
from scope_ray.emd import points_emd
from scope_ray.models import build_model
from scope_ray.scc import canvas_coordinates, overlap_indices, scc_views
from scope_ray.stages.extract import config_hash as extract_hash
from scope_ray.instability import (
    ALIGNMENTS,
    ClassPicker,
    aligned_head_emds,
    aligned_token_emd,
    alignment_supports,
    head_attention_emds,
    overlap_sample,
    token_attention_emd,
    tokens_per_image,
)
from scope_ray.stages.instability import config_hash, emd_batch, run_instability
from scope_ray.storage import ResultsRoot
from scope_ray.tokens import token_table

SHIFTS = (1, 4)
CAP = 6
GRID, HEADS = 7, 3  # demo-vit-tiny


def _quiet(*_):
    pass


# ------------------------------------------------------------------------------- the data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic val split (parquet) plus a second shard, later in source order, holding a corrupt
    image of a new class 7, a good image of that class (not chosen: not the first) and two unlabelled."""
    root = tmp_path_factory.mktemp("inst")
    src = write_synthetic(str(root / "data"), n_train=0, n_val=8, num_classes=3, seed=0, formats=("parquet",))
    val = src["imagenet"]["parquet"]["val"]
    shard0 = pq.read_table(Path(val["path"]) / "part-00000.parquet")
    good = shard0.column("image").to_pylist()
    extra = pa.table({"key": ["x_corrupt", "x_class7", "x_unlab0", "x_unlab1"],
                      "image": [bad_image_samples()["truncated"][0], good[0], good[1], good[2]],
                      "label": pa.array([7, 7, -1, -1], pa.int64())})
    pq.write_table(extra, Path(val["path"]) / "part-00001.parquet")
    rows = pa.concat_tables([shard0, extra])
    ids, labels = rows.column("key").to_pylist(), rows.column("label").to_pylist()
    first: dict[int, str] = {}
    for i, lab in zip(ids, labels):
        if lab >= 0:
            first.setdefault(lab, i)
    n = len(first) + 1  # one more than the labelled classes: exactly one unlabelled image fills in
    return {"source": val, "n": n, "expected": set(first.values()) | {"x_unlab0"},
            "bytes": dict(zip(ids, rows.column("image").to_pylist())), "root": root}


def _job(data, root, *overrides):
    spec = {"data": {"imagenet": {"val": data["source"]}}, "storage": {"root": str(root)}}
    return load_config(spec, [f"scope.shifts=[{','.join(map(str, SHIFTS))}]", f"scope.instability_tokens={CAP}",
                              f"scope.instability_images={data['n']}", "scope.batch_size=2", *overrides])


def _median_norm(data) -> float:
    model = build_model("demo-vit-tiny", seed=0)
    imgs = [resize_center_crop(decode_image(data["bytes"][i]), 112) for i in sorted(data["expected"] - {"x_corrupt"})]
    with torch.inference_mode():
        norms = model.forward_layer(model.preprocess(torch.from_numpy(np.stack(imgs)))).norms
    return float(norms.median())


def _fake_extract(job, root: ResultsRoot, centre: float) -> None:
    """A committed extract stage whose val-token norms are log-uniform around ``centre``, so
    tau 'auto' (Otsu on log norms) lands near it: both outlier and normal tokens occur."""
    norms = np.exp(np.linspace(np.log(centre / 1.3), np.log(centre * 1.3), 400)).astype(np.float32)
    stage = root.stage(job.model.name, "extract")
    acts = np.zeros((400, 1, job.model.spec.width), np.float32)
    stage.write_part("val_tokens", "p0", token_table([f"v{i}" for i in range(400)], np.zeros((400, 1), int),
                                                     acts, norms[:, None]))
    stage.commit(extract_hash(job), {}, {"val_tokens": 400, "train_tokens": 0, "rejects": 0})


@pytest.fixture(scope="module")
def run(ray_local, data):
    job = _job(data, data["root"] / "results")
    root = ResultsRoot(job.storage.root)
    _fake_extract(job, root, _median_norm(data))
    res = run_instability(job, root, progress=False, log=_quiet)
    return {"job": job, "root": root, "res": res, "stage": root.stage(job.model.name, "instability")}


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_summary_has_one_row_per_shift_and_all_tokens(run, data):
    res, stage = run["res"], run["stage"]
    used = len(data["expected"]) - 1  # the corrupt one is rejected
    assert not res.skipped and res.images_selected == len(data["expected"]) and res.rejected == 1
    summary = stage.read_table("summary").to_pylist()
    assert [r["shift"] for r in summary] == list(SHIFTS)
    tokens = stage.read_table("tokens")
    for row in summary:
        per_image = tokens_per_image(GRID, row["shift"], CAP)
        assert per_image == CAP
        assert row["n_non"] + row["n_out"] == used * per_image
        assert row["images"] == used and row["n_undefined"] == 0
        at = tokens.filter(pc.equal(tokens.column("shift"), row["shift"]))
        emd, out = at.column("emd").to_numpy(), at.column("outlier").to_numpy()
        assert row["d_non"] == pytest.approx(emd[~out].mean()) if (~out).any() else np.isnan(row["d_non"])
        assert row["d_out"] == pytest.approx(emd[out].mean()) if out.any() else np.isnan(row["d_out"])
    # tau came from the (fake) extract stage; it splits the tokens.
    assert res.manifest["tau_source"].startswith("auto") and summary[0]["tau"] == res.tau
    outlier = tokens.column("outlier").to_numpy()
    assert 0 < outlier.sum() < len(outlier)
    norm1, norm2 = tokens.column("norm1").to_numpy(), tokens.column("norm2").to_numpy()
    assert np.array_equal(outlier, (norm1 > res.tau) | (norm2 > res.tau))
    m = stage.manifest()
    assert m["rows"] == {"images": len(data["expected"]), "tokens": tokens.num_rows, "summary": 2, "rejects": 1}
    # The default alignment, named in the manifest and in every summary row (the report reads it).
    assert m["alignment"] == "canvas" and [r["alignment"] for r in summary] == ["canvas"] * len(SHIFTS)
    # Larger shifts move the context further: the attention moves further on the canvas.
    assert summary[1]["d_non"] > summary[0]["d_non"]


@pytest.mark.slow
def test_one_image_per_class_and_unlabelled_only_to_fill(run, data):
    images = run["stage"].read_table("images")
    assert set(images.column("image_id").to_pylist()) == data["expected"]
    labels = [lab for lab in images.column("label").to_pylist() if lab >= 0]
    assert len(labels) == len(set(labels))  # one per class
    assert "x_class7" not in images.column("image_id").to_pylist()  # class 7's first image is the corrupt one
    assert images.column("label").to_pylist().count(-1) == 1


@pytest.mark.slow
def test_corrupt_image_is_recorded_and_the_rest_kept(run, data):
    stage = run["stage"]
    rejects = stage.read_table("rejects").to_pylist()
    assert [(r["split"], r["image_id"]) for r in rejects] == [("val", "x_corrupt")]
    assert rejects[0]["reason"].startswith("corrupt or truncated")
    ids = set(stage.read_table("tokens").column("image_id").to_pylist())
    assert ids == data["expected"] - {"x_corrupt"}


@pytest.mark.slow
def test_emd_equals_a_direct_recomputation(run, data):
    job, tokens = run["job"], run["stage"].read_table("tokens")
    image_id = sorted(data["expected"] - {"x_corrupt"})[0]
    model = build_model(job.model.name, weights="none", seed=job.seed, layer=job.model.resolved_layer)
    img = decode_image(data["bytes"][image_id])
    for s in SHIFTS:
        rows = tokens.filter(pc.and_(pc.equal(tokens.column("image_id"), image_id), pc.equal(tokens.column("shift"), s)))
        assert rows.num_rows == CAP
        v1, v2 = scc_views(img, 16, GRID, s)
        with torch.inference_mode():
            px = model.preprocess(torch.from_numpy(np.stack([v1, v2])))
            attn = model.patch_attention(px).numpy().astype(np.float64)
            norms = model.forward_layer(px).norms.numpy()
        c1, c2 = canvas_coordinates(GRID, s)
        idx1, idx2 = overlap_indices(GRID, s)
        pos = overlap_sample(image_id, s, idx1.size, CAP, job.seed)
        t1, t2 = rows.column("token1").to_numpy(), rows.column("token2").to_numpy()
        assert np.array_equal(np.sort(t1), np.sort(idx1[pos]))
        for r in rows.slice(0, 3).to_pylist():
            k1, k2 = r["token1"], r["token2"]
            assert (k1, k2) in set(zip(idx1.tolist(), idx2.tolist()))  # the same pixels in both views
            direct = np.mean([points_emd(attn[0, h, k1], c1, attn[1, h, k2], c2) for h in range(HEADS)])
            assert r["emd"] == pytest.approx(direct, rel=1e-4, abs=1e-6)
            assert r["norm1"] == pytest.approx(norms[0, k1], rel=1e-5)
            assert r["norm2"] == pytest.approx(norms[1, k2], rel=1e-5)
        np.testing.assert_array_equal(t2, [idx2[np.flatnonzero(idx1 == k)[0]] for k in t1])


@pytest.mark.slow
def test_rerun_is_skipped(run):
    again = run_instability(run["job"], run["root"], progress=False, log=_quiet)
    assert again.skipped and again.tau == run["res"].tau
    assert (again.images_selected, again.rejected) == (run["res"].images_selected, 1)
    assert again.summary == run["stage"].read_table("summary").to_pylist()


# ---------------------------------------------------------------------- errors before any work
def test_auto_tau_without_extract_names_the_stage_to_run(data, tmp_path):
    job = _job(data, tmp_path / "empty")
    with pytest.raises(RuntimeError, match="scope-ray stage extract"):
        run_instability(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)


@pytest.mark.slow
def test_gpu_demand_on_a_cpu_cluster_fails_before_any_work(ray_local, data, tmp_path):
    from scope_ray.stages.cluster import ClusterResourceError

    if ray_local.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    job = _job(data, tmp_path / "r", "model.tau=5", "ray.gpus_per_actor=1")
    with pytest.raises(ClusterResourceError, match="no GPUs"):
        run_instability(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)
    assert not (tmp_path / "r").exists()


def test_missing_split_is_a_clear_error(tmp_path):
    job = load_config({"storage": {"root": str(tmp_path)}}, ["model.tau=5"])
    with pytest.raises(ValueError, match="data.imagenet.val is not set"):
        run_instability(job, ResultsRoot(job.storage.root), progress=False, log=_quiet)


# --------------------------------------------------------------------------- the pure core
def _rows(rng, h=HEADS, n=GRID * GRID):
    x = rng.random((h, n)) ** 4
    return x / x.sum(axis=1, keepdims=True)


def test_identical_attention_rows_give_zero():
    rng = np.random.default_rng(0)
    a = _rows(rng)
    c1, _ = canvas_coordinates(GRID, 2)
    assert token_attention_emd(a, a, c1, c1) == 0.0
    # On the SCC canvas: both views attend to the same overlap patches (same pixels) with the
    # same weights -> the same points on the canvas -> no transport.
    for s in (1, 3, 5):
        c1, c2 = canvas_coordinates(GRID, s)
        idx1, idx2 = overlap_indices(GRID, s)
        w = rng.random(idx1.size)
        a1, a2 = np.zeros((HEADS, GRID * GRID)), np.zeros((HEADS, GRID * GRID))
        a1[:, idx1], a2[:, idx2] = w, w
        assert token_attention_emd(a1, a2, c1, c2) == pytest.approx(0.0, abs=1e-12)


def test_same_token_index_in_both_views_moves_by_the_shift():
    """A spike on patch m of each view is s·√2 apart on the canvas (the diagonal shift)."""
    for s in (1, 2, 4):
        c1, c2 = canvas_coordinates(GRID, s)
        a = np.zeros((HEADS, GRID * GRID))
        a[:, 10] = 1.0
        assert token_attention_emd(a, a, c1, c2) == pytest.approx(s * np.sqrt(2))


def test_per_head_emd_is_symmetric_and_averaged():
    rng = np.random.default_rng(1)
    a1, a2 = _rows(rng), _rows(rng)
    c1, c2 = canvas_coordinates(GRID, 1)
    per_head = head_attention_emds(a1, a2, c1, c2)
    assert per_head.shape == (HEADS,) and (per_head > 0).all()
    np.testing.assert_allclose(per_head, head_attention_emds(a2, a1, c2, c1), rtol=1e-9)
    assert token_attention_emd(a1, a2, c1, c2) == pytest.approx(per_head.mean())
    bad = a1.copy()
    bad[1] = np.nan
    emds = head_attention_emds(bad, a2, c1, c2)
    assert np.isnan(emds[1]) and np.isfinite(emds[[0, 2]]).all()
    assert np.isnan(token_attention_emd(bad, a2, c1, c2))


def test_token_sample_is_seeded_by_image_and_shift():
    a = overlap_sample("img1", 1, 36, 5, seed=0)
    assert len(a) == 5 and np.array_equal(a, np.sort(a)) and len(set(a)) == 5
    assert np.array_equal(a, overlap_sample("img1", 1, 36, 5, seed=0))
    assert not np.array_equal(a, overlap_sample("img2", 1, 36, 5, seed=0))
    assert not np.array_equal(a, overlap_sample("img1", 2, 36, 5, seed=0))
    assert np.array_equal(overlap_sample("img1", 1, 9, 20, seed=0), np.arange(9))  # cap above the overlap
    assert np.array_equal(overlap_sample("img1", 1, 9, None, seed=0), np.arange(9))
    assert tokens_per_image(7, 1, None) == 36 and tokens_per_image(7, 5, 6) == 4


def test_class_picker_first_of_each_class_then_unlabelled():
    p = ClassPicker(4)
    assert not p.add(["a", "b", "u1", "c", "b2"], [0, 1, -1, 0, 1])
    assert not p.add(["u2", "d"], [-1, 2])
    assert [c[0] for c in p.selection()] == ["a", "b", "d", "u1"]  # 3 classes, one unlabelled fills
    assert p.add(["e", "f"], [3, 4])  # a 4th class: done; unlabelled no longer needed
    assert [c[0] for c in p.selection()] == ["a", "b", "d", "e"]
    assert p.scanned == 8 and p.selection()[-1][2] == 7  # positions in source order


# ------------------------------------------------------- alignment (scope.instability_alignment)
# Attention of known geometry for one overlap token, and each alignment's value derived by hand
# (docs/instability.md "Alignment"). Two facts give every number: identical weights on identical
# points cost 0; and a measure moved rigidly by the vector t costs exactly |t| (the translation plan
# costs |t|, and no plan costs less: the 1-Lipschitz map x -> <x, t>/|t| moves in mean by |t|).
# View 2's patch (r, c) lies at canvas (r+s, c+s), so "same position in each view" is a
# translation by (s, s) on the canvas and "same canvas cell" is one by (-s, -s) in the view frames:
# both cost s·√2.
def _content_anchored(s, w):
    """Both views attend to the same image content: weights w on the overlap cells, the same
    weight on the same pixels (idx1[k] in view 1, idx2[k] in view 2)."""
    idx1, idx2 = overlap_indices(GRID, s)
    a1, a2 = np.zeros((HEADS, GRID * GRID)), np.zeros((HEADS, GRID * GRID))
    a1[:, idx1], a2[:, idx2] = w, w
    return a1, a2


def _view_anchored(w_HN):
    """Both views attend to the same positions within the view, whatever content is there."""
    return w_HN.copy(), w_HN.copy()


def _central(s, rng):
    """View-anchored weights on view positions (r, c) with s <= r, c <= p-1-s only: in view 1
    those are overlap cells (r, c >= s) and in view 2 too (r, c <= p-1-s), so the overlap cut
    keeps every weight of both rows."""
    r_N, c_N = np.divmod(np.arange(GRID * GRID), GRID)
    inside = (r_N >= s) & (r_N <= GRID - 1 - s) & (c_N >= s) & (c_N <= GRID - 1 - s)
    w = np.where(inside, rng.random((HEADS, GRID * GRID)) + 0.1, 0.0)
    return w / w.sum(axis=1, keepdims=True)


ANALYTIC = {  # geometry -> alignment -> value in units of s·√2 (NaN: undefined)
    "content-anchored": {"canvas": 0, "view": 1, "overlap": 0},
    "view-anchored (central)": {"canvas": 1, "view": 0, "overlap": 1},
    "view-anchored (corner)": {"canvas": 1, "view": 0, "overlap": np.nan},
    "uniform": {"canvas": 1, "view": 0, "overlap": 0},
}


def _geometry(name, s, rng):
    if name == "content-anchored":
        return _content_anchored(s, rng.random((HEADS, (GRID - s) ** 2)) + 0.1)
    if name == "view-anchored (central)":
        return _view_anchored(_central(s, rng))
    if name == "view-anchored (corner)":  # all on view position (0, 0): not shared in view 1
        w = np.zeros((HEADS, GRID * GRID))
        w[:, 0] = 1.0
        return _view_anchored(w)
    return _view_anchored(np.full((HEADS, GRID * GRID), 1.0 / GRID ** 2))


@pytest.mark.parametrize("geometry", list(ANALYTIC))
def test_each_alignment_gives_its_analytic_value_on_known_geometry(geometry):
    rng = np.random.default_rng(7)
    for s in (1, 2, 3):  # up to (p-1)/2, so the central band of _central is not empty
        a1, a2 = _geometry(geometry, s, rng)
        for alignment in ALIGNMENTS:
            want = ANALYTIC[geometry][alignment] * s * np.sqrt(2)
            got = aligned_head_emds(a1, a2, GRID, s, alignment)
            if np.isnan(want):
                assert np.isnan(got).all() and np.isnan(aligned_token_emd(a1, a2, GRID, s, alignment))
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=f"{geometry} {alignment} s={s}")
                assert aligned_token_emd(a1, a2, GRID, s, alignment) == pytest.approx(want, abs=1e-9)
    # The default is today's computation: the canvas alignment is head_attention_emds on the canvas.
    a1, a2 = _rows(rng), _rows(rng)
    np.testing.assert_array_equal(aligned_head_emds(a1, a2, GRID, 2, "canvas"),
                                  head_attention_emds(a1, a2, *canvas_coordinates(GRID, 2)))


def _pot_reference(a1_N, a2_N, s, alignment):
    """The EMD from first principles: POT's ot.emd2 on the two rows, placed by the geometry
    rule written out here (not scc's helpers), with Euclidean costs from ot.dist."""
    import ot

    pts, keep1, keep2 = [], [], []
    for r in range(GRID):
        for c in range(GRID):
            pts.append((r, c))
            keep1.append(alignment != "overlap" or (r >= s and c >= s))  # view 1's shared patches
            keep2.append(alignment != "overlap" or (r <= GRID - 1 - s and c <= GRID - 1 - s))  # view 2's
    p1 = np.array(pts, float)
    p2 = p1 + (0 if alignment == "view" else s)  # view 2 sits s further on the canvas
    keep1, keep2 = np.array(keep1), np.array(keep2)
    w1, w2 = a1_N[keep1], a2_N[keep2]
    return ot.emd2(w1 / w1.sum(), w2 / w2.sum(), ot.dist(p1[keep1], p2[keep2], metric="euclidean"))


def test_alignments_match_pot_on_random_rows():
    rng = np.random.default_rng(3)
    for s in (1, 3):
        a1, a2 = _rows(rng), _rows(rng)
        for alignment in ALIGNMENTS:
            got = aligned_head_emds(a1, a2, GRID, s, alignment)
            want = [_pot_reference(a1[h], a2[h], s, alignment) for h in range(HEADS)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=f"{alignment} s={s}")
        # The three alignments measure different things: on random rows they differ.
        vals = [aligned_token_emd(a1, a2, GRID, s, al) for al in ALIGNMENTS]
        assert len({round(v, 6) for v in vals}) == 3


def test_overlap_alignment_undefined_rule_and_supports():
    s = 2
    keep1, c1, keep2, c2 = alignment_supports(GRID, s, "overlap")
    idx1, idx2 = overlap_indices(GRID, s)
    assert np.array_equal(keep1, idx1) and np.array_equal(keep2, idx2) and np.array_equal(c1, c2)
    for al in ("canvas", "view"):
        k1, _, k2, _ = alignment_supports(GRID, s, al)
        assert np.array_equal(k1, np.arange(GRID ** 2)) and np.array_equal(k2, np.arange(GRID ** 2))
    rng = np.random.default_rng(5)
    a1, a2 = _rows(rng), _rows(rng)
    # A NaN on a patch the overlap cut drops still makes the row (that head) undefined.
    outside = np.setdiff1d(np.arange(GRID ** 2), idx1)[0]
    bad = a1.copy()
    bad[1, outside] = np.nan
    emds = aligned_head_emds(bad, a2, GRID, s, "overlap")
    assert np.isnan(emds[1]) and np.isfinite(emds[[0, 2]]).all()
    # No mass on the overlap in one view, one head: that head (so the token) is undefined.
    empty = a2.copy()
    empty[2, idx2] = 0.0
    emds = aligned_head_emds(a1, empty, GRID, s, "overlap")
    assert np.isnan(emds[2]) and np.isfinite(emds[:2]).all()
    assert np.isnan(aligned_token_emd(a1, empty, GRID, s, "overlap"))
    assert np.isfinite(aligned_token_emd(a1, empty, GRID, s, "canvas"))  # the full row is fine there
    with pytest.raises(ValueError, match="alignment must be one of"):
        alignment_supports(GRID, s, "diagonal")


def test_alignment_is_config_hashed_recorded_and_named(tmp_path, monkeypatch):
    import scope_ray.report.figures as report
    from scope_ray.stages import instability as inst

    base = {"storage": {"root": str(tmp_path / "r")}}
    jobs = {al: load_config(base, ["model.tau=5", f"scope.instability_alignment={al}"]) for al in ALIGNMENTS}
    assert load_config(base, ["model.tau=5"]).scope.instability_alignment == "canvas"  # the default
    assert len({config_hash(j, 5.0) for j in jobs.values()}) == 3  # changing it recomputes the stage
    with pytest.raises(ValueError):
        load_config(base, ["scope.instability_alignment=diagonal"])
    # emd_batch (the Ray task) computes and writes under the alignment it is given.
    rng = np.random.default_rng(2)
    a1, a2 = np.stack([_rows(rng) for _ in range(3)]), np.stack([_rows(rng) for _ in range(3)])
    batch = {"image_id": np.array(["i0", "i0", "i1"], dtype=object), "shift": np.array([1, 3, 1]),
             "token1": np.array([8, 24, 9]), "token2": np.array([0, 0, 1]), "norm1": np.array([1.0, 9.0, 1.0]),
             "norm2": np.array([1.0, 1.0, 1.0]), "attn1": a1.astype(np.float32), "attn2": a2.astype(np.float32)}
    root = ResultsRoot(str(tmp_path / "r"))
    emd_batch(batch, root=root, model="m", grid=GRID, tau=5.0, alignment="overlap", run=None)
    written = root.stage("m", "instability").written_table("tokens", inst.TOKENS_SCHEMA)
    want = [aligned_token_emd(a1[t].astype(np.float32), a2[t].astype(np.float32), GRID, s, "overlap")
            for t, s in enumerate(batch["shift"])]
    np.testing.assert_allclose(written.column("emd").to_numpy(), want, rtol=0, atol=1e-12)
    # The stage's figure title names it.
    titles = []
    monkeypatch.setattr(report, "instability_plot", lambda *a, title, **k: titles.append(title) or Path(a[3]))
    monkeypatch.setattr(inst.StageDir, "write_figure", lambda self, p: str(p))
    inst._draw_summary(jobs["view"], root.stage("m", "instability"), [{"shift": 1, "d_non": 1.0, "d_out": 2.0}])
    assert titles and "alignment: view" in titles[0]


def test_report_names_the_alignment_behind_the_instability_table(tmp_path):
    from scope_ray.report.document import Document, render_markdown
    from scope_ray.report.content import NO_PUBLISHED, collect, comparability, has_published, instability_section
    from scope_ray.instability import summarize

    root = ResultsRoot(str(tmp_path / "results"))
    tokens = pa.table({"shift": np.repeat([1, 2], 10), "outlier": np.tile([True] + [False] * 4, 4),
                       "emd": np.linspace(0.5, 3.0, 20)})
    for model, extra in (("dinov2-b", {"alignment": "overlap"}), ("demo-vit-tiny", {})):  # {}: an old manifest
        stage = root.stage(model, "instability")
        stage.write_part("summary", "part-0", pa.Table.from_pylist(summarize(tokens, (1, 2), 2, 4.0)))
        stage.commit("h", {"images": {}}, {"summary": 2}, extra=extra)
    runs = collect(root)
    verdicts = {r.name: comparability([m for m in r.manifests.values() if m], r.name) if has_published(r.name)
                else NO_PUBLISHED for r in runs}
    md = render_markdown(Document("t", [instability_section(root, runs, verdicts)]))
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] in ("dinov2-b", "demo-vit-tiny"):
            rows[(cells[0], cells[1])] = cells
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    col = [c.strip() for c in header.strip().strip("|").split(" | ")].index("alignment")
    assert rows[("dinov2-b", "this run")][col] == "overlap"
    assert rows[("dinov2-b", "paper (supp. Table 7)")][col] == "not stated"
    assert rows[("demo-vit-tiny", "this run")][col] == "canvas (not recorded)"
    assert "s·√2" in md and "scope.instability_alignment" in md
