"""What several stages read from the results of others, in one place (no stage imports another):
the committed SAE, tau, the analysis image set, the CDS pool, and the backbone + SAE its actors
hold. Directory names and config hashes come from ``scope_ray.pipeline``.
"""

from __future__ import annotations

import posixpath
import sys

import numpy as np
import pyarrow.parquet as pq

from scope_ray import pipeline
from scope_ray.config import JobConfig, SourceConfig
from scope_ray.instability import ClassPicker
from scope_ray.storage import ResultsRoot

# The SAE's file in train-sae/ when a manifest does not name it (stages committed before files
# were named by run).
SAE_FILE = "sae.safetensors"


# ---------------------------------------------------------------------------------- the SAE
def load_sae(job: JobConfig, root: ResultsRoot, device: str = "cpu"):
    """The committed SAE of ``job``'s model."""
    from scope_ray.sae import BatchTopKSAE

    stage = root.stage(job.model.name, pipeline.TRAIN_SAE)
    if not stage.is_complete(pipeline.train_sae_hash(job)):
        why = "no trained SAE" if not stage.is_complete() else "the SAE there was trained with another config"
        raise RuntimeError(f"{job.model.name}: {why} at {stage.uri}; run `scope-ray stage train-sae` first")
    # A stage committed before files were named by run has no file name in its manifest.
    manifest = stage.manifest()
    path = posixpath.join(stage.uri, manifest.get("sae_file", SAE_FILE))
    if "imported" in manifest:  # sae.source: another toolkit's SAE, in scope_ray.sae_import's form
        from scope_ray.sae_import import ImportedSAE

        return ImportedSAE.load(path, endpoint_url=root.endpoint_url, device=device)
    return BatchTopKSAE.load(path, endpoint_url=root.endpoint_url, device=device)


def check_token_width(files: list[str], root: ResultsRoot, expected: int, what: str) -> None:
    """Fail clearly when the stored activations do not have the width the SAE config implies."""
    schema = pq.read_schema(files[0], filesystem=root.arrow_fs)
    field = schema.field("activation") if "activation" in schema.names else None
    width = getattr(field.type, "list_size", None) if field is not None else None
    if width != expected:
        raise ValueError(f"{what}: token parquet {files[0]} has activation width {width}, but the SAE for "
                         f"this job expects {expected} (model width); was it extracted with another model?")


# ---------------------------------------------------------------------------------- tau
def resolve_tau(job: JobConfig, root: ResultsRoot) -> tuple[float, str]:
    """tau from the config, or 'auto' = Otsu on log norms of the validation tokens."""
    from scope_ray.scope import auto_tau

    tau = job.model.resolved_tau
    if tau != "auto":
        return float(tau), "config"
    files = root.stage(job.model.name, pipeline.EXTRACT).part_files("val_tokens")
    norms = np.concatenate([pq.read_table(f, columns=["norm"], filesystem=root.arrow_fs).column("norm").to_numpy()
                            for f in files])
    return auto_tau(norms), "auto (Otsu on log norms of val tokens)"


def tau_for_analysis(job: JobConfig, root: ResultsRoot) -> tuple[float, str]:
    """``resolve_tau``, failing clearly when 'auto' needs an extraction that is not there."""
    if job.model.resolved_tau == "auto":
        extract = root.stage(job.model.name, pipeline.EXTRACT)
        if not extract.is_complete(pipeline.extract_hash(job)):
            raise RuntimeError(
                f"{job.model.name}: tau is 'auto', which is computed from the extract stage's val tokens, and the "
                f"extract stage at {extract.uri} is missing or from another config; run `scope-ray stage extract` "
                "first (or set model.tau to a number)")
    return resolve_tau(job, root)


# ------------------------------------------------------------------- the analysis image set
def select_one_per_class(job: JobConfig, source, progress: bool) -> tuple[ClassPicker, list[tuple[str, int, int]]]:
    from tqdm import tqdm

    from scope_ray.data.sources import read_source

    picker = ClassPicker(job.scope.instability_images)
    ds = read_source(source, "imagenet", endpoint_url=job.storage.endpoint_url, num_cpus=job.ray.read_cpus)
    bar = tqdm(desc="instability: select", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for b in ds.select_columns(["image_id", "label"]).iter_batches(batch_size=4096, batch_format="pyarrow"):
        bar.update(b.num_rows)
        if picker.add(b.column("image_id").to_pylist(), b.column("label").to_pylist()):
            break  # n classes found: the rest of the split cannot change the choice
    bar.close()
    return picker, picker.selection()


def analysis_image_ids(job: JobConfig, root: ResultsRoot, tau: float, progress: bool = False) -> list[str]:
    """The instability image set (one per class, SELECTION_RULE): read from this stage when it is
    complete for this job, chosen again by the same rule otherwise. The partition stage uses it
    as the paper's "same set of 1,000 images" for the awCDS curve and the group statistics."""
    stage = root.stage(job.model.name, pipeline.INSTABILITY)
    if stage.is_complete(pipeline.instability_hash(job, tau)):
        return stage.read_table("images", columns=["image_id"]).column("image_id").to_pylist()
    source = getattr(job.data.imagenet, job.scope.instability_split)
    if source is None:
        raise ValueError(f"data.imagenet.{job.scope.instability_split} is not set: the analysis image set "
                         "(scope.instability_split) needs it")
    return [c[0] for c in select_one_per_class(job, source, progress)[1]]


# ------------------------------------------------------------------- the CDS pool and its actors
def pool_source(job: JobConfig) -> SourceConfig:
    """The analysis pool: the configured ImageNet split, capped at ``scope.pool_images``."""
    split = job.scope.pool_split
    source = getattr(job.data.imagenet, split)
    if source is None:
        raise ValueError(f"data.imagenet.{split} is not set: the CDS analysis pool (scope.pool_split) needs it")
    cap = job.scope.pool_images
    if cap is not None and (source.max_images is None or cap < source.max_images):
        source = source.model_copy(update={"max_images": cap})
    return source


class ModelAndSAE:
    """What both passes' actors hold: the backbone at its designated layer and the trained SAE."""

    def __init__(self, job: JobConfig, root: ResultsRoot, torch_threads: int):
        from scope_ray.stages.cluster import actor_backbone

        self.job = job
        self.model, self.device = actor_backbone(job, torch_threads)
        self.sae = load_sae(job, root, device=self.device)

    def codes(self, pixels_BSS3: np.ndarray):
        """SAE codes (JumpReLU at the trained threshold) of every patch token, z_BNQ as a float32
        tensor on the actor's device: callers reduce or gather there, so only what they keep
        crosses to the host (the full [B, N, q] is hundreds of MB at paper scale)."""
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(np.require(pixels_BSS3, requirements=["C", "W"])).to(self.device)
            tokens_BND = self.model.forward_layer(self.model.preprocess(pixels)).patch_tokens.float()
            b, n, d = tokens_BND.shape
            return self.sae.encode(tokens_BND.reshape(b * n, d), use_threshold=True).float().reshape(b, n, -1)


def selected_only(batch: dict[str, np.ndarray], *, keys_sorted: np.ndarray) -> dict[str, np.ndarray]:
    """Ray Data batch filter: keep the rows whose image some feature selected."""
    from scope_ray.topk import image_keys

    keys = image_keys([str(i) for i in batch["image_id"]])
    if keys_sorted.size == 0:
        return {k: v[:0] for k, v in batch.items()}
    pos = np.minimum(np.searchsorted(keys_sorted, keys), keys_sorted.size - 1)
    keep = keys_sorted[pos] == keys
    return {k: v[keep] for k, v in batch.items()}
