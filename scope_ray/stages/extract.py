"""Extraction: stream images through ViT actors and store designated-layer patch tokens.

Two tables per model, both under ``ROOT/<model>/extract/`` (docs/storage.md):
- ``train_tokens``: ``tokens_per_image`` random patch tokens per training image (SAE training data);
- ``val_tokens``: every patch token of the validation split (SAE evaluation, tau);
plus ``rejects`` (split, image id, reason) for every image that could not be used.

Ray Data streams the source through decoding tasks, a pool of model actors that only compute the
tokens (``TokenExtractor``), and CPU tasks that write them (``write_tokens``: part files named by
their rows, so a retried block overwrites rather than duplicates). The writers return only counts
and the Ray node whose actor ran the model, so the driver never holds activations; the
manifest's ``nodes`` records which node produced how many rows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scope_ray.config import JobConfig, SourceConfig
from scope_ray.logs import info
from scope_ray.storage import ResultsRoot, StageDir, content_hash
from scope_ray.tokens import rejects_table, sample_positions, token_table
from scope_ray.pipeline import EXTRACT as STAGE
from scope_ray.pipeline import extract_hash as config_hash

Mode = Literal["sample", "all"]


# Row kinds TokenExtractor emits: one COUNTS row per batch (its image count and the node that ran
# it, so a batch of rejects only still reports them), a REJECT row per unusable image, a TOKEN row
# per stored token.
COUNTS, REJECT, TOKEN = 0, 1, 2


class TokenExtractor:
    """A Ray Data actor (the GPU when there is one): decoded pixels in, token rows out. It only
    computes: building and writing the Parquet part files runs in CPU tasks after it
    (``write_tokens``), so a GPU never waits on them."""

    def __init__(self, job: JobConfig, root: ResultsRoot, split: str, table: str, mode: Mode, torch_threads: int):
        from scope_ray.stages.cluster import actor_backbone, this_node

        self.job, self.split, self.table, self.mode = job, split, table, mode
        self.node = this_node()  # an actor never moves; a restarted one runs __init__ again
        self.model, self.device = actor_backbone(job, torch_threads)
        self.width = job.model.spec.width

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ids = [str(i) for i in batch["image_id"]]
        ok = np.asarray(batch["ok"], dtype=bool)
        bad = np.flatnonzero(~ok)
        token_ids, pos, norms, acts = [], np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros((0, self.width), np.float32)
        if ok.any():
            good_ids = [i for i, good in zip(ids, ok) if good]
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device)
            with torch.inference_mode():
                out = self.model.forward_layer(self.model.preprocess(pixels))
            tokens_BND = out.patch_tokens.float().cpu().numpy()
            norms_BN = out.norms.float().cpu().numpy()
            b, n, d = tokens_BND.shape
            if self.mode == "sample":
                k = self.job.extract.tokens_per_image
                pos_BK = np.stack([sample_positions(i, n, k, self.job.seed) for i in good_ids])
            else:
                pos_BK = np.broadcast_to(np.arange(n), (b, n))
            rows = np.arange(b)[:, None]
            token_ids = list(np.repeat(np.asarray(good_ids, dtype=object), pos_BK.shape[1]))
            pos = pos_BK.reshape(-1).astype(np.int32)
            norms = norms_BN[rows, pos_BK].reshape(-1).astype(np.float32)
            acts = np.ascontiguousarray(tokens_BND[rows, pos_BK].reshape(-1, d), dtype=np.float32)
        n_bad, n_tok = bad.size, len(token_ids)
        head = 1 + n_bad
        return {
            "kind": np.concatenate([[COUNTS], np.full(n_bad, REJECT), np.full(n_tok, TOKEN)]).astype(np.int8),
            "image_id": np.array([""] + [ids[i] for i in bad] + token_ids, dtype=object),
            "reason": np.array([""] + [str(batch["reason"][i]) for i in bad] + [""] * n_tok, dtype=object),
            "position": np.concatenate([np.full(head, -1, np.int32), pos]),
            "norm": np.concatenate([np.zeros(head, np.float32), norms]),
            "activation": np.concatenate([np.zeros((head, self.width), np.float32), acts]),
            "images": np.concatenate([[len(ids)], np.zeros(n_bad + n_tok, np.int64)]),
            "node_id": np.array([self.node["node_id"]] * (head + n_tok), dtype=object),
            "node_ip": np.array([self.node["ip"]] * (head + n_tok), dtype=object),
        }


def write_tokens(batch: dict[str, np.ndarray], *, root: ResultsRoot, model: str, split: str, table: str,
                 run: str | None = None) -> dict[str, np.ndarray]:
    """Ray Data task (CPU): ``TokenExtractor`` rows in; the ``table`` and ``rejects`` part files
    written (named by their content, so a retried task overwrites rather than duplicates); per
    node that ran the model, its image, reject and token-row counts out."""
    stage = root.stage(model, STAGE, run=run)
    kind = np.asarray(batch["kind"])
    ids = [str(i) for i in batch["image_id"]]
    rej, tok = np.flatnonzero(kind == REJECT), np.flatnonzero(kind == TOKEN)
    if rej.size:
        rej_ids = [ids[r] for r in rej]
        stage.write_part("rejects", f"{split}-{content_hash(rej_ids)}",
                         rejects_table(split, rej_ids, [str(batch["reason"][r]) for r in rej]))
    if tok.size:
        position = np.asarray(batch["position"])[tok]
        keys = (f"{ids[t]}\0{p}" for t, p in zip(tok, position))
        acts = np.asarray(batch["activation"])[tok]
        stage.write_part(table, f"{split}-{content_hash(keys)}",
                         token_table([ids[t] for t in tok], position[:, None], acts[:, None, :],
                                     np.asarray(batch["norm"])[tok][:, None]))
    node_id = np.asarray(batch["node_id"]).astype(str)
    nodes = sorted(set(node_id))
    ip = {n: str(batch["node_ip"][int(np.flatnonzero(node_id == n)[0])]) for n in nodes}
    images = np.asarray(batch["images"])
    return {"images": np.array([int(images[node_id == n].sum()) for n in nodes]),
            "rejected": np.array([int(((kind == REJECT) & (node_id == n)).sum()) for n in nodes]),
            "rows": np.array([int(((kind == TOKEN) & (node_id == n)).sum()) for n in nodes]),
            "node_id": np.array(nodes), "node_ip": np.array([ip[n] for n in nodes])}


@dataclass
class SplitCounts:
    images: int = 0
    rejected: int = 0
    rows: int = 0
    nodes: dict[str, dict] = field(default_factory=dict)  # Ray node id -> {"ip", "images", "rows"}

    @property
    def used(self) -> int:
        return self.images - self.rejected


@dataclass
class ExtractResult:
    skipped: bool
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    manifest: dict | None = None


def _stream_split(job: JobConfig, root: ResultsRoot, ds, split: str, table: str, mode: Mode,
                  progress: bool, run: str) -> SplitCounts:
    """Decode and extract the opened source ``ds`` (``read_source``) into ``table``."""
    import ray.data
    from tqdm import tqdm

    from scope_ray.stages.cluster import actor_resources, one_block_per_batch, tally_nodes
    from scope_ray.stages.decode import decode_batch

    res = actor_resources(job.ray)
    spec = job.model.spec
    ds = one_block_per_batch(ds, job.extract.batch_size)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs=dict(size=spec.image_size, max_pixels=job.data.max_pixels, min_side=job.data.min_side,
                       max_aspect_ratio=job.data.max_aspect_ratio, transform=spec.transform),
        batch_size=job.extract.batch_size, num_cpus=job.ray.decode_cpus, batch_format="numpy",
    )
    ds = ds.map_batches(
        TokenExtractor,
        fn_constructor_kwargs=dict(job=job, root=root, split=split, table=table, mode=mode,
                                   torch_threads=res.torch_threads),
        # Fault tolerance is Ray Data's default for actor pools (max_restarts=-1, max_task_retries=-1)
        # and its tasks (max_retries=-1): a killed actor or a lost node's is restarted and its batches
        # rerun, which the content-named part files make idempotent. tests/stages/test_multinode.py
        # kills both for real and checks every image id is stored exactly once.
        compute=res.strategy(),
        num_cpus=res.num_cpus, num_gpus=res.num_gpus,
        batch_size=job.extract.batch_size, batch_format="numpy",
    )
    # One actor output block per writer task (batch_size=None): the same block, retried, gives
    # the same rows and so the same part names.
    ds = ds.map_batches(write_tokens, fn_kwargs=dict(root=root, model=job.model.name, split=split, table=table,
                                                     run=run),
                        batch_size=None, num_cpus=job.ray.read_cpus, batch_format="numpy")
    counts = SplitCounts()
    bar = tqdm(desc=f"extract {split}", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for summary in ds.iter_batches(batch_size=None, batch_format="numpy"):
        counts.images += int(summary["images"].sum())
        counts.rejected += int(summary["rejected"].sum())
        counts.rows += int(summary["rows"].sum())
        tally_nodes(counts.nodes, summary)
        bar.update(int(summary["images"].sum()))
        bar.set_postfix(rejected=counts.rejected, tokens=counts.rows)
    bar.close()
    return counts


def _verify(stage: StageDir, root: ResultsRoot, table: str, counts: SplitCounts, per_image: int) -> None:
    """Nothing lost, nothing doubled: rows = used images x tokens per image, each (image, position) once."""
    import pyarrow.dataset as pads

    files = stage.run_files(table)
    if not files:
        got = 0
        unique_images = 0
    else:
        t = pads.dataset(files, filesystem=root.arrow_fs, format="parquet").to_table(columns=["image_id"])
        got = t.num_rows
        unique_images = len(pc.unique(t.column("image_id")))
    expected = counts.used * per_image
    if got != expected or unique_images != counts.used:
        raise RuntimeError(
            f"extract {table}: {got} rows for {unique_images} images on storage, expected {expected} rows for "
            f"{counts.used} images ({counts.images} in - {counts.rejected} rejected); not committing"
        )


def run_extract(job: JobConfig, root: ResultsRoot, *, progress: bool = True, log=info) -> ExtractResult:
    """Run (or skip, when already committed with this config) the extraction stage for ``job``."""
    stage = root.stage(job.model.name, STAGE)
    chash = config_hash(job)
    if stage.is_complete(chash):
        log(f"[extract] {job.model.name}: already complete at {stage.uri} (config {chash}); skipping")
        return ExtractResult(skipped=True, manifest=stage.manifest())
    src = job.data.imagenet
    plan: list[tuple[str, str, Mode, SourceConfig | None]] = [
        (job.extract.train_split, "train_tokens", "sample", getattr(src, job.extract.train_split)),
    ]
    if job.extract.val_split is not None:
        plan.append((job.extract.val_split, "val_tokens", "all", getattr(src, job.extract.val_split)))
    for split, _, _, source in plan:
        if source is None:
            raise ValueError(f"data.imagenet.{split} is not set: extraction needs it (see docs/data.md)")
    # Every input is opened and checked (path exists, every Parquet footer, a manifest's entries)
    # before the committed stage is touched: a typo in a data path fails here and leaves the
    # previous extraction byte-identical, rather than deleting it and then failing.
    from scope_ray.data.sources import read_source

    opened = {table: read_source(source, "imagenet", endpoint_url=job.storage.endpoint_url, num_cpus=job.ray.read_cpus)
              for _, table, _, source in plan}
    with stage.writing(chash, lease_seconds=job.storage.lease_seconds):
        spec = job.model.spec
        result = ExtractResult(skipped=False)
        # One line for the plan (each split's progress bar names the split while it streams).
        log(f"[extract] {job.model.name} layer {job.model.resolved_layer}: "
            + "; ".join(f"{split} split from {source.path} -> {table}" for split, table, _, source in plan))
        for split, table, mode, source in plan:
            counts = _stream_split(job, root, opened[table], split, table, mode, progress, run=chash)
            per_image = job.extract.tokens_per_image if mode == "sample" else spec.num_patches
            _verify(stage, root, table, counts, per_image)
            result.counts[table] = counts
        rejects = stage.run_files("rejects")
        if rejects:
            import pyarrow.dataset as pads

            reasons = pads.dataset(rejects, filesystem=root.arrow_fs, format="parquet").to_table(columns=["reason"])
            for r in reasons.column("reason").to_pylist():
                key = r.split(":")[0]
                result.reject_reasons[key] = result.reject_reasons.get(key, 0) + 1
        rows = {table: c.rows for table, c in result.counts.items()}
        rows["rejects"] = sum(c.rejected for c in result.counts.values())
        inputs = {
            table: {"split": split, "source": source.model_dump(mode="json"), "images": result.counts[table].images,
                    "rejected": result.counts[table].rejected}
            for split, table, _, source in plan
        }
        result.manifest = stage.commit(
            chash, inputs, rows,
            extra={"layer": job.model.resolved_layer, "width": spec.width, "grid": spec.grid,
                   "tokens_per_image": job.extract.tokens_per_image, "seed": job.seed,
                   # What the tokens came from: the report needs it to say whether the paper's numbers compare.
                   "weights": job.model.weights, "synthetic_data": job.data.synthetic,
                   "precision": {"dtype": job.model.precision, "tf32": job.model.tf32},
                   "nodes": {table: c.nodes for table, c in result.counts.items()}},
        )
        # One line for what was committed (a line per table and one for the reasons said no more).
        reasons = "; rejects by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(result.reject_reasons.items()))
        log("[extract] committed " + "; ".join(f"{table}: {c.images} images in, {c.rejected} rejected, {c.rows} token rows"
                                               for table, c in result.counts.items())
            + (reasons if result.reject_reasons else ""))
        return result
