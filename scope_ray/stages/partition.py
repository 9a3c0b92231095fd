"""γ partition, group validation, awCDS and the scope figures (METHOD §6–7; Table 4, Figures 6, 7, 9, 10).

Reads the ``cds`` stage and writes ``ROOT/<model>/partition/``:

- ``partition``: one row in the layout of Table 4 (dictionary size, γ and how it was chosen,
  low / high / unscored bucket sizes, which sum to q, and the unscored ones by reason);
- ``features``: every feature's CDS, bucket (``low``, ``high`` or ``unscored``) and, when
  unscored, why (scope.unscored_reasons): what feature-group removal reads;
- ``gamma_sensitivity``: low / high sizes at γ − 0.05, γ, γ + 0.05;
- ``groups``: per group (low-CDS, high-CDS), the mean summed activation per outlier token and per
  normal token, and the share of the group's activation mass that lands on outlier tokens — the
  check that high-CDS features live on outliers (METHOD §6);
- ``awcds``: mean awCDS per token-norm percentile bin (Figure 7);
- ``gallery``: the features and images drawn in the galleries;
- ``figures/``: cds_histogram.png (Fig. 6), awcds.png (Fig. 7), gallery_low.png / gallery_high.png
  (Figs. 9 / 10), listed in the manifest.

The token statistics use the validation tokens that extraction stored for the analysis image set
(the instability stage's one-per-class selection, the paper's "same set of 1,000 images"; read
from that stage when it is complete, chosen by the same rule otherwise), encoded by the trained
SAE inside a Ray task (on a GPU when the cluster has one).
Kept apart from the ``cds`` stage so that a new γ never recomputes CDS.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from scope_ray.config import JobConfig
from scope_ray.logs import info
from scope_ray.scope import UNSCORED_REASONS, gamma_sensitivity, split_by_gamma, unscored_reasons
from scope_ray.storage import ResultsRoot, StageDir
from scope_ray.pipeline import CDS as CDS_STAGE
from scope_ray.pipeline import CDS_TOPK as TOPK_STAGE
from scope_ray.pipeline import PARTITION as STAGE
from scope_ray.pipeline import cds_hash
from scope_ray.pipeline import partition_hash as config_hash
from scope_ray.stages.common import ModelAndSAE, analysis_image_ids, load_sae, pool_source, resolve_tau, selected_only

GROUPS = ("low", "high")


def resolve_gamma(job: JobConfig, cds_Q: np.ndarray, scored_Q: np.ndarray) -> tuple[float, str]:
    """γ for ``job`` (``scope.choose_gamma``: the configured value or Otsu on the scored CDS)."""
    from scope_ray.scope import choose_gamma

    return choose_gamma(cds_Q, scored_Q, job.scope.gamma, job.scope.min_usable_images)


def token_statistics(job: JobConfig, root: ResultsRoot, cds_Q: np.ndarray, groups: dict[str, np.ndarray],
                     tau: float, image_ids: list[str]) -> dict:
    """Group activations on outlier vs normal tokens and the awCDS curve, over the stored val
    tokens of ``image_ids`` (the analysis image set)."""
    import pyarrow.parquet as pq
    import torch

    from scope_ray.devices import granted_device
    from scope_ray.scope import aw_cds, norm_percentile_bins
    from scope_ray.tokens import activations_of

    device = granted_device()  # the GPU Ray granted, else the CPU (scope_ray.devices)
    sae = load_sae(job, root, device=device)
    files = root.stage(job.model.name, "extract").part_files("val_tokens")
    sums = {g: {"outlier": 0.0, "normal": 0.0} for g in GROUPS}
    n_tok = {"outlier": 0, "normal": 0}
    norms_all, aw_all, found = [], [], set()
    nonfinite = 0
    for f in files:
        # The filter is pushed into the Parquet read: row groups of other images are skipped.
        t = pq.read_table(f, filesystem=root.arrow_fs, filters=[("image_id", "in", image_ids)])
        if t.num_rows == 0:
            continue
        found.update(t.column("image_id").to_pylist())
        x = activations_of(t)
        norms = t.column("norm").to_numpy().astype(np.float64)
        ok = np.isfinite(x).all(axis=1) & np.isfinite(norms)
        nonfinite += int((~ok).sum())
        x, norms = x[ok], norms[ok]
        for start in range(0, len(x), 4096):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + 4096])).to(device)
            with torch.inference_mode():
                z = sae.encode(xb, use_threshold=True).float().cpu().numpy()
            nb = norms[start:start + 4096]
            outl = nb > tau
            for kind, mask in (("outlier", outl), ("normal", ~outl)):
                n_tok[kind] += int(mask.sum())
                for g in GROUPS:
                    sums[g][kind] += float(z[mask][:, groups[g]].sum())
            norms_all.append(nb)
            aw_all.append(aw_cds(z, cds_Q))
    norms_T = np.concatenate(norms_all) if norms_all else np.zeros(0)
    aw_T = np.concatenate(aw_all) if aw_all else np.zeros(0)
    centres, means, counts = norm_percentile_bins(norms_T, aw_T, job.scope.awcds_bins, return_counts=True)
    group_rows = []
    for g in GROUPS:
        out_sum, norm_sum = sums[g]["outlier"], sums[g]["normal"]
        group_rows.append({
            "group": g, "features": int(groups[g].size),
            "mean_act_outlier": out_sum / n_tok["outlier"] if n_tok["outlier"] else float("nan"),
            "mean_act_normal": norm_sum / n_tok["normal"] if n_tok["normal"] else float("nan"),
            "outlier_share": out_sum / (out_sum + norm_sum) if out_sum + norm_sum > 0 else float("nan"),
        })
    outlier_pct = 100.0 * float((norms_T <= tau).mean()) if norms_T.size else float("nan")  # where tau sits
    return {"groups": group_rows, "centres": centres, "means": means, "counts": counts,
            "tokens": int(norms_T.size), "outlier_tokens": n_tok["outlier"], "images": len(found),
            "images_requested": len(image_ids), "tau_percentile": outlier_pct, "nonfinite_rows": nonfinite}


def gallery_choice(cds: pa.Table, topk: pa.Table, n_features: int, n_images: int) -> list[dict]:
    """The ``n_features`` lowest- and highest-CDS features and their top ``n_images`` images from
    pass 1, as rows (group, feature, cds, rank, image_id). Features with status ``ok`` (a full
    k_cds of usable images) come first, so the high end is not filled with features that scored
    1 on a single image; ties go to the lower index; a feature is drawn in one gallery only."""
    cds_Q = cds.column("cds").to_numpy()
    ok_Q = np.array([st == "ok" for st in cds.column("status").to_pylist()])
    feats = np.flatnonzero(np.isfinite(cds_Q))
    low = feats[np.lexsort((feats, cds_Q[feats], ~ok_Q[feats]))][:n_features]
    rest = np.setdiff1d(feats, low)
    high = rest[np.lexsort((rest, -cds_Q[rest], ~ok_Q[rest]))][:n_features]
    f = topk.column("feature").to_numpy()
    r = topk.column("rank").to_numpy()
    img = topk.column("image_id").to_pylist()
    rows = []
    for g, picked in (("low", low), ("high", high)):
        for feat in picked:
            sel = np.flatnonzero((f == feat) & (r < n_images))
            for i in sel[np.argsort(r[sel])]:
                rows.append({"group": g, "feature": int(feat), "cds": float(cds_Q[feat]), "rank": int(r[i]),
                             "image_id": img[i]})
    return rows


def gallery_maps(job: JobConfig, root: ResultsRoot, rows: list[dict]) -> tuple[dict[str, np.ndarray], dict[tuple[int, str], np.ndarray]]:
    """Pixels (native-size centre crop, as in pass 1) of the gallery images and each (feature,
    image) activation map over the full patch grid."""
    import ray.data

    from scope_ray.data.sources import read_source
    from scope_ray.stages.decode import decode_batch
    from scope_ray.topk import image_keys

    spec = job.model.spec
    wanted = sorted({r["image_id"] for r in rows})
    if not wanted:
        return {}, {}
    ds = read_source(pool_source(job), "imagenet", endpoint_url=job.storage.endpoint_url, num_cpus=job.ray.read_cpus)
    ds = ds.map_batches(selected_only, fn_kwargs=dict(keys_sorted=np.unique(image_keys(wanted))), batch_size=256,
                        num_cpus=job.ray.read_cpus, batch_format="numpy")
    ds = ds.map_batches(decode_batch, fn_kwargs=dict(size=spec.image_size, max_pixels=job.data.max_pixels,
                                                     min_side=job.data.min_side, transform=spec.transform,
                                                     max_aspect_ratio=job.data.max_aspect_ratio), batch_size=16,
                        num_cpus=job.ray.decode_cpus, batch_format="numpy")
    pixels: dict[str, np.ndarray] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, ok, px in zip(batch["image_id"], batch["ok"], batch["pixels"]):
            if ok:
                pixels[str(i)] = px
    ids = sorted(pixels)
    maps: dict[tuple[int, str], np.ndarray] = {}
    if ids:
        import ray

        from scope_ray.stages.cluster import actor_resources

        res = actor_resources(job.ray)

        wanted_rows = [r for r in rows if r["image_id"] in pixels]
        image_index = np.array([ids.index(r["image_id"]) for r in wanted_rows])
        feature_index = np.array([r["feature"] for r in wanted_rows])

        @ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus)
        def _maps(job, root, images, image_index, feature_index):
            # Only the [rows, N] maps leave the task, not the codes of every gallery image.
            z_BNQ = ModelAndSAE(job, root, res.torch_threads).codes(images)
            return z_BNQ[image_index, :, feature_index].cpu().numpy()

        maps_RN = ray.get(_maps.remote(job, root, np.stack([pixels[i] for i in ids]), image_index, feature_index))
        for r, m in zip(wanted_rows, maps_RN):
            maps[(r["feature"], r["image_id"])] = m.reshape(spec.grid, spec.grid)
    return pixels, maps


@dataclass
class PartitionResult:
    skipped: bool
    row: dict = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    sensitivity: list[dict] = field(default_factory=list)  # low / high sizes at γ − 0.05, γ, γ + 0.05


def _write_figures(job: JobConfig, stage: StageDir, cds_Q: np.ndarray, scored_Q: np.ndarray, gamma: float,
                   gamma_source: str, sensitivity: list[dict], stats: dict, gallery_rows: list[dict],
                   gallery: tuple) -> dict[str, str]:
    """Figures 6, 7, 9 and 10 (drawn by ``report.figures``) under the stage's ``figures/``."""
    from scope_ray.report.figures import awcds_curve, cds_histogram, feature_gallery

    q = cds_Q.size
    pixels, maps = gallery
    with tempfile.TemporaryDirectory() as tmp:
        name = f"{job.model.name} layer {job.model.resolved_layer}"
        local = {
            "cds_histogram": cds_histogram(
                np.where(scored_Q, cds_Q, np.nan), Path(tmp) / "cds_histogram.png", gamma=gamma,
                unscored_cds=cds_Q[~scored_Q], sensitivity=sensitivity,
                title=f"{name}: CDS of {q} SAE features (γ {gamma:.3g}, {gamma_source})"),
            "awcds": awcds_curve(stats["centres"], stats["means"], Path(tmp) / "awcds.png",
                                 outlier_percentile=stats["tau_percentile"],
                                 title=f"{name}: awCDS by token-norm percentile ({stats['tokens']} tokens)"),
        }
        for g, label in (("low", "lowest"), ("high", "highest")):
            local[f"gallery_{g}"] = _draw_gallery(
                [r for r in gallery_rows if r["group"] == g], pixels, maps, job, Path(tmp) / f"gallery_{g}.png",
                title=f"{name}: {label}-CDS features, top images with activation overlaid", draw=feature_gallery)
        figures = {key: stage.write_figure(path) for key, path in local.items()}
    return figures


def run_partition(job: JobConfig, root: ResultsRoot, *, progress: bool = True, log=info) -> PartitionResult:
    import ray

    from scope_ray.stages.cluster import actor_resources

    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job)
    if stage.is_complete(chash):
        log(f"[partition] {job.model.name}: already complete at {stage.uri}; skipping")
        m = stage.manifest()
        return PartitionResult(skipped=True, row=stage.read_table("partition").to_pylist()[0],
                               groups=stage.read_table("groups").to_pylist(), figures=m["figures"],
                               sensitivity=stage.read_table("gamma_sensitivity").to_pylist())
    cds_stage = root.stage(job.model.name, CDS_STAGE)
    if not cds_stage.is_complete(cds_hash(job)):
        raise RuntimeError(f"{job.model.name}: the cds stage at {cds_stage.uri} is missing or from another config; "
                           "run `scope-ray stage cds` first")
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        cds = cds_stage.read_table("cds")
        cds_Q = cds.column("cds").to_numpy()
        q = cds_Q.size
        reason_Q = unscored_reasons(cds.column("status").to_numpy(zero_copy_only=False),
                                    cds.column("images_used").to_numpy(), job.scope.min_usable_images)
        scored_Q = reason_Q == ""
        gamma, gamma_source = resolve_gamma(job, cds_Q, scored_Q)
        buckets = split_by_gamma(cds_Q, scored_Q, gamma)
        groups = {g: buckets[g] for g in GROUPS}
        sensitivity = gamma_sensitivity(cds_Q, scored_Q, gamma)
        tau, tau_source = resolve_tau(job, root)
        res = actor_resources(job.ray)

        image_ids = analysis_image_ids(job, root, tau, progress=progress)
        stats = ray.get(ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus)(token_statistics).remote(
            job, root, cds_Q, groups, tau, image_ids))
        if stats["images"] < len(image_ids):
            log(f"[partition] {len(image_ids) - stats['images']} of the {len(image_ids)} analysis images have no stored "
                "val tokens (extract.val_split differs from scope.instability_split?); statistics use the rest")
        row = table4_row(job, q, gamma, gamma_source, buckets, reason_Q)
        stage.write_part("partition", "part-0", pa.Table.from_pylist([{k: v for k, v in row.items() if k != "model"}]))
        stage.write_part("gamma_sensitivity", "part-0", pa.Table.from_pylist(sensitivity))
        stage.write_part("groups", "part-0", pa.Table.from_pylist(stats["groups"]))
        membership = np.full(q, "unscored", dtype=object)
        for g in GROUPS:
            membership[groups[g]] = g
        stage.write_part("features", "part-0", pa.table({
            "feature": pa.array(np.arange(q), pa.int64()), "cds": pa.array(cds_Q, pa.float64()),
            "group": pa.array(membership.tolist(), pa.string()),
            "unscored_reason": pa.array([r or None for r in reason_Q.tolist()], pa.string())}))
        stage.write_part("awcds", "part-0", pa.table({"norm_percentile": stats["centres"], "awcds": stats["means"],
                                                      "tokens": stats["counts"].astype(np.int64)}))  # tokens averaged
        topk = root.stage(job.model.name, TOPK_STAGE).read_table("topk")
        gallery_rows = gallery_choice(cds, topk, job.scope.gallery_features, job.scope.gallery_images)
        stage.write_part("gallery", "part-0", pa.Table.from_pylist(
            gallery_rows, schema=pa.schema([("group", pa.string()), ("feature", pa.int64()), ("cds", pa.float64()),
                                            ("rank", pa.int64()), ("image_id", pa.string())])))
        figures = _write_figures(job, stage, cds_Q, scored_Q, gamma, gamma_source, sensitivity, stats, gallery_rows,
                                 gallery_maps(job, root, gallery_rows))
        stage.commit(chash, {"cds": cds_stage.uri, "val_tokens": root.stage(job.model.name, "extract").uri},
                     {"partition": 1, "gamma_sensitivity": len(sensitivity), "groups": len(stats["groups"]), "features": q,
                      "awcds": len(stats["centres"]),
                      "gallery": len(gallery_rows)},
                     extra={"gamma": gamma, "gamma_source": gamma_source, "tau": tau, "tau_source": tau_source,
                            "tokens": stats["tokens"], "outlier_tokens": stats["outlier_tokens"],
                            "images": stats["images"], "images_requested": stats["images_requested"],
                            "nonfinite_rows": stats["nonfinite_rows"], "figures": figures})
        lo, hi = sensitivity[0], sensitivity[-1]
        log(f"[partition] gamma {gamma:.3g} ({gamma_source}): {row['low_cds']} low-CDS, {row['high_cds']} high-CDS, "
            f"{row['unscored']} unscored of {q} ({_reasons_text(row)}); at gamma -/+ 0.05: {lo['high']} / {hi['high']} "
            f"high-CDS; figures under {posixpath.join(stage.uri, 'figures')}")
        return PartitionResult(skipped=False, row=row, groups=stats["groups"], figures=figures, sensitivity=sensitivity)


def table4_row(job: JobConfig, q: int, gamma: float, gamma_source: str, buckets: dict[str, np.ndarray],
               reason_Q: np.ndarray) -> dict:
    """The ``partition`` row (Table 4's layout): every one of the q features in exactly one bucket."""
    row = {"model": job.model.name, "dictionary_size": q, "gamma": gamma, "gamma_source": gamma_source,
           "low_cds": int(buckets["low"].size), "high_cds": int(buckets["high"].size),
           "unscored": int(buckets["unscored"].size)}
    for reason in UNSCORED_REASONS:
        row[unscored_column(reason)] = int((reason_Q == reason).sum())
    row.update({"min_usable_images": job.scope.min_usable_images, "shift": job.scope.shift, "k_cds": job.scope.k_cds})
    if row["low_cds"] + row["high_cds"] + row["unscored"] != q or \
            sum(row[unscored_column(r)] for r in UNSCORED_REASONS) != row["unscored"]:
        raise AssertionError(f"partition buckets do not add up to q={q}: {row}")  # a bug, never data
    return row


def table4_columns() -> list[tuple[str, str, str]]:
    """Table 4's columns as the report and the demo print them: (key, header, format)."""
    return [("dictionary_size", "dictionary size", "d"), ("gamma", "γ", ".3f"), ("gamma_source", "γ from", ""),
            ("low_cds", "low-CDS", "d"), ("high_cds", "high-CDS", "d"), ("unscored", "unscored", "d")] + \
        [(unscored_column(r), f"unscored: {r}", "d") for r in UNSCORED_REASONS]


SENSITIVITY_COLUMNS = [("gamma", "γ", ".3f"), ("low", "low-CDS", "d"), ("high", "high-CDS", "d")]


def unscored_column(reason: str) -> str:
    """The partition-row column counting one unscored reason (``unscored_never_fired``, ...)."""
    return "unscored_" + reason.replace(" ", "_")


def _reasons_text(row: dict) -> str:
    return ", ".join(f"{row[unscored_column(r)]} {r}" for r in UNSCORED_REASONS if row[unscored_column(r)]) or "none"


def _draw_gallery(rows: list[dict], pixels: dict, maps: dict, job: JobConfig, path: Path, *, title: str, draw) -> Path:
    spec = job.model.spec
    feats = list(dict.fromkeys(r["feature"] for r in rows))
    m = job.scope.gallery_images
    size, grid = spec.image_size, spec.grid
    images = np.zeros((len(feats), m, size, size, 3), np.uint8)
    fmaps = np.full((len(feats), m, grid, grid), np.nan)
    labels = []
    for fi, feat in enumerate(feats):
        mine = [r for r in rows if r["feature"] == feat]
        labels.append(f"feature {feat} · CDS {mine[0]['cds']:.3f}")
        for col, r in enumerate(mine[:m]):
            if r["image_id"] in pixels:
                images[fi, col] = pixels[r["image_id"]]
                fmaps[fi, col] = maps[(feat, r["image_id"])]
    return draw(images, fmaps, path, title=title, row_labels=labels)
