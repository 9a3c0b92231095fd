"""One typed config tree for a job, validated on load before any Ray work starts.

A job is a YAML file (see ``jobs/``) plus ``--set key=value`` overrides. Every section is a
frozen pydantic model that forbids unknown keys; cross-field rules that need the model registry
(layer range, K versus dictionary size, shift versus grid) run in ``JobConfig``'s validator.
Every failure is a ``ConfigError`` whose message names the dotted key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from scope_ray.models.registry import REGISTRY, ModelSpec, get_spec


def _admits_bool(annotation: Any) -> bool:
    import typing

    return annotation is bool or annotation is Any or any(_admits_bool(a) for a in typing.get_args(annotation))


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class ConfigError(ValueError):
    """A job config that cannot run; the message names the key and the allowed values."""


class _Section(BaseModel):
    # allow_inf_nan=False: `sae.lr: .inf` or `model.tau: .nan` would train to NaN or select nothing.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:  # noqa: ANN001 - pydantic's ValidationInfo
        """`layer: true` must not read as 1: a YAML boolean is refused where a number is expected."""
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            if not _admits_bool(annotation):
                raise ValueError(f"{value!r} is a boolean; expected {_type_name(annotation)}")
        return value


# ---------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    name: str = Field("demo-vit-tiny", description="registry name (see `scope-ray models` / docs/models.md)")
    weights: str = Field(
        "none",
        description="'none' = random init from `seed`; 'pretrained' = the library's pretrained tag "
        "(needs internet on the cluster); otherwise a local path or s3:// URI of a safetensors file",
    )
    layer: int | None = Field(None, description="designated block, 1-based; default: the registry's (paper Table 5)")
    tau: float | Literal["auto"] | None = Field(
        None, description="outlier norm threshold; default: the registry's, 'auto' where the paper gives none"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="backbone forwards in fp32, or under bf16 autocast (CUDA or CPU; about 2x the images/s "
        "on recent GPUs); tokens, attention and final tokens are returned and stored as float32 either way")
    tf32: bool = Field(False, description="let CUDA matmuls in backbone forwards use TF32 (Ampere and later; fp32 "
                       "range, 10-bit mantissa); no effect on CPUs")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in REGISTRY and not v.startswith(("timm:", "open_clip:")):
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(REGISTRY)}, or timm:<name> / "
                             "open_clip:<arch>[.<tag>] for any plain ViT")
        get_spec(v)  # a library model that does not fit (non-square grid, hybrid stem...) fails here, naming why
        return v

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.name)

    @property
    def resolved_layer(self) -> int:
        return self.layer if self.layer is not None else self.spec.layer

    @property
    def resolved_tau(self) -> float | Literal["auto"]:
        if self.tau is not None:
            return self.tau
        return self.spec.tau if self.spec.tau is not None else "auto"


# ----------------------------------------------------------------------------------- data
class SourceConfig(_Section):
    """One split of one dataset."""

    format: Literal["folder", "parquet", "webdataset", "manifest"] = Field(description="storage layout, see docs/data.md")
    path: str = Field(description="local path or s3:// URI of the split (for `manifest`: of the CSV file)")
    split: str | None = Field(None, description="ADE20K folder layout only: sub-folder under images/ and annotations/")
    max_images: int | None = Field(None, ge=1, description="read at most this many images (in source order)")
    # 256 MiB = an 8-bit RGB image of the default max_pixels stored uncompressed (PPM, BMP): no
    # image the decoder would accept needs more, and a read task holds at most one such file.
    max_file_bytes: int = Field(
        256 * 2**20, ge=1, description="largest image or annotation file (folder, manifest) or tar member (webdataset) "
        "read; a bigger one is rejected from its size (stat or tar header) before it is read")
    # Bounds the work a gzip bomb of many members under max_file_bytes can cost one read task.
    max_archive_bytes: int = Field(
        64 * 2**30, ge=1, description="webdataset only: members of one .tar are read until their declared sizes "
        "pass this; the rest of that archive becomes one reject")
    allow_links_outside_root: bool = Field(
        False, description="local folder / manifest sources: read files whose resolved path (symlinks followed) lies "
        "outside the dataset root (link farms); off: such a file is a reject, never read")


class DatasetConfig(_Section):
    train: SourceConfig | None = None
    val: SourceConfig | None = None


class DataConfig(_Section):
    imagenet: DatasetConfig = DatasetConfig()
    ade20k: DatasetConfig = DatasetConfig()
    nyud: DatasetConfig = DatasetConfig()
    max_pixels: int = Field(
        89_478_485, ge=1, description="images with more pixels are rejected unread (decompression-bomb guard)"
    )
    min_side: int = Field(8, ge=1, description="images with a shorter side are rejected (too small to resize meaningfully)")
    # Why a limit at all: a 1:32 strip's centre crop keeps 1/32 of it, and an 8 x 11,000,000
    # bilevel PNG (10 KB, under max_pixels) is a crop of nothing whose resize would need 48 GiB.
    max_aspect_ratio: float = Field(
        32.0, ge=1.0, description="images whose longer side exceeds this many times the shorter are rejected from the "
        "header, before decoding (no photo or panorama comes close)")
    synthetic: bool = Field(
        False, description="the data was made by scope_ray.data.synthetic (the demo sets it); recorded in the extract "
                           "manifest so the report never sets synthetic results beside the paper's as comparable")


# -------------------------------------------------------------------------------- extract
class ExtractConfig(_Section):
    tokens_per_image: int = Field(4, ge=1, description="random patch tokens per training image (paper: 4)")
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    train_split: Literal["train", "val"] = "train"
    val_split: Literal["train", "val"] | None = Field("val", description="split whose every token is kept for evaluation; null skips it")


# ------------------------------------------------------------------------------------ sae
DEAD_AFTER_TOKENS_CAP = 10_000_000  # the usual fixed dead window (Gao et al. 2024): 'auto' never exceeds it


class InputNormalizationConfig(_Section):
    """What the toolkit's data loader did to activations before its SAE saw them: x' = (x − mean)·scale.
    Folded exactly into the imported weights, so the SAE then reads raw activations (docs/sae.md)."""

    scale: float = Field(1.0, gt=0, description="the scalar the loader multiplied (mean-subtracted) activations by "
                         "(saev: sqrt(d) / mean L2 norm, i.e. 1 / its loader's `scalar`)")
    mean: str | None = Field(None, description="safetensors file (local path, file:// or s3:// URI) holding one "
                             "tensor [width]: the per-dimension mean the loader subtracted before scaling; "
                             "null = none subtracted")


class SAESourceConfig(_Section):
    """An SAE trained by another toolkit, used in place of training one (scope_ray/sae_import.py, docs/sae.md)."""

    format: Literal["sparsify", "dictionary_learning", "overcomplete", "saelens", "saev", "plain"] = Field(
        description="the toolkit whose file this is")
    path: str = Field(description="the file or folder (local path, file:// or s3:// URI)")
    architecture: str | None = Field(None, description="the toolkit's class when its file does not say (overcomplete: "
                                     "SAE, TopKSAE, BatchTopKSAE or JumpSAE; dictionary_learning without config.json)")
    k: int | None = Field(None, ge=1, description="top-k when the file does not hold it (overcomplete TopKSAE)")
    threshold: float | None = Field(None, description="overcomplete BatchTopKSAE's running threshold (not in its state dict)")
    input_normalization: InputNormalizationConfig | None = Field(
        None, description="the input normalisation the toolkit's data loader applied in training (saev: scale_mean / "
        "scale_norm), folded into the weights; null = the SAE reads activations as they are")


class SAEConfig(_Section):
    source: SAESourceConfig | None = Field(
        None, description="import this SAE instead of training one: train-sae then reads it (exactly, as its toolkit "
        "computes it) and commits it; sae.expansion must give its dictionary size")
    expansion: int = Field(32, ge=1, description="dictionary size q = expansion x width (paper: 32)")
    k: int = Field(30, ge=1, description="BatchTopK K (paper: 30)")
    k_aux: int = Field(512, ge=1)
    aux_coef: float = Field(1 / 32, ge=0)
    dead_after_tokens: int | Literal["auto"] = Field(
        "auto", description="a latent is dead (and AuxK trains it) after not firing for this many tokens; 'auto' = "
        "a quarter of the tokens the run trains on, at most 10M (a fixed 10M is longer than one ImageNet "
        "epoch at 4 tokens/image, so AuxK would never run)")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(4096, ge=1)
    epochs: int = Field(1, ge=1)
    threshold_ema: float = Field(0.99, gt=0, lt=1)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP); one per GPU on a GPU cluster. "
                             "sae.batch_size is the global batch, split evenly over them")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints to the results root")
    max_failures: int = Field(3, ge=0, description="worker failures Ray Train recovers from (restarting from the last checkpoint)")
    log_every: int = Field(50, ge=1, description="steps between logged loss / FVU / L0 / dead-fraction lines")
    shuffle_buffer: int = Field(65_536, ge=0, description="rows in each worker's local shuffle buffer (0 = no shuffle)")
    scale_sample: int = Field(65_536, ge=1, description="tokens sampled to fix the input scale and initial b_dec")
    dense_fraction: float = Field(0.1, gt=0, le=1, description="eval: a latent firing on more than this fraction of tokens is dense")

    @field_validator("dead_after_tokens")
    @classmethod
    def _positive_window(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("must be 'auto' or a number of tokens >= 1")
        return v

    def resolved_dead_after_tokens(self, run_tokens: int) -> int:
        """The dead window for a run that trains on ``run_tokens`` tokens (steps x global batch;
        under DDP the dead counters count the global batch's tokens).

        'auto': a quarter of that, capped at the standard 10M (Gao et al. 2024), so a latent that
        stops firing early is revived by AuxK within the run."""
        if self.dead_after_tokens != "auto":
            return int(self.dead_after_tokens)
        return max(1, min(DEAD_AFTER_TOKENS_CAP, run_tokens // 4))


# ---------------------------------------------------------------------------------- scope
class ScopeConfig(_Section):
    shift: int = Field(1, ge=1, description="SCC shift s in patches (paper: 1)")
    shifts: tuple[int, ...] | None = Field(
        None, description="shifts for the instability sweep (Table 9); null = 1..6, capped at what the grid allows"
    )
    k_cds: int = Field(16, ge=1, description="top images per feature for CDS")
    min_usable_images: int = Field(
        4, ge=1, description="a feature's CDS enters the partition only when at least this many of its images were "
        "usable (overlap maps not both empty); fewer: 'unscored' (a CDS from 1-2 images sits at the extremes)")
    gamma: float | Literal["auto"] = Field("auto", description="CDS split threshold in [0, 1]; 'auto' = Otsu")
    instability_images: int = Field(1000, ge=1, description="images for the outlier-instability analysis (one per class)")
    instability_split: Literal["train", "val"] = Field("val", description="ImageNet split the instability images come from")
    instability_tokens: int | None = Field(
        None, ge=1, description="overlap tokens per image and shift whose attention EMD is computed; null = all "
        "(a seeded sample otherwise, keyed by image id)"
    )
    instability_alignment: Literal["canvas", "view", "overlap"] = Field(
        "canvas", description="where the two views' attention rows are placed for the EMD (docs/instability.md): "
        "'canvas' = the common (p+s)² canvas, view 2 at offset s; 'view' = each view's own p x p frame, no offset; "
        "'overlap' = both rows cut to the (p-s)² shared cells and renormalised (no mass there: EMD undefined, NaN)"
    )
    pool_split: Literal["train", "val"] = Field("val", description="ImageNet split forming the CDS analysis pool")
    pool_images: int | None = Field(None, ge=1, description="cap on analysis-pool images (source order); null = the whole split")
    spare_images: int = Field(
        4, ge=0, description="images kept per feature beyond k_cds, used when a top image's two overlap maps are both empty"
    )
    awcds_bins: int = Field(20, ge=1, description="norm-percentile bins of the awCDS curve (Figure 7)")
    gallery_features: int = Field(6, ge=0, description="lowest- and highest-CDS features drawn in the gallery (each)")
    gallery_images: int = Field(4, ge=1, description="top images per gallery feature")
    batch_size: int = Field(16, ge=1, description="images (or SCC pairs) per forward pass in the scope stages")

    @field_validator("gamma")
    @classmethod
    def _in_unit_interval(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= v <= 1.0:
            raise ValueError("must be 'auto' or a number in [0, 1] (CDS lies in [0, 1])")
        return v

    @field_validator("shifts")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or any(s < 1 for s in v)):
            raise ValueError("must be a non-empty list of shifts >= 1")
        return v


# --------------------------------------------------------------------------------- probes
class ProbeTaskConfig(_Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(ge=1)
    lr_range: tuple[float, float]
    weight_decay_range: tuple[float, float] = (1e-5, 1e-4)
    trials: int = Field(5, ge=1)

    @field_validator("lr_range", "weight_decay_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v


_PROBE_TASK_DEFAULTS = {  # the paper's (supp. C): batch size and learning-rate range differ per task
    "classification": {"batch_size": 1024, "lr_range": (1e-3, 1e-2)},
    "segmentation": {"batch_size": 64, "lr_range": (1e-3, 1e-2)},
    "depth": {"batch_size": 8, "lr_range": (1e-1, 1.0)},
}


class ProbesConfig(_Section):
    classification: ProbeTaskConfig = ProbeTaskConfig(**_PROBE_TASK_DEFAULTS["classification"])
    segmentation: ProbeTaskConfig = ProbeTaskConfig(**_PROBE_TASK_DEFAULTS["segmentation"])
    depth: ProbeTaskConfig = ProbeTaskConfig(**_PROBE_TASK_DEFAULTS["depth"])

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """A partial task section (e.g. ``--set probes.depth.epochs=2``) keeps that task's other
        defaults instead of failing for the fields it did not name."""
        if isinstance(data, dict):
            data = dict(data)
            for task, defaults in _PROBE_TASK_DEFAULTS.items():
                if isinstance(data.get(task), dict):
                    data[task] = {**defaults, **data[task]}
        return data
    depth_bins: int = Field(256, ge=2)
    max_depth: float = Field(10.0, gt=0, description="metres; upper edge of the depth bins")
    segmentation_classes: int = Field(150, ge=2, description="classes of the segmentation probe (ADE20K: 150); "
                                      "mask values must be below it or 255 (ignore)")
    worker_cpus: float | None = Field(
        None, gt=0, description="CPUs of each trial's Train worker; null = ray.cpus_per_actor. A probe trial is "
        "mostly start-up latency, so a fraction lets several trials share a small node")
    checkpoint_every: int = Field(
        5, ge=1, description="epochs between a probe trial's checkpoints (each also after the last epoch); a Train "
        "worker that dies is restarted from the newest one. Results do not depend on it")


# ------------------------------------------------------------------------------- zeroshot
# The seven-template ensemble the CLIP authors selected for ImageNet (openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb): close to the full 80-template accuracy.
DEFAULT_ZEROSHOT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


class ZeroShotConfig(_Section):
    """Zero-shot classification of ImageNet val for models with a text tower (METHOD §10)."""

    templates: tuple[str, ...] = Field(
        DEFAULT_ZEROSHOT_TEMPLATES, description="prompt templates, each with one '{}' for the class name; a class's "
        "text embedding is the renormalised mean over templates")
    class_names: str | tuple[str, ...] | None = Field(
        None, description="null = the val source's class ids (folder wnids, else label numbers: smoke tests only); "
        "a list of names in label order; or a path / s3:// URI of a .txt (one name per line, label order) or .json "
        "(a list, or an object keyed by label index or by wnid) file")
    text_batch_size: int = Field(256, ge=1, description="prompts per text-tower forward")
    image_embedding: Literal["class_token", "patch_mean"] = Field(
        "class_token", description="class_token = CLIP's own image embedding (encode_image: the class token through "
        "ln_post and proj), which removal reaches through the blocks after the designated one (the CLIP default "
        "layer is the penultimate block for this reason, METHOD §1); patch_mean = the mean of the final patch "
        "tokens after ln_post, through proj (our addition: unlike the class token it sees removal even when "
        "model.layer is set to the last block)")

    @field_validator("templates")
    @classmethod
    def _placeholder(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("needs at least one template")
        for t in v:
            if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
                raise ValueError(f"template {t!r} must contain exactly one '{{}}' (the class name) and no other braces")
        return v

    @field_validator("class_names")
    @classmethod
    def _names(cls, v):
        if isinstance(v, tuple) and (not v or any(not str(n).strip() for n in v)):
            raise ValueError("a class-name list must be non-empty and hold no blank names")
        if isinstance(v, str) and not v.strip():
            raise ValueError("must be null, a list of names or a file path")
        return v


# -------------------------------------------------------------------------------- storage
class StorageConfig(_Section):
    root: str = Field("results", description="results root: local path, file:// or s3://bucket/prefix")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, ...); credentials always come from the AWS chain"
    )
    lease_seconds: float = Field(
        120.0, ge=5, le=3600, description="a run holds each stage it writes by a lease renewed every third of this; "
        "a run that died on another host blocks the stage this long at most (docs/storage.md)")

    @field_validator("root")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"unsupported scheme in {v!r}; allowed: a local path, file://..., s3://...")
        # `s3:/bucket/x` or `s3//bucket/x` would silently be a local folder named `s3:` / `s3`,
        # which vanishes with a cluster's pods.
        if v.lower().startswith(("s3:", "s3//")) and not re.match(r"s3://[^/\s]+(/|$)", v):
            raise ValueError(f"{v!r} looks like an S3 URI but is not s3://bucket/prefix")
        return v


# ------------------------------------------------------------------------------------ ray
class RayConfig(_Section):
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS or a new local instance")
    num_actors: int = Field(1, ge=1, description="model actors per stage (one per GPU on a GPU cluster)")
    max_actors: int | None = Field(
        None, ge=1, description="autoscaling model-actor pools (the Ray Data stages: extract, eval-sae, instability, cds, "
        "probe-features; replaces ray.num_actors there): each pool starts at 1 actor and grows to this many as work "
        "waits and the cluster has (or, autoscaling, adds) room; not checked against the nodes present, so those stages "
        "run on a cluster that starts with no workers (train-sae and the probes still size from the nodes present). "
        "null = a fixed pool of ray.num_actors, sized and checked at the stage's start")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float | Literal["auto"] = Field(
        "auto", description="'auto' = 1 when the cluster has GPUs, else 0; a number > 0 fails at once on a GPU-less cluster"
    )
    gpus_per_sae_worker: float | Literal["auto"] = Field(
        "auto", description="GPUs per Ray Train SAE worker (DDP rank); 'auto' = 1 when the cluster has GPUs, else 0. "
        "With sae.num_workers >= 2 it must be 0 or a whole number: NCCL ranks cannot share a GPU")
    gpus_per_probe_worker: float | Literal["auto"] = Field(
        "auto", description="GPUs per probe trial (a one-worker Ray Train run); 'auto' = 1 when the cluster has GPUs, "
        "else 0. A fraction packs several small trials on one GPU")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per actor; default = cpus_per_actor")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per image-decoding task")
    read_cpus: float = Field(0.25, gt=0, description="CPUs per file-reading task (I/O-bound; Ray's default of 1 starves small nodes)")
    cluster_share: float = Field(
        1.0, gt=0, le=1, description="fraction of the cluster's CPUs and GPUs this job sizes its actor pools to. "
        "scope-ray sweep sets 1/max_concurrent for each job it runs at once, so that concurrent jobs' actors never "
        "hold every CPU between them (each would wait forever for the read tasks that feed it); an actor that does "
        "not fit its share beside those tasks asks for less (never for more than ray.cpus_per_actor)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning", description="how much of Ray's own logging reaches the terminal (Ray Data's plans and progress, "
        "Tune's tables, Train's set-up); scope-ray's progress and results are printed at any level")

    @field_validator("gpus_per_actor", "gpus_per_sae_worker", "gpus_per_probe_worker")
    @classmethod
    def _nonneg(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be 'auto' or a number >= 0")
        return v


# ------------------------------------------------------------------------------------ job
class JobConfig(_Section):
    name: str = Field("scope-ray", description="job name, used in logs and sweep tables")
    seed: int = Field(0, ge=0, description="one seed for every random choice (weights, token sampling, SAE, probes)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    extract: ExtractConfig = ExtractConfig()
    sae: SAEConfig = SAEConfig()
    scope: ScopeConfig = ScopeConfig()
    probes: ProbesConfig = ProbesConfig()
    zeroshot: ZeroShotConfig = ZeroShotConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    # Input digests (scope_ray.identity), computed once per job where first asked (the driver)
    # and shipped with the job to the Ray workers.
    _identities: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        spec = self.model.spec
        if not 1 <= self.model.resolved_layer <= spec.depth:
            raise _KeyError("model.layer", f"{self.model.layer} is out of range for {spec.name}; allowed: 1..{spec.depth}")
        q = self.dictionary_size
        if self.sae.k > q:
            raise _KeyError(
                "sae.k", f"{self.sae.k} is larger than the dictionary (expansion {self.sae.expansion} x width "
                f"{spec.width} = {q}); allowed: 1..{q}"
            )
        # The overlap must be at least 2x2 patches for the CDS normaliser sqrt(2)(p - s - 1) to be positive.
        max_shift = spec.grid - 2
        for key, shifts in (("scope.shift", (self.scope.shift,)), ("scope.shifts", self.scope.shifts or ())):
            bad = [s for s in shifts if s > max_shift]
            if bad:
                raise _KeyError(key, f"{bad[0]} leaves no 2x2 overlap on {spec.name}'s {spec.grid}x{spec.grid} grid; allowed: 1..{max_shift}")
        sae_gpus = self.ray.gpus_per_sae_worker
        if self.sae.num_workers > 1 and sae_gpus != "auto" and sae_gpus != int(sae_gpus):
            raise _KeyError("ray.gpus_per_sae_worker", f"{sae_gpus} would put several of the sae.num_workers="
                            f"{self.sae.num_workers} DDP ranks on one GPU (NCCL needs one GPU per rank); allowed: "
                            "0, a whole number, or 'auto'")
        if self.sae.batch_size % self.sae.num_workers:
            raise _KeyError("sae.batch_size", f"{self.sae.batch_size} does not split evenly over sae.num_workers="
                            f"{self.sae.num_workers} (it is the global batch); allowed: a multiple of {self.sae.num_workers}")
        if self.scope.min_usable_images > self.scope.k_cds:
            raise _KeyError("scope.min_usable_images", f"{self.scope.min_usable_images} exceeds scope.k_cds="
                            f"{self.scope.k_cds} (a CDS averages at most k_cds images); allowed: 1..{self.scope.k_cds}")
        if self.extract.val_split == self.extract.train_split:
            raise _KeyError("extract.val_split", f"{self.extract.val_split!r} is also the training split; allowed: "
                            "the other split, or null")
        n = self.extract.tokens_per_image
        if n > spec.num_patches:
            raise _KeyError("extract.tokens_per_image", f"{n} exceeds the {spec.num_patches} patches per image; allowed: 1..{spec.num_patches}")
        return self

    @property
    def dictionary_size(self) -> int:
        """q = expansion x the model's width (METHOD §2)."""
        return self.sae.expansion * self.model.spec.width

    @property
    def instability_shifts(self) -> tuple[int, ...]:
        if self.scope.shifts is not None:
            return self.scope.shifts
        return tuple(range(1, min(6, self.model.spec.grid - 2) + 1))

    def stage_hash(self, *sections: str, exclude: tuple[str, ...] = ()) -> str:
        """A short hash of the named sections (dotted keys) plus the seed: what a stage's output
        depends on. ``exclude`` drops keys that only steer how it runs (retries, logging)."""
        dumped = self.model_dump(mode="json")
        # Hash resolved values: an explicit setting equal to the registry default is the same job.
        dumped["model"]["layer"] = self.model.resolved_layer
        dumped["model"]["tau"] = self.model.resolved_tau
        # Keys added after results were committed, at their neutral value, leave those results'
        # hashes as they were (an imported SAE without input normalisation is not re-imported,
        # and the stages after it not redone, because the key now exists).
        source = dumped["sae"].get("source")
        if isinstance(source, dict) and source.get("input_normalization") is None:
            source.pop("input_normalization", None)
        for key in exclude:
            *parents, leaf = key.split(".")
            node: Any = dumped
            for part in parents:
                node = node[part]
            node.pop(leaf)
        picked = {"seed": self.seed}
        for s in sections:
            node = dumped
            for part in s.split("."):
                node = node[part]
            picked[s] = node
            # What the files are, not only where: a dataset or weights replaced in place reruns
            # the stages that read them (scope_ray/identity.py).
            identity = self._input_identities(s)
            if identity:
                picked[f"{s}@content"] = identity
        blob = json.dumps(picked, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


    def _input_identities(self, section: str) -> dict[str, str]:
        """Digests of the files behind ``section`` (``model.weights``, a dataset, or one split)."""
        uris = []
        if section == "model.weights" and self.model.weights not in ("none", "pretrained"):
            uris.append(self.model.weights)
        if section == "sae" and self.sae.source is not None:
            uris.append(self.sae.source.path)  # an imported SAE's identity is its files' content
            norm = self.sae.source.input_normalization
            if norm is not None and norm.mean is not None:
                uris.append(norm.mean)  # so is the mean folded into it
        parts = section.split(".")
        if parts[0] == "data" and len(parts) >= 2 and parts[1] in ("imagenet", "ade20k", "nyud"):
            dataset = getattr(self.data, parts[1])
            for split in ([parts[2]] if len(parts) > 2 else ["train", "val"]):
                source = getattr(dataset, split, None)
                if source is not None:
                    uris.append(posixpath.dirname(source.path.rstrip("/")) if source.format == "manifest"
                                else source.path)
        try:
            cache = self._identities
        except (AttributeError, TypeError):  # a job built without its private state: no cache
            cache = {}
        out = {}
        for uri in uris:
            if uri not in cache:
                from scope_ray.identity import input_identity

                cache[uri] = input_identity(uri, self.storage.endpoint_url)
            out[uri] = cache[uri]
        return out


class _KeyError(ValueError):
    """Raised inside validators to carry the dotted key out through pydantic."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")


# --------------------------------------------------------------------------------- loading
def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        node = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if node is None:
            return []
    return list(getattr(node, "model_fields", {}))


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(JobConfig, loc)
            lines.append(f"{key}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            # Cross checks run on the whole tree (empty loc) and carry their own dotted key.
            lines.append(msg if loc == () else f"{key}: {msg} (got {e.get('input')!r})")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key}: {e['msg']}{got_s}")
    return "invalid job config:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set sae.k=32")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy, plain types
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


PLACEHOLDER = "PLACEHOLDER"  # what the shipped job specs put where a path of yours must go


def placeholders(job: "JobConfig") -> list[str]:
    """Dotted keys whose value still holds ``PLACEHOLDER``: a shipped spec not yet pointed at your
    data and results root. Valid as a config, but nothing can run on it."""
    def walk(tree, prefix: str) -> list[str]:
        if isinstance(tree, dict):
            return [k for key, value in tree.items() for k in walk(value, f"{prefix}{key}.")]
        if isinstance(tree, (list, tuple)):
            return [k for i, value in enumerate(tree) for k in walk(value, f"{prefix}{i}.")]
        return [prefix.rstrip(".")] if isinstance(tree, str) and PLACEHOLDER in tree else []

    return walk(job.model_dump(mode="json"), "")


# A job or sweep spec is a page of settings: anything larger is not one (a 10 MB spec took 42 s
# and 850 MB to load), and a handful of anchors is all a spec uses (a 601-byte "billion laughs"
# file expands without bound).
MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_ALIASES = 100
MAX_SPEC_VALUES = 100_000  # scalars, lists and mappings once aliases are expanded (a real spec: < 1,000)


def _check_expansion(tree: Any, limit: int = MAX_SPEC_VALUES) -> None:
    """Count the values ``tree`` holds with every alias expanded (PyYAML shares aliased objects,
    so the loaded tree is small; hashing or copying it expands them), stopping at ``limit``."""
    stack, seen = [tree], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise yaml.YAMLError(f"more than {limit:,} values once aliases are expanded: refused as an expansion bomb")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping and more than MAX_SPEC_ALIASES
    aliases (``*name``) in one document."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_SPEC_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_SPEC_ALIASES} aliases (*name): refused as an expansion bomb")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key] + 1}); "
                    "the first would be silently dropped", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, what: str, error: type[ConfigError] = ConfigError) -> dict:
    """The mapping a YAML file holds (empty file = {}); ``error`` naming the file when it is
    missing, too large, not UTF-8, not YAML (a key twice, too many aliases included), or not a
    mapping. ``what`` says which kind of file ("job", "sweep")."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise error(f"{what} file {str(path)!r} is {size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader) or {}
        _check_expansion(raw)
    except yaml.YAMLError as exc:
        raise error(f"{what} file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise error(f"{what} file {str(path)!r} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def load_config(source: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a job from a YAML path (or a dict, or None for all defaults) plus ``key=value`` overrides."""
    if source is None:
        raw: Any = {}
    elif isinstance(source, dict):
        raw = source
    else:
        raw = read_yaml_mapping(source, "job")
    if not isinstance(raw, dict):
        raise ConfigError("a job config must be a mapping of sections (model, data, sae, ...)")
    raw = apply_overrides(raw, list(overrides))
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


__all__ = ["ConfigError", "JobConfig", "SourceConfig", "load_config", "apply_overrides"]
