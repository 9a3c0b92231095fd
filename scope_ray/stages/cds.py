"""The Contextual Dependency Score of every SAE feature (METHOD §5), in two streaming passes.

Pass 1, ``cds-topk``: the analysis pool (``scope.pool_split`` of ImageNet, capped by
``scope.pool_images``) streams through the SCC-pair tasks (stages.scc_pairs, at ``scope.shift``)
and a pool of ViT + SAE actors. An image's selection score for a feature is its max activation
over the overlap tokens of BOTH views of its SCC pair (``overlap_selection_scores``): the very
pixels and tokens pass 2 scores, so a selected image has the feature in the overlap of at least
one view and is never skipped as "both maps empty" (METHOD §5 step 1). Each actor keeps a running
top-(k_CDS + spares) image list per feature (``topk.FeatureTopK``: O(q·k) memory, never
O(images)) and reports only the entries that enter it; the driver merges the reports into the
global lists. Table ``topk``: feature, rank, image_id, max_act (the overlap max).

Pass 2, ``cds``: only the selected images are read again, turned into SCC pairs at
``scope.shift`` (stages.scc_pairs) and run through ViT + SAE once each, for all the features that
selected them (``PairMaps``, the model actors: they only compute the two overlap maps). CPU tasks
after them (``score_pairs``) run the exact EMD and write the part files, so a GPU never waits on
either. Each (feature, image) gives a score (scope.scc_pair_scores: EMD / D_grid, 1 when
the feature left the overlap, NaN when both maps are empty); each feature's CDS is the mean of
its first k_CDS usable scores in rank order (scope.cds_from_scores). Tables ``pairs`` and ``cds``;
a feature with no usable image keeps a row with CDS NaN and a status saying why.

Each pass is its own stage directory with its own manifest, so an interrupted pass 2 does not
redo pass 1. The partition, awCDS and figures that read ``cds`` live in stages/partition.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from scope_ray.config import JobConfig
from scope_ray.logs import info
from scope_ray.storage import ResultsRoot, content_hash
from scope_ray.tokens import REJECTS_SCHEMA, rejects_table
from scope_ray.pipeline import CDS as STAGE
from scope_ray.pipeline import CDS_TOPK as TOPK_STAGE
from scope_ray.pipeline import cds_hash as config_hash
from scope_ray.pipeline import cds_topk_hash as topk_hash
from scope_ray.stages.common import ModelAndSAE, load_sae, pool_source, selected_only


PAIRS_SCHEMA = pa.schema([
    pa.field("feature", pa.int64()), pa.field("rank", pa.int32()), pa.field("image_id", pa.string()),
    pa.field("score", pa.float64()), pa.field("empty_view1", pa.bool_()), pa.field("empty_view2", pa.bool_()),
])


# ------------------------------------------------------------------------------ config hashes


# ------------------------------------------------------------------------------------ pass 1
def overlap_selection_scores(z1_BNQ, z2_BNQ, idx1_O, idx2_O):
    """Pass 1's score of each (image, feature): the max activation over the overlap tokens of the
    image's SCC pair, both views — ``max(max_o z1[b, idx1[o], f], max_o z2[b, idx2[o], f])`` — from
    the codes of view 1 and view 2 (``[B, N, q]``, torch tensors or NumPy arrays) and the overlap's
    token indices (``scc.overlap_indices``). Tokens outside the overlap never count: a feature that
    fires only there scores 0 and does not select the image (``topk`` ignores values <= 0), while an
    image with a positive score has a non-empty overlap map in at least one view, so pass 2 can
    use it (METHOD §5 step 1)."""
    if hasattr(z1_BNQ, "amax"):  # torch
        import torch

        i1 = torch.as_tensor(np.asarray(idx1_O), device=z1_BNQ.device)
        i2 = torch.as_tensor(np.asarray(idx2_O), device=z2_BNQ.device)
        return torch.maximum(z1_BNQ[:, i1].amax(dim=1), z2_BNQ[:, i2].amax(dim=1))
    z1_BNQ, z2_BNQ = np.asarray(z1_BNQ), np.asarray(z2_BNQ)
    return np.maximum(z1_BNQ[:, idx1_O].max(axis=1), z2_BNQ[:, idx2_O].max(axis=1))


class TopKCollector(ModelAndSAE):
    """Ray Data actor: SCC pairs at ``scope.shift`` in; the (feature, image) entries that entered
    this actor's running top-k lists out, plus per-batch image counts (on the first row of each
    batch). The score is ``overlap_selection_scores``."""

    def __init__(self, job: JobConfig, root: ResultsRoot, torch_threads: int, keep: int, run: str | None = None):
        from scope_ray.scc import overlap_indices
        from scope_ray.topk import FeatureTopK

        super().__init__(job, root, torch_threads)
        self.stage = root.stage(job.model.name, TOPK_STAGE, run=run)
        self.topk = FeatureTopK(job.dictionary_size, keep)
        self.idx1, self.idx2 = overlap_indices(job.model.spec.grid, job.scope.shift)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from scope_ray.topk import image_keys

        ids = [str(i) for i in batch["image_id"]]
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        reasons = [str(r) for r in batch["reason"]]
        entries = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        max_BQ = np.zeros((0, self.topk.q))
        good = np.flatnonzero(ok)
        if good.size:
            b = good.size
            z_2BNQ = self.codes(np.concatenate([batch["view1"][ok], batch["view2"][ok]]))
            max_BQ = overlap_selection_scores(z_2BNQ[:b], z_2BNQ[b:], self.idx1, self.idx2).cpu().numpy()
            del z_2BNQ
            finite_B = np.isfinite(max_BQ).all(axis=1)
            for i in good[~finite_B]:  # a broken backbone output: never let NaN pick an image
                ok[i], reasons[i] = False, "nonfinite_activations: NaN or Inf in the SAE codes"
            max_BQ, good = max_BQ[finite_B], good[finite_B]
        if (~ok).any():  # recorded before the running lists change, so a failure here loses nothing
            bad = np.flatnonzero(~ok)
            self.stage.write_part("rejects", f"pool-{content_hash(ids)}",
                                  rejects_table(self.job.scope.pool_split, [ids[i] for i in bad], [reasons[i] for i in bad]))
        if good.size:
            entries = self.topk.update(max_BQ, image_keys([ids[i] for i in good]))
        feature, key, value = entries
        key_to_id = {k: i for k, i in zip(image_keys(ids), ids)}
        n = max(1, feature.size)  # always one row, so the counts travel even when nothing entered
        out = {
            "feature": np.full(n, -1, np.int64), "key": np.full(n, -1, np.int64), "value": np.zeros(n),
            "image_id": np.full(n, "", dtype=object), "images": np.zeros(n, np.int64), "rejected": np.zeros(n, np.int64),
        }
        out["feature"][: feature.size], out["key"][: feature.size], out["value"][: feature.size] = feature, key, value
        out["image_id"][: feature.size] = [key_to_id[int(k)] for k in key]
        out["images"][0], out["rejected"][0] = len(ids), int((~ok).sum())
        return out


@dataclass
class TopKResult:
    skipped: bool
    images: int = 0
    rejected: int = 0
    features_with_images: int = 0


def run_cds_topk(job: JobConfig, root: ResultsRoot, *, progress: bool = True, log=info) -> TopKResult:
    """Pass 1 (or skip when committed with this config): per-feature top images of the pool."""
    import ray.data
    from tqdm import tqdm

    from scope_ray.data.sources import read_source
    from scope_ray.stages.cluster import actor_resources, one_block_per_batch
    from scope_ray.stages.scc_pairs import with_scc_pairs
    from scope_ray.topk import NO_KEY, FeatureTopK

    stage = root.stage(job.model.name, TOPK_STAGE)
    chash = topk_hash(job)
    if stage.is_complete(chash):
        log(f"[cds] pass 1 (top images per feature): already complete at {stage.uri}; skipping")
        m = stage.manifest()
        return TopKResult(skipped=True, images=m["images"], rejected=m["rows"]["rejects"],
                          features_with_images=m["features_with_images"])
    load_sae(job, root)  # fail before any Ray work when the SAE is missing or stale
    source = pool_source(job)
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        q, keep = job.dictionary_size, job.scope.k_cds + job.scope.spare_images
        res = actor_resources(job.ray)
        spec = job.model.spec
        log(f"[cds] pass 1: top {keep} images (k_cds {job.scope.k_cds} + {job.scope.spare_images} spares) for each of "
            f"{q} features over {source.path} ({job.scope.pool_split}), each image scored on the overlap of its SCC "
            f"pair at shift {job.scope.shift}")
        ds = read_source(source, "imagenet", endpoint_url=job.storage.endpoint_url, num_cpus=job.ray.read_cpus)
        # The same SCC views pass 2 scores (not a centre crop): a top image has the feature in the overlap.
        ds = with_scc_pairs(one_block_per_batch(ds, job.scope.batch_size), spec, (job.scope.shift,), job)
        ds = ds.map_batches(
            TopKCollector, fn_constructor_kwargs=dict(job=job, root=root, torch_threads=res.torch_threads, keep=keep,
                                                   run=chash),
            compute=res.strategy(), num_cpus=res.num_cpus, num_gpus=res.num_gpus,
            batch_size=job.scope.batch_size, batch_format="numpy",
        )
        merged = FeatureTopK(q, keep)
        key_to_id: dict[int, str] = {}
        images = rejected = reported = 0
        bar = tqdm(desc="cds pass 1", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            real = part["feature"] >= 0
            merged.offer(part["feature"][real], part["key"][real], part["value"][real])
            key_to_id.update(zip(part["key"][real].tolist(), part["image_id"][real].tolist()))
            reported += int(real.sum())
            images += int(part["images"].sum())
            rejected += int(part["rejected"].sum())
            bar.update(int(part["images"].sum()))
            bar.set_postfix(rejected=rejected)
            if len(key_to_id) > 4 * q * keep:  # keep the id map O(q·k) too
                held = set(merged.keys[merged.keys != NO_KEY].tolist())
                key_to_id = {k: v for k, v in key_to_id.items() if k in held}
        bar.close()
        if images - rejected == 0:
            raise RuntimeError(f"[cds] pass 1: none of the {images} pool images could be used; not committing")
        feat_QK = np.broadcast_to(np.arange(q)[:, None], merged.keys.shape)
        rank_QK = np.broadcast_to(np.arange(keep)[None, :], merged.keys.shape)
        held = merged.keys != NO_KEY
        table = pa.table({
            "feature": pa.array(feat_QK[held], pa.int64()), "rank": pa.array(rank_QK[held], pa.int32()),
            "image_id": pa.array([key_to_id[int(k)] for k in merged.keys[held]], pa.string()),
            "max_act": pa.array(merged.values[held], pa.float64()),
        })
        stage.write_part("topk", "part-0", table)
        fired = int(held.any(axis=1).sum())
        stage.commit(chash, {"pool": source.model_dump(mode="json"), "sae": root.stage(job.model.name, "train-sae").uri},
                     {"topk": table.num_rows, "rejects": rejected},
                     extra={"images": images, "features": q, "keep": keep, "features_with_images": fired,
                            "entries_reported": reported, "shift": job.scope.shift,
                            "selection": "max activation over the overlap tokens of both SCC views"})
        log(f"[cds] pass 1: {images} images ({rejected} rejected); {fired}/{q} features fired on at least one image; "
            f"{reported} entries reported by the actors for {table.num_rows} kept")
        return TopKResult(skipped=False, images=images, rejected=rejected, features_with_images=fired)


# ------------------------------------------------------------------------------------ pass 2


# Pair rows per EMD task: a pair costs one exact EMD on the (p-s)^2 overlap (CLIP-B/16, s = 1:
# 196 cells, ~1-2 ms on one core), so a task of this many runs for a second or two.
EMD_BATCH_PAIRS = 1024
EMD_TASK_CPUS = 1.0  # single-threaded NumPy/POT
# Row kinds PairMaps emits: one COUNTS row per batch (its image and reject counts, so a batch with
# neither pair nor reject still reports them), a REJECT row per rejected image, a PAIR row per
# (feature, selected image) with both overlap maps.
COUNTS, REJECT, PAIR = 0, 1, 2


class PairMaps(ModelAndSAE):
    """Ray Data actor (the GPU when there is one): SCC pairs of selected images in; per (feature,
    image) the feature's two overlap maps out, flattened. It only computes: the exact EMD and the
    Parquet writing run in CPU tasks after it (``score_pairs``), so a GPU never waits on either."""

    def __init__(self, job: JobConfig, root: ResultsRoot, torch_threads: int, selection_ref):
        import ray

        from scope_ray.scc import overlap_indices

        super().__init__(job, root, torch_threads)
        # (image key, feature, rank) sorted by key: each image finds its features by binary search.
        self.sel_key, self.sel_feature, self.sel_rank = ray.get(selection_ref)
        self.idx1, self.idx2 = overlap_indices(job.model.spec.grid, job.scope.shift)
        self.side = job.model.spec.grid - job.scope.shift

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from scope_ray.topk import image_keys

        ids = [str(i) for i in batch["image_id"]]
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        reasons = [str(r) for r in batch["reason"]]
        good = np.flatnonzero(ok)
        cells = self.side * self.side
        maps1, maps2, feats_all, ranks_all, pair_ids = [], [], [], [], []
        if good.size:
            z_2BNQ = self.codes(np.concatenate([batch["view1"][ok], batch["view2"][ok]]))
            b = good.size
            idx1, idx2 = torch.from_numpy(self.idx1).to(z_2BNQ.device), torch.from_numpy(self.idx2).to(z_2BNQ.device)
            for j, i in enumerate(good):
                key = image_keys([ids[i]])[0]
                lo, hi = np.searchsorted(self.sel_key, key, "left"), np.searchsorted(self.sel_key, key, "right")
                feats, ranks = self.sel_feature[lo:hi], self.sel_rank[lo:hi]
                f = torch.from_numpy(feats).to(z_2BNQ.device)
                # Only the overlap tokens x this image's features leave the device.
                m1 = z_2BNQ[j][idx1][:, f].T.float().cpu().numpy()
                m2 = z_2BNQ[b + j][idx2][:, f].T.float().cpu().numpy()
                if not (np.isfinite(m1).all() and np.isfinite(m2).all()):
                    ok[i], reasons[i] = False, "nonfinite_activations: NaN or Inf in the SAE codes"
                    continue
                maps1.append(m1)
                maps2.append(m2)
                feats_all.append(feats)
                ranks_all.append(ranks)
                pair_ids += [ids[i]] * len(feats)
        bad = np.flatnonzero(~ok)
        n_pairs, n_bad = len(pair_ids), bad.size
        n = 1 + n_bad + n_pairs
        empty = np.zeros((0, cells), np.float32)
        zeros = np.zeros((1 + n_bad, cells), np.float32)
        return {
            "kind": np.concatenate([[COUNTS], np.full(n_bad, REJECT), np.full(n_pairs, PAIR)]).astype(np.int8),
            "image_id": np.array([""] + [ids[i] for i in bad] + pair_ids, dtype=object),
            "reason": np.array([""] + [reasons[i] for i in bad] + [""] * n_pairs, dtype=object),
            "feature": np.concatenate([np.full(1 + n_bad, -1), *feats_all]).astype(np.int64),
            "rank": np.concatenate([np.full(1 + n_bad, -1), *ranks_all]).astype(np.int32),
            "map1": np.concatenate([zeros, *(maps1 or [empty])]),
            "map2": np.concatenate([zeros, *(maps2 or [empty])]),
            "images": np.concatenate([[len(ids)], np.zeros(n - 1, np.int64)]),
        }


def score_pairs(batch: dict[str, np.ndarray], *, root: ResultsRoot, model: str, split: str, side: int,
                run: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data task (CPU): ``PairMaps`` rows in; the exact EMD of every pair (one batched call)
    and the ``pairs`` / ``rejects`` part files written, named by their content so a retried task
    overwrites; counts out."""
    from scope_ray.scope import scc_pair_scores

    stage = root.stage(model, STAGE, run=run)
    kind = np.asarray(batch["kind"])
    ids = [str(i) for i in batch["image_id"]]
    rej = np.flatnonzero(kind == REJECT)
    if rej.size:
        rej_ids = [ids[r] for r in rej]
        stage.write_part("rejects", f"pairs-{content_hash(rej_ids)}",
                         rejects_table(split, rej_ids, [str(batch["reason"][r]) for r in rej]))
    pair = np.flatnonzero(kind == PAIR)
    if pair.size:
        m1_PHW = np.asarray(batch["map1"])[pair].reshape(-1, side, side)
        m2_PHW = np.asarray(batch["map2"])[pair].reshape(-1, side, side)
        feature = np.asarray(batch["feature"])[pair]
        scores = scc_pair_scores(m1_PHW, m2_PHW)  # one batched exact-EMD call for the whole batch
        keys = (f"{ids[p]}\0{f}" for p, f in zip(pair, feature))
        stage.write_part("pairs", f"pairs-{content_hash(keys)}", pa.table({
            "feature": pa.array(feature, pa.int64()),
            "rank": pa.array(np.asarray(batch["rank"])[pair], pa.int32()),
            "image_id": pa.array([ids[p] for p in pair], pa.string()),
            "score": pa.array(scores, pa.float64()),
            "empty_view1": pa.array(~m1_PHW.reshape(pair.size, -1).any(axis=1)),
            "empty_view2": pa.array(~m2_PHW.reshape(pair.size, -1).any(axis=1)),
        }, schema=PAIRS_SCHEMA))
    return {"images": np.array([int(np.asarray(batch["images"]).sum())]), "rejected": np.array([int(rej.size)]),
            "pairs": np.array([int(pair.size)])}


def cds_table(pairs: pa.Table, q: int, k: int, held_Q: np.ndarray, rejected_Q: np.ndarray | None = None) -> pa.Table:
    """The ``cds`` table: every feature's CDS from its scored pairs (scope.cds_from_scores in
    rank order, vectorised over features).

    ``held_Q``: top images pass 1 kept per feature; ``rejected_Q``: of those, images rejected in
    pass 2. status: ``ok``; ``fewer usable images than k_cds`` (a CDS from what there was);
    ``no usable image`` (every scored image had both maps empty: CDS NaN); ``images rejected``
    (no image could be scored at all: CDS NaN); ``never fired`` (no pool image activates the
    feature: CDS NaN). ``images_both_empty`` counts the skipped images up to the last one used
    (spares after it were never consulted)."""
    rejected_Q = np.zeros(q, np.int64) if rejected_Q is None else rejected_Q
    f = pairs.column("feature").to_numpy()
    r = pairs.column("rank").to_numpy()
    s = pairs.column("score").to_numpy()
    e1 = pairs.column("empty_view1").to_numpy(zero_copy_only=False)
    e2 = pairs.column("empty_view2").to_numpy(zero_copy_only=False)
    order = np.lexsort((r, f))
    f, s, one_empty = f[order], s[order], (e1 ^ e2)[order]
    usable = ~np.isnan(s)
    # Running count of usable scores within each feature, in rank order (1-based at usable rows).
    csum = np.cumsum(usable)
    first = np.searchsorted(f, f, "left")
    before = np.where(first > 0, csum[np.maximum(first - 1, 0)], 0)
    seen = csum - before
    used = usable & (seen <= k)
    n_used = np.bincount(f[used], minlength=q)
    total = np.bincount(f[used], weights=s[used], minlength=q)
    # A skipped image was consulted when fewer than k usable ones came before it.
    skipped = ~usable & (seen < k)
    with np.errstate(invalid="ignore", divide="ignore"):
        cds = np.where(n_used > 0, total / np.maximum(n_used, 1), np.nan)
    scored_Q = np.bincount(f, minlength=q)
    status = np.select(
        [held_Q == 0, (scored_Q == 0) & (rejected_Q > 0), n_used == 0, n_used < k],
        ["never fired", "images rejected", "no usable image", "fewer usable images than k_cds"], "ok")
    return pa.table({
        "feature": pa.array(np.arange(q), pa.int64()), "cds": pa.array(cds, pa.float64()),
        "images_used": pa.array(n_used, pa.int32()),
        "images_left_overlap": pa.array(np.bincount(f[used & one_empty], minlength=q), pa.int32()),
        "images_both_empty": pa.array(np.bincount(f[skipped], minlength=q), pa.int32()),
        "images_rejected": pa.array(rejected_Q, pa.int32()),
        "images_held": pa.array(held_Q, pa.int32()), "status": pa.array(status.tolist(), pa.string()),
    })


@dataclass
class CDSResult:
    skipped: bool
    topk: TopKResult | None = None
    table: pa.Table | None = None
    nan_features: int = 0


def _stream_pairs(job: JobConfig, root: ResultsRoot, selection: tuple, keys_sorted: np.ndarray, progress: bool,
                  run: str) -> tuple[int, int]:
    """Pass 2's Ray pipeline: the selected pool images → SCC pairs → activation maps (actors) →
    EMD scores (CPU tasks, which write the ``pairs`` parts). Returns (images, rejected)."""
    import ray
    import ray.data
    from tqdm import tqdm

    from scope_ray.data.sources import read_source
    from scope_ray.stages.cluster import actor_resources, one_block_per_batch
    from scope_ray.stages.scc_pairs import with_scc_pairs

    spec = job.model.spec
    # 1-CPU EMD tasks (or the read and decode tasks, if larger) beside the actors.
    res = actor_resources(job.ray, task_cpus=max(EMD_TASK_CPUS, job.ray.read_cpus + job.ray.decode_cpus))
    ds = read_source(pool_source(job), "imagenet", endpoint_url=job.storage.endpoint_url, num_cpus=job.ray.read_cpus)
    ds = ds.map_batches(selected_only, fn_kwargs=dict(keys_sorted=keys_sorted), batch_size=256,
                        num_cpus=job.ray.read_cpus, batch_format="numpy")
    ds = with_scc_pairs(one_block_per_batch(ds, job.scope.batch_size), spec, (job.scope.shift,), job)
    ds = ds.map_batches(
        PairMaps, fn_constructor_kwargs=dict(job=job, root=root, torch_threads=res.torch_threads,
                                             selection_ref=ray.put(selection)),
        compute=res.strategy(), num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        batch_size=job.scope.batch_size, batch_format="numpy",
    )
    ds = ds.map_batches(score_pairs, fn_kwargs=dict(root=root, model=job.model.name, split=job.scope.pool_split,
                                                    side=spec.grid - job.scope.shift, run=run),
                        batch_size=EMD_BATCH_PAIRS, num_cpus=EMD_TASK_CPUS, batch_format="numpy")
    images = rejected = 0
    bar = tqdm(desc="cds pass 2", unit="img", total=int(keys_sorted.size), disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        images += int(part["images"].sum())
        rejected += int(part["rejected"].sum())
        bar.update(int(part["images"].sum()))
    bar.close()
    return images, rejected


def run_cds(job: JobConfig, root: ResultsRoot, *, progress: bool = True, log=info) -> CDSResult:
    """Both passes (each skipped when committed with this config); returns the ``cds`` table."""
    from scope_ray.topk import image_keys

    topk_result = run_cds_topk(job, root, progress=progress, log=log)
    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job)
    if stage.is_complete(chash):
        log(f"[cds] pass 2 (SCC pairs, CDS): already complete at {stage.uri}; skipping")
        table = stage.read_table("cds")
        return CDSResult(skipped=True, topk=topk_result, table=table,
                         nan_features=int(np.isnan(table.column("cds").to_numpy()).sum()))
    topk = root.stage(job.model.name, TOPK_STAGE).read_table("topk")
    q, k = job.dictionary_size, job.scope.k_cds
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        held = np.bincount(topk.column("feature").to_numpy(), minlength=q)
        if topk.num_rows == 0:  # no feature fires on any pool image: every feature is listed, none scored
            log("[cds] pass 2: no feature fired on any pool image; every feature gets CDS NaN ('never fired')")
            table = cds_table(PAIRS_SCHEMA.empty_table(), q, k, held)
            stage.write_part("cds", "part-0", table)
            stage.commit(chash, {"topk": root.stage(job.model.name, TOPK_STAGE).uri}, {"pairs": 0, "cds": q, "rejects": 0},
                         extra={"shift": job.scope.shift, "k_cds": k, "grid": job.model.spec.grid, "nan_features": q})
            return CDSResult(skipped=False, topk=topk_result, table=table, nan_features=q)
        keys = image_keys(topk.column("image_id").to_pylist())
        order = np.argsort(keys, kind="stable")
        selection = (keys[order], topk.column("feature").to_numpy()[order], topk.column("rank").to_numpy()[order])
        keys_sorted = np.unique(keys)
        spec = job.model.spec
        log(f"[cds] pass 2: {keys_sorted.size} selected images -> SCC pairs at shift {job.scope.shift} -> "
            f"{topk.num_rows} (feature, image) scores")
        images, rejected = _stream_pairs(job, root, selection, keys_sorted, progress, run=chash)
        pairs = stage.written_table("pairs", PAIRS_SCHEMA)
        # Nothing lost, nothing doubled: every (feature, image) of a usable selected image exactly once.
        rejected_ids = set(stage.written_table("rejects", REJECTS_SCHEMA).column("image_id").to_pylist())
        held_rejected = np.array([i in rejected_ids for i in topk.column("image_id").to_pylist()], dtype=bool)
        expected = int((~held_rejected).sum())
        unique = len(set(zip(pairs.column("feature").to_pylist(), pairs.column("image_id").to_pylist())))
        if pairs.num_rows != expected or unique != expected or images != keys_sorted.size:
            raise RuntimeError(f"[cds] pass 2: {pairs.num_rows} scored pairs ({unique} distinct) for {images} images on "
                               f"storage, expected {expected} pairs for {keys_sorted.size} images; not committing")
        rejected_Q = np.bincount(topk.column("feature").to_numpy()[held_rejected], minlength=q)
        table = cds_table(pairs, q, k, held, rejected_Q)
        stage.write_part("cds", "part-0", table)
        nan_features = int(np.isnan(table.column("cds").to_numpy()).sum())
        stage.commit(chash, {"topk": root.stage(job.model.name, TOPK_STAGE).uri},
                     {"pairs": pairs.num_rows, "cds": q, "rejects": rejected},
                     extra={"shift": job.scope.shift, "k_cds": k, "grid": spec.grid, "nan_features": nan_features})
        cds = table.column("cds").to_numpy()
        log(f"[cds] pass 2: {images} images ({rejected} rejected), {pairs.num_rows} scored pairs; CDS median "
            f"{np.nanmedian(cds) if nan_features < q else float('nan'):.3f}; {nan_features} features with CDS NaN "
            "(listed in the cds table with their status)")
        return CDSResult(skipped=False, topk=topk_result, table=table, nan_features=nan_features)
