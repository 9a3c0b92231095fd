"""Outlier instability (METHOD §4; Table 7 at s = 1, Table 9 over s = 1…6): how far the attention
of a token moves when only its context shifts, for outlier versus normal tokens.

Pipeline (docs/instability.md has the picture, the selection rule and the costs):

1. **Selection** on the driver, from ``image_id`` and ``label`` only (no pixel is decoded):
   the first image of each class in source order, ``scope.instability_images`` of them.
2. **Pairs**: Ray Data reads the split again, keeps the selected ids and cuts SCC pairs for every
   shift in ``job.instability_shifts`` (``scc_pairs.with_scc_pairs``, CPU tasks).
3. **Attention** (actor pool, the GPU when there is one): both views through the ViT; for each
   overlap token (all, or a seeded sample of ``scope.instability_tokens``) the attention rows of
   every head in both views and the token's norm in both views. One output row per token.
4. **EMD** (CPU tasks): per head, the exact EMD between the two rows, averaged over heads;
   ``scope.instability_alignment`` says where the rows are placed (``alignment_supports``):
   ``canvas`` (default) the common ``(p+s)²`` canvas, view 2 at offset s; ``view`` each view's own
   ``p × p`` frame; ``overlap`` only the ``(p−s)²`` shared patches, each row renormalised there
   (no mass there: NaN, counted in ``n_undefined``). On the canvas a uniform or view-anchored row
   scores exactly s·√2; docs/instability.md has every alignment's analytic values. The alignment
   is in the config hash, the manifest, every summary row and the figure title.
   Outlier = norm > tau in either view. These tasks write
   the ``tokens`` part files. The EMD is the expensive step and CPU-bound, so it runs in tasks
   that spread over every CPU of the cluster rather than inside the (GPU) model actors.
5. The driver verifies what is on storage, writes the per-shift ``summary`` and commits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scope_ray.config import JobConfig
from scope_ray.instability import (
    SELECTION_RULE,
    aligned_token_emd,
    alignment_supports,
    overlap_sample,
    summarize,
    tokens_per_image,
)
from scope_ray.logs import info
from scope_ray.storage import ResultsRoot, StageDir, content_hash
from scope_ray.tokens import REJECTS_SCHEMA, rejects_table
from scope_ray.pipeline import INSTABILITY as STAGE
from scope_ray.pipeline import instability_hash as config_hash
from scope_ray.stages.common import analysis_image_ids, select_one_per_class, tau_for_analysis  # noqa: F401

# Tokens per EMD task. One token costs heads x one dense EMD (CLIP-B/16: 12 x ~1.7 ms on one core),
# so a task runs for seconds: long enough to amortise scheduling, short enough to spread the work.
EMD_BATCH_TOKENS = 256
EMD_TASK_CPUS = 1.0  # an EMD task is single-threaded NumPy/POT
IMAGES_SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False),
                           pa.field("label", pa.int64(), nullable=False)])
TOKENS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("shift", pa.int32(), nullable=False),
    pa.field("token1", pa.int32(), nullable=False),
    pa.field("token2", pa.int32(), nullable=False),
    pa.field("norm1", pa.float32(), nullable=False),
    pa.field("norm2", pa.float32(), nullable=False),
    pa.field("outlier", pa.bool_(), nullable=False),
    pa.field("emd", pa.float64(), nullable=False),
])


class AttentionRows:
    """Ray Data actor: SCC pair rows in, one row per sampled overlap token out (its attention rows
    over each view's patches, every head, and its norm in each view). Records rejected images."""

    def __init__(self, job: JobConfig, root: ResultsRoot, split: str, first_shift: int, torch_threads: int,
                 run: str | None = None):
        from scope_ray.stages.cluster import actor_backbone

        self.job, self.split, self.first_shift = job, split, first_shift
        self.stage = root.stage(job.model.name, STAGE, run=run)
        self.model, self.device = actor_backbone(job, torch_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from scope_ray.scc import overlap_indices

        ids = [str(i) for i in batch["image_id"]]
        shift_R = np.asarray(batch["shift"], dtype=np.int64)
        ok_R = np.asarray(batch["ok"], dtype=bool)
        # An image has one row per shift, possibly in different batches: only the first shift's
        # row records a rejection, so each rejected image is written exactly once.
        rej = np.flatnonzero(~ok_R & (shift_R == self.first_shift))
        if rej.size:
            table = rejects_table(self.split, [ids[r] for r in rej], [batch["reason"][r] for r in rej])
            self.stage.write_part("rejects", f"{self.split}-{content_hash(ids[r] for r in rej)}", table)
        spec, cap, heads = self.model.spec, self.job.scope.instability_tokens, self.model.num_heads
        n, good = self.model.num_patches, np.flatnonzero(ok_R)
        if good.size == 0:
            return _token_rows([], [], [], [], np.zeros((0,)), np.zeros((0,)),
                               np.zeros((0, heads, n), np.float32), np.zeros((0, heads, n), np.float32))
        views = np.concatenate([batch["view1"][good], batch["view2"][good]])
        b = good.size
        out_ids, out_s, t1, t2, n1, n2, a1, a2 = [], [], [], [], [], [], [], []
        with torch.inference_mode():
            pixels = self.model.preprocess(torch.from_numpy(np.ascontiguousarray(views)).to(self.device))
            # One forward through blocks 1…L gives both (it used to run them twice).
            attn_2BHNN, layer = self.model.patch_attention_and_layer(pixels)
            norms_2BN = layer.norms.float().cpu().numpy()
            for j, r in enumerate(good):
                s = int(shift_R[r])
                idx1, idx2 = overlap_indices(spec.grid, s)
                pos = overlap_sample(ids[r], s, idx1.size, cap, self.job.seed)
                k1, k2 = idx1[pos], idx2[pos]
                out_ids += [ids[r]] * pos.size
                out_s.append(np.full(pos.size, s))
                t1.append(k1)
                t2.append(k2)
                n1.append(norms_2BN[j, k1])
                n2.append(norms_2BN[b + j, k2])
                # Gather the query rows on the device: only K of the N rows per head leave it.
                a1.append(attn_2BHNN[j][:, torch.from_numpy(k1).to(self.device)].transpose(0, 1))  # [K, H, N]
                a2.append(attn_2BHNN[b + j][:, torch.from_numpy(k2).to(self.device)].transpose(0, 1))
            attn1_THN = torch.cat(a1).float().cpu().numpy()
            attn2_THN = torch.cat(a2).float().cpu().numpy()
        return _token_rows(out_ids, np.concatenate(out_s), np.concatenate(t1), np.concatenate(t2),
                           np.concatenate(n1), np.concatenate(n2), attn1_THN, attn2_THN)


def _token_rows(ids, shift, token1, token2, norm1, norm2, attn1_THN, attn2_THN) -> dict[str, np.ndarray]:
    return {"image_id": np.asarray(ids, dtype=object), "shift": np.asarray(shift, dtype=np.int64),
            "token1": np.asarray(token1, dtype=np.int64), "token2": np.asarray(token2, dtype=np.int64),
            "norm1": np.asarray(norm1, dtype=np.float32), "norm2": np.asarray(norm2, dtype=np.float32),
            "attn1": np.ascontiguousarray(attn1_THN, dtype=np.float32),
            "attn2": np.ascontiguousarray(attn2_THN, dtype=np.float32)}


def emd_batch(batch: dict[str, np.ndarray], *, root: ResultsRoot, model: str, grid: int, tau: float,
              alignment: str, run: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data task: token rows with attention → EMD (under ``alignment``) and outlier flag → a
    ``tokens`` part file (named by the batch's (image, shift, token) keys, so a retry overwrites);
    returns counts."""
    ids = [str(i) for i in batch["image_id"]]
    if not ids:
        return {"rows": np.array([0]), "undefined": np.array([0])}
    shift_T = np.asarray(batch["shift"], dtype=np.int64)
    supports = {int(s): alignment_supports(grid, int(s), alignment) for s in np.unique(shift_T)}
    attn1_THN, attn2_THN = batch["attn1"], batch["attn2"]
    emd_T = np.array([aligned_token_emd(attn1_THN[t], attn2_THN[t], grid, int(shift_T[t]), alignment,
                                        supports[int(shift_T[t])]) for t in range(len(ids))])
    norm1_T, norm2_T = np.asarray(batch["norm1"], np.float32), np.asarray(batch["norm2"], np.float32)
    table = pa.Table.from_arrays([
        pa.array(ids, pa.string()), pa.array(shift_T.astype(np.int32)),
        pa.array(np.asarray(batch["token1"]).astype(np.int32)), pa.array(np.asarray(batch["token2"]).astype(np.int32)),
        pa.array(norm1_T), pa.array(norm2_T), pa.array((norm1_T > tau) | (norm2_T > tau)), pa.array(emd_T),
    ], schema=TOKENS_SCHEMA)
    keys = (f"{i}\0{s}\0{t}" for i, s, t in zip(ids, shift_T, batch["token1"]))
    root.stage(model, STAGE, run=run).write_part("tokens", content_hash(keys), table)
    return {"rows": np.array([len(ids)]), "undefined": np.array([int(np.isnan(emd_T).sum())])}


def _keep_ids(batch: pa.Table, *, ids: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("image_id"), value_set=pa.array(ids, pa.string())))


# ====================================================================================== the stage
@dataclass
class InstabilityResult:
    skipped: bool
    summary: list[dict[str, Any]] = field(default_factory=list)
    images_selected: int = 0
    rejected: int = 0
    tau: float | None = None
    manifest: dict | None = None


def _stream(job: JobConfig, root: ResultsRoot, res, source, split: str, ids: list[str], scan_rows: int, tau: float,
            progress: bool, run: str) -> int:
    import ray.data
    from tqdm import tqdm

    from scope_ray.data.sources import read_source
    from scope_ray.stages.cluster import one_block_per_batch
    from scope_ray.stages.scc_pairs import with_scc_pairs

    spec, shifts = job.model.spec, job.instability_shifts
    ds = read_source(source, "imagenet", endpoint_url=job.storage.endpoint_url, num_cpus=job.ray.read_cpus)
    # Rows arrive in source order (read_source preserves it), so nothing selected lies past the
    # last row the selection pass needed: on a large split this avoids reading the rest.
    ds = ds.limit(scan_rows).map_batches(_keep_ids, fn_kwargs=dict(ids=ids), batch_format="pyarrow", batch_size=None,
                                         zero_copy_batch=True, num_cpus=job.ray.read_cpus)
    ds = with_scc_pairs(one_block_per_batch(ds, job.scope.batch_size), spec, shifts, job)
    ds = ds.map_batches(
        AttentionRows,
        fn_constructor_kwargs=dict(job=job, root=root, split=split, first_shift=shifts[0], torch_threads=res.torch_threads,
                                   run=run),
        compute=res.strategy(), num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        batch_size=job.scope.batch_size, batch_format="numpy",
    )
    ds = ds.map_batches(emd_batch, fn_kwargs=dict(root=root, model=job.model.name, grid=spec.grid, tau=tau,
                                                  alignment=job.scope.instability_alignment, run=run),
                        batch_size=EMD_BATCH_TOKENS, num_cpus=EMD_TASK_CPUS, batch_format="numpy")
    total = len(ids) * sum(tokens_per_image(spec.grid, s, job.scope.instability_tokens) for s in shifts)
    rows = 0
    bar = tqdm(desc="instability: attention EMD", unit="tok", total=total, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows += int(part["rows"].sum())
        bar.update(int(part["rows"].sum()))
    bar.close()
    return rows


def _verify(job: JobConfig, tokens: pa.Table, rejects: pa.Table, selected: set[str]) -> tuple[set[str], set[str]]:
    """Every selected image is either rejected (once) or has exactly its token rows at every shift,
    once. Returns (used, rejected) image ids."""
    spec, cap = job.model.spec, job.scope.instability_tokens
    used = set(tokens.column("image_id").to_pylist())
    rejected = set(rejects.column("image_id").to_pylist())
    problems = []
    if len(rejected) != rejects.num_rows:
        problems.append(f"{rejects.num_rows - len(rejected)} images rejected more than once")
    if used & rejected:
        problems.append(f"{len(used & rejected)} images both rejected and with tokens")
    if (used | rejected) != selected:
        problems.append(f"{len(selected - used - rejected)} selected images missing, "
                        f"{len((used | rejected) - selected)} unexpected")
    shift_T = tokens.column("shift").to_numpy()
    extra = set(np.unique(shift_T).tolist()) - set(job.instability_shifts)
    if extra:
        problems.append(f"rows at shifts {sorted(extra)} that were not asked for")
    for s in job.instability_shifts:
        at = tokens.filter(pc.equal(tokens.column("shift"), s))
        expected = len(used) * tokens_per_image(spec.grid, s, cap)
        keys = at.group_by(["image_id", "token1"]).aggregate([]).num_rows
        n_img = len(pc.unique(at.column("image_id")))
        if at.num_rows != expected or keys != at.num_rows or n_img != len(used):
            problems.append(f"shift {s}: {at.num_rows} rows ({keys} distinct) for {n_img} images, expected "
                            f"{expected} for {len(used)}")
    if problems:
        raise RuntimeError("instability: storage does not match the selection (" + "; ".join(problems) +
                           "); not committing")
    return used, rejected


def run_instability(job: JobConfig, root: ResultsRoot, *, progress: bool = True, log=info) -> InstabilityResult:
    """Run (or skip, when already committed with this config and tau) the instability stage."""
    split = job.scope.instability_split
    source = getattr(job.data.imagenet, split)
    if source is None:
        raise ValueError(f"data.imagenet.{split} is not set: the instability stage (scope.instability_split={split!r}) "
                         "needs it (see docs/data.md)")
    tau, tau_source = tau_for_analysis(job, root)
    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job, tau)
    if stage.is_complete(chash):
        log(f"[instability] {job.model.name}: already complete at {stage.uri} (config {chash}); skipping")
        manifest = stage.manifest()
        counts = manifest["inputs"]["images"]
        return InstabilityResult(skipped=True, summary=stage.read_table("summary").to_pylist(), tau=tau,
                                 images_selected=counts["selected"], rejected=counts["rejected"], manifest=manifest)
    from scope_ray.stages.cluster import actor_resources

    # A GPU request on a GPU-less cluster fails here, before any work; the pool leaves room for a
    # 1-CPU EMD task (or the read and decode tasks, if larger) so the stage can never starve itself.
    res = actor_resources(job.ray, task_cpus=max(EMD_TASK_CPUS, job.ray.read_cpus + job.ray.decode_cpus))
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        spec, shifts = job.model.spec, job.instability_shifts
        log(f"[instability] {job.model.name} layer {job.model.resolved_layer}: selecting "
            f"{job.scope.instability_images} images (one per class) from {split} at {source.path}")
        picker, chosen = select_one_per_class(job, source, progress)
        if len(chosen) < job.scope.instability_images:
            log(f"[instability] only {len(chosen)} images available ({len(picker.labelled)} classes, "
                f"{len(picker.unlabelled)} unlabelled) of {job.scope.instability_images} requested")
        if not chosen:
            raise ValueError(f"data.imagenet.{split} at {source.path} has no images to analyse")
        ids = [c[0] for c in chosen]
        stage.write_part("images", "part-0", pa.table({"image_id": ids, "label": [c[1] for c in chosen]}, schema=IMAGES_SCHEMA))
        scan_rows = max(c[2] for c in chosen) + 1
        log(f"[instability] {len(ids)} images x shifts {list(shifts)}, tau {tau:.4g} ({tau_source}), tokens per image "
            f"and shift: {job.scope.instability_tokens or 'all'}, alignment {job.scope.instability_alignment}")
        _stream(job, root, res, source, split, ids, scan_rows, tau, progress, run=chash)
        tokens = stage.written_table("tokens", TOKENS_SCHEMA, ["image_id", "shift", "token1", "outlier", "emd"])
        rejects = stage.written_table("rejects", REJECTS_SCHEMA, ["image_id", "reason"])
        used, rejected = _verify(job, tokens, rejects, set(ids))
        summary = summarize(tokens, shifts, len(used), tau)
        for row in summary:
            row.update(layer=job.model.resolved_layer, alignment=job.scope.instability_alignment)
        stage.write_part("summary", "part-0", pa.Table.from_pylist(summary))
        unlabelled = sum(1 for c in chosen if c[1] < 0)
        figure = _draw_summary(job, stage, summary)
        result = InstabilityResult(skipped=False, summary=summary, images_selected=len(ids), rejected=len(rejected), tau=tau)
        result.manifest = stage.commit(
            chash, {"images": {"split": split, "source": source.model_dump(mode="json"), "selected": len(ids),
                               "rejected": len(rejected), "unlabelled": unlabelled, "rows_scanned": picker.scanned}},
            {"images": len(ids), "tokens": tokens.num_rows, "summary": len(summary), "rejects": len(rejected)},
            extra={"tau": tau, "tau_source": tau_source, "shifts": list(shifts), "layer": job.model.resolved_layer,
                   "grid": spec.grid, "heads": spec.num_heads, "instability_tokens": job.scope.instability_tokens,
                   "images_requested": job.scope.instability_images, "selection_rule": SELECTION_RULE, "seed": job.seed,
                   "alignment": job.scope.instability_alignment,
                   "figures": {"instability": figure}},
        )
        # One line, every shift (Table 9 reads across shifts); the token counts are in the stored summary.
        images = summary[0]["images"] if summary else 0
        log(f"[instability] D_non / D_out over {images} images: "
            + ", ".join(f"s={r['shift']} {r['d_non']:.4f} / {r['d_out']:.4f}" for r in summary))
        if rejected:
            log(f"[instability] {len(rejected)} selected images rejected (see the rejects table)")
        return result


def _draw_summary(job: JobConfig, stage: StageDir, summary: list[dict[str, Any]]) -> str:
    """Table 9 as a figure (mean attention EMD by shift, outlier vs not) under the stage's figures/."""
    import tempfile
    from pathlib import Path

    from scope_ray.report.figures import instability_plot

    with tempfile.TemporaryDirectory() as tmp:
        path = instability_plot(np.array([r["shift"] for r in summary]), np.array([r["d_non"] for r in summary]),
                                np.array([r["d_out"] for r in summary]), Path(tmp) / "instability.png",
                                title=f"{job.model.name} layer {job.model.resolved_layer}: attention EMD under SCC "
                                      f"by shift (Tables 7 / 9)\nalignment: {job.scope.instability_alignment}")
        return stage.write_figure(path)

