"""Zero-shot stage (METHOD §10): CLIP's zero-shot top-1 and confidence per removal variant.

For a model with a text tower, the class text embeddings come from the text tower
(``zeroshot.templates`` x ``zeroshot.class_names``, the usual CLIP prompt ensemble, computed once
in one Ray task, on a GPU when the cluster has one), and the image embeddings are the
``clip_embedding`` column the probe-features stage cached in ``classification_val``: the image
tower's own pooled and projected output of each variant's edited forward. With
``zeroshot.image_embedding: patch_mean`` (our addition) they are instead the cached ``embedding``
(the mean of the ``ln_post``'d final patch tokens) through the visual projection, which sees
removal even when the designated layer is the last block. No image goes through the backbone
here; scoring is a matrix product per part file, streamed on the driver.

Tables under ``ROOT/<model>/zeroshot/`` (docs/zeroshot.md is the reference): ``zeroshot``, one
row per variant, and ``classes``, the class text embeddings used. A model without a text tower
gets a skipped result with a reason, not an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scope_ray.logs import info
from scope_ray.pipeline import ZEROSHOT as STAGE
from scope_ray.config import JobConfig
from scope_ray.pipeline import PROBE_FEATURES as FEATURES_STAGE
from scope_ray.pipeline import probe_features_hash as features_hash
from scope_ray.pipeline import run_hint
from scope_ray.removal import VARIANTS
from scope_ray.storage import ResultsRoot, StageDir

SOURCE_TABLE = "classification_val"
ZEROSHOT_SCHEMA = pa.schema([
    pa.field("variant", pa.string()),
    pa.field("n_images", pa.int64()),
    pa.field("n_correct", pa.int64()),
    pa.field("top1", pa.float64()),
    pa.field("mean_confidence", pa.float64()),
    pa.field("top1_delta", pa.float64()),
    pa.field("mean_confidence_delta", pa.float64()),
    pa.field("n_classes", pa.int64()),
    pa.field("templates", pa.list_(pa.string())),
    pa.field("logit_scale", pa.float64()),
    pa.field("image_embedding", pa.string()),
])
# The cached column each image embedding is computed from.
SOURCE_COLUMN = {"class_token": "clip_embedding", "patch_mean": "embedding"}


@dataclass
class ZeroShotResult:
    skipped: bool
    reason: str = ""  # why it was skipped: already complete, or no text tower
    rows: list[dict] = field(default_factory=list)  # the `zeroshot` table, one dict per variant
    seconds: float = 0.0
    manifest: dict | None = None


# ------------------------------------------------------------------------------- class names
def _read_text(uri: str, endpoint_url: str | None) -> str:
    from scope_ray.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(uri, endpoint_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"zeroshot.class_names: file {uri!r} does not exist")
    return fs.cat_file(path).decode("utf-8")


def _wnid_index(job: JobConfig) -> dict[str, int]:
    from scope_ray.data.sources import imagenet_class_index

    source = job.data.imagenet.val
    if source is None or source.format != "folder":
        raise ValueError("zeroshot.class_names: a file keyed by wnid needs data.imagenet.val in folder format "
                         "(its classes.txt / sub-directories give wnid -> label); key it by label index instead")
    return imagenet_class_index(source.path, job.storage.endpoint_url)


def resolve_class_names(job: JobConfig) -> tuple[list[str], str]:
    """(name per label index, where they came from). See docs/zeroshot.md for the accepted forms."""
    cfg = job.zeroshot.class_names
    if isinstance(cfg, tuple):
        return [str(n) for n in cfg], "config list"
    if cfg is None:
        source = job.data.imagenet.val
        if source is not None and source.format == "folder":
            index = _wnid_index(job)
            names = [""] * len(index)
            for wnid, i in index.items():
                names[i] = wnid
            return names, f"wnids of {source.path} (set zeroshot.class_names for real names)"
        return [], "label numbers (set zeroshot.class_names for real names)"
    text = _read_text(cfg, job.storage.endpoint_url)
    if cfg.lower().endswith(".json"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"zeroshot.class_names: {cfg!r} is not valid JSON: {err}") from None
        if isinstance(obj, list):
            names = [str(n) for n in obj]
        elif isinstance(obj, dict) and obj:
            if all(str(k).isdigit() for k in obj):
                by_index = {int(k): str(v) for k, v in obj.items()}
            else:
                index = _wnid_index(job)
                unknown = sorted(k for k in obj if k not in index)
                if unknown:
                    raise ValueError(f"zeroshot.class_names: {cfg!r} names wnid {unknown[0]!r}, which the val source's "
                                     f"class index does not hold ({len(unknown)} such keys)")
                by_index = {index[k]: str(v) for k, v in obj.items()}
                missing_wnids = sorted(w for w in index if w not in obj)
                if missing_wnids:
                    raise ValueError(f"zeroshot.class_names: {cfg!r} has no name for wnid {missing_wnids[0]!r} "
                                     f"(label {index[missing_wnids[0]]}); {len(missing_wnids)} wnids lack a name")
            gaps = sorted(set(range(max(by_index) + 1)) - set(by_index))
            if gaps:
                raise ValueError(f"zeroshot.class_names: {cfg!r} has no name for label {gaps[0]} "
                                 f"({len(gaps)} labels below {max(by_index)} lack one)")
            names = [by_index[i] for i in range(len(by_index))]
        else:
            raise ValueError(f"zeroshot.class_names: {cfg!r} must hold a JSON list or a non-empty object")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if not names or blank:
        raise ValueError(f"zeroshot.class_names: {cfg!r} " + ("holds no names" if not names else
                                                               f"has a blank name for label {blank[0]}"))
    return names, cfg


# ------------------------------------------------------------------------------------ driver
def config_hash(job: JobConfig, class_names: list[str], features_manifest: dict) -> str:
    """The templates, the image embedding (``zeroshot.image_embedding``), the resolved class names
    (file contents, not just the path), and the exact probe-features commit the embeddings come
    from; not the text batch size."""
    blob = json.dumps({"zeroshot": job.stage_hash("zeroshot", exclude=("zeroshot.text_batch_size",
                                                                        "zeroshot.class_names")),
                       "class_names": class_names, "features": features_manifest.get("config_hash"),
                       "features_at": features_manifest.get("committed_at")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _features(job: JobConfig, root: ResultsRoot) -> tuple[StageDir, dict]:
    stage = root.stage(job.model.name, FEATURES_STAGE)
    hint = f"run `{run_hint(FEATURES_STAGE)}` first"
    if not stage.is_complete(features_hash(job)):
        why = "missing" if not stage.is_complete() else "from another config"
        raise RuntimeError(f"{job.model.name}: the probe-features stage at {stage.uri} is {why}; zero-shot reads its "
                           f"{SOURCE_TABLE} table: {hint} (with data.imagenet.val set)")
    m = stage.manifest()
    if SOURCE_TABLE not in m["tables"]:
        raise RuntimeError(f"{job.model.name}: the probe features at {stage.uri} have no {SOURCE_TABLE} table; set "
                           f"data.imagenet.val and {hint}")
    if job.zeroshot.image_embedding == "class_token" and not m.get("clip_embedding_dim"):
        raise RuntimeError(f"{job.model.name}: the probe features at {stage.uri} carry no clip_embedding (written "
                           f"by an older version); remove its manifest.json (the stage is then redone) and {hint}")
    return stage, m


def _check_labels(labels: np.ndarray, ids: list[str], n_classes: int, names_from: str, where: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{where}: image {ids[i]!r} has label {int(labels[i])}, outside the {n_classes} class names "
                         f"(0..{n_classes - 1}) from {names_from}; {bad.size} such rows. Set zeroshot.class_names "
                         "to the dataset's full class list")


class TextSide(NamedTuple):
    """What the stage needs from the CLIP model besides the cached image features."""

    class_embeddings: np.ndarray  # class_CE, unit rows
    logit_scale: float
    blind: bool  # the image embedding cannot see removal (``removal_invisible``)
    projection: np.ndarray | None  # proj_DE for ``patch_mean``, else None


def text_embeddings(job: JobConfig, names: list[str], templates: list[str],
                    torch_threads: int | None = None) -> TextSide:
    """The class embeddings, logit scale, blindness and (``patch_mean``) the visual projection
    from the job's own CLIP model, in this process."""
    import torch

    from scope_ray.models import build_backbone
    from scope_ray.devices import granted_device
    from scope_ray.zeroshot import (class_embeddings, clip_tokenizer, logit_scale, patch_mean_projection,
                                    removal_invisible)

    if torch_threads:
        torch.set_num_threads(torch_threads)
    spec = job.model.spec
    device = granted_device()  # the GPU Ray granted, else the CPU (scope_ray.devices)
    model = build_backbone(spec, weights=job.model.weights, seed=job.seed, endpoint_url=job.storage.endpoint_url)
    model = model.to(device)
    class_CE = class_embeddings(model, clip_tokenizer(model, spec.arch), names, templates,
                                batch_size=job.zeroshot.text_batch_size)
    which = job.zeroshot.image_embedding
    return TextSide(class_CE.numpy(), logit_scale(model), removal_invisible(model, job.model.resolved_layer, which),
                    patch_mean_projection(model) if which == "patch_mean" else None)


def _text_side(job: JobConfig, names: list[str], templates: list[str]) -> TextSide:
    """``text_embeddings`` in one Ray task sized like a model actor: the text tower is a full
    transformer per prompt (1000 classes x 7 templates take minutes on a few CPU cores, seconds on
    a GPU), so it goes where the GPUs are rather than onto the driver."""
    import ray

    from scope_ray.stages.cluster import actor_resources, connect

    if not ray.is_initialized():
        connect(job.ray)
    res = actor_resources(job.ray, task_cpus=0.0)  # nothing else runs beside it
    task = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus)(text_embeddings)
    return ray.get(task.remote(job, names, templates, res.torch_threads))


def _score_variants(features, fm: dict, column: str, width: int, proj_DE, class_CE, scale: float,
                    names: list[str], names_from: str) -> dict:
    """One zero-shot tally per variant over the cached val embeddings; each variant must have
    scored the same images, as many as probe-features used."""
    from scope_ray.zeroshot import ZeroShotTally, patch_mean_embedding, zeroshot_logits

    tallies = {v: ZeroShotTally() for v in VARIANTS}
    where = features.table_uri(SOURCE_TABLE)
    for path in features.part_files(SOURCE_TABLE):
        t = pq.read_table(path, columns=["image_id", "variant", column, "label"], filesystem=features.root.arrow_fs)
        labels = t.column("label").to_numpy()
        variant = np.asarray(t.column("variant").to_pylist(), dtype=object)
        _check_labels(labels, t.column("image_id").to_pylist(), len(names), names_from, where)
        emb = t.column(column).combine_chunks().flatten().to_numpy().reshape(t.num_rows, width)
        if proj_DE is not None:
            emb = patch_mean_embedding(emb, proj_DE).numpy()
        for v in np.unique(variant):
            if v not in tallies:
                raise RuntimeError(f"{where}: unknown variant {v!r}; expected {list(VARIANTS)}")
            sel = variant == v
            tallies[v].update(zeroshot_logits(emb[sel], class_CE, scale), labels[sel])
    counts = {v: t.n for v, t in tallies.items()}
    used = fm.get("splits", {}).get("classification", {}).get("val", {}).get("used")
    if len(set(counts.values())) != 1 or (used is not None and counts["original"] != used):
        raise RuntimeError(f"{where}: images per variant {counts}, expected {used} each; not committing")
    return tallies


def run_zeroshot(job: JobConfig, root: ResultsRoot, *, log=info) -> ZeroShotResult:
    """Run (or skip, when committed with this config) the zero-shot stage for ``job``."""
    spec = job.model.spec
    if not spec.has_text_tower:
        reason = f"{spec.name} has no text tower: zero-shot applies to the CLIP models only"
        log(f"[zeroshot] {reason}; skipping")
        return ZeroShotResult(skipped=True, reason=reason)
    features, fm = _features(job, root)
    names, names_from = resolve_class_names(job)
    label_max = fm.get("splits", {}).get("classification", {}).get("val", {}).get("label_max")
    if not names:  # label numbers: as many classes as the labels reach
        names = [str(i) for i in range((label_max or 0) + 1)]
    if label_max is not None and label_max >= len(names):
        raise ValueError(f"{features.table_uri(SOURCE_TABLE)}: labels reach {label_max}, outside the {len(names)} class "
                         f"names (0..{len(names) - 1}) from {names_from}. Set zeroshot.class_names to the dataset's "
                         "full class list")
    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job, names, fm)
    if stage.is_complete(chash):
        log(f"[zeroshot] {job.model.name}: already complete at {stage.uri} (config {chash}); skipping")
        return ZeroShotResult(skipped=True, reason="already complete with this config",
                              rows=stage.read_table("zeroshot").to_pylist(), manifest=stage.manifest())
    start = time.perf_counter()
    templates = list(job.zeroshot.templates)
    log(f"[zeroshot] {job.model.name}: {len(names)} classes x {len(templates)} templates through the text tower "
        f"(class names: {names_from})")
    which = job.zeroshot.image_embedding
    class_CE, scale, blind, proj_DE = _text_side(job, names, templates)
    if blind:
        log(f"[zeroshot] warning: layer {spec.depth} is {spec.name}'s last block and its image embedding is the class "
            "token, which removal never edits: every variant will score exactly like `original`. Set model.layer "
            "below the last block, or zeroshot.image_embedding=patch_mean, to measure removal's effect on zero-shot")
    column = SOURCE_COLUMN[which]
    if which == "patch_mean":
        log("[zeroshot] image embedding: patch_mean, the mean of the final patch tokens after ln_post through the "
            "visual projection (our addition, not CLIP's own class-token embedding)")
        width, dim = spec.width, int(proj_DE.shape[1])
        if proj_DE.shape[0] != width:
            raise RuntimeError(f"the visual projection takes width {proj_DE.shape[0]}, the cached embedding has {width}")
    else:
        width = dim = int(fm["clip_embedding_dim"])
    if class_CE.shape[1] != dim:
        raise RuntimeError(f"text embeddings have width {class_CE.shape[1]}, the image embeddings {dim}")

    tallies = _score_variants(features, fm, column, width, proj_DE, class_CE, scale, names, names_from)
    base = tallies["original"]
    rows = [{"variant": v, "n_images": t.n, "n_correct": t.correct, "top1": t.top1,
             "mean_confidence": t.mean_confidence, "top1_delta": t.top1 - base.top1,
             "mean_confidence_delta": t.mean_confidence - base.mean_confidence, "n_classes": len(names),
             "templates": templates, "logit_scale": scale, "image_embedding": which} for v, t in tallies.items()]
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        stage.write_part("zeroshot", "part-0", pa.Table.from_pylist(rows, schema=ZEROSHOT_SCHEMA))
        emb_flat = pa.array(class_CE.astype(np.float32).reshape(-1), pa.float32())
        stage.write_part("classes", "part-0", pa.table({
            "label": pa.array(np.arange(len(names)), pa.int64()), "name": pa.array(names, pa.string()),
            "text_embedding": pa.FixedSizeListArray.from_arrays(emb_flat, dim)}))
        seconds = time.perf_counter() - start
        manifest = stage.commit(
            chash, {"probe_features": features.uri, "table": SOURCE_TABLE,
                    "probe_features_config_hash": fm.get("config_hash")},
            {"zeroshot": len(rows), "classes": len(names)},
            extra={"templates": templates, "class_names_source": names_from, "n_classes": len(names),
                   "logit_scale": scale, "clip_embedding_dim": dim, "image_embedding": which,
                   "image_embedding_column": column, "variants": list(VARIANTS),
                   "weights": job.model.weights, "variants_equal_original_by_construction": blind,
                   "seconds": round(seconds, 3)},
        )
        for r in rows:
            log(f"[zeroshot] {r['variant']:>15}: top-1 {r['top1']:.4f} ({r['top1_delta']:+.4f}), mean confidence "
                f"{r['mean_confidence']:.4f} ({r['mean_confidence_delta']:+.4f}) over {r['n_images']} images")
        return ZeroShotResult(skipped=False, rows=rows, seconds=seconds, manifest=manifest)
