"""Probe features: the final-layer tokens each linear probe reads, for every removal variant.

For each task whose data is configured (classification: ``data.imagenet``, segmentation:
``data.ade20k``, depth: ``data.nyud``; each of ``train`` / ``val`` that is set) and each variant
in ``VARIANTS``, images stream through decoding tasks and a pool of ViT + SAE actors that run
``final_tokens(pixels, edit=removal_edit(sae, group))`` (METHOD §8: the group leaves the patch
tokens at the designated block, the edit propagates through the later blocks, the tokens are read
after the final norm). Groups come from the committed partition stage's ``features`` table; the
random control is ``random_group(q, |high|, pool=low, exclude=high, seed)``: |high| features drawn
from the scored, live features outside the high group (the low-CDS group), never an unscored one.

Tables under ``ROOT/<model>/probe-features/`` (docs/probes.md is the reference):
``classification_<split>``, ``segmentation_<split>``, ``depth_<split>`` and ``rejects``.
Each actor writes one part file per batch holding every variant's rows, named by the batch's
image ids, so a retried batch overwrites; the driver checks rows = (images − rejects) × variants,
each (image, variant) once, and commits the manifest last.

Models with a text tower (the CLIPs) also get ``clip_embedding`` in the classification tables:
the image tower's own pooled and projected output (``encode_image``) of the same edited forward,
read off a hook on the visual module, so zero-shot (``stages/zeroshot.py``) needs no second pass.

Four forwards per batch (one per variant). Sharing the SAE encoding of the designated-layer
tokens across the three removal variants would save about one SAE encode per removal variant
but needs the removal arithmetic outside ``removal.py``; the forwards dominate, so each variant
goes through ``removal_edit`` as it is.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from scope_ray.config import JobConfig, SourceConfig
from scope_ray.logs import info
from scope_ray.storage import ResultsRoot, StageDir, content_hash
from scope_ray.tokens import REJECTS_SCHEMA, rejects_table
from scope_ray.pipeline import PARTITION
from scope_ray.pipeline import PROBE_FEATURES as STAGE
# RANDOM_POOL: where the random control group is drawn from (load_groups); recorded and hashed.
from scope_ray.pipeline import RANDOM_POOL
from scope_ray.pipeline import partition_hash
from scope_ray.pipeline import probe_features_hash as config_hash
from scope_ray.removal import VARIANT_GROUP, VARIANTS
from scope_ray.probes.tasks import Task
from scope_ray.stages.common import load_sae

# Which dataset each probe task reads (its source is data.<dataset>).
TASKS: dict[Task, str] = {"classification": "imagenet", "segmentation": "ade20k", "depth": "nyud"}
SPLITS = ("train", "val")
# The extraction's rejects columns plus the task: the three datasets may share image ids.


def table_name(task: str, split: str) -> str:
    return f"{task}_{split}"


def table_schema(task: Task, d: int, n: int, s: int, clip_dim: int | None = None) -> pa.Schema:
    """The Arrow schema of ``<task>_<split>``: D width, N patch tokens, S input side; ``clip_dim``
    (E, the image-text embedding width) adds ``clip_embedding`` to classification tables."""
    f32, head = pa.float32(), [pa.field("image_id", pa.string()), pa.field("variant", pa.string())]
    if task == "classification":
        clip = [pa.field("clip_embedding", pa.list_(f32, clip_dim))] if clip_dim else []
        return pa.schema(head + [pa.field("embedding", pa.list_(f32, d)), pa.field("label", pa.int64()), *clip])
    if task == "segmentation":
        return pa.schema(head + [pa.field("tokens", pa.list_(f32, n * d)), pa.field("mask", pa.list_(pa.uint8(), s * s))])
    if task == "depth":
        return pa.schema(head + [pa.field("cls", pa.list_(f32, d)), pa.field("tokens", pa.list_(f32, n * d)),
                                 pa.field("depth", pa.list_(f32, s * s))])
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")


# --------------------------------------------------------------------------------- actor
def _fsl(values_BK: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    b, k = values_BK.shape
    flat = pa.array(np.ascontiguousarray(values_BK).reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, k)


def clip_embedding_dim(model) -> int | None:
    """E of a model with a text tower (the visual projection's output width), else None."""
    if not model.spec.has_text_tower:
        return None
    return int(model.vision.output_dim)


def spec_clip_dim(spec) -> int | None:
    """``clip_embedding_dim`` from the architecture alone (built on the meta device: no memory, no weights)."""
    if not spec.has_text_tower:
        return None
    import torch

    from scope_ray.models import build_backbone

    with torch.device("meta"):
        return int(build_backbone(spec).visual.output_dim)


def has_class_token(model) -> bool:
    """Whether prefix token 0 is a class token (SigLIP towers have none; registers come after CLS)."""
    if model.spec.loader == "open_clip":
        return True
    return getattr(model.backbone, "cls_token", None) is not None


class ProbeFeatureWriter:
    """Ray Data actor: decoded images in; one part file of every variant's rows out; counts returned."""

    def __init__(self, job: JobConfig, root: ResultsRoot, task: str, split: str, groups: dict[str, np.ndarray],
                 torch_threads: int, run: str | None = None):
        from scope_ray.removal import removal_edit
        from scope_ray.stages.cluster import actor_backbone, this_node

        self.task, self.split, self.table = task, split, table_name(task, split)
        self.node = this_node()
        self.stage = root.stage(job.model.name, STAGE, run=run)
        self.model, self.device = actor_backbone(job, torch_threads)
        sae = load_sae(job, root, device=self.device)
        self.edits = {"original": None}
        self.edits.update({v: removal_edit(sae, groups[g]) for v, g in VARIANT_GROUP.items()})
        self.prefix = self.model.num_prefix_tokens
        self.cls = has_class_token(self.model)
        spec = job.model.spec
        self.clip_dim = clip_embedding_dim(self.model) if task == "classification" else None
        self.schema = table_schema(task, spec.width, spec.num_patches, spec.image_size, self.clip_dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ids = [str(i) for i in batch["image_id"]]
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        reasons = [str(r) for r in batch["reason"]]
        # The task is in the name: another dataset's batch may hold the same ids (e.g. "val_000000").
        part = f"{self.task}-{self.split}-{content_hash(ids)}"
        out = {"images": np.array([len(ids)]), "rejected": np.array([0]), "rows": np.array([0]),
               "invalid_depth_pixels": np.array([0]), "label_min": np.array([np.iinfo(np.int64).max]),
               "label_max": np.array([np.iinfo(np.int64).min]), "class_token": np.array([int(self.cls)]),
               "node_id": np.array([self.node["node_id"]]), "node_ip": np.array([self.node["ip"]])}
        tokens: dict[str, np.ndarray] = {}
        clip: dict[str, np.ndarray] = {}
        if ok.any():
            good = np.flatnonzero(ok)
            pixels = self.model.preprocess(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device))
            # Blocks 1…L are the same for every variant: run once, then only the blocks after L per
            # variant (4 full forwards before; CLIP-B/16 at layer 11: 15 block calls instead of 48).
            with torch.inference_mode():
                designated = self.model.designated_output(pixels)
            for variant in VARIANTS:
                tokens[variant], clip[variant] = self._forward(pixels, self.edits[variant], designated)
            finite_B = np.logical_and.reduce([np.isfinite(t).all(axis=(1, 2)) for t in tokens.values()]
                                             + [np.isfinite(e).all(axis=1) for e in clip.values() if e is not None])
            for i in good[~finite_B]:  # a broken backbone or SAE: never hand NaN features to a probe
                ok[i], reasons[i] = False, "nonfinite_activations: NaN or Inf in the final tokens"
            tokens = {v: t[finite_B] for v, t in tokens.items()}
            clip = {v: None if e is None else e[finite_B] for v, e in clip.items()}
        if (~ok).any():
            bad = np.flatnonzero(~ok)
            self.stage.write_part("rejects", part, rejects_table(self.split, [ids[i] for i in bad],
                                                                 [reasons[i] for i in bad], task=self.task))
        out["rejected"][0] = int((~ok).sum())
        if not ok.any():
            return out
        good_ids = [ids[i] for i in np.flatnonzero(ok)]
        table = pa.concat_tables([self._rows(good_ids, v, tokens[v], batch, ok, clip[v]) for v in VARIANTS])
        self.stage.write_part(self.table, part, table)
        out["rows"][0] = table.num_rows
        if self.task == "depth":
            out["invalid_depth_pixels"][0] = int(np.isnan(batch["depth"][ok]).sum())
        if self.task == "classification":
            labels = np.asarray(batch["label"][ok], dtype=np.int64)
            out["label_min"][0], out["label_max"][0] = labels.min(), labels.max()
        return out

    def _forward(self, pixels_B3SS, edit, designated=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(final tokens_BTD, CLIP image embedding_BE or None) with ``edit``, continuing from the
        designated block's output ``designated`` (``ViTWrapper.designated_output``; None: a full
        forward)."""
        import torch

        if self.clip_dim is None:
            with torch.inference_mode():
                return self.model.final_tokens(pixels_B3SS, edit=edit, start_from=designated).float().cpu().numpy(), None
        # open_clip's visual forward returns encode_image's output (pooling per its config, ln_post,
        # proj); catching it on the way out of the same forward costs nothing extra.
        out: list = []
        handle = self.model.vision.register_forward_hook(
            lambda _m, _a, o: out.append(o[0] if isinstance(o, tuple) else o))
        try:
            with torch.inference_mode():
                tokens = self.model.final_tokens(pixels_B3SS, edit=edit, start_from=designated).float().cpu().numpy()
        finally:
            handle.remove()
        return tokens, out[-1].float().cpu().numpy()

    def _rows(self, ids: list[str], variant: str, tokens_BTD: np.ndarray, batch: dict, ok: np.ndarray,
              clip_BE: np.ndarray | None = None) -> pa.Table:
        b = len(ids)
        patch_BND = tokens_BTD[:, self.prefix:]
        cols = {"image_id": pa.array(ids, pa.string()), "variant": pa.array([variant] * b, pa.string())}
        if self.task == "classification":
            # All visual tokens = every patch token; CLS / registers are not image regions (docs/probes.md).
            cols["embedding"] = _fsl(patch_BND.mean(axis=1), pa.float32())
            cols["label"] = pa.array(np.asarray(batch["label"][ok], dtype=np.int64), pa.int64())
            if self.clip_dim:
                cols["clip_embedding"] = _fsl(clip_BE, pa.float32())
        elif self.task == "segmentation":
            cols["tokens"] = _fsl(patch_BND.reshape(b, -1), pa.float32())
            cols["mask"] = _fsl(np.asarray(batch["mask"][ok], dtype=np.uint8).reshape(b, -1), pa.uint8())
        else:
            cls_BD = tokens_BTD[:, 0] if self.cls else patch_BND.mean(axis=1)
            cols["cls"] = _fsl(cls_BD, pa.float32())
            cols["tokens"] = _fsl(patch_BND.reshape(b, -1), pa.float32())
            cols["depth"] = _fsl(np.asarray(batch["depth"][ok], dtype=np.float32).reshape(b, -1), pa.float32())
        return pa.table(cols, schema=self.schema)


# --------------------------------------------------------------------------------- driver
@dataclass
class SplitCounts:
    images: int = 0
    rejected: int = 0
    rows: int = 0
    invalid_depth_pixels: int = 0
    label_min: int | None = None
    label_max: int | None = None
    class_token: bool = True
    nodes: dict[str, dict] = field(default_factory=dict)  # Ray node id -> {"ip", "images", "rows"}

    @property
    def used(self) -> int:
        return self.images - self.rejected


@dataclass
class ProbeFeaturesResult:
    skipped: bool
    counts: dict[str, SplitCounts] = field(default_factory=dict)  # by table name
    reject_reasons: dict[str, int] = field(default_factory=dict)
    group_sizes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    manifest: dict | None = None


def task_plan(job: JobConfig) -> list[tuple[str, str, SourceConfig]]:
    """(task, split, source) for every configured split of every probe dataset."""
    plan = []
    for task, dataset in TASKS.items():
        cfg = getattr(job.data, dataset)
        for split in SPLITS:
            source = getattr(cfg, split)
            if source is not None:
                plan.append((task, split, source))
    return plan


def load_groups(job: JobConfig, root: ResultsRoot) -> dict[str, np.ndarray]:
    """Feature ids of the high, low and random groups from the committed partition (sorted int64),
    and ``random_pool``: the ids the random group was drawn from.

    The random control is drawn from the scored features outside the high group, i.e. the low
    group with a finite CDS (``RANDOM_POOL``): never a high-CDS feature, and never a feature the
    partition left unscored (dead, never selected, too few usable images), whatever that bucket is
    named. RuntimeError, naming both sizes, when that pool is smaller than the high group."""
    from scope_ray.removal import random_group

    part = root.stage(job.model.name, PARTITION)
    hint = "run `scope-ray stage cds` first (it computes CDS and the partition)"
    if not part.is_complete(partition_hash(job)):
        why = "missing" if not part.is_complete() else "from another config"
        raise RuntimeError(f"{job.model.name}: the partition stage at {part.uri} is {why}; the probe features need its "
                           f"feature groups: {hint}")
    try:
        t = part.read_table("features", columns=["feature", "cds", "group"])
    except KeyError:
        raise RuntimeError(f"{job.model.name}: the partition at {part.uri} has no `features` table (written by an "
                           f"older version); {hint} after removing it") from None
    q = job.dictionary_size
    feature = t.column("feature").to_numpy()
    group = np.asarray(t.column("group").to_pylist(), dtype=object)
    if np.sort(feature).tolist() != list(range(q)):
        raise RuntimeError(f"{job.model.name}: the partition's features table lists {feature.size} features, "
                           f"expected each of 0..{q - 1} once; {hint}")
    groups = {g: np.sort(feature[group == g]).astype(np.int64) for g in ("low", "high")}
    scored = np.isfinite(np.asarray(t.column("cds").to_numpy(zero_copy_only=False), dtype=np.float64))
    pool = np.sort(feature[(group == "low") & scored]).astype(np.int64)
    n_high = int(groups["high"].size)
    if pool.size < n_high:
        raise RuntimeError(f"{job.model.name}: the random control group needs |high| = {n_high} features drawn from the "
                           f"scored features outside the high group (the low-CDS group, finite CDS), but only "
                           f"{pool.size} exist (partition at {part.uri}); a random group of the high group's size "
                           "cannot be drawn (a higher scope.gamma moves features from high to low; Table 4 shows the buckets)")
    groups["random"] = random_group(q, size=n_high, pool=pool, exclude=groups["high"], seed=job.seed).numpy()
    groups["random_pool"] = pool
    return groups


def _stream_split(job: JobConfig, root: ResultsRoot, task: str, split: str, source: SourceConfig,
                  groups: dict[str, np.ndarray], progress: bool, run: str) -> SplitCounts:
    import ray.data
    from tqdm import tqdm

    from scope_ray.data.sources import read_source
    from scope_ray.stages.cluster import actor_resources, one_block_per_batch, tally_nodes
    from scope_ray.stages.decode import decode_batch

    res = actor_resources(job.ray)
    spec = job.model.spec
    batch_size = job.extract.batch_size
    ds = one_block_per_batch(read_source(source, TASKS[task], endpoint_url=job.storage.endpoint_url,
                                         num_cpus=job.ray.read_cpus), batch_size)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs=dict(task=task, size=spec.image_size, max_pixels=job.data.max_pixels, min_side=job.data.min_side,
                       max_aspect_ratio=job.data.max_aspect_ratio, transform=spec.transform),
        batch_size=batch_size, num_cpus=job.ray.decode_cpus, batch_format="numpy",
    )
    ds = ds.map_batches(
        ProbeFeatureWriter,
        fn_constructor_kwargs=dict(job=job, root=root, task=task, split=split, groups=groups,
                                   torch_threads=res.torch_threads, run=run),
        compute=res.strategy(),
        num_cpus=res.num_cpus, num_gpus=res.num_gpus, batch_size=batch_size, batch_format="numpy",
    )
    c = SplitCounts()
    lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    bar = tqdm(desc=f"probe features {task} {split}", unit="img", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for s in ds.iter_batches(batch_size=None, batch_format="numpy"):
        c.images += int(s["images"].sum())
        c.rejected += int(s["rejected"].sum())
        c.rows += int(s["rows"].sum())
        c.invalid_depth_pixels += int(s["invalid_depth_pixels"].sum())
        lo, hi = min(lo, int(s["label_min"].min())), max(hi, int(s["label_max"].max()))
        c.class_token = bool(s["class_token"].all())
        tally_nodes(c.nodes, s)
        bar.update(int(s["images"].sum()))
        bar.set_postfix(rejected=c.rejected)
    bar.close()
    if task == "classification" and c.used:
        c.label_min, c.label_max = lo, hi
    return c


def verify_table(stage: StageDir, table: str, counts: SplitCounts) -> None:
    """Nothing lost, nothing doubled: rows = used images x variants, each (image, variant) once."""
    keys = pa.schema([pa.field("image_id", pa.string()), pa.field("variant", pa.string())])
    t = stage.written_table(table, keys, columns=["image_id", "variant"])
    pairs = t.group_by(["image_id", "variant"]).aggregate([]).num_rows
    images = t.group_by(["image_id"]).aggregate([]).num_rows
    variants = set(t.column("variant").unique().to_pylist())
    expected = counts.used * len(VARIANTS)
    if t.num_rows != expected or pairs != t.num_rows or images != counts.used or not variants <= set(VARIANTS):
        raise RuntimeError(
            f"probe-features {table}: {t.num_rows} rows ({pairs} distinct (image, variant) pairs, {images} images, "
            f"variants {sorted(variants)}) on storage; expected {expected} rows = ({counts.images} images in - "
            f"{counts.rejected} rejected) x {len(VARIANTS)} variants, each pair once; not committing"
        )


def _split_counts(plan, result: ProbeFeaturesResult, spec) -> dict[str, dict[str, dict]]:
    """The manifest's ``splits``: task -> split -> counts (label range, invalid depth pixels)."""
    splits: dict[str, dict[str, dict]] = {}
    for task, split, _ in plan:
        c = result.counts[table_name(task, split)]
        entry = {"images": c.images, "rejected": c.rejected, "used": c.used, "rows": c.rows}
        if task == "classification":
            entry.update(label_min=c.label_min, label_max=c.label_max)
        if task == "depth":
            entry.update(invalid_depth_pixels=c.invalid_depth_pixels,
                         depth_pixels=c.used * spec.image_size * spec.image_size)
        splits.setdefault(task, {})[split] = entry
    return splits


def run_probe_features(job: JobConfig, root: ResultsRoot, *, progress: bool = True, log=info) -> ProbeFeaturesResult:
    """Run (or skip, when committed with this config) the probe-features stage for ``job``."""

    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job)
    if stage.is_complete(chash):
        log(f"[probe-features] {job.model.name}: already complete at {stage.uri}; skipping")
        m = stage.manifest()
        return ProbeFeaturesResult(skipped=True, group_sizes=m["group_sizes"], manifest=m)
    plan = task_plan(job)
    if not plan:
        raise ValueError("no probe data configured: set data.imagenet, data.ade20k and/or data.nyud train/val "
                         "(see docs/data.md)")
    groups = load_groups(job, root)
    pool = groups.pop("random_pool")
    load_sae(job, root)  # fail before any Ray work when the SAE is missing or stale
    sizes = {g: int(v.size) for g, v in groups.items()}
    sizes["random_shared_with_high"] = int(np.intersect1d(groups["random"], groups["high"]).size)
    if sizes["high"] == 0:
        log("[probe-features] warning: the high-CDS group is empty; high_removed and random_removed equal original")
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        spec = job.model.spec
        result = ProbeFeaturesResult(skipped=False, group_sizes=sizes)
        start = time.perf_counter()
        # One line for the plan (each table's progress bar names it while it streams).
        log(f"[probe-features] {job.model.name} layer {job.model.resolved_layer}, {len(VARIANTS)} variants per image: "
            + "; ".join(f"{table_name(task, split)} from {source.path}" for task, split, source in plan))
        for task, split, source in plan:
            table = table_name(task, split)
            counts = _stream_split(job, root, task, split, source, groups, progress, run=chash)
            if counts.used == 0:
                raise RuntimeError(f"[probe-features] {table}: none of the {counts.images} images could be used "
                                   "(see the rejects table); not committing")
            verify_table(stage, table, counts)
            result.counts[table] = counts
        reasons = stage.written_table("rejects", REJECTS_SCHEMA, columns=["reason"]).column("reason").to_pylist()
        n_rejects = len(reasons)
        for r in reasons:
            key = r.split(":")[0]
            result.reject_reasons[key] = result.reject_reasons.get(key, 0) + 1
        if n_rejects != sum(c.rejected for c in result.counts.values()):
            raise RuntimeError(f"[probe-features] {n_rejects} reject rows on storage, "
                               f"{sum(c.rejected for c in result.counts.values())} rejected images counted; not committing")
        result.seconds = time.perf_counter() - start
        rows = {t: c.rows for t, c in result.counts.items()}
        rows["rejects"] = n_rejects
        inputs = {t: {"task": task, "split": split, "source": source.model_dump(mode="json"),
                      "images": result.counts[t].images, "rejected": result.counts[t].rejected}
                  for task, split, source in plan for t in [table_name(task, split)]}
        inputs["partition"] = root.stage(job.model.name, "partition").uri
        inputs["sae"] = root.stage(job.model.name, "train-sae").uri
        splits = _split_counts(plan, result, spec)
        result.manifest = stage.commit(
            chash, inputs, rows,
            extra={"layer": job.model.resolved_layer, "width": spec.width, "grid": spec.grid,
                   "clip_embedding_dim": spec_clip_dim(spec),
                   "num_patches": spec.num_patches, "image_size": spec.image_size, "variants": list(VARIANTS),
                   "group_sizes": sizes, "splits": splits, "seed": job.seed,
                   "random_group": {"drawn_from": RANDOM_POOL, "pool": int(pool.size), "size": sizes["random"],
                                    "seed": job.seed},
                   "cls_source": "class token" if all(c.class_token for c in result.counts.values())
                   else "patch-token mean (the model has no class token)",
                   "seconds": round(result.seconds, 3),
                   "nodes": {t: c.nodes for t, c in result.counts.items()}},
        )
        # One line for every table (images in / rejected / rows) and the reject reasons.
        reasons = "; rejects by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(result.reject_reasons.items()))
        log("[probe-features] committed (images in / rejected / rows) " + ", ".join(
            f"{t} {c.images}/{c.rejected}/{c.rows}" for t, c in result.counts.items())
            + (reasons if result.reject_reasons else ""))
        return result

